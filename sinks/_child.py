"""A file sink run in a child process: ``json-log:///path?process=true``,
``eventlog:///path?process=true``.

Rendering a JSON log line and writing the event log cost the scheduler's
process several microseconds of Python an event, in threads that hold the GIL
its loop needs. With ``process=true`` the sink's work moves to a child process
(``python -m sluice.sinks._child``; a service's such sinks share one): this
process only sends each batch down a pipe as one msgpack blob of the events
(:mod:`sluice._event_wire`, ~0.5 us an event; the JSON is rendered in the
child), and the child gives the sink class, built from the same spec without
``process``, the events with the JSON the in-process sink would have written,
byte for byte. On a machine with a core to spare the child's work runs beside
the scheduler rather than in it (docs/performance.md).

Replies come back on a second pipe: ``("ready",)`` once the sink started,
``("ok",)`` for each batch written and each ``flush`` and ``close``, and
``("error", index, text)`` when the sink at ``index`` of the specs (``None``:
building them) failed. ``write`` returns once the child wrote
the batch, as the in-process sink's ``write`` would: when the bus is drained,
the files hold every event (the scheduler's catch-up reads its event log back).
A failure is raised in this process from that ``write`` (or ``flush``, ``close``),
once, so the bus logs it and counts it as the in-process sink's would be; the
child gives that sink nothing more (the event log then stays a prefix of the
run, as it does in-process) while its other sinks go on.

A child that dies (killed, out of memory) is replaced: the request that found
it gone starts another child, which builds its sinks with ``resume=True``, and
is sent again. Every batch before it was written (acknowledged), so only that
one may be partly in the files: the resumed sinks cut off a partial last line
and skip the events they already hold, and the files read as if the child had
never died. A sink that had failed stays out. A child that dies again
:data:`_MAX_RESTARTS` times in a row, with no batch written in between, is
not replaced: its sinks' requests fail from then on, each with a one-line
error naming the exit code.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing.connection
import subprocess
import sys
import threading
import types
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sluice._child_process import child_pipes, spawn_child
from sluice._event_wire import decode_batch, encode_batch

if TYPE_CHECKING:
    from sluice.events import Event

__all__ = ("ChildSink",)

logger = logging.getLogger("sluice.sinks")

_FLUSH = b"\0flush"
_CLOSE = b"\0close"
#: How long a request waits for the child's reply before it takes the child for dead.
_REPLY_TIMEOUT = 120.0
#: Children started in a row, each dead before it wrote a batch, before giving up.
_MAX_RESTARTS = 3


class ChildSinkError(RuntimeError):
    """The child process of a ``process=true`` sink failed or is gone; one line."""


class ChildSink:
    """Run the sinks that ``specs`` describe in one child process (see the module doc).

    ``name`` and ``kinds`` are the inner sinks' (joined), so the bus routes and
    names this subscription as it would the sink itself.
    :func:`~sluice.sinks.registry.sinks_from_config` puts every ``process=true``
    sink of a service in one child: each batch then goes down one pipe once,
    whatever the number of sinks. ``restarts``: how many children replaced one
    that died.
    """

    maxsize: int | None = None
    overflow: str | None = None
    linger: float | None = None
    #: The module the child runs (``python -m``); a test may put another in.
    module = "sluice.sinks._child"

    def __init__(
        self, specs: Sequence[str], *, name: str, kinds: frozenset[str] | None = None
    ) -> None:
        self.specs = list(specs)
        self.name = name
        self.kinds = kinds
        self.bus: Any = None
        self.restarts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._down: multiprocessing.connection.Connection | None = None
        self._up: multiprocessing.connection.Connection | None = None
        self._dead: str | None = None  # why the child is gone, once it is
        self._given_up = False  # no more children: one died _MAX_RESTARTS times in a row
        self._in_a_row = 0  # children started since a batch was last written
        self._failed: set[int] = set()  # sinks (by index in specs) that failed a write
        self._closed = False
        self._lock = threading.Lock()  # a user's close() may race the bus's thread

    def __repr__(self) -> str:
        return f"ChildSink({self.specs!r})"

    @property
    def pid(self) -> int | None:
        """The child's process id, once started."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        with self._lock:
            self._raise(self._request(None, "start"), "nothing is written")

    def write(self, batch: Sequence[Event], /) -> None:
        if not batch:
            return
        data = encode_batch(batch)
        with self._lock:
            # Written when this returns, as the in-process sink's would be: a
            # drained bus means a complete file (catch-up reads the event log).
            errors = self._request(data, "write")
            self._in_a_row = 0
            if self._dead is not None:
                self._raise(errors, f"{len(batch)} events from seq {batch[0].seq} on not written")
            # A sink of the child failed on this batch; the child's others wrote it.
            self._raise(errors, "it writes nothing more")

    def flush(self) -> None:
        with self._lock:
            if self._proc is not None and not self._closed:
                self._raise(self._request(_FLUSH, "flush"), "flush failed")

    def close(self) -> None:
        with self._lock:
            if self._proc is None or self._closed:
                self._closed = True
                return
            try:
                # A child that died since the last write is replaced for this too:
                # its files are closed (and fsynced) as the in-process sink's would be.
                if not self._given_up:
                    self._raise(self._request(_CLOSE, "close"), "close failed")
            finally:
                self._closed = True
                self._end_child(forget=False)  # pid and exit code stay readable

    # -- internals ---------------------------------------------------------------------

    def _spawn(self) -> list[str]:
        """Start a child; the failures it reported. One that cannot build its sinks
        says why and exits: that is raised at once, and no other is started (it
        would fail the same way). One that dies first (``_dead``) may be replaced."""
        self._proc, self._down, self._up = spawn_child(self.module)
        self._down.send(
            {
                "specs": self.specs,
                "run_id": getattr(self.bus, "run_id", None),
                "address": getattr(self.bus, "address", None),
                "resume": self.restarts > 0,
                "failed": sorted(self._failed),
            }
        )
        errors = self._read_up("ready", "start")
        if errors:
            self._dead = "it could not start"
            self._given_up = True
            self._raise(errors, "nothing is written")
        return errors

    def _request(self, data: bytes | None, what: str) -> list[str]:
        """Send ``data`` (``None``: only start a child) and wait for the child's
        reply; a dead child is replaced (see the module doc) and the request sent
        again. The failures the child reported; ``_dead`` is set if no child
        could take it."""
        errors: list[str] = []
        while True:
            if self._proc is None:
                errors += self._spawn()
            if self._dead is None and data is not None:
                try:
                    self._conn().send_bytes(data)
                except (OSError, ValueError):
                    self._dead = self._gone()
                else:
                    errors += self._read_up("ok", what)
            if self._dead is None or self._given_up:
                return errors
            self._in_a_row += 1
            if self._in_a_row > _MAX_RESTARTS:
                self._given_up = True
                logger.error(
                    "%s: its child process died %d times in a row (%s); its files take"
                    " no more events",
                    self.name,
                    self._in_a_row,
                    self._dead,
                )
                return errors
            logger.warning(
                "%s: its child process died (%s); starting another, which resumes its"
                " files and is sent the %s again",
                self.name,
                self._dead,
                what,
            )
            self._end_child(forget=True)
            self._dead = None
            self.restarts += 1

    def _end_child(self, *, forget: bool) -> None:
        """Close the pipes (EOF also tells a child that never got ``close`` to close
        its sinks) and wait for the child to exit; it is killed if it does not.
        ``forget``: make way for another child."""
        proc = self._proc
        if self._down is not None:
            self._down.close()
        if proc is not None:
            try:
                proc.wait(_REPLY_TIMEOUT if self._dead is None else 0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self._up is not None:
            self._up.close()
        if forget:
            self._proc = self._down = self._up = None

    def _conn(self) -> multiprocessing.connection.Connection:
        assert self._down is not None
        return self._down

    def _read_up(self, until: str, what: str) -> list[str]:
        """The failures the child reported before its ``until`` reply (every request
        waits for its own, so nothing is left over for the next). Marks the child
        dead if the pipe ends or no reply comes."""
        errors: list[str] = []
        up = self._up
        if up is None or self._dead is not None:
            return errors
        try:
            while True:
                if not up.poll(_REPLY_TIMEOUT):
                    self._dead = f"no reply to {what} in {_REPLY_TIMEOUT:.0f} s"
                    return errors
                reply = up.recv()
                if reply[0] == "error":
                    index, text = reply[1], reply[2]
                    if index is not None:
                        self._failed.add(index)
                    errors.append(str(text))
                    if until == "ready":
                        return errors  # a child that cannot start says so and exits
                elif reply[0] == until:
                    return errors
        except (EOFError, OSError):
            self._dead = self._gone()
        return errors

    def _raise(self, errors: list[str], consequence: str) -> None:
        if self._dead is not None:
            errors = [*errors, self._dead]
        if errors:
            raise ChildSinkError(
                f"{self.name} in a child process: {'; '.join(errors)}; {consequence}"
            )

    def _gone(self) -> str:
        code = None
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self._proc.wait(5)
        return f"the child process exited (code {code})"


# -- the child process -------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _serve(
    down: multiprocessing.connection.Connection, up: multiprocessing.connection.Connection
) -> None:
    from sluice.sinks.registry import resumed_sink, sink_from_spec

    config = down.recv()
    bus = types.SimpleNamespace(run_id=config["run_id"], address=config["address"])
    build = resumed_sink if config["resume"] else sink_from_spec
    # A sink that failed a write gets nothing more (in this child or an earlier
    # one): a later batch that succeeded would leave a hole in its file.
    failed: set[int] = set(config["failed"])
    sinks: list[Any] = []
    try:
        for i, spec in enumerate(config["specs"]):
            sink = None if i in failed else build(spec)
            if sink is not None:
                sink.bus = bus
                if hasattr(sink, "start"):
                    sink.start()
            sinks.append(sink)
    except Exception as exc:
        for started in sinks:  # a log already opened ends whole
            with contextlib.suppress(Exception):
                if started is not None:
                    started.close()
        up.send(("error", None, _one_line(exc)))
        return
    up.send(("ready",))

    def each(method: str, *args: Any) -> None:
        for i, sink in enumerate(sinks):
            if sink is None or i in failed or not hasattr(sink, method):
                continue
            try:
                if method == "write":
                    kinds = getattr(sink, "kinds", None)
                    batch = args[0] if kinds is None else [e for e in args[0] if e.kind in kinds]
                    if not batch:
                        continue
                    sink.write(batch)
                else:
                    getattr(sink, method)()
            except Exception as exc:
                failed.add(i)
                with contextlib.suppress(OSError, ValueError):
                    up.send(("error", i, f"{getattr(sink, 'name', sink)}: {_one_line(exc)}"))

    while True:
        try:
            data = down.recv_bytes()
        except (EOFError, OSError):
            data = _CLOSE  # the parent is gone: close the sinks as it would have
        if data == _CLOSE:
            failed.clear()  # every sink is closed, failed or not
            each("close")
            with contextlib.suppress(OSError, ValueError):
                up.send(("ok",))
            return
        if data == _FLUSH:
            each("flush")
            up.send(("ok",))
        else:
            each("write", decode_batch(data))
            up.send(("ok",))


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m sluice.sinks._child DOWN_FD UP_FD``: the child's entry point."""
    down, up = child_pipes(list(sys.argv[1:] if argv is None else argv))
    try:
        _serve(down, up)
    finally:
        down.close()
        up.close()


if __name__ == "__main__":
    main()
