"""File handling shared by the sinks that write files (event log, JSON log, RabbitMQ spool).

Besides whole writes and durable directory entries, this is where a file sink
finds what a writer that died left behind (:func:`cut_partial_line`), so that a
sink resumed on the same file (the file sinks' child restarted by its parent)
continues it without a broken line in the middle.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO

__all__ = ("cut_partial_line", "fsync_dir", "last_line", "write_all")

_BLOCK = 1 << 16  # read back from the end in blocks of this size


def write_all(f: IO[bytes], data: bytes) -> None:
    """Write all of ``data``: an unbuffered write may write less than asked."""
    view = memoryview(data)
    while view:
        n = f.write(view)
        if n is None:  # only for non-blocking files, which the sinks never open
            raise BlockingIOError(f"short write to {f.name}")
        view = view[n:]


def fsync_dir(path: Path) -> None:
    """Fsync a directory so new entries in it survive a crash (POSIX only)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def cut_partial_line(path: Path) -> bytes | None:
    """Cut off what follows the last newline of ``path``; return its last whole line.

    A writer killed in the middle of a ``write`` leaves a line without its
    newline at the end of the file; appending after it would glue two lines
    into one that no reader can parse. Returns the last whole line without its
    newline, or ``None`` if the file is missing or has no whole line (it is
    then left empty).
    """
    try:
        f = open(path, "r+b")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return None
    with f:
        end = f.seek(0, os.SEEK_END)
        newline = _newline_before(f, end)
        if newline + 1 < end:
            f.truncate(newline + 1)
            os.fsync(f.fileno())
        if newline < 0:
            return None
        return _line_ending_at(f, newline)


def last_line(path: Path) -> bytes | None:
    """The last whole line of ``path`` without its newline (``None``: there is none)."""
    with open(path, "rb") as f:
        newline = _newline_before(f, f.seek(0, os.SEEK_END))
        return None if newline < 0 else _line_ending_at(f, newline)


def _newline_before(f: IO[bytes], end: int) -> int:
    """Offset of the last newline before ``end`` (-1: none), reading back in blocks."""
    pos = end
    while pos > 0:
        start = max(0, pos - _BLOCK)
        f.seek(start)
        i = f.read(pos - start).rfind(b"\n")
        if i >= 0:
            return start + i
        pos = start
    return -1


def _line_ending_at(f: IO[bytes], newline: int) -> bytes:
    """The line whose newline is at offset ``newline``, without it."""
    start = _newline_before(f, newline) + 1
    f.seek(start)
    return f.read(newline - start)
