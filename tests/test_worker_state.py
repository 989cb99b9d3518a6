"""Tests of the worker's pure state machine: no sockets, no threads, no clock."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sluice._core.messages import (
    ComputeTaskMsg,
    FreeKeysMsg,
    MissingDataMsg,
    TaskErredMsg,
    TaskFinishedMsg,
)
from sluice._core.worker_commands import (
    Execute,
    ExecuteFailure,
    ExecuteSuccess,
    GatherDep,
    GatherDepFailure,
    GatherDepSuccess,
    Instruction,
    ReleaseData,
    SecedeTask,
    WorkerCommand,
)
from sluice._core.worker_state import MAX_PEERS_IN_FLIGHT, WORKER_LEGAL_EDGES, WorkerState
from sluice.events import ComputeRequested, Event, FreeRequested, Key, TaskTransition, from_dict

ME = "tcp://me:1"
A = "tcp://a:1"
B = "tcp://b:1"
C = "tcp://c:1"


class Harness:
    """A WorkerState with its whole log, checked after every command."""

    def __init__(self, nthreads: int = 2) -> None:
        self.state = WorkerState(ME, nthreads)
        self.log: list[Event] = []
        self.seen: list[Event] = []
        self.now = 0.0

    def __call__(self, cmd: WorkerCommand) -> tuple[list[Event], list[Instruction]]:
        self.now += 1.0
        events, out = self.state.handle(cmd, now=self.now, emit=self.seen.append)
        assert events == self.seen[len(self.log) :]
        self.log.extend(events)
        check_invariants(self.state, self.log, events, self.now)
        return events, out

    def compute(
        self, key: Key, who_has: Mapping[Key, tuple[str, ...]] | None = None, priority: int = 0
    ) -> tuple[list[Event], list[Instruction]]:
        return self(
            ComputeTaskMsg(
                worker=ME, key=key, who_has=who_has or {}, priority=priority, stimulus_id="c"
            )
        )

    def edges(self, events: list[Event]) -> list[tuple[Key, str, str]]:
        return [(e.key, e.start, e.finish) for e in events if isinstance(e, TaskTransition)]


def check_invariants(
    state: WorkerState, log: list[Event], new: list[Event], now: float | None = None
) -> None:
    """What must hold after every command, whatever the history."""
    assert [e.seq for e in log] == list(range(1, len(log) + 1))
    for e in new:
        assert e.source == ME
        if now is not None:
            assert e.time == now
        if isinstance(e, TaskTransition):
            assert (e.start, e.finish) in WORKER_LEGAL_EDGES
        # Events survive the JSON round trip, so a log file replays.
        assert from_dict(e.to_dict()) == e
    assert WorkerState.from_events(ME, state.nthreads, log).snapshot() == state.snapshot()
    assert len(state.executing) <= state.nthreads
    for key in state.executing:
        ts = state.tasks[key]
        assert ts.state == "executing"
        assert all(d.state == "memory" for d in ts.dependencies)
    for key, ts in state.tasks.items():
        assert ts.key == key
        # No task rests in released, and everything kept is needed.
        assert ts.state not in ("released", "forgotten")
        assert ts.requested or any(
            d.state in ("waiting", "ready", "executing", "long-running") for d in ts.dependents
        ), ts
        for d in ts.dependencies:
            assert state.tasks[d.key] is d and ts in d.dependents
        for d in ts.dependents:
            assert state.tasks[d.key] is d and ts in d.dependencies
        if ts.state == "ready":
            assert all(d.state == "memory" for d in ts.dependencies)
        if ts.state == "flight":
            assert ts.coming_from in state.in_flight_workers
        assert ME not in ts.who_has
    assert len(state.in_flight_workers) <= MAX_PEERS_IN_FLIGHT
    if state.ready:
        assert state.tasks[state.ready[0][2]].state == "ready"
    if len(state.executing) < state.nthreads:
        assert not state.snapshot()["ready"], "a thread is free but a ready task waits"


def of_type(out: list[Instruction], cls: type) -> list[Any]:
    return [i for i in out if isinstance(i, cls)]


# -- behaviour ------------------------------------------------------------------


def test_run_without_dependencies() -> None:
    """The hot path: requested, ready, executing, memory, reported."""
    h = Harness()
    events, out = h.compute("x")
    assert isinstance(events[0], ComputeRequested)
    assert h.edges(events) == [
        ("x", "released", "waiting"),
        ("x", "waiting", "ready"),
        ("x", "ready", "executing"),
    ]
    assert out == [Execute(key="x", stimulus_id="c")]
    events, out = h(ExecuteSuccess(key="x", nbytes=10, duration=0.5, stimulus_id="done"))
    assert h.edges(events) == [("x", "executing", "memory")]
    ev = events[0]
    assert isinstance(ev, TaskTransition)
    assert (ev.nbytes, ev.duration, ev.stimulus_id) == (10, 0.5, "done")
    assert out == [TaskFinishedMsg(worker=ME, key="x", nbytes=10, duration=0.5, stimulus_id="done")]
    assert h.state.tasks["x"].state == "memory"
    assert h.state.tasks["x"].nbytes == 10


def test_dependencies_fetched_from_two_peers() -> None:
    """Dependencies are grouped per peer, one request each; the task runs once all arrived."""
    h = Harness()
    events, out = h.compute("z", {"a1": (A,), "a2": (A,), "b1": (B,)})
    assert ("z", "released", "waiting") in h.edges(events)
    gathers = of_type(out, GatherDep)
    assert {g.worker: set(g.keys) for g in gathers} == {A: {"a1", "a2"}, B: {"b1"}}
    assert not of_type(out, Execute)
    flights = [e for e in events if isinstance(e, TaskTransition) and e.finish == "flight"]
    assert {(e.key, e.worker) for e in flights} == {("a1", A), ("a2", A), ("b1", B)}
    assert h.state.in_flight_workers == {A: {"a1", "a2"}, B: {"b1"}}

    events, out = h(GatherDepSuccess(worker=A, nbytes={"a1": 1, "a2": 2}))
    assert h.edges(events) == [("a1", "flight", "memory"), ("a2", "flight", "memory")]
    assert out == []
    events, out = h(GatherDepSuccess(worker=B, nbytes={"b1": 3}))
    assert h.edges(events) == [
        ("b1", "flight", "memory"),
        ("z", "waiting", "ready"),
        ("z", "ready", "executing"),
    ]
    assert out == [Execute(key="z", stimulus_id="")]

    # Once z is done, the fetched copies are dropped: the scheduler does not know them.
    events, out = h(ExecuteSuccess(key="z", nbytes=4))
    assert of_type(out, TaskFinishedMsg)
    (release,) = of_type(out, ReleaseData)
    assert set(release.keys) == {"a1", "a2", "b1"}
    assert set(h.state.tasks) == {"z"}
    assert not h.state.tasks["z"].dependencies


def test_dependency_in_memory_is_not_fetched() -> None:
    h = Harness()
    h.compute("x")
    h(ExecuteSuccess(key="x", nbytes=1))
    _, out = h.compute("y", {"x": (ME,)})
    assert out == [Execute(key="y", stimulus_id="c")]


def test_nthreads_limit_and_priority_order() -> None:
    """Never more than nthreads run; lower priority number first, then arrival order."""
    h = Harness(nthreads=2)
    for key, prio in [("a", 5), ("b", 5), ("c", 1), ("d", 5), ("e", 1)]:
        h.compute(key, priority=prio)
    assert h.state.executing == {"a", "b"}
    assert h.state.snapshot()["ready"] == ["c", "e", "d"]
    started = []
    for done in ["a", "b", "c", "e", "d"]:
        _, out = h(ExecuteSuccess(key=done))
        started += [i.key for i in of_type(out, Execute)]
        assert len(h.state.executing) <= 2
    assert started == ["c", "e", "d"]


def test_long_running_frees_a_thread() -> None:
    h = Harness(nthreads=1)
    h.compute("a")
    h.compute("b")
    assert h.state.executing == {"a"}
    events, out = h(SecedeTask(key="a"))
    assert h.edges(events)[0] == ("a", "executing", "long-running")
    assert out == [Execute(key="b", stimulus_id="")]
    events, out = h(ExecuteSuccess(key="a", nbytes=1))
    assert h.edges(events) == [("a", "long-running", "memory")]


def test_failure_keeps_exception() -> None:
    h = Harness()
    h.compute("x")
    events, out = h(
        ExecuteFailure(key="x", exception="ZeroDivisionError()", traceback="tb", duration=0.1)
    )
    assert h.edges(events) == [("x", "executing", "error")]
    ev = events[0]
    assert isinstance(ev, TaskTransition)
    assert (ev.exception, ev.traceback) == ("ZeroDivisionError()", "tb")
    assert out == [
        TaskErredMsg(
            worker=ME, key="x", exception="ZeroDivisionError()", traceback="tb", duration=0.1
        )
    ]
    ts = h.state.tasks["x"]
    assert (ts.state, ts.exception, ts.traceback) == ("error", "ZeroDivisionError()", "tb")


def test_compute_after_error_is_a_retry() -> None:
    h = Harness()
    h.compute("x")
    h(ExecuteFailure(key="x", exception="E"))
    events, out = h.compute("x")
    assert ("x", "error", "released") in h.edges(events)
    assert out == [Execute(key="x", stimulus_id="c")]
    assert h.state.tasks["x"].exception is None


def test_fetch_failure_falls_back_then_reports_missing() -> None:
    h = Harness()
    _, out = h.compute("z", {"d": (A, B)})
    (g,) = of_type(out, GatherDep)
    first = g.worker
    other = B if first == A else A
    events, out = h(GatherDepFailure(worker=first, keys=("d",)))
    assert h.edges(events) == [("d", "flight", "fetch"), ("d", "fetch", "flight")]
    assert of_type(out, GatherDep) == [GatherDep(worker=other, keys=("d",), stimulus_id="")]
    assert h.state.tasks["d"].who_has == {other}

    events, out = h(GatherDepFailure(worker=other, keys=("d",), stimulus_id="lost"))
    assert h.edges(events) == [
        ("d", "flight", "released"),
        ("z", "waiting", "released"),
        ("z", "released", "forgotten"),
        ("d", "released", "forgotten"),
    ]
    assert out == [
        MissingDataMsg(worker=ME, key="d", errant_workers=tuple(sorted([A, B])), stimulus_id="lost")
    ]
    assert h.state.tasks == {}
    # The scheduler sends the work again; it runs as new.
    _, out = h.compute("z", {"d": (C,)})
    assert of_type(out, GatherDep) == [GatherDep(worker=C, keys=("d",), stimulus_id="c")]


def test_dependency_with_no_holder_is_missing_at_once() -> None:
    h = Harness()
    _, out = h.compute("z", {"d": ()})
    assert of_type(out, MissingDataMsg) == [
        MissingDataMsg(worker=ME, key="d", errant_workers=(), stimulus_id="c")
    ]
    assert h.state.tasks == {}


def test_at_most_a_few_peers_in_flight() -> None:
    h = Harness()
    peers = [f"tcp://p{i}:1" for i in range(MAX_PEERS_IN_FLIGHT + 2)]
    _, out = h.compute("z", {f"d{i}": (p,) for i, p in enumerate(peers)})
    assert len(of_type(out, GatherDep)) == MAX_PEERS_IN_FLIGHT
    busy = next(iter(h.state.in_flight_workers))
    (key,) = h.state.in_flight_workers[busy]
    _, out = h(GatherDepSuccess(worker=busy, nbytes={key: 1}))
    assert len(of_type(out, GatherDep)) == 1


def test_free_while_executing_discards_late_result() -> None:
    h = Harness(nthreads=1)
    h.compute("x")
    h.compute("y")
    events, out = h(FreeKeysMsg(worker=ME, keys=("x",), stimulus_id="free"))
    assert isinstance(events[0], FreeRequested)
    assert h.edges(events) == [
        ("x", "executing", "released"),
        ("x", "released", "forgotten"),
        ("y", "ready", "executing"),
    ]
    assert out == [Execute(key="y", stimulus_id="free")]
    events, out = h(ExecuteSuccess(key="x", nbytes=1))
    assert (events, out) == ([], [])
    assert "x" not in h.state.tasks


def test_free_ready_task() -> None:
    h = Harness(nthreads=1)
    h.compute("x")
    h.compute("y")
    events, out = h(FreeKeysMsg(worker=ME, keys=("y",)))
    assert h.edges(events) == [("y", "ready", "released"), ("y", "released", "forgotten")]
    assert out == []
    _, out = h(ExecuteSuccess(key="x"))
    assert not of_type(out, Execute)


def test_free_memory_keys_releases_data() -> None:
    h = Harness()
    h.compute("x")
    h(ExecuteSuccess(key="x", nbytes=1))
    events, out = h(FreeKeysMsg(worker=ME, keys=("x", "unknown"), stimulus_id="f"))
    assert h.edges(events) == [("x", "memory", "released"), ("x", "released", "forgotten")]
    assert out == [ReleaseData(keys=("x",), stimulus_id="f")]
    assert h.state.tasks == {}


def test_free_of_key_still_needed_here_waits_for_dependent() -> None:
    h = Harness()
    h.compute("x")
    h(ExecuteSuccess(key="x", nbytes=1))
    h.compute("y", {"x": (ME,)})
    events, out = h(FreeKeysMsg(worker=ME, keys=("x",)))
    assert h.edges(events) == [] and out == []
    assert not h.state.tasks["x"].requested
    events, out = h(ExecuteSuccess(key="y", nbytes=1))
    assert ("x", "released", "forgotten") in h.edges(events)
    assert ReleaseData(keys=("x",), stimulus_id="") in out


def test_free_waiting_task_drops_its_fetches() -> None:
    h = Harness()
    h.compute("z", {"d": (A,), "e": (B,)})
    h(GatherDepSuccess(worker=A, nbytes={"d": 1}))
    events, out = h(FreeKeysMsg(worker=ME, keys=("z",)))
    assert out == [ReleaseData(keys=("d",), stimulus_id="")]
    assert set(h.edges(events)) >= {
        ("z", "waiting", "released"),
        ("d", "memory", "released"),
        ("e", "flight", "released"),
    }
    assert h.state.tasks == {} and h.state.in_flight_workers == {}
    # The late reply from B is discarded.
    assert h(GatherDepSuccess(worker=B, nbytes={"e": 1})) == ([], [])


def test_duplicate_compute_of_key_in_memory() -> None:
    h = Harness()
    h.compute("x")
    h(ExecuteSuccess(key="x", nbytes=7, duration=2.0))
    events, out = h.compute("x")
    assert events == []
    assert out == [TaskFinishedMsg(worker=ME, key="x", nbytes=7, duration=2.0, stimulus_id="c")]


def test_duplicate_compute_while_running_is_ignored() -> None:
    h = Harness()
    h.compute("x")
    assert h.compute("x") == ([], [])


def test_stale_inputs_are_ignored() -> None:
    h = Harness()
    h.compute("x")
    stale: list[WorkerCommand] = [
        ExecuteSuccess(key="nope"),
        ExecuteFailure(key="nope"),
        GatherDepSuccess(worker=A, nbytes={"nope": 1}),
        GatherDepFailure(worker=A, keys=("nope",)),
        FreeKeysMsg(worker=ME, keys=("nope",)),
        SecedeTask(key="nope"),
    ]
    for cmd in stale:
        assert h(cmd) == ([], [])
    h(ExecuteSuccess(key="x", nbytes=1))
    assert h(ExecuteSuccess(key="x", nbytes=2)) == ([], [])
    assert h(ExecuteFailure(key="x")) == ([], [])
    assert h.state.tasks["x"].nbytes == 1


def test_rebuilt_state_decides_like_the_live_one() -> None:
    """A state folded from the log carries on exactly as the live one would."""
    h = Harness(nthreads=1)
    h.compute("x", priority=2)
    h.compute("y", {"d": (A, B), "e": (B,)}, priority=1)
    h.compute("z", priority=0)
    rebuilt = WorkerState.from_events(ME, 1, h.log)
    rest: list[WorkerCommand] = [
        GatherDepFailure(worker=A, keys=("d",)),
        GatherDepSuccess(worker=B, nbytes={"d": 1, "e": 2}),
        ExecuteSuccess(key="x", nbytes=1),
        FreeKeysMsg(worker=ME, keys=("z",)),
        ExecuteSuccess(key="y", nbytes=1),
    ]
    for cmd in rest:
        assert h(cmd) == rebuilt.handle(cmd, now=h.now)


def test_apply_rejects_bad_logs() -> None:
    h = Harness()
    h.compute("x")
    log = h.log
    with pytest.raises(ValueError, match="seq"):
        WorkerState.from_events(ME, 2, log[1:])
    with pytest.raises(ValueError, match="seq"):
        WorkerState.from_events(ME, 2, [log[0], log[0]])
    state = WorkerState.from_events(ME, 2, log[:1])
    bad_start = TaskTransition(seq=2, source=ME, key="x", start="waiting", finish="ready")
    with pytest.raises(ValueError, match="which is released"):
        state.apply(bad_start)
    illegal = TaskTransition(seq=2, source=ME, key="x", start="released", finish="memory")
    with pytest.raises(ValueError, match="illegal"):
        state.apply(illegal)
    foreign = TaskTransition(seq=2, source=A, key="x", start="released", finish="waiting")
    with pytest.raises(ValueError, match="applied to worker"):
        state.apply(foreign)


# -- random histories -------------------------------------------------------------

KEYS = [f"k{i}" for i in range(8)]
PEERS = [A, B, C]


class WorkerMachine(RuleBasedStateMachine):
    """Random scheduler messages, task completions and peer replies."""

    def __init__(self) -> None:
        super().__init__()
        self.h = Harness(nthreads=2)

    def _in(self, state: str) -> list[Key]:
        return sorted(k for k, ts in self.h.state.tasks.items() if ts.state == state)

    @rule(
        key=st.sampled_from(KEYS),
        deps=st.dictionaries(
            st.sampled_from(KEYS), st.lists(st.sampled_from([*PEERS, ME]), max_size=2), max_size=3
        ),
        priority=st.integers(0, 3),
    )
    def compute(self, key: str, deps: dict[str, list[str]], priority: int) -> None:
        who_has: dict[Key, tuple[str, ...]] = {d: tuple(p) for d, p in deps.items() if d != key}
        self.h.compute(key, who_has, priority)

    @precondition(lambda self: self.h.state.executing or self.h.state.long_running)
    @rule(data=st.data(), fail=st.booleans())
    def finish(self, data: st.DataObject, fail: bool) -> None:
        key = data.draw(st.sampled_from(self._in("executing") + self._in("long-running")))
        if fail:
            self.h(ExecuteFailure(key=key, exception="E", traceback="tb", duration=1.0))
        else:
            self.h(ExecuteSuccess(key=key, nbytes=3, duration=1.0))

    @precondition(lambda self: self.h.state.executing)
    @rule(data=st.data())
    def secede(self, data: st.DataObject) -> None:
        self.h(SecedeTask(key=data.draw(st.sampled_from(self._in("executing")))))

    @precondition(lambda self: self.h.state.in_flight_workers)
    @rule(data=st.data(), ok=st.booleans())
    def gather(self, data: st.DataObject, ok: bool) -> None:
        peer = data.draw(st.sampled_from(sorted(self.h.state.in_flight_workers)))
        keys = sorted(self.h.state.in_flight_workers[peer])
        some = data.draw(st.lists(st.sampled_from(keys), min_size=1, unique=True))
        if ok:
            self.h(GatherDepSuccess(worker=peer, nbytes={k: 5 for k in some}))
        else:
            self.h(GatherDepFailure(worker=peer, keys=tuple(some)))

    @rule(keys=st.lists(st.sampled_from(KEYS), min_size=1, max_size=4))
    def free(self, keys: list[str]) -> None:
        self.h(FreeKeysMsg(worker=ME, keys=tuple(keys)))

    @rule(key=st.sampled_from(KEYS), peer=st.sampled_from(PEERS))
    def stale_reply(self, key: str, peer: str) -> None:
        ts = self.h.state.tasks.get(key)
        if ts is None or ts.state not in ("flight", "executing", "long-running"):
            before = self.h.state.snapshot()
            assert self.h(ExecuteSuccess(key=key)) == ([], [])
            if ts is None or ts.coming_from != peer:
                assert self.h(GatherDepSuccess(worker=peer, nbytes={key: 1})) == ([], [])
            assert self.h.state.snapshot() == before

    @invariant()
    def replayable(self) -> None:
        check_invariants(self.h.state, self.h.log, [])


TestWorkerMachine = WorkerMachine.TestCase
TestWorkerMachine.settings = settings(
    max_examples=50,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
