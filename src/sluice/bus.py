"""The event bus: one per process, every consumer of events hangs off it.

Theory of operation
-------------------
``publish(event)`` is the hot path and does only O(1) work on the publishing
thread: it appends the event to the history ring and hands it to each
subscription routed for its kind. It never awaits and never blocks.

- An *inline* subscription is called right there, in order. This is how
  ``SchedulerPlugin.transition`` sees the scheduler exactly as it is.
- A *queued* subscription (the default for sinks) appends to a bounded queue
  of its own. A drain task on the event loop takes batches off that queue and
  hands them to the sink: ``async def write`` runs on the loop, a plain
  ``def write`` in a thread of its own, one batch at a time, so a slow sink
  never slows the publisher. When a queue passes ``maxsize`` its ``overflow``
  policy decides: ``"block"`` keeps every event and puts the bus *under
  pressure* (servers stop reading new work until ``wait_for_capacity()``
  returns); ``"drop"`` drops the oldest and counts it; ``"spill"`` writes the
  excess to a temporary file and feeds it back in order. While events keep
  coming, a drain task writes at most once per ``linger`` (20 ms by default),
  so a busy sink gets a few large batches, not hundreds of small ones.

A consumer that raises never breaks the publisher or the other consumers: the
failure is logged with its traceback, counted in :meth:`EventBus.stats`, and
reported as a ``UserEvent`` on topic ``consumer-failed`` (at most once per
consumer per second). ``EventBus(strict=True)`` re-raises instead, so a plugin
bug fails a test.

The bus stamps nothing the producer did not set: on the scheduler,
``SchedulerState`` owns the sequence numbers. The only events the bus makes
itself (``consumer-failed``) are stamped by the ``stamp`` callable it was given.
"""

from __future__ import annotations

import abc
import contextlib
import inspect
import itertools
import logging
import math
import os
import pickle
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from typing import IO, Any, Literal, Self

import anyio
import anyio.abc
import anyio.to_thread
import attrs

from sluice.events import Event, UserEvent

__all__ = ("DEFAULT_LINGER", "BusClosedError", "EventBus", "Subscription")

logger = logging.getLogger("sluice.bus")

Mode = Literal["inline", "queued"]
Overflow = Literal["block", "drop", "spill"]
Consumer = Any  # a callable fn(event), or an object with write(batch)

_FAILURE_REPORT_INTERVAL = 1.0  # seconds between consumer-failed events per consumer
_SPILL_CHUNK = 1000  # events per pickled chunk in a spill file
# For the consumer-failed rate limit; tests freeze it without freezing the event loop.
_clock = time.monotonic
#: Seconds a busy queued consumer waits between writes for its batch to grow.
DEFAULT_LINGER = 0.02


class BusClosedError(RuntimeError):
    """An event was published on a bus that is closed."""


def _default_name(consumer: Consumer) -> str:
    name = getattr(consumer, "name", None)
    if isinstance(name, str) and name:
        return name
    if inspect.isfunction(consumer) or inspect.ismethod(consumer):
        return str(consumer.__qualname__)
    return type(consumer).__name__.lower()


class Subscription(abc.ABC):
    """One consumer on a bus, with its delivery statistics."""

    mode: Mode

    def __init__(
        self, bus: EventBus, consumer: Consumer, name: str, kinds: frozenset[str] | None
    ) -> None:
        self.bus = bus
        self.consumer = consumer
        self.name = name
        self.kinds = kinds
        self.delivered = 0
        self.failed = 0
        self.dropped = 0
        self.spilled = 0  # events that went through a spill file (overflow="spill")
        self._last_report = -_FAILURE_REPORT_INTERVAL
        self._unreported = 0  # failures since the last one logged and reported

    def wants(self, kind: str) -> bool:
        return self.kinds is None or kind in self.kinds

    @abc.abstractmethod
    def deliver(self, event: Event) -> None:
        """Hand ``event`` on: call the consumer, or queue it for the drain task."""

    @property
    def lag(self) -> int:
        """Events accepted but not yet handed to the consumer."""
        return 0

    def stats(self) -> dict[str, int]:
        return {
            "delivered": self.delivered,
            "failed": self.failed,
            "dropped": self.dropped,
            "spilled": self.spilled,
            "lag": self.lag,
        }

    def _failure(self, exc: BaseException) -> None:
        self.failed += 1
        self.bus._consumer_failed(self, exc)


