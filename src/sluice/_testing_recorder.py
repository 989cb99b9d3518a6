"""The recorder and the story helpers of :mod:`sluice.testing`.

Nothing here needs a cluster or pytest: a :class:`Recorder` is an inline bus
consumer that keeps every event it is given, and the story helpers read a
list of events, a recorder or an event log on disk alike.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from sluice.events import Event, Key, SchedulerStarted, TaskTransition, to_key

if TYPE_CHECKING:
    from sluice._core.scheduler_state import SchedulerState
    from sluice.bus import EventBus, Subscription

__all__ = (
    "EventSource",
    "Recorder",
    "Step",
    "as_events",
    "assert_story",
    "story",
    "transitions",
)

#: One step of a task's story: ``(start, finish)``.
Step: TypeAlias = tuple[str, str]

#: What the helpers accept as a run: events, a :class:`Recorder`, or the path of an event log.
EventSource: TypeAlias = "Iterable[Event] | Recorder | str | os.PathLike[str]"

SCHEDULER = "scheduler"


class Recorder:
    """An inline bus consumer that keeps every event it sees, in order.

    Subscribe it to any bus (``bus.subscribe(recorder)``: it is a plain
    callable, so it runs inline) or use :meth:`attach` with a bus, a
    ``Scheduler`` or a ``Worker``. ``kinds`` limits what is kept.
    """

    name = "sluice-recorder"

    def __init__(self, *, kinds: Iterable[str] | None = None) -> None:
        self.events: list[Event] = []
        #: The kinds kept (``None``: all); the bus reads this attribute too.
        self.kinds: frozenset[str] | None = frozenset(kinds) if kinds is not None else None
        self._bus: EventBus | None = None
        self._subscription: Subscription | None = None
        self._waiters: list[_Waiter] = []

    # -- consuming -------------------------------------------------------------------

    def __call__(self, event: Event) -> None:
        if self.kinds is not None and event.kind not in self.kinds:
            return
        self.events.append(event)
        if self._waiters:
            for waiter in list(self._waiters):
                if waiter.event is None and waiter.predicate(event):
                    waiter.wake(event)

    def attach(self, target: Any, *, since: int | None = 0, name: str | None = None) -> Recorder:
        """Subscribe to ``target``'s bus (an ``EventBus``, or anything with ``.bus``).

        ``since=0`` (the default) first replays what the bus still holds in its
        history, so attaching to a running scheduler misses nothing;
        ``since=None`` records only what comes next. Returns the recorder.
        """
        from sluice.bus import EventBus

        bus = target if isinstance(target, EventBus) else getattr(target, "bus", None)
        if not isinstance(bus, EventBus):
            raise TypeError(f"cannot attach a recorder to {target!r}: it has no event bus")
        if self._subscription is not None:
            raise RuntimeError("this recorder is already attached; detach() it first")
        if name is None:
            # Several recorders may listen to one bus: each gets a name of its own.
            taken = bus.subscriptions
            name = next(
                n
                for n in (self.name, *(f"{self.name}-{i}" for i in range(2, len(taken) + 3)))
                if n not in taken
            )
        self._subscription = bus.subscribe(
            self, name=name, mode="inline", kinds=self.kinds, since=since
        )
        self._bus = bus
        return self

    def detach(self) -> None:
        """Unsubscribe from the bus given to :meth:`attach` (a no-op if not attached)."""
        sub = self._subscription
        if (
            self._bus is not None
            and sub is not None
            and self._bus.subscriptions.get(sub.name) is sub
        ):
            self._bus.unsubscribe(sub.name)
        self._bus = None
        self._subscription = None

    def clear(self) -> None:
        """Forget the events recorded so far."""
        self.events.clear()

    async def wait_for(self, predicate: Callable[[Event], bool], *, timeout: float = 30.0) -> Event:
        """Wait until an event matching ``predicate`` has been recorded; return it.

        Events recorded already count (the first match is returned). Raises
        ``TimeoutError`` after ``timeout`` seconds. For tests against a live
        cluster: wait for what the test needs instead of sleeping. The bus may
        publish on another thread (a cluster run by a sync ``LocalCluster``).
        """
        import anyio

        waiter = _Waiter(predicate)
        self._waiters.append(waiter)  # first, so nothing recorded meanwhile is missed
        try:
            for event in list(self.events):
                if predicate(event):
                    return event
            with anyio.fail_after(timeout):
                await waiter.done.wait()
        finally:
            self._waiters.remove(waiter)
        assert waiter.event is not None
        return waiter.event

    # -- reading ---------------------------------------------------------------------

    def __iter__(self) -> Iterator[Event]:
        return iter(self.events)

    def __len__(self) -> int:
        return len(self.events)

    def __repr__(self) -> str:
        return f"<Recorder {len(self.events)} events>"

    def kind_counts(self) -> collections.Counter[str]:
        """How many events of each kind were recorded (a ``Counter``).

        (Not ``kinds()``: ``kinds`` is the attribute a bus reads to route events.)
        """
        return collections.Counter(e.kind for e in self.events)

    def transitions(
        self, key: Any = None, *, source: str | None = SCHEDULER
    ) -> list[TaskTransition]:
        """The task transitions recorded, of one ``key`` or of all; see :func:`transitions`."""
        return transitions(self.events, key, source=source)

    def story(self, key: Any, *, source: str | None = SCHEDULER) -> list[Step]:
        """``key``'s transitions as ``(start, finish)`` pairs; see :func:`story`."""
        return story(self.events, key, source=source)

    def state(self, until: int | None = None) -> SchedulerState:
        """The scheduler state these events fold into (up to seq ``until``, inclusive)."""
        from sluice._core.scheduler_state import SchedulerState

        return SchedulerState.from_events(self.events, until=until)

    def save(self, path: str | os.PathLike[str], *, run_id: str | None = None) -> Path:
        """Write the recorded events as an event log that ``sluice.replay.read_events`` reads.

        The event-log sink itself writes it (same header, same format), so the
        file replays exactly as a log the scheduler wrote. Like the sink, this
        never overwrites an existing log. Returns the path.
        """
        from sluice.sinks.eventlog import EventLog

        address = next(
            (e.address for e in self.events if isinstance(e, SchedulerStarted)),
            self._bus.address if self._bus is not None else None,
        )
        if run_id is None and self._bus is not None:
            run_id = self._bus.run_id
        log = EventLog(path, fsync="close", run_id=run_id, address=address or None)
        try:
            log.start()
            log.write(self.events)
        finally:
            log.close()
        return Path(path)


