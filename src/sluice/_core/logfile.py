"""The on-disk format of the event log, and its reader.

An event log is JSON Lines. Line 1 of every file is a header::

    {"format": "sluice-event-log", "version": 1, "run_id": "...",
     "started": 1700000000.0, "address": "tcp://..."}

and every further line is one ``event.to_dict()``. A log that grew past its
``rotate_bytes`` is split into *segments*: ``path`` (the first), ``path.1``,
``path.2``... Each segment starts with its own header (the same ``run_id``, plus
``"segment": n``) so it can be identified on its own, and no line is ever split
across two segments. The writer (:class:`sluice.sinks.eventlog.EventLog`) only
ever appends to the newest segment and never renames anything, so a crash can
lose at most the tail of the last segment.

The reader therefore tolerates exactly one kind of damage: a last line of the
last segment that has no newline and does not parse (a crash mid-write). It is
logged at WARNING and reported in :attr:`EventLogReader.truncated`. Anything
else that does not parse is corruption, reported with the file and its 1-based
line number (the header is line 1), after the events before it were yielded,
so a test or a human can find the bad line with ``sed -n Np``. So is an event
whose ``seq`` is not greater than the one before it (lines swapped or repeated).

Speed matters (logs of millions of transitions are replayed in tests), so the
reader iterates lines of a binary file with a large buffer and decodes each
with :func:`sluice._core.event_codec.decode_line`; the hot loop does nothing else.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import orjson

from sluice._core.event_codec import decode_line
from sluice.events import SCHEMA_VERSION, Event

__all__ = (
    "FORMAT",
    "EventLogError",
    "EventLogReader",
    "existing_segments",
    "read_events",
    "read_header",
    "segment_path",
)

#: The ``format`` field of every event-log header.
FORMAT: Final = "sluice-event-log"

#: Oldest schema version this reader can upcast from.
_MIN_VERSION: Final = 1

#: Read buffer: big reads keep the per-line cost down to the decoding.
_BUFFER: Final = 1 << 20

logger = logging.getLogger("sluice.replay")

StrPath = str | os.PathLike[str]


class EventLogError(ValueError):
    """An event log cannot be read: not a log, a newer version, or a corrupt line.

    The message always starts with the file (and, for a bad line, its 1-based
    line number), so it points at the exact place to look.
    """

    __module__ = "sluice.replay"


def segment_path(path: Path, n: int) -> Path:
    """The path of segment ``n`` (0 is the first segment, ``path`` itself)."""
    return path if n == 0 else Path(f"{path}.{n}")


def existing_segments(path: Path) -> list[int]:
    """Numbers ``n >= 1`` of the ``path.n`` files that exist, sorted.

    Listing the directory (rather than probing ``path.1``, ``path.2``... until
    one is missing) lets the reader notice a missing segment in the middle and
    lets the writer notice stale segments of an older log.
    """
    pattern = re.compile(re.escape(path.name) + r"\.([1-9][0-9]*)")
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        m = pattern.fullmatch(name)
        if m is not None:
            found.append(int(m.group(1)))
    return sorted(found)


def _parse_header(file: str, line: bytes) -> dict[str, Any]:
    """Decode and check a header line; raise :class:`EventLogError` if it is not one."""
    try:
        header = orjson.loads(line)
    except orjson.JSONDecodeError:
        header = None
    if type(header) is not dict or header.get("format") != FORMAT:
        raise EventLogError(f"{file}: not a sluice event log (line 1 is not its header)")
    version = header.get("version")
    if type(version) is not int or version < _MIN_VERSION:
        raise EventLogError(f"{file}:1: bad event-log version {version!r}")
    if version > SCHEMA_VERSION:
        raise EventLogError(
            f"{file}: written with event schema version {version}, newer than this"
            f" sluice reads ({SCHEMA_VERSION}); upgrade sluice to read it"
        )
    if type(header.get("run_id")) is not str:
        raise EventLogError(f"{file}:1: header has no run_id")
    return header


def _read_first_line(path: Path) -> bytes:
    """The first line of ``path``; a clear error for a missing or empty file."""
    try:
        with open(path, "rb") as f:
            line = f.readline()
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "no such event log", str(path)) from None
    if not line:
        raise EventLogError(f"{path}: empty file, not a sluice event log (no header)")
    return line


class EventLogReader:
    """Reads the events of a (possibly rotated) event log, in order.

    The first segment's header is read and checked at construction, so a wrong
    path fails at once; the events are read lazily by iterating the reader.
    Each iteration starts afresh from the first segment.

    - ``header``: the first segment's header, as a dict.
    - ``truncated``: after an iteration, ``(file, line)`` of a tolerated
      truncated last line, else ``None``.
    """

    def __init__(self, path: StrPath) -> None:
        self.path = Path(path)
        self.header: dict[str, Any] = _parse_header(str(self.path), _read_first_line(self.path))
        segment = self.header.get("segment", 0)
        if segment != 0:
            raise EventLogError(
                f"{self.path}: this is segment {segment!r} of a rotated log;"
                " read the log from its first file"
            )
        self.truncated: tuple[str, int] | None = None
        self._last_seq = 0  # seq of the last event read, across segments

    @property
    def run_id(self) -> str:
        """The run this log records."""
        run_id: str = self.header["run_id"]
        return run_id

    def segments(self) -> list[Path]:
        """The files of this log, in order; raise if one in the middle is missing."""
        numbers = existing_segments(self.path)
        for expected, n in enumerate(numbers, 1):
            if n != expected:
                missing = segment_path(self.path, expected)
                raise EventLogError(
                    f"{missing}: missing segment of the event log"
                    f" ({segment_path(self.path, n)} exists)"
                )
        return [self.path, *(segment_path(self.path, n) for n in numbers)]

    def __iter__(self) -> Iterator[Event]:
        self.truncated = None
        self._last_seq = 0
        paths = self.segments()
        last = len(paths) - 1
        for n, path in enumerate(paths):
            # Only the last segment may be truncated, so this reads to the end.
            yield from self._read_segment(path, n, is_last=n == last)

    def _check_segment_header(self, file: str, n: int, line: bytes) -> int:
        """Check the header of segment ``n``; return its schema version."""
        header = _parse_header(file, line)
        if header["run_id"] != self.run_id:
            raise EventLogError(
                f"{file}: segment of another run (run_id {header['run_id']!r},"
                f" {self.path} has {self.run_id!r})"
            )
        if header.get("segment", 0) != n:
            raise EventLogError(
                f"{file}:1: header says segment {header.get('segment', 0)!r}, expected {n}"
            )
        version: int = header["version"]
        return version

    def _read_segment(self, path: Path, n: int, *, is_last: bool) -> Iterator[Event]:
        file = str(path)
        with open(path, "rb", buffering=_BUFFER) as f:
            first = f.readline()
            if is_last and n > 0 and not first.endswith(b"\n") and not _parses(first):
                # The writer crashed while starting this segment (an empty
                # file or part of its header): nothing of it was lost.
                self._truncate(file, 1)
                return
            version = self._check_segment_header(file, n, first)
            last_seq = self._last_seq
            for lineno, line in enumerate(f, 2):
                try:
                    event = decode_line(line, version)
                except (ValueError, TypeError) as exc:
                    # JSONDecodeError and EventSchemaError are ValueErrors; a
                    # TypeError comes from an unhashable "kind" such as a list.
                    if is_last and not line.endswith(b"\n"):
                        self._truncate(file, lineno)
                        return
                    reason = "blank line" if not line.strip() else _reason(exc)
                    raise EventLogError(f"{file}:{lineno}: {reason}") from None
                if event.seq <= last_seq:
                    # A bus stamps strictly increasing seqs, so a log of one run
                    # never goes back (a filtered copy may skip seqs, never repeat).
                    raise EventLogError(
                        f"{file}:{lineno}: seq {event.seq} is out of order (after seq {last_seq})"
                    )
                last_seq = event.seq
                yield event
            self._last_seq = last_seq

    def _truncate(self, file: str, lineno: int) -> None:
        self.truncated = (file, lineno)
        logger.warning(
            "%s:%d: truncated last line ignored (the writer stopped mid-write)", file, lineno
        )


def _parses(line: bytes) -> bool:
    try:
        orjson.loads(line)
    except orjson.JSONDecodeError:
        return False
    return True


def _reason(exc: Exception) -> str:
    if isinstance(exc, orjson.JSONDecodeError):
        return f"invalid JSON ({exc})"
    return str(exc)


def read_header(path: StrPath) -> dict[str, Any]:
    """The header of the log at ``path`` (its first segment)."""
    return EventLogReader(path).header


def read_events(path: StrPath) -> Iterator[Event]:
    """The events of the log at ``path``, across its rotated segments.

    The header is checked now (a wrong path fails at the call), the events are
    read lazily.
    """
    return iter(EventLogReader(path))