class _InlineSubscription(Subscription):
    mode: Mode = "inline"

    def __init__(
        self, bus: EventBus, consumer: Consumer, name: str, kinds: frozenset[str] | None
    ) -> None:
        super().__init__(bus, consumer, name, kinds)
        if callable(consumer):
            self._call: Callable[[Event], Any] = consumer
        else:
            # A sink subscribed inline gets one-event batches on the publisher.
            self._call = lambda event: consumer.write((event,))

    def deliver(self, event: Event) -> None:
        try:
            self._call(event)
        except Exception as exc:
            self._failure(exc)
            if self.bus.strict:
                raise
        else:
            self.delivered += 1


class _QueuedSubscription(Subscription):
    mode: Mode = "queued"

    def __init__(
        self,
        bus: EventBus,
        consumer: Consumer,
        name: str,
        kinds: frozenset[str] | None,
        *,
        maxsize: int,
        overflow: Overflow,
        max_batch: int,
        linger: float = 0.0,
    ) -> None:
        super().__init__(bus, consumer, name, kinds)
        # The sink's own filter, if it has one: what it would discard is never
        # queued, so it neither takes room in the queue nor gets spilled.
        self._accepts: Callable[[Event], bool] | None = getattr(consumer, "accepts", None)
        self.maxsize = maxsize
        self.linger = linger
        self._last_write = -math.inf
        self._hurry = anyio.Event()  # set by drain() and close(): stop lingering
        self.low_water = maxsize // 2
        self.overflow = overflow
        self.max_batch = max_batch
        self._queue: deque[Event] = deque()
        self._wakeup = anyio.Event()
        self._idle = True  # the drain task waits on _wakeup
        self._idle_event = anyio.Event()  # set while idle with nothing queued
        self._idle_event.set()
        self._closing = False
        self._closed = anyio.Event()
        self._is_async = inspect.iscoroutinefunction(consumer.write)
        self._limiter = anyio.CapacityLimiter(1)  # one thread at a time for this sink
        self._spill: _Spill | None = None
        self.error: BaseException | None = None

    # -- publisher side (event loop thread) ----------------------------------

    def deliver(self, event: Event) -> None:
        if self._accepts is not None and not self._accepts(event):
            return
        queue = self._queue
        if self._spill is not None:
            self._spill.append(event)
            self.spilled += 1
        elif len(queue) < self.maxsize:
            queue.append(event)
        elif self.overflow == "block":
            queue.append(event)
            self.bus._pressure_on(self)
        elif self.overflow == "drop":
            queue.popleft()
            queue.append(event)
            self.dropped += 1
        else:
            self._spill = _Spill(self.bus.spill_dir, self.name)
            self._spill.append(event)
            self.spilled += 1
        if self._idle:
            self._idle = False
            self._idle_event = anyio.Event()
            self._wakeup.set()

    @property
    def lag(self) -> int:
        spilled = self._spill.pending if self._spill is not None else 0
        return len(self._queue) + spilled

    # -- drain side ------------------------------------------------------------

    def _take_batch(self) -> list[Event]:
        queue = self._queue
        if not queue and self._spill is not None:
            # Memory is empty: feed back the spilled events, oldest first.
            queue.extend(self._spill.read_chunk())
            if self._spill.pending == 0:
                self._spill.close()
                self._spill = None
        if len(queue) <= self.max_batch:
            batch = list(queue)
            queue.clear()
        else:
            batch = [queue.popleft() for _ in range(self.max_batch)]
        if len(queue) <= self.low_water:
            self.bus._pressure_off(self)
        return batch

    async def _call(self, method: str, *args: Any) -> None:
        fn = getattr(self.consumer, method, None)
        if fn is None:
            return
        if inspect.iscoroutinefunction(fn):
            await fn(*args)
        else:
            result = await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)
            if inspect.isawaitable(result):
                await result

    async def run(self) -> None:
        """Drain the queue until the subscription is closed and empty."""
        try:
            await self._guarded("start")
            while True:
                if not self._queue and self._spill is None:
                    if self._closing:
                        break
                    self._idle = True
                    self._idle_event.set()
                    self._hurry = anyio.Event()
                    await self._wakeup.wait()
                    self._wakeup = anyio.Event()
                    continue
                await self._linger()
                batch = self._take_batch()
                if not batch:
                    continue
                self._last_write = anyio.current_time()
                if await self._guarded("write", batch):
                    self.delivered += len(batch)
            await self._guarded("flush")
            await self._guarded("close")
        finally:
            if self._spill is not None:
                self._spill.close()
            self.bus._pressure_off(self)
            self._idle_event.set()
            self._closed.set()

    async def _linger(self) -> None:
        """Let a small batch grow until ``linger`` seconds after the previous write.

        Each write of a sync sink is a hop to its thread and back, which costs the
        event loop more than the sink's work on a few events; under load, waiting
        a little turns hundreds of small writes a second into tens of large ones.
        Events that come after a quiet spell are not held back, and nothing
        waits while the bus is draining or closing, spilling, or has a full batch.
        """
        if not self.linger or self._closing or self._spill is not None:
            return
        if len(self._queue) >= self.max_batch or self._hurry.is_set():
            return
        wait = self._last_write + self.linger - anyio.current_time()
        if wait > 0:
            with anyio.move_on_after(wait):
                await self._hurry.wait()

    async def _guarded(self, method: str, *args: Any) -> bool:
        try:
            await self._call(method, *args)
        except Exception as exc:
            self._failure(exc)
            if self.bus.strict and self.error is None:
                self.error = exc
            return False
        return True

    def close(self) -> None:
        """Finish what is queued, then flush and close the sink."""
        self._closing = True
        self._hurry.set()
        if self._idle:
            self._idle = False
            self._idle_event = anyio.Event()
            self._wakeup.set()

    async def wait_idle(self) -> None:
        """Return once everything queued so far has been written."""
        self._hurry.set()
        while (self.lag or not self._idle) and not self._closed.is_set():
            await self._idle_event.wait()

    async def wait_closed(self) -> None:
        await self._closed.wait()