class _Waiter:
    """A pending :meth:`Recorder.wait_for`: woken on its loop, from whichever thread."""

    def __init__(self, predicate: Callable[[Event], bool]) -> None:
        import asyncio

        import anyio

        self.predicate = predicate
        self.done = anyio.Event()
        self.event: Event | None = None
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()

    def wake(self, event: Event) -> None:
        self.event = event
        if threading.get_ident() == self._thread:
            self.done.set()
        else:
            self._loop.call_soon_threadsafe(self.done.set)


# -- reading events --------------------------------------------------------------------


def as_events(log: EventSource) -> list[Event]:
    """The events of ``log``: a recorder, an event log's path, or any iterable of events."""
    if isinstance(log, Recorder):
        return list(log.events)
    if isinstance(log, str | os.PathLike):
        from sluice.replay import read_events

        return list(read_events(log))
    return list(log)


def _norm_key(key: Any) -> Key:
    # A key typed as a list (or read from JSON) means the tuple key.
    return to_key(key) if isinstance(key, list) else key


def transitions(
    log: EventSource, key: Any = None, *, source: str | None = SCHEDULER
) -> list[TaskTransition]:
    """The ``TaskTransition`` events of ``log``, in order.

    ``log`` is a list of events, a :class:`Recorder` or an event log's path.
    ``key`` keeps only that task's (``None``: every task). ``source`` keeps
    only the transitions made by ``"scheduler"`` (the default: the
    scheduler's own story, what a ``SchedulerPlugin`` sees), by one worker
    (its address), or by anyone (``None``).
    """
    events = as_events(log)
    key = _norm_key(key)
    return [
        e
        for e in events
        if isinstance(e, TaskTransition)
        and (key is None or e.key == key)
        and (source is None or e.source == source)
    ]


def story(log: EventSource, key: Any, *, source: str | None = SCHEDULER) -> list[Step]:
    """``key``'s story: its transitions as ``(start, finish)`` pairs, in order.

    By default the scheduler's transitions; ``source`` picks a worker's
    (its address) or everyone's (``None``), as in :func:`transitions`.
    """
    return [(e.start, e.finish) for e in transitions(log, key, source=source)]


# -- assertions ------------------------------------------------------------------------


def _describe(e: TaskTransition) -> str:
    extra = []
    if e.source != SCHEDULER:
        extra.append(f"on {e.source}")
    elif e.worker:
        extra.append(f"worker {e.worker}")
    if e.exception:
        extra.append(e.exception)
    tail = f"  ({', '.join(extra)})" if extra else ""
    return f"seq {e.seq}{tail}"


def _steps_table(
    actual: Sequence[TaskTransition], marks: dict[int, str], width: int = 28
) -> list[str]:
    lines = []
    for i, e in enumerate(actual):
        step = f"{e.start} -> {e.finish}"
        lines.append(f"  {marks.get(i, ' ')} {i + 1:>3}  {step:<{width}} {_describe(e)}")
    return lines or ["      (none)"]


