"""The RabbitMQ sink's disk spool: messages that could not go out yet, in order.

A spool is a directory of append-only *segment* files, ``seg<+n>.jsonl``,
read in numeric order of ``n`` (which may be negative), oldest first. Each
line is one message::

    ["<message_id>","<routing key>"]<TAB><body: the event's JSON>

A JSON-encoded string never holds a raw tab or newline, and neither does
orjson's output, so the first tab splits the line and every line ends in a
newline. A line without its newline is the end of a write cut short by a crash:
it is dropped with a warning, as the event-log reader does. Any other
unreadable line is logged as an error and counted in :attr:`Spool.corrupt`.

New messages are appended to the newest segment (a new segment per process
start: an old segment is never appended to). A reader *loads* a whole
segment at a time (sealing it first if it is the one being written); the
publisher deletes a loaded segment with :meth:`Spool.remove` once the broker
has confirmed all its messages. :meth:`Spool.prepend` writes messages that
must go out *before* everything on disk (what was still in memory when the
sink closed) as a new segment numbered below every other, atomically
(temporary file, fsync, rename).

A ``lock`` file, held with ``flock`` for the life of the :class:`Spool`, keeps
a second live process (or a second sink in this one) from sharing the
directory: the second one gets :class:`SpoolInUseError` naming the pid.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import orjson

from sluice.sinks._files import fsync_dir
from sluice.sinks._json import event_json

if TYPE_CHECKING:
    from sluice._amqp_url import RoutingKey

__all__ = (
    "DirectoryLock",
    "Message",
    "Spool",
    "SpoolInUseError",
    "decode_line",
    "encode_line",
    "message_encoder",
)

logger = logging.getLogger("sluice.sinks.rabbitmq")

#: One AMQP message: (message_id, routing_key, body).
Message = tuple[str, str, bytes]

_SEGMENT = re.compile(r"^seg([+-]\d+)\.jsonl$")
_TAB = b"\t"
_NL = b"\n"


class SpoolInUseError(OSError):
    """The spool directory is locked by another live sink.

    An ``OSError``: the command-line services report it in one line, like a port in use.
    """


def message_encoder(id_prefix: str, routing_key: RoutingKey) -> Callable[[Any], Message]:
    """The function that makes an event's message: id ``<id_prefix><seq>``, routing
    key, body the event's JSON (an event or a child's :class:`~sluice._event_wire.EventView`)."""
    constant = routing_key.template if routing_key.constant else None

    def encode(event: Any) -> Message:
        body = event_json(event)
        # A queue's routing key is its name: no need to build the event's dict.
        key = constant if constant is not None else routing_key(event.to_dict())
        return f"{id_prefix}{event.seq}", key, body

    return encode


def encode_line(message: Message) -> bytes:
    mid, rk, body = message
    return orjson.dumps([mid, rk]) + _TAB + body + _NL


def decode_line(line: bytes) -> Message:
    """Parse one line (with or without its newline); ``ValueError`` if it is not one."""
    head, sep, body = line.rstrip(_NL).partition(_TAB)
    if not sep or not body:
        raise ValueError("no tab-separated body")
    ids = orjson.loads(head)
    if not (isinstance(ids, list) and len(ids) == 2 and all(isinstance(s, str) for s in ids)):
        raise ValueError("bad message header")
    return ids[0], ids[1], body


def _segment_name(n: int) -> str:
    return f"seg{n:+021d}.jsonl"


def _lock(directory: Path) -> int:
    """Take the directory's lock (non-blocking); returns the held file descriptor."""
    path = directory / "lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)
        raise SpoolInUseError(
            f"spool directory {directory} is in use by another sink (pid {holder});"
            " give each RabbitMQ sink its own spool="
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _unlock(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)  # closing the descriptor releases the flock


class DirectoryLock:
    """The spool directory's lock, held until :meth:`release` (or garbage collection)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        fd = _lock(directory)
        self._finalizer = weakref.finalize(self, _unlock, fd)

    def release(self) -> None:
        self._finalizer()


class Spool:
    """An ordered, crash-tolerant FIFO of messages in ``directory``; see the module doc."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        segment_messages: int = 10_000,
        lock: bool = True,
    ) -> None:
        if segment_messages < 1:
            raise ValueError(f"segment_messages must be at least 1, not {segment_messages}")
        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.segment_messages = segment_messages
        # lock=False: the caller holds the directory's lock (a parent process).
        self._lock = DirectoryLock(self.directory) if lock else None
        for stale in self.directory.glob("*.tmp"):  # a prepend cut short by a crash
            with contextlib.suppress(OSError):
                stale.unlink()
        found = sorted(
            int(m.group(1)) for p in self.directory.iterdir() if (m := _SEGMENT.match(p.name))
        )
        self._unread: deque[int] = deque(found)  # sealed segments not loaded yet, oldest first
        self._loaded: set[int] = set()  # loaded, waiting for remove()
        self._writer: IO[bytes] | None = None
        self._writing: int | None = None  # number of the segment being appended to
        self._written = 0  # messages in it
        self._next = (found[-1] + 1) if found else 0
        #: Messages on disk not loaded yet (an estimate for segments of older runs).
        self.unread_messages = sum(self._count(n) for n in found)
        #: Unreadable lines skipped (each logged).
        self.corrupt = 0

    # -- writing ---------------------------------------------------------------------

    def append(self, messages: Iterable[Message]) -> int:
        """Append messages behind everything on disk; returns how many."""
        count = 0
        for message in messages:
            if self._writer is None or self._written >= self.segment_messages:
                self._open_segment()
            assert self._writer is not None
            self._writer.write(encode_line(message))
            self._written += 1
            count += 1
        self.unread_messages += count
        return count

    def flush(self) -> None:
        """Hand what was appended to the OS (survives a crash of this process)."""
        if self._writer is not None:
            self._writer.flush()

    def prepend(self, messages: list[Message]) -> None:
        """Write ``messages`` as a new segment that is read before every other."""
        if not messages:
            return
        known = [*self._unread, *self._loaded]
        if self._writing is not None:
            known.append(self._writing)
        n = min(known, default=self._next) - 1
        final = self.directory / _segment_name(n)
        tmp = final.with_name(final.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(b"".join([encode_line(m) for m in messages]))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(self.directory)
        self._unread.appendleft(n)
        self.unread_messages += len(messages)

    # -- reading ---------------------------------------------------------------------

    def has_unread(self) -> bool:
        return bool(self._unread) or self._written > 0

    def load_next(self) -> tuple[int, list[Message]] | None:
        """Read the oldest segment not loaded yet: ``(number, messages)``, or ``None``."""
        if not self._unread:
            if not self._written:
                return None
            self._seal()
        n = self._unread.popleft()
        self._loaded.add(n)
        messages = self._read(n)
        self.unread_messages = max(self.unread_messages - len(messages), 0)
        return n, messages

    def remove(self, n: int) -> None:
        """Delete loaded segment ``n``: every message in it was confirmed."""
        self._loaded.discard(n)
        with contextlib.suppress(FileNotFoundError):
            (self.directory / _segment_name(n)).unlink()

    def remove_loaded(self) -> None:
        """Delete every loaded segment (their unconfirmed messages were prepended)."""
        for n in list(self._loaded):
            self.remove(n)

    @property
    def segments(self) -> list[Path]:
        """The segment files on disk now, oldest first."""
        found = sorted(
            (int(m.group(1)), p) for p in self.directory.iterdir() if (m := _SEGMENT.match(p.name))
        )
        return [p for _, p in found]

    # -- closing ---------------------------------------------------------------------

    def close(self) -> None:
        """Make the open segment durable and release the lock; safe to call twice."""
        self._seal()
        if self._lock is not None:
            self._lock.release()

    # -- internals -------------------------------------------------------------------

    def _open_segment(self) -> None:
        self._seal()
        n = self._next
        self._next += 1
        # "x": never append to (or clobber) a segment another run left behind.
        self._writer = open(self.directory / _segment_name(n), "xb")  # noqa: SIM115
        self._writing = n
        self._written = 0
        fsync_dir(self.directory)

    def _seal(self) -> None:
        writer = self._writer
        if writer is None:
            return
        self._writer = None
        try:
            writer.flush()
            os.fsync(writer.fileno())
        finally:
            writer.close()
        assert self._writing is not None
        if self._written:
            self._unread.append(self._writing)
        else:
            with contextlib.suppress(FileNotFoundError):
                (self.directory / _segment_name(self._writing)).unlink()
        self._writing = None
        self._written = 0

    def _count(self, n: int) -> int:
        try:
            return (self.directory / _segment_name(n)).read_bytes().count(_NL)
        except OSError:
            return 0

    def _read(self, n: int) -> list[Message]:
        path = self.directory / _segment_name(n)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            logger.error("spool segment %s vanished before it was sent", path)
            return []
        lines = data.split(_NL)
        tail = lines.pop()  # b"" when the file ends in a newline
        messages: list[Message] = []
        for lineno, line in enumerate(lines, 1):
            if not line:
                continue
            try:
                messages.append(decode_line(line))
            except ValueError as exc:
                self.corrupt += 1
                logger.error("spool %s line %d is corrupt (%s); skipped", path, lineno, exc)
        if tail:
            logger.warning(
                "spool %s ends in a partly written line (a crash mid-write); ignored", path
            )
        return messages