class _Spill:
    """Events past a full queue, in pickled chunks in a temporary file, in order."""

    def __init__(self, directory: str | None, name: str) -> None:
        fd, self.path = tempfile.mkstemp(prefix=f"sluice-spill-{name}-", dir=directory)
        self._writer: IO[bytes] = os.fdopen(fd, "wb")
        self._reader: IO[bytes] = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        self._tail: list[Event] = []  # newest events, not yet written
        self._chunks_on_disk = 0
        self.pending = 0

    def append(self, event: Event) -> None:
        self._tail.append(event)
        self.pending += 1
        if len(self._tail) >= _SPILL_CHUNK:
            pickle.dump(self._tail, self._writer, protocol=pickle.HIGHEST_PROTOCOL)
            self._chunks_on_disk += 1
            self._tail = []

    def read_chunk(self) -> list[Event]:
        if self._chunks_on_disk:
            self._writer.flush()
            chunk: list[Event] = pickle.load(self._reader)
            self._chunks_on_disk -= 1
        else:
            chunk, self._tail = self._tail, []
        self.pending -= len(chunk)
        return chunk

    def close(self) -> None:
        self._writer.close()
        self._reader.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class EventBus:
    """Publishes events to inline consumers and queued sinks.

    ``async with EventBus() as bus:`` runs the drain tasks; leaving the block
    (or ``await bus.aclose()``) drains every queued sink, then closes it.
    """

    def __init__(
        self,
        *,
        history_size: int = 10_000,
        strict: bool = False,
        run_id: str | None = None,
        address: str = "",
        stamp: Callable[[Event], Event] | None = None,
        spill_dir: str | None = None,
        catch_up: Callable[[int], Iterable[Event]] | None = None,
    ) -> None:
        self.history: deque[Event] = deque(maxlen=history_size)
        self.strict = strict
        self.run_id = run_id or uuid.uuid4().hex
        self.address = address
        self.spill_dir = spill_dir
        self._stamp = stamp or self._own_stamp
        self._catch_up = catch_up
        self._subs: dict[str, Subscription] = {}
        self._routes: dict[str, tuple[Subscription, ...]] = {}
        self._names = itertools.count(2)
        self._pressured: set[Subscription] = set()
        self._relieved = anyio.Event()
        self._relieved.set()
        self._task_group: anyio.abc.TaskGroup | None = None
        self._closed = False
        self._publishing = False
        self._deferred: list[Event] = []

    # -- publishing ----------------------------------------------------------------

    def publish(self, event: Event) -> None:
        """Hand ``event`` to every subscription that wants its kind. Never blocks."""
        if self._closed:
            raise BusClosedError(f"bus closed; cannot publish {event.kind} seq={event.seq}")
        if self._publishing:
            # A consumer published from inside a delivery: every consumer must
            # still see events in publication order, so this one waits its turn.
            self._deferred.append(event)
            return
        self.history.append(event)
        route = self._routes.get(event.kind)
        if route is None:
            route = self._route(event.kind)
        self._publishing = True
        try:
            for sub in route:
                sub.deliver(event)
        finally:
            self._publishing = False
        if self._deferred:
            self._flush_deferred()

    def publish_many(self, events: Iterable[Event]) -> None:
        """Publish several events in order."""
        for event in events:
            self.publish(event)

    def _flush_deferred(self) -> None:
        deferred, self._deferred = self._deferred, []
        for event in deferred:
            self.publish(event)

    def _route(self, kind: str) -> tuple[Subscription, ...]:
        route = tuple(s for s in self._subs.values() if s.wants(kind))
        self._routes[kind] = route
        return route

    def _own_stamp(self, event: Event) -> Event:
        last = self.history[-1].seq if self.history else 0
        return attrs.evolve(event, seq=last + 1)

    # -- subscribing ---------------------------------------------------------------

    def subscribe(
        self,
        consumer: Consumer,
        *,
        name: str | None = None,
        kinds: Iterable[str] | None = None,
        mode: Mode | None = None,
        maxsize: int | None = None,
        overflow: Overflow | None = None,
        max_batch: int | None = None,
        since: int | None = None,
        linger: float | None = None,
    ) -> Subscription:
        """Add a consumer; returns its :class:`Subscription`.

        A plain callable is inline by default (``fn(event)`` on the publisher);
        an object with ``write(batch)`` is queued. ``kinds`` limits the event
        kinds delivered (default: the consumer's ``kinds`` attribute, else all).
        ``maxsize`` (default 100,000) and ``overflow`` (default ``"block"``) of a
        queued consumer default to its attributes of those names, if it has them.
        ``since=SEQ`` first delivers the events after ``SEQ`` from the history
        ring (or the ``catch_up`` source), then continues live: no gap, no
        duplicate. ``max_batch``: the most events one ``write`` gets (default:
        all that are queued, up to ``maxsize``), so that a sink that pays a fixed
        cost per call (a round trip, a sleep) takes bigger batches as it falls
        behind and catches up instead of pushing back on the publisher.
        ``linger``: the least time between two writes while events keep coming
        (default: the consumer's ``linger`` attribute, else ``DEFAULT_LINGER``,
        20 ms; 0 writes each batch as soon as it can), so that a busy sink gets
        a few large batches rather than many small ones. An event after a quiet
        spell of ``linger`` or more is written at once.
        """
        if self._closed:
            raise BusClosedError("bus closed; cannot subscribe")
        # A sink may say what suits it (``maxsize`` / ``overflow`` attributes, as
        # ``kinds``); the arguments win.
        if maxsize is None:
            maxsize = getattr(consumer, "maxsize", None) or 100_000
        if overflow is None:
            overflow = getattr(consumer, "overflow", None) or "block"
        if linger is None:
            linger = getattr(consumer, "linger", None)
            if linger is None:
                linger = DEFAULT_LINGER
        if not linger >= 0:
            raise ValueError(f"linger must be a number of seconds >= 0, not {linger!r}")
        if mode is None:
            mode = "queued" if hasattr(consumer, "write") else "inline"
        if mode not in ("inline", "queued"):
            raise ValueError(f"mode must be 'inline' or 'queued', not {mode!r}")
        if overflow not in ("block", "drop", "spill"):
            raise ValueError(f"overflow must be 'block', 'drop' or 'spill', not {overflow!r}")
        if mode == "queued" and not hasattr(consumer, "write"):
            raise TypeError(f"a queued consumer needs a write(batch) method: {consumer!r}")
        if mode == "inline" and not (callable(consumer) or hasattr(consumer, "write")):
            raise TypeError(f"an inline consumer must be callable: {consumer!r}")
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, not {maxsize}")
        if max_batch is None:
            max_batch = maxsize
        elif max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        name = name or _default_name(consumer)
        if name in self._subs:
            raise ValueError(f"a consumer named {name!r} is already subscribed")
        if kinds is None:
            kinds = getattr(consumer, "kinds", None)
        kind_set = frozenset(kinds) if kinds is not None else None

        sub: Subscription
        if mode == "inline":
            sub = _InlineSubscription(self, consumer, name, kind_set)
        else:
            sub = _QueuedSubscription(
                self,
                consumer,
                name,
                kind_set,
                maxsize=maxsize,
                overflow=overflow,
                max_batch=max_batch,
                linger=float(linger),
            )
            if hasattr(consumer, "bus"):
                consumer.bus = self
        if since is not None:
            for event in self._events_since(since):
                if sub.wants(event.kind):
                    sub.deliver(event)
        self._subs[name] = sub
        self._routes.clear()
        if isinstance(sub, _QueuedSubscription) and self._task_group is not None:
            self._task_group.start_soon(sub.run, name=f"sluice-sink-{name}")
        return sub

    def _events_since(self, since: int) -> list[Event]:
        history = self.history
        if (history and since < history[0].seq - 1) or (not history and since < 0):
            if self._catch_up is None:
                oldest = history[0].seq if history else 0
                raise ValueError(
                    f"cannot catch up from seq {since}: history starts at seq {oldest}"
                    " and this bus has no event log to read older events from"
                )
            older = [e for e in self._catch_up(since) if e.seq > since]
            first_held = history[0].seq if history else None
            older = [e for e in older if first_held is None or e.seq < first_held]
            return older + list(history)
        return [e for e in history if e.seq > since]

    def unsubscribe(self, name: str) -> Subscription:
        """Remove the consumer named ``name``.

        A queued sink receives what was already queued, then is flushed and
        closed in the background (``await sub.wait_closed()`` to wait).
        """
        try:
            sub = self._subs.pop(name)
        except KeyError:
            raise ValueError(f"no consumer named {name!r} is subscribed") from None
        self._routes.clear()
        if isinstance(sub, _QueuedSubscription):
            sub.close()
        return sub

    @property
    def subscriptions(self) -> dict[str, Subscription]:
        return dict(self._subs)

    def stats(self) -> dict[str, dict[str, int]]:
        """Per consumer: events ``delivered``, ``failed`` deliveries, ``dropped``, ``lag``."""
        return {name: sub.stats() for name, sub in self._subs.items()}

    # -- back-pressure -------------------------------------------------------------

    @property
    def under_pressure(self) -> bool:
        """True while a ``block`` sink's queue is past its ``maxsize``."""
        return bool(self._pressured)

    async def wait_for_capacity(self) -> None:
        """Return once no ``block`` sink is past its high-water mark.

        Servers await this before reading more work from the network.
        """
        while self._pressured:
            await self._relieved.wait()

    def _pressure_on(self, sub: Subscription) -> None:
        if sub not in self._pressured:
            if not self._pressured:
                self._relieved = anyio.Event()
            self._pressured.add(sub)

    def _pressure_off(self, sub: Subscription) -> None:
        if sub in self._pressured:
            self._pressured.discard(sub)
            if not self._pressured:
                self._relieved.set()

    # -- failures ------------------------------------------------------------------

    def _consumer_failed(self, sub: Subscription, exc: BaseException) -> None:
        # Logged and reported at most once a second per consumer: a sink that fails
        # on every batch would otherwise cost the publisher a traceback per batch.
        now = _clock()
        if now - sub._last_report < _FAILURE_REPORT_INTERVAL:
            sub._unreported += 1
            return
        sub._last_report = now
        more, sub._unreported = sub._unreported, 0
        since = f" (and {more} times since the last report)" if more else ""
        logger.warning("consumer %r failed%s", sub.name, since, exc_info=exc)
        if self._closed:
            return
        report = UserEvent(
            time=time.time(),
            topic="consumer-failed",
            msg={"consumer": sub.name, "error": f"{type(exc).__name__}: {exc}"},
        )
        self.publish(self._stamp(report))

    # -- lifecycle -----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._tg_cm = anyio.create_task_group()
        self._task_group = await self._tg_cm.__aenter__()
        for sub in self._subs.values():
            if isinstance(sub, _QueuedSubscription):
                self._task_group.start_soon(sub.run, name=f"sluice-sink-{sub.name}")
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    async def drain(self) -> None:
        """Wait until every queued sink has written everything published so far."""
        if self._task_group is None:
            raise RuntimeError("drain() needs a running bus: use 'async with EventBus() as bus'")
        for sub in list(self._subs.values()):
            if isinstance(sub, _QueuedSubscription):
                await sub.wait_idle()
        self._raise_strict()

    async def aclose(self) -> None:
        """Drain every queued sink, flush and close it, then stop the drain tasks."""
        if self._closed:
            return
        self._closed = True
        queued = [s for s in self._subs.values() if isinstance(s, _QueuedSubscription)]
        for sub in queued:
            sub.close()
        if self._task_group is not None:
            for sub in queued:
                await sub.wait_closed()
            await self._tg_cm.__aexit__(None, None, None)
            self._task_group = None
        elif queued:
            # Never started: run each sink now, so what was published still lands.
            async with anyio.create_task_group() as tg:
                for sub in queued:
                    tg.start_soon(sub.run)
        self._raise_strict()

    def _raise_strict(self) -> None:
        if not self.strict:
            return
        for sub in self._subs.values():
            error = getattr(sub, "error", None)
            if error is not None:
                sub.error = None  # type: ignore[attr-defined]
                raise error
