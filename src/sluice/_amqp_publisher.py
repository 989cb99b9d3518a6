"""The RabbitMQ sink's publisher: a thread of its own that owns the pika connection.

Theory of operation
-------------------
The sink's ``write(batch)`` only appends the events to :attr:`Publisher.incoming`
(under a lock) and wakes the thread's pika ``IOLoop``; it never waits on the
broker. Everything else happens on the publisher thread, which runs one IOLoop
for its whole life (connections come and go on it):

- Events are encoded into messages and queued, oldest first, in three tiers:
  ``unconfirmed`` (published, awaiting the broker's confirm), ``mem`` (not yet
  published) and the disk :class:`~sluice._amqp_spool.Spool`. A new message goes
  to ``mem`` unless the memory tiers hold ``max_memory`` messages or the spool has
  unread messages: then it is appended to the spool, so once anything was spilled,
  later messages queue behind it. When ``mem`` runs empty, the next spool segment
  is loaded into it. Order is therefore the order of ``write``.
- The channel is in confirm mode. Messages are published in chunks while fewer
  than ``max_inflight`` are unconfirmed; the broker's (multiple-)acks pop them
  off ``unconfirmed``. A message leaves the sink only when it is confirmed. A spool
  segment is deleted once every message loaded from it is confirmed.
- When the connection or channel dies (or the broker nacks), every unconfirmed
  message goes back to the front of ``mem`` and is published again, in order,
  on the next connection (at-least-once: the broker may have kept some of them,
  so consumers see a repeated ``message_id``). Reconnects back off exponentially
  up to ``max_backoff``. One WARNING per outage, one INFO when it ends.
- On close the sink waits (bounded) until everything is confirmed, stops the
  thread and writes what is left (unconfirmed, mem, incoming) to the spool
  *ahead* of what is already there (:meth:`Spool.prepend`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

try:
    import pika
    import pika.exceptions
    import pika.spec
    from pika.adapters.select_connection import IOLoop
except ImportError as exc:  # pragma: no cover - exercised with pika hidden
    raise ImportError("the RabbitMQ sink needs pika: pip install 'sluice[rabbitmq]'") from exc

from sluice._amqp_frames import CONTENT_TYPE, FrameWriter
from sluice._amqp_spool import Message, Spool

__all__ = ("Publisher", "ThreadBackend", "shutdown")

logger = logging.getLogger("sluice.sinks.rabbitmq")

#: A queued message and the spool segment it was loaded from (None: from memory).
Item = tuple[str, str, bytes, int | None]

_CHUNK = 500  # messages published per IOLoop callback, so confirms and I/O interleave


def _coalesce_output(connection: Any) -> None:
    """Join the frames pika buffered into one chunk, so they go out in one ``send``.

    pika queues every frame (three per message) as its own chunk and sends them
    one ``send()`` call each: a fifth of the publisher's CPU. This reaches into
    pika's transport; if its internals are not what they were in pika 1.3/1.4,
    it does nothing.
    """
    buffers = getattr(getattr(connection, "_transport", None), "_tx_buffers", None)
    if isinstance(buffers, deque) and len(buffers) > 1:
        try:
            joined = b"".join(buffers)
        except TypeError:
            return
        buffers.clear()
        buffers.append(joined)


class Publisher:
    """Publishes encoded events to one queue or exchange with batched confirms."""

    def __init__(
        self,
        parameters: Any,
        *,
        exchange: str,
        queue: str | None,
        encode: Callable[[Any], Message],
        spool: Spool,
        label: str,
        max_memory: int = 100_000,
        max_inflight: int = 10_000,
        max_backoff: float = 5.0,
        queue_arguments: dict[str, Any] | None = None,
    ) -> None:
        self.parameters = parameters
        self.exchange = exchange
        self.queue = queue
        self.queue_arguments = queue_arguments or None
        self.encode = encode
        self.spool = spool
        self.label = label
        self.max_memory = max_memory
        self.max_inflight = max_inflight
        self.max_backoff = max_backoff
        # Shared with the writer thread, under _lock.
        self._lock = threading.Lock()
        self.incoming: deque[Any] = deque()  # events (or ready messages: see encode)
        self._wake_pending = False
        self._stopped = False
        #: Set while nothing at all is waiting (incoming, memory, spool, unconfirmed).
        self.idle = threading.Event()
        if not spool.has_unread():
            self.idle.set()
        #: Set when close() may stop waiting: all confirmed, or the broker is away.
        self.settled = threading.Event()
        # Publisher-thread state.
        self.mem: deque[Item] = deque()
        self.unconfirmed: deque[Item] = deque()
        self._first_tag = 1  # delivery tag of unconfirmed[0]
        self._acked_singly: set[int] = set()
        self._outstanding: dict[int, int] = {}  # spool segment -> messages unconfirmed
        self._ioloop: Any = None  # made by start(): an unstarted publisher holds no sockets
        self._connection: Any = None
        self._channel: Any = None
        self._frames: FrameWriter | None = None  # None: publish through pika's basic_publish
        self._ready = False
        self._closing = False
        self._stopping = False
        self._pump_scheduled = False
        self._retry_timer: Any = None
        self._backoff = 0.0
        self._channel_reason: BaseException | None = None
        self._outage_since: float | None = None
        self._spilled_this_outage = False
        self._thread = threading.Thread(target=self._main, name=f"sluice-rabbitmq-{label}")
        self._thread.daemon = True  # a sink nobody closed must not hang interpreter exit
        # Counters (written by the publisher thread only).
        self.published = 0
        self.confirmed = 0
        self.spooled = 0
        self.resent = 0
        self.connections = 0
        self.failed = False

    # -- any thread ------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._ioloop is not None

    def start(self) -> None:
        self._ioloop = IOLoop()
        self._thread.start()

    def submit(self, batch: Sequence[Any]) -> None:
        """Hand events over; never blocks on the broker."""
        with self._lock:
            if self._stopped:
                raise RuntimeError(f"RabbitMQ sink {self.label} is closed")
            self.incoming.extend(batch)
            self.idle.clear()
            if self._wake_pending:
                return
            self._wake_pending = True
        self._ioloop.add_callback_threadsafe(self._on_wake)

    def connected(self) -> bool:
        return self._ready

    def begin_close(self) -> None:
        """Ask the thread to settle: confirm everything, or find the broker away."""
        self._call(self._on_begin_close)

    def stop(self, timeout: float = 5.0) -> list[Message]:
        """Stop the thread; returns every message not confirmed, oldest first."""
        with self._lock:
            self._stopped = True
        if self._thread.is_alive():
            self._call(self._on_stop)
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.error("RabbitMQ publisher thread %s did not stop", self.label)
        left: list[Message] = [(m, r, b) for m, r, b, _ in self.unconfirmed]
        left += [(m, r, b) for m, r, b, _ in self.mem]
        with self._lock:
            events, self.incoming = list(self.incoming), deque()
        left += [self.encode(e) for e in events]
        self.unconfirmed.clear()
        self.mem.clear()
        return left

    def _call(self, fn: Callable[[], None]) -> None:
        if self._ioloop is None:
            return
        with contextlib.suppress(Exception):  # the loop is already closed: nothing to do
            self._ioloop.add_callback_threadsafe(fn)

    # -- the thread --------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._ioloop.add_callback_threadsafe(self._connect)
            self._ioloop.start()
        except Exception:
            self.failed = True
            logger.exception("RabbitMQ publisher thread %s failed; events are kept", self.label)
        finally:
            with contextlib.suppress(Exception):
                if self._connection is not None and self._connection.is_open:
                    self._connection.close()
            self._ioloop.close()
            self.settled.set()

    def _on_wake(self) -> None:
        with self._lock:
            self._wake_pending = False
            events, self.incoming = self.incoming, deque()
        if events:
            self._accept(events)
        self._pump()

    def _accept(self, events: deque[Any]) -> None:
        spool = self.spool
        spill: list[Message] = []
        mem = self.mem
        room = self.max_memory - len(mem) - len(self.unconfirmed)
        must_spill = spool.has_unread()
        encode = self.encode
        for event in events:
            message = encode(event)
            if must_spill or room <= 0:
                must_spill = True
                spill.append(message)
            else:
                mem.append((*message, None))
                room -= 1
        if spill:
            self.spooled += spool.append(spill)
            spool.flush()
            if room <= 0 and not self._spilled_this_outage:
                self._spilled_this_outage = True
                logger.warning(
                    "RabbitMQ sink %s: %d events wait in memory; later ones go to the spool %s",
                    self.label,
                    len(mem) + len(self.unconfirmed),
                    spool.directory,
                )

    def _pump(self) -> None:
        """Publish the next chunk while the confirm window has room."""
        self._pump_scheduled = False
        if self._ready and not self._stopping:
            mem = self.mem
            unconfirmed = self.unconfirmed
            budget = min(_CHUNK, self.max_inflight - len(unconfirmed))
            chunk: list[Item] = []
            while len(chunk) < budget:
                if not mem and not self._load_spool():
                    break
                chunk.append(mem.popleft())
            if chunk:
                # Unconfirmed from here: if the connection turns out to be gone, _lost
                # puts them back in front of mem.
                unconfirmed.extend(chunk)
                self.published += len(chunk)
                if self._frames is not None:
                    if self._connection is not None and self._connection.is_open:
                        self._frames.write(chunk)
                else:
                    self._publish_with_pika(chunk)
            if (mem or self.spool.has_unread()) and len(unconfirmed) < self.max_inflight:
                self._schedule_pump()
        self._check_settled()

    def _publish_with_pika(self, chunk: list[Item]) -> None:
        channel = self._channel
        exchange = self.exchange
        BasicProperties = pika.BasicProperties
        for item in chunk:
            properties = BasicProperties(
                content_type=CONTENT_TYPE, delivery_mode=2, message_id=item[0]
            )
            channel.basic_publish(exchange, item[1], item[2], properties)
        _coalesce_output(self._connection)

    def _schedule_pump(self) -> None:
        if not self._pump_scheduled:
            self._pump_scheduled = True
            self._ioloop.call_later(0, self._pump)

    def _load_spool(self) -> bool:
        """Move the oldest spool segment into ``mem``; False if the spool is empty."""
        while True:
            loaded = self.spool.load_next()
            if loaded is None:
                return False
            n, messages = loaded
            if messages:
                self._outstanding[n] = len(messages)
                self.mem.extend([(m, r, b, n) for m, r, b in messages])
                return True
            self.spool.remove(n)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        if isinstance(method, pika.spec.Basic.Nack):
            logger.warning(
                "RabbitMQ %s refused message(s) up to delivery tag %d; publishing again",
                self.label,
                method.delivery_tag,
            )
            self._drop_connection()
            return
        tag = method.delivery_tag
        first = self._first_tag
        if tag < first:
            return  # already confirmed (a multiple ack covered it)
        if not method.multiple and tag != first:
            # Acks may come out of order (an unroutable message is confirmed at
            # once, a routed one after it is on disk): remember it until the
            # ones before it are confirmed too.
            self._acked_singly.add(tag)
            return
        n = tag - first + 1
        acked = self._acked_singly
        if acked:
            acked.difference_update([t for t in acked if t <= tag])
            while first + n in acked:
                acked.discard(first + n)
                n += 1
        self._release(min(n, len(self.unconfirmed)))
        self._first_tag = first + n
        self._pump()

    def _release(self, n: int) -> None:
        """The oldest ``n`` unconfirmed messages are confirmed: forget them."""
        unconfirmed = self.unconfirmed
        outstanding = self._outstanding
        for _ in range(n):
            segment = unconfirmed.popleft()[3]
            if segment is not None:
                left = outstanding[segment] - 1
                if left:
                    outstanding[segment] = left
                else:
                    del outstanding[segment]
                    self.spool.remove(segment)
        self.confirmed += n

    def _check_settled(self) -> None:
        if self.mem or self.unconfirmed or self.spool.has_unread():
            return
        with self._lock:
            if self.incoming or self._wake_pending:
                return
            self.idle.set()
        if self._closing:
            self.settled.set()

    # -- connection lifecycle --------------------------------------------------------

    def _connect(self) -> None:
        self._retry_timer = None
        if self._stopping or self._connection is not None:
            return
        self._connection = pika.SelectConnection(
            self.parameters,
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed,
            custom_ioloop=self._ioloop,
        )

    def _on_open(self, connection: Any) -> None:
        logger.debug("RabbitMQ %s: connection open", self.label)
        connection.channel(on_open_callback=self._on_channel)

    def _on_channel(self, channel: Any) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=self._on_confirm_mode)

    def _on_confirm_mode(self, _frame: Any) -> None:
        channel = self._channel
        if channel is None or not channel.is_open:
            return
        if self.queue is not None:
            channel.queue_declare(
                self.queue,
                durable=True,
                arguments=self.queue_arguments,
                callback=self._on_declared,
            )
        else:
            channel.exchange_declare(
                self.exchange, exchange_type="topic", durable=True, callback=self._on_declared
            )

    def _on_declared(self, frame: Any) -> None:
        logger.debug("RabbitMQ %s: channel ready", self.label)
        self._frames = FrameWriter.for_channel(self._connection, self._channel, self.exchange)
        self._ready = True
        self._first_tag = 1
        self._acked_singly.clear()
        self._backoff = 0.0
        self.connections += 1
        if self._outage_since is not None:
            # What the queue holds says whether the broker kept what it confirmed
            # before the outage (less than that, with no consumer: it lost some).
            held = getattr(frame.method, "message_count", None)
            logger.info(
                "RabbitMQ %s is back after %.1f s%s; sending %d waiting events",
                self.label,
                time.monotonic() - self._outage_since,
                "" if held is None else f" (the queue holds {held} messages)",
                len(self.mem) + self.spool.unread_messages,
            )
            self._outage_since = None
            self._spilled_this_outage = False
        self._pump()

    def _on_open_error(self, _connection: Any, error: BaseException) -> None:
        self._lost(error)

    def _on_closed(self, _connection: Any, reason: BaseException) -> None:
        self._lost(reason)

    def _on_channel_closed(self, _channel: Any, reason: BaseException) -> None:
        self._channel = None
        self._ready = False
        # Reported by _lost, which follows: a channel error (a queue declared with
        # other arguments, say) says more than the connection's normal close.
        self._channel_reason = reason
        self._drop_connection()

    def _drop_connection(self) -> None:
        self._ready = False
        connection = self._connection
        if connection is not None and not (connection.is_closing or connection.is_closed):
            connection.close()

    def _lost(self, reason: BaseException) -> None:
        """The connection is gone (or never opened): requeue, then retry or finish."""
        logger.debug("RabbitMQ %s: connection lost: %r", self.label, reason)
        self._connection = None
        self._channel = None
        self._frames = None
        self._ready = False
        if self.unconfirmed:
            self.resent += len(self.unconfirmed)
            self.mem.extendleft(reversed(self.unconfirmed))
            self.unconfirmed.clear()
        self._acked_singly.clear()
        if self._stopping:
            self._ioloop.stop()
            return
        channel_reason, self._channel_reason = self._channel_reason, None
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            if channel_reason is not None and not isinstance(
                reason, pika.exceptions.ConnectionClosedByBroker
            ):
                reason = channel_reason
            logger.warning(
                "RabbitMQ %s is unreachable (%s); events wait in memory, then in the"
                " spool %s, and go out in order when it is back",
                self.label,
                str(reason) or type(reason).__name__,
                self.spool.directory,
            )
        if self._closing:
            self.settled.set()  # closing with the broker away: spool what is left
            return
        self._backoff = min(max(self._backoff * 2, 0.1), self.max_backoff)
        self._retry_timer = self._ioloop.call_later(self._backoff, self._connect)

    def _on_begin_close(self) -> None:
        self._closing = True
        self._on_wake()
        if self._connection is None and self._outage_since is not None:
            # Waiting for a retry: try once more now, give up if it fails.
            if self._retry_timer is not None:
                self._ioloop.remove_timeout(self._retry_timer)
                self._retry_timer = None
            self._connect()
        self._check_settled()

    def _on_stop(self) -> None:
        self._stopping = True
        self._ready = False
        if self._retry_timer is not None:
            self._ioloop.remove_timeout(self._retry_timer)
            self._retry_timer = None
        connection = self._connection
        if connection is None:
            self._ioloop.stop()
            return
        if not (connection.is_closing or connection.is_closed):
            connection.close()
        # The broker may never answer the close: do not wait for it forever.
        self._ioloop.call_later(2.0, self._ioloop.stop)


def shutdown(publisher: Publisher, spool: Spool, timeout: float, label: str) -> int:
    """Close a publisher: wait up to ``timeout`` for confirms, spool the rest, close the spool.

    Returns how many messages were left for the spool.
    """
    if publisher.started:
        publisher.begin_close()
        publisher.settled.wait(timeout)
    left = publisher.stop()
    try:
        if left:
            spool.prepend(left)
            publisher.spooled += len(left)
            logger.warning(
                "RabbitMQ %s: %d events not confirmed at close were written to the spool"
                " %s; a sink started with that spool sends them first",
                label,
                len(left),
                spool.directory,
            )
        spool.remove_loaded()
    finally:
        spool.close()
    return len(left)


class ThreadBackend:
    """The sink's default backend: a :class:`Publisher` thread in this process."""

    def __init__(
        self,
        parameters: Any,
        *,
        exchange: str,
        queue: str | None,
        encode: Callable[[Any], Message],
        spool_dir: Any,
        segment_messages: int,
        label: str,
        lock: bool = True,
        **limits: Any,
    ) -> None:
        self.label = label
        self.spool = Spool(spool_dir, segment_messages=segment_messages, lock=lock)
        self.publisher = Publisher(
            parameters,
            exchange=exchange,
            queue=queue,
            encode=encode,
            spool=self.spool,
            label=label,
            **limits,
        )

    def start(self) -> None:
        self.publisher.start()

    def submit(self, batch: Sequence[Any]) -> None:
        self.publisher.submit(batch)

    def connected(self) -> bool:
        return self.publisher.connected()

    def wait_confirmed(self, timeout: float | None) -> bool:
        return self.publisher.idle.wait(timeout)

    def close(self, timeout: float) -> None:
        shutdown(self.publisher, self.spool, timeout, self.label)

    def stats(self) -> dict[str, int]:
        p = self.publisher
        return {
            "published": p.published,
            "confirmed": p.confirmed,
            "spooled": p.spooled,
            "resent": p.resent,
            "pending": len(p.incoming)
            + len(p.mem)
            + len(p.unconfirmed)
            + self.spool.unread_messages,
            "connections": p.connections,
            "corrupt": self.spool.corrupt,
            "lost": 0,  # only a publisher process that dies loses events
        }
