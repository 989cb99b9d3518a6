"""The durable event log: every event of a run, one JSON line each.

The log is what makes a run replayable (``sluice.replay.read_events``,
``sluice replay LOG``), so it is written to survive crashes rather than to be
pretty:

- Line 1 is a header (``format``, ``version``, ``run_id``, ``started``,
  ``address``); each further line is one ``event.to_dict()``, encoded with
  orjson (the sink must keep up with >300k events/s).
- A batch is encoded as a whole and written with a single ``write`` call, so a
  crash leaves at most one partly written line, at the very end, which the
  reader tolerates.
- Rotation by size appends new segments ``path.1``, ``path.2``... and never
  renames anything, so no crash can lose a whole segment. Each segment starts
  with its own header (same ``run_id``, plus ``"segment": n``).
- ``fsync``: ``"batch"`` (default) fsyncs after every batch, so an event
  delivered to the sink survives a power loss; ``"close"`` only when a segment
  is closed (fast, durable after a clean shutdown); ``"never"`` leaves it to
  the OS. ``flush()`` fsyncs too unless the policy is ``"never"``.

An existing log is never appended to or overwritten: if ``path`` exists and is
not empty, or stale segments ``path.N`` of an older log are there, the
constructor raises :class:`FileExistsError` naming the path. Running a
scheduler twice with the same ``--event-log`` therefore fails at startup with
a one-line message instead of producing one file that mixes two runs (whose
``seq`` would restart at 1 in the middle). An existing *empty* file (say, made
by ``mktemp``) is reused.

The one exception is ``resume=True``: the log of *this* run (its header's
``run_id`` must be the sink's) is continued after the writer that had it open
died (the file sinks' child, restarted by its parent, resumes its files so). A
partial last line is cut off, and the events of the next batches that the log
already holds (``seq`` not above its last) are skipped, so the log reads as if
the writer had never stopped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, get_args

import click
import orjson

from sluice._core.logfile import FORMAT, existing_segments, read_header, segment_path
from sluice.events import SCHEMA_VERSION
from sluice.sinks import Sink
from sluice.sinks._files import cut_partial_line, fsync_dir, last_line, write_all
from sluice.sinks._json import event_json

if TYPE_CHECKING:
    from sluice.events import Event

__all__ = ("EventLog", "FsyncPolicy")

logger = logging.getLogger("sluice.sinks.eventlog")

FsyncPolicy = Literal["batch", "close", "never"]

_NL = orjson.OPT_APPEND_NEWLINE


class EventLog(Sink):
    """Append every event to a JSON Lines file, rotated by size.

    ``run_id`` and ``address`` go in the header; by default they are taken
    from the bus the sink runs on (a fresh uuid4 hex / ``None`` without one).
    The header is written at ``start()`` or at the first ``write``, so a sink
    that is never started leaves no file behind. ``resume=True`` continues this
    run's log instead of refusing an existing one (see the module doc).
    """

    name = "eventlog"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        rotate_bytes: int | None = None,
        fsync: FsyncPolicy = "batch",
        run_id: str | None = None,
        address: str | None = None,
        resume: bool = False,
    ) -> None:
        if fsync not in get_args(FsyncPolicy):
            raise ValueError(f"fsync must be one of 'batch', 'close', 'never', not {fsync!r}")
        if rotate_bytes is not None and (type(rotate_bytes) is not int or rotate_bytes <= 0):
            raise ValueError(f"rotate_bytes must be a positive int or None, not {rotate_bytes!r}")
        self.path = Path(path)
        self.rotate_bytes = rotate_bytes
        self.fsync: FsyncPolicy = fsync
        self._run_id = run_id
        self._address = address
        self.resume = resume
        if not resume:
            self._check_not_exists()
        # After a resume: the last seq the log already held; events up to it are skipped.
        self._skip_to = 0
        # The bus calls write/flush/close from worker threads, one at a time,
        # but nothing forbids a user from calling close() concurrently.
        self._lock = threading.Lock()
        self._file: IO[bytes] | None = None
        self._segment = -1  # number of the open segment; -1 before the first
        self._size = 0  # bytes in the open segment
        self._header_size = 0  # bytes of its header
        self._started: float | None = None
        self._closed = False
        # Set by a failed write: nothing more is written, so that the log stays a
        # prefix of the run (a later, smaller batch that fit would leave a hole).
        self._stopped: str | None = None

    # -- header fields -------------------------------------------------------------

    @property
    def run_id(self) -> str:
        """The run id written in the header: argument, else the bus's, else a new one."""
        if self._run_id is None:
            bus_run_id = getattr(self.bus, "run_id", None)
            self._run_id = bus_run_id if bus_run_id else uuid.uuid4().hex
        return self._run_id

    @property
    def address(self) -> str | None:
        """The scheduler address written in the header, if known."""
        if self._address is not None:
            return self._address
        return getattr(self.bus, "address", None) or None

    @property
    def paths(self) -> list[Path]:
        """The segment files written so far, in order."""
        return [segment_path(self.path, n) for n in range(self._segment + 1)]

    # -- Sink interface ------------------------------------------------------------

    def start(self) -> None:
        """Create the file and write its header, so a run with no event still has a log."""
        with self._lock:
            self._ensure_open()

    def write(self, batch: Sequence[Event], /) -> None:
        """Append ``batch`` with one ``write`` call; fsync per policy."""
        if not batch:
            return
        with self._lock:
            if self._stopped is not None:
                raise OSError(
                    f"event log {self.path} stopped after a failed write ({self._stopped});"
                    f" events from seq {batch[0].seq} on are not in it"
                )
            try:
                f = self._ensure_open()
            except OSError as exc:
                self._stop(exc, batch[0].seq)
                raise
            if self._skip_to:  # resumed: what the log holds already is not written again
                batch = [e for e in batch if e.seq > self._skip_to]
                if not batch:
                    return
                self._skip_to = 0  # seqs only grow: no later batch holds a logged one
            data = _encode(batch)
            # A segment holding only its header is never left: a limit smaller
            # than the header would otherwise leave a trail of empty segments.
            if (
                self.rotate_bytes is not None
                and self._size >= self.rotate_bytes
                and self._size > self._header_size
            ):
                try:
                    f = self._open_segment(self._segment + 1)
                except OSError as exc:
                    self._stop(exc, batch[0].seq)
                    raise
            try:
                write_all(f, data)
            except OSError as exc:
                # Disk full or similar, maybe after part of the batch: cut the
                # partial line off, so the log ends on a whole event.
                with contextlib.suppress(OSError):
                    f.truncate(self._size)
                    f.seek(self._size)
                self._stop(exc, batch[0].seq)
                raise
            self._size += len(data)
            if self.fsync == "batch":
                os.fsync(f.fileno())

    def flush(self) -> None:
        """Make everything written so far durable (unless the policy is ``"never"``)."""
        with self._lock:
            if self._file is not None and self.fsync != "never":
                os.fsync(self._file.fileno())

    def close(self) -> None:
        """Fsync per policy and close; safe to call more than once."""
        with self._lock:
            self._closed = True
            self._close_segment()

    # -- internals -----------------------------------------------------------------

    def _stop(self, exc: OSError, seq: int) -> None:
        self._stopped = f"{type(exc).__name__}: {exc}"
        logger.error(
            "event log %s: writing seq %d on failed (%s); the log ends before it and"
            " takes no more events",
            self.path,
            seq,
            self._stopped,
        )

    def _check_not_exists(self) -> None:
        """Refuse to mix two runs in one log (see the module docstring)."""
        try:
            nonempty = self.path.stat().st_size > 0
        except FileNotFoundError:
            nonempty = False
        stale = existing_segments(self.path)
        if nonempty or stale:
            what = self.path if nonempty else segment_path(self.path, stale[0])
            raise FileExistsError(
                f"event log {what} already exists; sluice never appends to or overwrites"
                " a log: give a new path or remove the old log"
            )

    def _ensure_open(self) -> IO[bytes]:
        if self._file is not None:
            return self._file
        if self._closed:
            raise ValueError(f"event log {self.path} is closed")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.resume:
            resumed = self._resume()
            if resumed is not None:
                return resumed
        self._started = time.time()
        return self._open_segment(0)

    def _resume(self) -> IO[bytes] | None:
        """Reopen this run's log where a writer that died left it; ``None`` if it
        has no whole header yet (it is then started afresh)."""
        numbers = [0, *existing_segments(self.path)]
        n = numbers[-1]
        try:
            with open(self.path, "rb") as first:
                whole_header = first.readline().endswith(b"\n")
        except FileNotFoundError:
            return None
        if not whole_header and n == 0:  # died while writing the log's first header
            cut_partial_line(self.path)
            return None
        # Whose log it is, before anything in it is touched.
        header = read_header(self.path)
        if header["run_id"] != self.run_id:
            raise ValueError(
                f"event log {self.path} records run {header['run_id']!r}, not"
                f" {self.run_id!r}: it cannot be resumed by this run"
            )
        self._started = header.get("started")
        last = cut_partial_line(segment_path(self.path, n))
        if last is None:  # died while starting segment n: start it again
            self._skip_to = _last_seq(self.path, numbers[:-1])
            segment_path(self.path, n).unlink()
            return self._open_segment(n)
        self._skip_to = _last_seq(self.path, numbers)
        path = segment_path(self.path, n)
        f = open(path, "ab", buffering=0)  # noqa: SIM115 - kept open across calls
        self._file = f
        self._segment = n
        with open(path, "rb") as segment:
            self._header_size = len(segment.readline())
        self._size = f.seek(0, os.SEEK_END)
        return f

    def _open_segment(self, n: int) -> IO[bytes]:
        """Close the open segment (if any) and start segment ``n`` with its header."""
        self._close_segment()
        path = segment_path(self.path, n)
        # "x" so that a log another process created meanwhile is never
        # clobbered; an empty first file (checked empty at construction) is reused.
        mode = "wb" if n == 0 and path.exists() and path.stat().st_size == 0 else "xb"
        # Unbuffered: every batch is already one big write, a buffer would
        # only copy it and split it.
        f = open(path, mode, buffering=0)  # noqa: SIM115 - kept open across calls
        header: dict[str, Any] = {
            "format": FORMAT,
            "version": SCHEMA_VERSION,
            "run_id": self.run_id,
            "started": self._started,
            "address": self.address,
        }
        if n:
            header["segment"] = n
        data = orjson.dumps(header, option=_NL)
        try:
            write_all(f, data)
        except BaseException:
            f.close()
            raise
        self._file = f
        self._segment = n
        self._size = self._header_size = len(data)
        if self.fsync == "batch":
            # Make the new directory entry durable too: a segment that vanished
            # after a power loss would leave a gap the reader rejects.
            os.fsync(f.fileno())
            fsync_dir(path.parent)
        return f

    def _close_segment(self) -> None:
        f = self._file
        if f is None:
            return
        self._file = None
        try:
            if self.fsync != "never":
                os.fsync(f.fileno())
                if self.fsync == "close":
                    fsync_dir(self.path.parent)
        finally:
            f.close()


