"""``json-log``: one structured JSON line per event, for log shippers.

Each event becomes one line such as::

    {"timestamp": "2026-11-25T14:03:07.512334Z", "level": "info",
     "logger": "sluice.events", "event": "task-transition", "seq": 42,
     "key": "inc-1", "start": "processing", "finish": "memory", ...}

``event`` is the event's kind (structlog's name for the message), the other
fields are the event's own (``to_dict()``), and ``timestamp`` is the event's
``time`` (when it happened, not when it was written), in UTC ISO 8601. Failures
(transitions to ``erred``/``error``) get ``"level": "error"``.

The line is what structlog's ``add_log_level`` and ``JSONRenderer`` (orjson) make
of that dict, and with ``processors=[...]`` it is made that way, your structlog
processors first (to add a ``service`` or ``host`` field, say). Without them, the
same bytes are spliced from the event's cached JSON (:meth:`Event.to_json`,
shared with the event log and RabbitMQ): a busy scheduler makes tens of
thousands of events a second, and building and rendering a dict for each, in
the scheduler's process, cost it a sixth of its time. A batch is written with a
single ``write``; to a file, unbuffered, so a batch that ``write`` returned
from is in the file even if the process dies next.
"""

from __future__ import annotations

import datetime
import functools
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import click
import orjson
import structlog

from sluice.sinks import Sink
from sluice.sinks._files import cut_partial_line, write_all
from sluice.sinks._json import event_json

if TYPE_CHECKING:
    from sluice.events import Event

__all__ = ("JsonLog",)

_FAILED = frozenset({"erred", "error"})
_UTC = datetime.UTC


