"""Test your plugins and sinks from recorded event logs: helpers and pytest fixtures.

This module is a pytest plugin, loaded automatically wherever sluice is
installed (entry point ``pytest11``). It only defines fixtures, so a test
suite that does not ask for them runs exactly as before; the scheduler and
cluster machinery is imported only by the fixtures that need it.

Fixtures:

- ``sluice_recorder``: a fresh :class:`Recorder` (detached at teardown).
- ``sluice_replay``: :func:`replay_log`, to drive a plugin or sink from a log.
- ``sluice_cluster`` (async, ``@pytest.mark.anyio``): an in-process scheduler,
  workers and an async client, with a recorder on the scheduler's bus; a
  plugin or sink that raised during the test fails it at teardown.
  ``@pytest.mark.sluice_cluster(n_workers=2, nthreads=1)`` sizes it.

Helpers, usable with or without the fixtures: :func:`replay_log`,
:func:`assert_story`, :func:`story`, :func:`transitions`, :func:`as_events`.
A "log" is anything of: the path of an event log, a :class:`Recorder`, or an
iterable of events. See ``docs/testing.md``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from sluice._testing_recorder import (
    EventSource,
    Recorder,
    Step,
    as_events,
    assert_story,
    story,
    transitions,
)
from sluice.events import Event, TaskTransition

if TYPE_CHECKING:
    from sluice._core.scheduler_state import SchedulerState
    from sluice._testing_cluster import InProcessCluster

__all__ = (
    "EventSource",
    "Recorder",
    "Step",
    "as_events",
    "assert_story",
    "replay_log",
    "sluice_cluster",
    "sluice_recorder",
    "sluice_replay",
    "story",
    "transitions",
)

# -- replay --------------------------------------------------------------------------

_HOOKS = (
    "transition",
    "update_graph",
    "add_worker",
    "remove_worker",
    "add_client",
    "remove_client",
    "restart",
    "log_event",
)


def _check_consumer(consumer: Any) -> None:
    """Refuse what replay would silently misuse, with a message that says why."""
    __tracebackhide__ = True
    from sluice.plugin import NannyPlugin, WorkerPlugin

    name = type(consumer).__name__
    if isinstance(consumer, type):
        raise TypeError(
            f"replay_log() got the class {consumer.__name__}, not an instance:"
            f" pass {consumer.__name__}(...)"
        )
    if isinstance(consumer, WorkerPlugin | NannyPlugin):
        kind = "WorkerPlugin" if isinstance(consumer, WorkerPlugin) else "NannyPlugin"
        raise TypeError(
            f"{name} is a {kind}: replay drives the scheduler's consumers (SchedulerPlugin"
            " objects, sinks with write(batch), and plain callables fn(event)); a worker"
            " plugin's transition hook would be handed the scheduler's transitions"
        )
    if not (
        hasattr(consumer, "write")
        or callable(consumer)
        or any(hasattr(consumer, h) for h in _HOOKS)
    ):
        raise TypeError(
            f"{consumer!r} is not a consumer replay can drive: it has no write(batch),"
            f" is not callable, and has none of the SchedulerPlugin hooks {', '.join(_HOOKS)}"
        )


class _Position:
    """Iterates the events for replay and remembers where it is, for error notes."""

    def __init__(self, events: list[Event]) -> None:
        self.events = events
        self.index = -1
        self.exhausted = False

    def __iter__(self) -> Iterator[Event]:
        for index, event in enumerate(self.events):
            self.index = index
            yield event
        self.exhausted = True

    def note(self, label: str) -> str:
        if self.index < 0:
            return f"sluice.testing: raised before the first event of {label} (a sink's start())"
        event = self.events[self.index]
        where = (
            f"after the last event of {label} (seq {event.seq}): in a sink's write, flush or close"
            if self.exhausted
            else f"while replaying event seq {event.seq} of {label}"
        )
        lines = [f"sluice.testing: raised {where}", f"  event: {_summary(event)}"]
        if isinstance(event, TaskTransition) and not self.exhausted:
            so_far = [
                f"{e.start} -> {e.finish}"
                for e in self.events[: self.index + 1]
                if isinstance(e, TaskTransition) and e.key == event.key and e.source == event.source
            ]
            lines.append(f"  story of {event.key!r} on {event.source} so far: {', '.join(so_far)}")
        return "\n".join(lines)


def _summary(event: Event) -> str:
    if isinstance(event, TaskTransition):
        extra = f", {event.exception}" if event.exception else ""
        return (
            f"task-transition {event.key!r} {event.start} -> {event.finish}"
            f" (source {event.source}{extra})"
        )
    fields = {k: v for k, v in event.to_dict().items() if k not in ("kind", "seq", "time")}
    text = ", ".join(f"{k}={v!r}" for k, v in fields.items())
    return f"{event.kind} ({text[:200]})"


def replay_log(
    log: EventSource,
    *consumers: Any,
    until: int | None = None,
    scheduler_view: bool = True,
) -> SchedulerState:
    """Drive ``consumers`` with a recorded run, as the live run did; return the final state.

    ``log`` is an event log's path, a :class:`Recorder` or an iterable of
    events. ``consumers`` are SchedulerPlugin objects, sinks (``write(batch)``)
    and plain callables ``fn(event)``, driven by :func:`sluice.replay.replay`
    (see it for which hooks are called); ``until`` stops after that seq
    (inclusive). Replay is strict: an exception raised by a consumer is not
    turned into a ``consumer-failed`` event but propagates with its own type
    and traceback, so the test fails there; a note on it says which event of
    the log was being replayed (and that task's story up to it).
    """
    __tracebackhide__ = True
    from sluice.replay import replay

    for consumer in consumers:
        _check_consumer(consumer)
    if isinstance(log, str | os.PathLike):
        label = os.fspath(log)
    elif isinstance(log, Recorder):
        label = "the recorder's events"
    else:
        label = "the events given"
    events = as_events(log)
    if until is not None:
        events = [e for e in events if e.seq <= until]
    position = _Position(events)
    try:
        return replay(position, *consumers, scheduler_view=scheduler_view)
    except Exception as exc:
        exc.add_note(position.note(label))
        raise


# -- fixtures ------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "sluice_cluster(n_workers=2, nthreads=1): size of the sluice_cluster fixture's cluster",
    )


@pytest.fixture
def sluice_recorder() -> Iterator[Recorder]:
    """A fresh :class:`Recorder`: ``recorder.attach(scheduler)`` or ``bus.subscribe(recorder)``."""
    recorder = Recorder()
    yield recorder
    recorder.detach()


@pytest.fixture
def sluice_replay() -> Callable[..., SchedulerState]:
    """:func:`replay_log`: ``sluice_replay(log, plugin_or_sink, ...) -> SchedulerState``."""
    return replay_log


@pytest.fixture
async def sluice_cluster(
    request: pytest.FixtureRequest, anyio_backend: Any
) -> AsyncIterator[InProcessCluster]:
    """An in-process scheduler, workers and async client, with a recorder on the scheduler.

    Yields an ``InProcessCluster`` (``scheduler``, ``workers``, ``client``,
    ``recorder``, ``address``). At teardown, a ``consumer-failed`` event
    (a plugin or sink that raised during the test) fails the test.
    """
    from sluice._testing_cluster import consumer_failures, in_process_cluster

    backend = anyio_backend if isinstance(anyio_backend, str) else anyio_backend[0]
    if backend != "asyncio":
        pytest.skip(f"sluice runs on asyncio, not {backend}")
    marker = request.node.get_closest_marker("sluice_cluster")
    options: dict[str, Any] = dict(marker.kwargs) if marker is not None else {}
    async with in_process_cluster(**options) as cluster:
        yield cluster
    failures = consumer_failures(cluster.recorder.events)
    cluster.recorder.detach()
    if failures:
        pytest.fail(
            "a plugin or sink raised during the test (see its traceback in the captured log):\n"
            + "\n".join(f"  {f}" for f in failures),
            pytrace=False,
        )
