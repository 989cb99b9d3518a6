"""Drive plugins and sinks from a recorded log, as the live run did, with no cluster.

The live scheduler applies each event to its state, then runs inline plugins,
then queues the event for sinks. Replay does the same in the same order: the
event is folded into a :class:`SchedulerState`, then each plugin hook is called
with a read-only view of that state, then sinks get the events in batches. So
a plugin that reads ``scheduler.tasks[key]`` in ``transition`` sees what it
would have seen live.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

import attrs
from anyio.from_thread import BlockingPortal, start_blocking_portal

from sluice._core.scheduler_state import SchedulerState
from sluice.events import (
    ClientAdded,
    ClientRemoved,
    Event,
    GraphUpdated,
    Restarted,
    SchedulerStarted,
    TaskTransition,
    UserEvent,
    WorkerAdded,
    WorkerRemoved,
)
from sluice.plugin import SchedulerPlugin

__all__ = ("ReplayedScheduler", "replay")

_SINK_BATCH = 1000


@attrs.frozen
class RecordedRun:
    """What a sink reads from its ``bus`` when it is fed a recorded run instead of a live bus."""

    run_id: str
    address: str | None = None


class ReplayedScheduler:
    """The ``scheduler`` a plugin gets during replay: the state at that event, read-only."""

    def __init__(self, state: SchedulerState, address: str = "") -> None:
        self._state = state
        self.address = address

    @property
    def tasks(self) -> Mapping[Any, Any]:
        return MappingProxyType(self._state.tasks)

    @property
    def workers(self) -> Mapping[str, Any]:
        return MappingProxyType(self._state.workers)

    @property
    def clients(self) -> Mapping[str, Any]:
        return MappingProxyType(self._state.clients)

    @property
    def state(self) -> SchedulerState:
        return self._state

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(
            f"the replayed scheduler is read-only and has no {name!r}"
            " (it offers tasks, workers, clients, address, state)"
        )


class _Runner:
    """Runs hooks that turn out to be coroutines, on a private event loop thread.

    ``replay`` is a plain function that may be called from sync code or from
    inside a running loop; a blocking portal works in both cases.
    """

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self._portal: BlockingPortal | None = None

    def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        result = fn(*args, **kwargs)
        if inspect.isawaitable(result):
            if self._portal is None:
                self._portal = self._stack.enter_context(start_blocking_portal())

            async def wait() -> None:
                await result

            self._portal.call(wait)

    def close(self) -> None:
        self._stack.close()


def _plugin_dispatch(event: Event, plugin: Any, view: Any, run: Callable[..., Any]) -> None:
    """Call the SchedulerPlugin hook that matches ``event``, if the plugin has it."""
    kind = type(event)
    if kind is TaskTransition:
        assert isinstance(event, TaskTransition)
        if event.source != "scheduler":
            return  # a worker's transition: scheduler plugins never see those live
        hook = getattr(plugin, "transition", None)
        if hook is not None:
            extra = {
                name: value
                for name in ("worker", "nbytes", "duration", "exception", "traceback")
                if (value := getattr(event, name)) is not None
            }
            run(hook, event.key, event.start, event.finish, stimulus_id=event.stimulus_id, **extra)
    elif kind is GraphUpdated:
        assert isinstance(event, GraphUpdated)
        hook = getattr(plugin, "update_graph", None)
        if hook is not None:
            run(
                hook,
                view,
                client=event.client,
                keys=set(event.keys),
                tasks=list(event.dependencies),
                annotations={},
                priority=dict(event.priority),
                dependencies={k: set(v) for k, v in event.dependencies.items()},
                stimulus_id=event.stimulus_id,
            )
    elif kind is WorkerAdded:
        assert isinstance(event, WorkerAdded)
        _maybe(plugin, "add_worker", run, scheduler=view, worker=event.worker)
    elif kind is WorkerRemoved:
        assert isinstance(event, WorkerRemoved)
        _maybe(
            plugin,
            "remove_worker",
            run,
            scheduler=view,
            worker=event.worker,
            stimulus_id=event.stimulus_id,
        )
    elif kind is ClientAdded:
        assert isinstance(event, ClientAdded)
        _maybe(plugin, "add_client", run, scheduler=view, client=event.client)
    elif kind is ClientRemoved:
        assert isinstance(event, ClientRemoved)
        _maybe(plugin, "remove_client", run, scheduler=view, client=event.client)
    elif kind is Restarted:
        _maybe(plugin, "restart", run, view)
    elif kind is UserEvent:
        assert isinstance(event, UserEvent)
        _maybe(plugin, "log_event", run, event.topic, event.msg)


def _maybe(plugin: Any, hook_name: str, run: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    hook = getattr(plugin, hook_name, None)
    if hook is not None:
        run(hook, *args, **kwargs)


def _lifecycle(plugin: Any, hook_name: str, run: Callable[..., Any], *args: Any) -> None:
    """``start``/``before_close``/``close``, skipped where the plugin kept the base class's
    no-op (an async one would start an event loop thread for nothing)."""
    if getattr(type(plugin), hook_name, None) is getattr(SchedulerPlugin, hook_name):
        return
    _maybe(plugin, hook_name, run, *args)


def replay(
    events: Iterable[Event],
    *consumers: Any,
    scheduler_view: bool = True,
    run_id: str | None = None,
    address: str | None = None,
) -> SchedulerState:
    """Drive ``consumers`` with ``events`` as the live run did; return the final state.

    A consumer with ``write(batch)`` is a sink: it gets ``start()``, the events
    of the kinds it wants in batches, then ``flush()`` and ``close()``. A plain
    callable gets ``fn(event)`` for every event. Anything else is a
    SchedulerPlugin: as on a live scheduler, ``start(scheduler)`` is called
    before the first event, then its event hooks (transition, update_graph,
    add/remove worker and client, restart, log_event) with a read-only
    ``scheduler`` rebuilt from the log (``None`` with ``scheduler_view=False``),
    and ``before_close()`` and ``close()`` after the last event, before the
    sinks get their last batch. Sync and async hooks both work.

    With ``scheduler_view=False`` the events are not folded into a state (so
    a partial log, one not starting at seq 1, can drive consumers too) and the
    returned state is empty.

    ``run_id`` (and ``address``) name the recorded run, as the header of its
    log does: a sink without a bus of its own is given them as its ``bus``, so
    what it stamps with the run id (an event log's header, RabbitMQ message
    ids) is what the live run's sinks stamped.
    """
    state = SchedulerState()
    view: ReplayedScheduler | None = ReplayedScheduler(state) if scheduler_view else None
    sinks = [c for c in consumers if hasattr(c, "write")]
    calls = [
        c for c in consumers if c not in sinks and callable(c) and not hasattr(c, "transition")
    ]
    plugins = [c for c in consumers if c not in sinks and c not in calls]
    batches: dict[int, list[Event]] = {id(s): [] for s in sinks}
    if run_id is not None:
        for sink in sinks:
            if getattr(sink, "bus", None) is None:
                sink.bus = RecordedRun(run_id, address)
    run = _Runner()
    try:
        for sink in sinks:
            _maybe(sink, "start", run)
        for plugin in plugins:
            _lifecycle(plugin, "start", run, view)
        for event in events:
            if scheduler_view:
                state.apply(event)
            if view is not None and type(event) is SchedulerStarted:
                assert isinstance(event, SchedulerStarted)
                view.address = event.address
            for fn in calls:
                fn(event)
            for plugin in plugins:
                _plugin_dispatch(event, plugin, view, run)
            for sink in sinks:
                kinds = getattr(sink, "kinds", None)
                if kinds is not None and event.kind not in kinds:
                    continue
                batch = batches[id(sink)]
                batch.append(event)
                if len(batch) >= _SINK_BATCH:
                    run(sink.write, batch)
                    batches[id(sink)] = []
        # As a live scheduler closes: the plugins, then the bus drains into the sinks.
        for hook in ("before_close", "close"):
            for plugin in plugins:
                _lifecycle(plugin, hook, run)
        for sink in sinks:
            if batches[id(sink)]:
                run(sink.write, batches[id(sink)])
            _maybe(sink, "flush", run)
            _maybe(sink, "close", run)
    finally:
        run.close()
    return state