@functools.lru_cache(maxsize=4)
def _iso_second(second: int) -> str:
    return datetime.datetime.fromtimestamp(second, _UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _iso(seconds: float) -> str:
    """``seconds`` as UTC ISO 8601 with microseconds; the date part is computed once per
    second (a busy scheduler logs thousands of events in each)."""
    return _iso_bytes(seconds).decode()


@functools.lru_cache(maxsize=4)
def _iso_second_bytes(second: int) -> bytes:
    return _iso_second(second).encode()


def _split_micros(seconds: float) -> tuple[int, int]:
    """Whole seconds and microseconds, rounded as ``datetime.fromtimestamp`` rounds."""
    whole = int(seconds)
    micros = round((seconds - whole) * 1_000_000)
    if micros == 1_000_000:
        return whole + 1, 0
    return whole, micros


def _iso_bytes(seconds: float) -> bytes:
    whole, micros = _split_micros(seconds)
    return b"%s.%06dZ" % (_iso_second_bytes(whole), micros)


def _dumps(event_dict: dict[str, Any], **_: Any) -> bytes:
    # Fields may hold anything a user event carries: what orjson cannot encode is
    # written as its repr instead of failing the whole batch.
    return orjson.dumps(event_dict, default=repr, option=orjson.OPT_APPEND_NEWLINE)


class JsonLog(Sink):
    """Write each event as one JSON line to ``stderr``, ``stdout`` or a file.

    ``target`` is ``"stderr"``, ``"stdout"``, a path (appended to: log shippers
    follow a growing file) or an open binary or text stream. ``logger`` is the
    logger name written in each line. ``processors``: structlog processors run on
    each event's dict before it is rendered.

    ``resume=True`` (a file only) continues the file a writer of the same run
    left when it died (the file sinks' child, restarted by its parent): a
    partial last line is cut off, and if the last whole line is an event of
    the first batch written, the events of that batch up to it are skipped.
    """

    name = "json-log"

    def __init__(
        self,
        target: str | os.PathLike[str] | IO[Any] = "stderr",
        *,
        logger: str = "sluice.events",
        processors: Sequence[Callable[..., Any]] = (),
        resume: bool = False,
    ) -> None:
        self.target = target
        self.resume = resume
        # After a resume: the seq of the file's last line, until the first batch.
        self._resumed_at: int | None = None
        self.logger = logger
        self.processors = list(processors)
        self._stream: IO[bytes] | None = None
        self._owned = False
        self._lock = threading.Lock()
        self._chain: list[Any] = [
            *self.processors,
            structlog.processors.add_log_level,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ]
        self._logger_json = orjson.dumps(logger)
        # Per (kind, level): what goes between the timestamp's digits and the seq's,
        # and the start of the event's own JSON, {"kind":K,"seq":, to check it against.
        self._heads: dict[tuple[str, str], tuple[bytes, bytes]] = {}
        # The line's start up to the timestamp's fraction, for the last whole second
        # seen: a busy scheduler logs thousands of events in each. One tuple, so a
        # render on another thread never reads a second with another's prefix.
        self._second: tuple[int, bytes] = (-1, b"")

    def __repr__(self) -> str:
        return f"JsonLog({self.target!r})"

    def _open(self) -> IO[bytes]:
        if self._stream is not None:
            return self._stream
        target = self.target
        stream: IO[bytes]
        if target == "stderr":
            stream = sys.stderr.buffer
        elif target == "stdout":
            stream = sys.stdout.buffer
        elif isinstance(target, (str, os.PathLike)):
            path = Path(target)
            path.parent.mkdir(parents=True, exist_ok=True)
            if self.resume:
                self._resumed_at = _seq_of(cut_partial_line(path))
            stream = open(path, "ab", buffering=0)  # noqa: SIM115 - closed by close()
            self._owned = True
        else:
            stream = getattr(target, "buffer", target)
        self._stream = stream
        return stream

    def start(self) -> None:
        self._open()

    def render(self, event: Event) -> bytes:
        """The JSON line (with its newline) this sink writes for ``event``."""
        return self.render_all([event])

    def render_all(self, batch: Sequence[Event]) -> bytes:
        """The JSON lines of ``batch``, joined: what :meth:`write` writes."""
        if self.processors:
            return b"".join([self._render_with_structlog(e, _level(e)) for e in batch])
        # One loop with everything in locals: at tens of thousands of events a
        # second, a method call an event is a measurable part of the sink's cost.
        heads = self._heads
        second, prefix = self._second
        out: list[bytes] = []
        append = out.append
        for event in batch:
            try:
                data = event.to_json()
            except Exception:
                data = event_json(event)  # the repr of what JSON cannot hold, once warned
            finish = getattr(event, "finish", None)
            level = "error" if finish == "erred" or finish == "error" else "info"
            kind = event.kind
            made = heads.get((kind, level))
            if made is None:
                made = heads[kind, level] = self._make_heads(kind, level)
            head, start = made
            # {"kind":K,"seq":N,"time":T,"source":...}: keep N and, from "source" on,
            # the rest; put the envelope and "event":K in front. N and T are numbers.
            if data.startswith(start):
                n = len(start)
                digits_end = data.find(b',"time":', n)
                cut = data.find(b",", digits_end + 8)
                if digits_end > 0 and data.startswith(b',"source":', cut):
                    t = event.time
                    whole = int(t)
                    micros = round((t - whole) * 1_000_000)  # as _split_micros, inlined
                    if micros == 1_000_000:
                        whole, micros = whole + 1, 0
                    if whole != second:
                        second = whole
                        prefix = b'{"timestamp":"%s.' % _iso_second_bytes(whole)
                    # Parts, not one %-format: formatting bytes costs twice as much.
                    append(prefix)
                    append(b"%06d" % micros)
                    append(head)
                    append(data[n:digits_end])
                    append(data[cut:])
                    append(b"\n")
                    continue
            append(self._render_with_structlog(event, level))
        # One tuple, so a render on another thread never reads a second with
        # another's prefix.
        self._second = (second, prefix)
        return b"".join(out)

    def _make_heads(self, kind: str, level: str) -> tuple[bytes, bytes]:
        kind_json = orjson.dumps(kind)
        head = b'","level":"%s","logger":%s,"event":%s,"seq":' % (
            level.encode(),
            self._logger_json,
            kind_json,
        )
        return b"Z" + head, b'{"kind":%s,"seq":' % kind_json

    def _render_with_structlog(self, event: Event, level: str) -> bytes:
        fields = event.to_dict()
        del fields["time"]
        event_dict: dict[str, Any] = {
            "timestamp": _iso(event.time),
            "level": "info",
            "logger": self.logger,
            "event": fields.pop("kind"),
            **fields,
        }
        out: Any = event_dict
        for processor in self._chain:
            out = processor(None, level, out)
        return out  # type: ignore[no-any-return]

    # Sync: writing to a file or a pipe may block, so the bus runs this in a thread.
    def write(self, batch: Sequence[Event]) -> None:
        with self._lock:
            stream = self._open()
            if self._resumed_at is not None:
                batch = _unwritten(batch, self._resumed_at)
                self._resumed_at = None
            data = self.render_all(batch)
            if self._owned:
                write_all(stream, data)
            else:
                stream.write(data)

    def flush(self) -> None:
        with self._lock:
            if self._stream is not None:
                self._stream.flush()

    def close(self) -> None:
        with self._lock:
            if self._stream is not None:
                self._stream.flush()
                if self._owned:
                    self._stream.close()
                self._stream = None


def _level(event: Event) -> str:
    return "error" if getattr(event, "finish", None) in _FAILED else "info"


def _seq_of(line: bytes | None) -> int | None:
    """The ``seq`` field of a JSON log line, if it has one."""
    if line is None:
        return None
    try:
        fields = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    seq = fields.get("seq") if type(fields) is dict else None
    return seq if type(seq) is int else None


def _unwritten(batch: Sequence[Event], last: int) -> Sequence[Event]:
    """``batch`` without the events a writer that died wrote of it before: those up to
    ``last``, the seq of the file's last line, if it is one of the batch's. A last
    line from before the batch (an earlier batch, an earlier run) skips nothing."""
    if batch and batch[0].seq <= last <= batch[-1].seq:
        return [e for e in batch if e.seq > last]
    return batch


@click.command()
@click.option(
    "--json-log-target",
    default="stderr",
    show_default=True,
    help="Where the JSON lines go: stderr, stdout or a file path.",
)
def sluice_setup(server: Any, json_log_target: str) -> None:
    """As a preload (``--preload sluice.sinks.jsonlog``): JSON lines of ``server``'s events."""
    server.add_sink(JsonLog(json_log_target))