def _expected_table(expected: Sequence[Step], marks: dict[int, str]) -> list[str]:
    lines = [f"  {marks.get(i, ' ')} {i + 1:>3}  {s} -> {f}" for i, (s, f) in enumerate(expected)]
    return lines or ["      (none)"]


def _who(key: Any, source: str | None) -> str:
    where = "anywhere" if source is None else f"source {source!r}"
    return f"story of {key!r} ({where})"


def _no_such_key(events: Sequence[Event], key: Any, source: str | None) -> str:
    keys: dict[str, Any] = {}
    for e in events:
        if isinstance(e, TaskTransition) and (source is None or e.source == source):
            keys.setdefault(repr(e.key), e.key)
    msg = f"{_who(key, source)}: no transition of this key in {len(events)} events"
    if not keys:
        return msg + " (there are no task transitions at all)"
    import difflib

    close = difflib.get_close_matches(repr(key), list(keys), n=3, cutoff=0.5)
    if close:
        return msg + f"; did you mean {' or '.join(close)}?"
    shown = ", ".join(list(keys)[:10]) + (", ..." if len(keys) > 10 else "")
    return msg + f"; keys with transitions: {shown}"


def _check_steps(expected: Sequence[Any]) -> list[Step]:
    steps = []
    for step in expected:
        if (
            not isinstance(step, tuple | list)
            or len(step) != 2
            or not all(isinstance(s, str) for s in step)
        ):
            raise TypeError(f"each expected step must be a (start, finish) pair, not {step!r}")
        steps.append((step[0], step[1]))
    return steps


def assert_story(
    log: EventSource,
    key: Any,
    expected: Sequence[Sequence[str]],
    *,
    partial: bool = False,
    source: str | None = SCHEDULER,
) -> list[TaskTransition]:
    """Assert that ``key``'s story in ``log`` is ``expected``; return its transitions.

    ``expected`` is a list of ``(start, finish)`` pairs. By default the story
    must be exactly that; with ``partial=True`` the pairs must appear in that
    order, other transitions may come between and around them. On a mismatch
    the ``AssertionError`` shows the actual story (seq, worker, exception of
    each step), the expected one, and marks the first divergence.
    ``source`` is as in :func:`transitions` (default: the scheduler).
    """
    __tracebackhide__ = True
    steps = _check_steps(expected)
    events = as_events(log)
    key = _norm_key(key)
    actual = transitions(events, key, source=source)
    got = [(e.start, e.finish) for e in actual]
    if not actual and steps:
        raise AssertionError(_no_such_key(events, key, source))
    if partial:
        _assert_subsequence(key, source, steps, actual)
    elif got != steps:
        n = next((i for i, (a, b) in enumerate(zip(got, steps, strict=False)) if a != b), None)
        if n is None:
            n = min(len(got), len(steps))
        head = f"{_who(key, source)} differs from the expected one at step {n + 1}:"
        want = f"{steps[n][0]} -> {steps[n][1]}" if n < len(steps) else "(the story ends)"
        was = f"{got[n][0]} -> {got[n][1]}  {_describe(actual[n])}" if n < len(got) else "(ends)"
        lines = [head, f"  expected: {want}", f"  actual:   {was}", ""]
        lines.append(f"actual story ({len(got)} transitions):")
        lines += _steps_table(actual, {n: ">"})
        lines.append(f"expected story ({len(steps)} transitions):")
        lines += _expected_table(steps, {n: ">"})
        raise AssertionError("\n".join(lines))
    return actual


def _assert_subsequence(
    key: Any, source: str | None, steps: list[Step], actual: list[TaskTransition]
) -> None:
    __tracebackhide__ = True
    matched: dict[int, str] = {}
    i = 0
    for n, step in enumerate(steps):
        while i < len(actual) and (actual[i].start, actual[i].finish) != step:
            i += 1
        if i == len(actual):
            after = (
                f"after step {max(matched) + 1} (seq {actual[max(matched)].seq})"
                if matched
                else "anywhere"
            )
            lines = [
                f"{_who(key, source)} lacks expected step {n + 1}, {step[0]} -> {step[1]}, {after}",
                "",
                f"actual story ({len(actual)} transitions; * = matched an expected step):",
            ]
            lines += _steps_table(actual, matched)
            lines.append(f"expected steps, in this order ({len(steps)}):")
            lines += _expected_table(steps, {m: "*" for m in range(n)} | {n: ">"})
            raise AssertionError("\n".join(lines))
        matched[i] = "*"
        i += 1
