"""replay(): plugins and sinks driven from a recorded log see what they saw live."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from sluice import SchedulerPlugin, SchedulerState
from sluice._core.commands import AddClient, AddWorker, RemoveWorker, UpdateGraph
from sluice._core.messages import ComputeTaskMsg, TaskErredMsg, TaskFinishedMsg
from sluice.events import Event, UserEvent
from sluice.replay import read_events, replay
from sluice.sinks import Sink
from sluice.sinks.eventlog import EventLog


class Recorder(SchedulerPlugin):
    """Writes down every hook call and what ``scheduler.tasks`` showed at that moment."""

    def __init__(self) -> None:
        self.scheduler: Any = None
        self.calls: list[tuple[Any, ...]] = []

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        ts = self.scheduler.tasks[key]
        deps = sorted(str(d.key) for d in ts.dependencies)
        worker = ts.processing_on.address if ts.processing_on is not None else None
        exception = kwargs.get("exception")
        self.calls.append(("transition", key, start, finish, ts.state, deps, worker, exception))

    def update_graph(self, scheduler: Any, *, keys: Any, dependencies: Any, **kw: Any) -> None:
        self.calls.append(("update_graph", sorted(map(str, keys)), len(dependencies)))

    def add_worker(self, scheduler: Any, worker: str) -> None:
        self.calls.append(("add_worker", worker, sorted(scheduler.workers)))

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        self.calls.append(("remove_worker", worker, sorted(scheduler.workers)))

    def add_client(self, scheduler: Any, client: str) -> None:
        self.calls.append(("add_client", client))

    def log_event(self, topic: str, msg: Any) -> None:
        self.calls.append(("log_event", topic, msg))


def live_run(plugin: Recorder) -> list[Event]:
    """A small run with a dependency chain, a failure and a worker loss, plugin inline."""
    state = SchedulerState()
    plugin.scheduler = state
    events: list[Event] = []

    def emit(event: Event) -> None:
        events.append(event)
        dispatch_live(plugin, state, event)

    def handle(cmd: Any) -> list[ComputeTaskMsg]:
        _, messages = state.handle(cmd, now=float(len(events)), emit=emit)
        return [m for m in messages if isinstance(m, ComputeTaskMsg)]

    handle(AddWorker(worker="tcp://a"))
    handle(AddWorker(worker="tcp://b"))
    handle(AddClient(client="c"))
    deps = {"x": (), "y": ("x",), "z": ("y",), "bad": ()}
    todo = handle(UpdateGraph(client="c", keys=("z", "bad"), dependencies=deps))
    while todo:
        msg = todo.pop(0)
        if msg.key == "bad":
            todo += handle(TaskErredMsg(worker=msg.worker, key="bad", exception="ValueError(1)"))
        elif msg.key == "y":
            # The worker running y dies before finishing it.
            todo = [m for m in todo if m.worker != msg.worker]
            todo += handle(RemoveWorker(worker=msg.worker, reason="lost"))
            if not todo:
                break
        else:
            todo += handle(TaskFinishedMsg(worker=msg.worker, key=msg.key, nbytes=8))
    stamped = state.record(UserEvent(topic="note", msg={"ok": True}), now=99.0)
    emit(stamped)
    return events


def dispatch_live(plugin: Recorder, state: SchedulerState, event: Event) -> None:
    """What the live server does for an inline plugin: the same hook routing as replay."""
    from sluice._replay_driver import _plugin_dispatch, _Runner

    _plugin_dispatch(event, plugin, state, _Runner())


def test_a_plugin_replayed_from_the_events_sees_what_it_saw_live() -> None:
    live = Recorder()
    events = live_run(live)
    assert any(c[0] == "remove_worker" for c in live.calls)
    assert any(c[0] == "transition" and c[3] == "erred" for c in live.calls)

    replayed = Recorder()

    class Capture(SchedulerPlugin):
        # The replayed plugin learns its scheduler the Dask way: from a hook argument.
        def add_worker(self, scheduler: Any, worker: str) -> None:
            replayed.scheduler = scheduler

    final = replay(events, Capture(), replayed)
    assert replayed.calls == live.calls
    assert final.seq == events[-1].seq


def test_replay_from_an_event_log_on_disk(tmp_path: Path) -> None:
    live = Recorder()
    events = live_run(live)
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    log.write(events)
    log.close()

    replayed = Recorder()

    class Capture(SchedulerPlugin):
        def add_worker(self, scheduler: Any, worker: str) -> None:
            replayed.scheduler = scheduler

    final = replay(read_events(path), Capture(), replayed)
    assert replayed.calls == live.calls
    live_state = SchedulerState.from_events(events)
    assert final.snapshot() == live_state.snapshot()


def test_sinks_get_start_batches_flush_close_and_only_their_kinds() -> None:
    events = live_run(Recorder())

    class Collect(Sink):
        kinds = frozenset({"task-transition"})

        def __init__(self) -> None:
            self.calls: list[str] = []
            self.events: list[Event] = []

        def start(self) -> None:
            self.calls.append("start")

        def write(self, batch: Sequence[Event]) -> None:
            self.calls.append("write")
            self.events.extend(batch)

        def flush(self) -> None:
            self.calls.append("flush")

        def close(self) -> None:
            self.calls.append("close")

    sink = Collect()
    seen: list[int] = []
    replay(events, sink, lambda e: seen.append(e.seq))
    assert sink.events == [e for e in events if e.kind == "task-transition"]
    assert sink.calls == ["start", "write", "flush", "close"]
    assert seen == [e.seq for e in events]


def test_plugins_are_started_and_closed_as_on_a_live_scheduler() -> None:
    events = live_run(Recorder())
    calls: list[tuple[Any, ...]] = []

    class Lifecycle(SchedulerPlugin):
        async def start(self, scheduler: Any) -> None:
            # Before the first event: the rebuilt scheduler is still empty.
            calls.append(("start", dict(scheduler.tasks), dict(scheduler.workers)))

        def transition(self, key: Any, start: str, finish: str, *a: Any, **kw: Any) -> None:
            if not calls or calls[-1][0] != "transition":
                calls.append(("transition",))

        async def before_close(self) -> None:
            calls.append(("before_close",))

        def close(self) -> None:  # type: ignore[override]  # a sync hook works too
            calls.append(("close",))

    class Duck:
        """No base class: its hooks are called all the same."""

        def start(self, scheduler: Any) -> None:
            calls.append(("duck-start",))

        def transition(self, *args: Any, **kwargs: Any) -> None:
            pass

        def close(self) -> None:
            calls.append(("duck-close",))

    replay(events, Lifecycle(), Duck())
    assert calls == [
        ("start", {}, {}),
        ("duck-start",),
        ("transition",),
        ("before_close",),
        ("close",),
        ("duck-close",),
    ]


def test_async_hooks_are_awaited() -> None:
    events = live_run(Recorder())

    class AsyncPlugin(SchedulerPlugin):
        def __init__(self) -> None:
            self.finished: list[Any] = []

        async def transition(self, key: Any, start: str, finish: str, *a: Any, **kw: Any) -> None:
            if finish == "memory":
                self.finished.append(key)

    plugin = AsyncPlugin()
    replay(events, plugin)
    assert plugin.finished == [
        e.key for e in events if getattr(e, "finish", None) == "memory" and e.source == "scheduler"
    ]
    assert plugin.finished  # the run did finish tasks


def test_the_replayed_scheduler_is_read_only_and_can_be_switched_off() -> None:
    events = live_run(Recorder())
    seen: list[Any] = []

    class Meddler(SchedulerPlugin):
        def add_worker(self, scheduler: Any, worker: str) -> None:
            seen.append(scheduler)
            with pytest.raises(TypeError):
                scheduler.tasks["x"] = None
            with pytest.raises(AttributeError, match="read-only"):
                scheduler.add_plugin(self)

    replay(events, Meddler())
    assert len(seen) == 2

    seen.clear()

    class Blind(SchedulerPlugin):
        def add_worker(self, scheduler: Any, worker: str) -> None:
            seen.append(scheduler)

    # A partial log (not starting at seq 1) cannot be folded; without a view it still drives.
    replay(events[3:], Blind(), scheduler_view=False)
    replay(events, Blind(), scheduler_view=False)
    assert seen == [None, None]
