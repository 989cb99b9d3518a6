"""Helpers for testing the pure scheduler: a checking harness and state invariants."""

from __future__ import annotations

from typing import Any

from sluice._core.commands import Command
from sluice._core.messages import ComputeTaskMsg, Message, TaskFinishedMsg
from sluice._core.scheduler_state import DEFAULT_SATURATION, SchedulerState
from sluice._core.transitions import ACTIVE, LEGAL_EDGES
from sluice.events import Event, GraphUpdated, Key, Restarted, TaskTransition


class Harness:
    """Drives a SchedulerState and checks every event it emits as it comes out.

    It keeps the whole log, a mirror of each task's state built only from the
    events, and checks that every transition starts where the mirror says the
    task is and follows a legal edge.
    """

    def __init__(self, worker_saturation: float = DEFAULT_SATURATION) -> None:
        self.state = SchedulerState(worker_saturation)
        # Fed the same commands: its tasks hash differently (by id), so any
        # decision that leaked set order would make the two logs differ.
        self.twin = SchedulerState(worker_saturation)
        self.log: list[Event] = []
        self.mirror: dict[Key, str] = {}
        self.now = 0.0

    def _check(self, event: Event) -> None:
        state = self.state
        assert event.seq == len(self.log) + 1, (event.seq, len(self.log))
        assert event.seq == state.seq
        if isinstance(event, TaskTransition):
            assert (event.start, event.finish) in LEGAL_EDGES, event
            assert self.mirror.get(event.key) == event.start, (event, self.mirror.get(event.key))
            if event.finish == "forgotten":
                del self.mirror[event.key]
                # Still readable by inline consumers during its -> forgotten transition.
                assert state.tasks[event.key].state == "forgotten"
            else:
                self.mirror[event.key] = event.finish
            assert state.tasks[event.key].state == event.finish
        elif isinstance(event, GraphUpdated):
            for key in event.dependencies:
                assert key not in self.mirror
                self.mirror[key] = "released"
        elif isinstance(event, Restarted):
            self.mirror.clear()
        self.log.append(event)

    def run(self, cmd: Command) -> tuple[list[Event], list[Message]]:
        self.now += 1.0
        events, messages = self.state.handle(cmd, now=self.now, emit=self._check)
        assert self.twin.handle(cmd, now=self.now) == (events, messages)
        assert len(events) == 0 or self.log[-len(events) :] == events
        assert all(e.time == self.now for e in events)
        check_invariants(self.state)
        return events, messages

    def finish_all(self, messages: list[Message]) -> list[Message]:
        """Finish every task sent to a worker, and what that makes ready, to the end."""
        out: list[Message] = []
        todo = [m for m in messages if isinstance(m, ComputeTaskMsg)]
        while todo:
            m = todo.pop(0)
            _, msgs = self.run(TaskFinishedMsg(worker=m.worker, key=m.key, nbytes=1))
            out.extend(msgs)
            todo.extend(x for x in msgs if isinstance(x, ComputeTaskMsg))
        return out


def _needed(ts: Any) -> bool:
    return bool(ts.who_wants) or any(d.state in ACTIVE for d in ts.dependents)


def check_invariants(state: SchedulerState) -> None:
    """Everything the decisions promise to keep true between two commands."""
    workers = state.workers
    live = set(workers.values())
    for key, ts in state.tasks.items():
        assert ts.key == key
        if ts.state == "forgotten":
            continue
        for d in ts.dependencies:
            assert ts in d.dependents
            assert state.tasks.get(d.key) is d and d.state != "forgotten", (ts, d)
        for d in ts.dependents:
            assert ts in d.dependencies
            assert state.tasks.get(d.key) is d and d.state != "forgotten", (ts, d)
        if ts.state == "processing":
            assert ts.processing_on in live and ts in ts.processing_on.processing, ts
            assert all(d.state == "memory" for d in ts.dependencies), ts
        else:
            assert ts.processing_on is None, ts
        if ts.state == "memory":
            assert len(ts.who_has) == 1 and ts.who_has <= live, ts
            assert all(ts in w.has_what for w in ts.who_has)
            assert _needed(ts), f"{ts} in memory, needed by nobody"
        else:
            assert not ts.who_has, ts
        if ts.state in ACTIVE:
            assert _needed(ts), f"{ts} active but not needed"
            assert all(
                d.state in ("waiting", "no-worker", "processing", "memory") for d in ts.dependencies
            ), [(d, d.state) for d in ts.dependencies]
        if ts.state == "no-worker":
            assert not workers
            assert all(d.state == "memory" for d in ts.dependencies)
        if ts.state == "waiting" and all(d.state == "memory" for d in ts.dependencies):
            # Ready but held back: only a root, queued, while no worker has room.
            assert not ts.dependencies and ts in state._queued, f"{ts} ready, waits"
            assert all(state._room(w) <= 0 for w in workers.values()), f"{ts} queued, room"
        if ts.state == "erred":
            assert ts.who_wants or ts.dependents
            assert ts.exception is not None
        if ts.state == "released":
            assert not _needed(ts), ts
            assert ts.dependents, f"{ts} released, nothing refers to it: should be forgotten"
        for c in ts.who_wants:
            assert ts in state.clients[c].wants_what
    for ws in workers.values():
        for ts in ws.processing:
            assert ts.processing_on is ws and state.tasks[ts.key] is ts
        for ts in ws.has_what:
            assert ws in ts.who_has and state.tasks[ts.key] is ts
    for name, cs in state.clients.items():
        for ts in cs.wants_what:
            assert name in ts.who_wants and state.tasks[ts.key] is ts
    assert set(state.unrunnable) == {t for t in state.tasks.values() if t.state == "no-worker"}
    for ts in state._queued:
        assert ts.state == "waiting" and not ts.dependencies, ts
        assert state.tasks.get(ts.key) is ts