def _encode(batch: Sequence[Event]) -> bytes:
    """One newline-terminated line per event, as a single bytes object."""
    lines = []
    for e in batch:
        try:
            lines.append(event_json(e))
        except Exception:  # even its repr() failed: keep the rest of the batch
            logger.error("event seq=%s (%s) dropped from the event log", e.seq, e.kind)
    lines.append(b"")
    return b"\n".join(lines)


def _last_seq(path: Path, numbers: list[int]) -> int:
    """The seq of the last event in segments ``numbers`` of the log (0: none).

    Called after :func:`cut_partial_line` made each segment end on a whole line.
    """
    for n in reversed(numbers):
        whole = last_line(segment_path(path, n))
        line = orjson.loads(whole) if whole is not None else None
        if type(line) is dict and "format" not in line and type(line.get("seq")) is int:
            return int(line["seq"])
    return 0


@click.command()
@click.option(
    "--eventlog-path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The event log to write (must not exist yet).",
)
@click.option(
    "--eventlog-fsync",
    type=click.Choice(get_args(FsyncPolicy)),
    default="batch",
    show_default=True,
    help="When to fsync: after every batch, when a segment closes, or never.",
)
@click.option(
    "--eventlog-rotate-bytes",
    type=click.IntRange(1),
    default=None,
    help="Start a new segment file when one passes this size.",
)
def sluice_setup(
    server: Any, eventlog_path: Path, eventlog_fsync: FsyncPolicy, eventlog_rotate_bytes: int | None
) -> None:
    """As a preload (``--preload sluice.sinks.eventlog``): record ``server``'s events."""
    sink = EventLog(eventlog_path, fsync=eventlog_fsync, rotate_bytes=eventlog_rotate_bytes)
    server.add_sink(sink)
