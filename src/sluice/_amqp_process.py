"""The RabbitMQ sink's optional child-process publisher (``RabbitMQ(..., process=True)``).

pika spends ~20-30 us of Python per message; in a thread that time holds the
GIL the scheduler's event loop needs. With ``process=True`` the sink sends each
batch as one msgpack blob of the events (:mod:`sluice._event_wire`, ~0.5 us an
event) down a pipe to a child process (``spawn``ed, so no state is inherited),
which makes the messages (the event's JSON, its message id and routing key, from
the ``id_prefix`` and ``routing_key`` template the parent sends at start) and
runs the same :class:`~sluice._amqp_publisher.ThreadBackend` as the in-process
sink: memory, spool, confirms, reconnects, and the same close procedure.

A blob starting with a NUL byte is a command: ``b"\\0close <timeout>"``. The child
reports back on the same pipe: ``("status", {...})`` every 50 ms and once more
when it exits, and ``("log", level, text)`` for its log records, which the parent
logs on ``sluice.sinks.rabbitmq``.

The parent holds the spool directory's lock for the life of the sink (so a
second sink on it fails at construction, as with the thread); the child uses the
directory without locking it. If the child dies, the parent logs an error with
the number of events it had not confirmed or spooled (they are lost), starts a
new child, which first sends what is in the spool, and goes on.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing.connection
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sluice._amqp_spool import DirectoryLock, message_encoder
from sluice._child_process import child_pipes, spawn_child
from sluice._event_wire import decode_batch, encode_batch

__all__ = ("ProcessBackend",)

logger = logging.getLogger("sluice.sinks.rabbitmq")

_CLOSE = b"\0close "
_REPORT_INTERVAL = 0.05


class ProcessBackend:
    """The parent side: hands encoded batches to the child, mirrors its status."""

    def __init__(
        self,
        url: str,
        *,
        message_format: Callable[[], dict[str, str]],
        exchange: str,
        queue: str | None,
        spool_dir: Path,
        segment_messages: int,
        label: str,
        **limits: Any,
    ) -> None:
        self.label = label
        # Asked at each start: the run id it holds is only fixed then.
        self.message_format = message_format
        self._lock = DirectoryLock(Path(spool_dir))
        self._config: dict[str, Any] = {
            "url": url,
            "exchange": exchange,
            "queue": queue,
            "spool_dir": str(spool_dir),
            "segment_messages": segment_messages,
            "label": label,
            "limits": limits,
        }
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._status: dict[str, Any] = {}
        self._sent = 0  # events handed to the current child
        self._carried: dict[str, int] = {}  # counters of children that died
        self._lost = 0
        self._proc: Any = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._reader: threading.Thread | None = None
        self._closing = False
        # Encoded batches wait here for the feeder thread, which writes them to the
        # pipe: a write to a full pipe (a child busy or starting) blocks the feeder,
        # not write(). Bounded like the child's memory; past that, write() waits.
        self._outbox: deque[tuple[bytes, int]] = deque()
        self._outbox_events = 0
        self._outbox_cond = threading.Condition()
        # The child holds up to max_memory events and spools the rest; this process
        # keeps what the pipe has not taken yet, up to max_memory too (encoded, ~100
        # bytes an event): a child starved of CPU by a busy scheduler reads slowly,
        # and past this write() waits on the bus's sink thread and the bus spills
        # (the sink's overflow), which pickles every event in the scheduler.
        self._max_outbox = int(limits.get("max_memory", 100_000))
        self._feeder: threading.Thread | None = None

    # -- the sink's backend interface ------------------------------------------------

    def start(self) -> None:
        self._proc, self._conn, up = spawn_child("sluice._amqp_process")
        self._conn.send({**self._config, **self.message_format()})
        with self._cond:
            self._status = {}
            self._sent = 0
        self._reader = threading.Thread(
            target=self._read, args=(up,), name=f"sluice-rabbitmq-status-{self.label}"
        )
        self._reader.daemon = True
        self._reader.start()
        if self._feeder is None:  # a restarted child keeps the feeder it had
            self._feeder = threading.Thread(
                target=self._feed, name=f"sluice-rabbitmq-feeder-{self.label}", daemon=True
            )
            self._feeder.start()

    def submit(self, batch: Sequence[Any]) -> None:
        if self._closing:
            raise RuntimeError(f"RabbitMQ sink {self.label} is closed")
        data = encode_batch(batch)
        with self._outbox_cond:
            while self._outbox_events >= self._max_outbox and not self._closing:
                self._outbox_cond.wait(0.1)
            self._outbox.append((data, len(batch)))
            self._outbox_events += len(batch)
            self._outbox_cond.notify_all()

    def _feed(self) -> None:
        """Write the outbox to the pipe in order until closed and drained."""
        cond = self._outbox_cond
        while True:
            with cond:
                while not self._outbox and not self._closing:
                    cond.wait()
                if not self._outbox:
                    return
                data, count = self._outbox[0]
            try:
                with self._send_lock:
                    try:
                        self._send(data)
                    except (OSError, EOFError, ValueError):
                        self._restart()
                        self._send(data)
                    with self._cond:
                        self._sent += count
            except Exception:
                logger.exception("RabbitMQ sink %s: %d events lost", self.label, count)
                self._lost += count
            with cond:
                self._outbox.popleft()
                self._outbox_events -= count
                cond.notify_all()

    def connected(self) -> bool:
        return bool(self._status.get("connected", False))

    def wait_confirmed(self, timeout: float | None) -> bool:
        if self._proc is None:
            return True  # never started: nothing was written

        def done() -> bool:
            s = self._status
            return (
                bool(s)
                and not self._outbox_events
                and s.get("received") == self._sent
                and bool(s.get("idle"))
            )

        with self._cond:
            return self._cond.wait_for(done, timeout)

    def close(self, timeout: float) -> None:
        with self._outbox_cond:
            self._closing = True
            self._outbox_cond.notify_all()
        try:
            if self._feeder is not None:
                self._feeder.join()  # the outbox goes to the child first
            if self._proc is not None:
                with self._send_lock, contextlib.suppress(OSError, EOFError, ValueError):
                    self._send(_CLOSE + str(timeout).encode())
                try:
                    self._proc.wait(timeout + 30)
                except subprocess.TimeoutExpired:
                    logger.error("RabbitMQ publisher process %s did not exit; killed", self.label)
                    self._proc.kill()
                    self._proc.wait(10)
                if self._reader is not None:
                    self._reader.join(10)
                if self._conn is not None:
                    self._conn.close()
        finally:
            self._lock.release()

    def stats(self) -> dict[str, int]:
        s = self._status
        out: dict[str, int] = {}
        for name in ("published", "confirmed", "spooled", "resent", "connections", "corrupt"):
            out[name] = int(s.get(name, 0)) + self._carried.get(name, 0)
        pending = int(s.get("pending", 0)) + self._sent - int(s.get("received", 0))
        out["pending"] = pending + self._outbox_events
        out["lost"] = self._lost
        return out

    # -- internals ---------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        if self._conn is None:
            raise OSError("no publisher process")
        self._conn.send_bytes(data)

    def _restart(self) -> None:
        """The child died: account for what it held, start a new one."""
        s = self._status
        lost = self._sent - int(s.get("confirmed", 0)) - int(s.get("spooled", 0))
        lost = max(lost, 0)
        for name in ("published", "confirmed", "spooled", "resent", "connections", "corrupt"):
            self._carried[name] = self._carried.get(name, 0) + int(s.get(name, 0))
        self._lost += lost
        code = self._proc.poll() if self._proc is not None else None
        logger.error(
            "RabbitMQ publisher process %s died (exit code %s); up to %d events it held"
            " in memory are lost; starting a new one, which sends the spool first",
            self.label,
            code,
            lost,
        )
        if self._conn is not None:
            self._conn.close()
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(5)
        self.start()

    def _read(self, conn: multiprocessing.connection.Connection) -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            if message[0] == "status":
                with self._cond:
                    self._status = message[1]
                    self._cond.notify_all()
            elif message[0] == "log":
                logger.log(message[1], "%s", message[2])
        conn.close()
        with self._cond:
            self._cond.notify_all()


# -- the child process -------------------------------------------------------------------


class _PipeHandler(logging.Handler):
    def __init__(self, send: Callable[[Any], None]) -> None:
        super().__init__()
        self._send_message = send

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self._send_message(("log", record.levelno, self.format(record)))


def _child_main(
    conn: multiprocessing.connection.Connection,
    up: multiprocessing.connection.Connection,
    config: dict[str, Any],
) -> None:
    """Run a ThreadBackend fed by the pipe until told to close (or the parent is gone)."""
    from sluice._amqp_publisher import ThreadBackend
    from sluice._amqp_url import RoutingKey, check_pika_url

    send_lock = threading.Lock()

    def send(message: Any) -> None:
        with send_lock, contextlib.suppress(OSError, ValueError):
            up.send(message)

    log = logging.getLogger("sluice.sinks.rabbitmq")
    log.addHandler(_PipeHandler(send))
    log.setLevel(logging.INFO)
    log.propagate = False

    backend = ThreadBackend(
        check_pika_url(config["url"]),
        exchange=config["exchange"],
        queue=config["queue"],
        encode=message_encoder(config["id_prefix"], RoutingKey(config["routing_key"])),
        spool_dir=config["spool_dir"],
        segment_messages=config["segment_messages"],
        label=config["label"],
        lock=False,
        **config["limits"],
    )
    received = 0

    def status(**extra: Any) -> dict[str, Any]:
        got = received  # read before idle: submit() clears idle before received grows
        s: dict[str, Any] = dict(backend.stats())
        s.update(
            received=got,
            idle=backend.publisher.idle.is_set(),
            connected=backend.connected(),
            **extra,
        )
        return s

    stop = threading.Event()

    def report() -> None:
        while not stop.wait(_REPORT_INTERVAL):
            send(("status", status()))

    reporter = threading.Thread(target=report, daemon=True)
    backend.start()
    reporter.start()
    timeout = 5.0
    try:
        while True:
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):
                break  # the parent is gone: close as it would have
            if data.startswith(_CLOSE):
                timeout = float(data[len(_CLOSE) :])
                break
            # The events' JSON is rendered here; the publisher thread makes the
            # messages (message_encoder) as it takes them.
            events = decode_batch(data)
            backend.submit(events)
            received += len(events)
    finally:
        backend.close(timeout)
        stop.set()
        reporter.join()
        send(("status", status(closed=True)))
        conn.close()
        up.close()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m sluice._amqp_process DOWN_FD UP_FD``: the child's entry point."""
    down, up = child_pipes(list(sys.argv[1:] if argv is None else argv))
    config = down.recv()
    _child_main(down, up, config)


if __name__ == "__main__":
    main()
