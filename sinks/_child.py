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
``("error", text)`` when a sink failed. ``write`` returns once the child wrote
the batch, as the in-process sink's ``write`` would: when the bus is drained,
the files hold every event (the scheduler's catch-up reads its event log back).
A failure is raised in this process from that ``write`` (or ``flush``, ``close``),
once, so the bus logs it and counts it as the in-process sink's would be; the
child gives that sink nothing more (the event log then stays a prefix of the
run, as it does in-process) while its other sinks go on. A child that dies
is not restarted: its sinks' writes fail from then on, each with a one-line
error naming the exit code.
"""

from __future__ import annotations

import contextlib
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

_FLUSH = b"\0flush"
_CLOSE = b"\0close"
#: How long a flush or close waits for the child's reply before it gives up.
_REPLY_TIMEOUT = 120.0


class ChildSinkError(RuntimeError):
    """The child process of a ``process=true`` sink failed or is gone; one line."""


class ChildSink:
    """Run the sinks that ``specs`` describe in one child process (see the module doc).

    ``name`` and ``kinds`` are the inner sinks' (joined), so the bus routes and
    names this subscription as it would the sink itself.
    :func:`~sluice.sinks.registry.sinks_from_config` puts every ``process=true``
    sink of a service in one child: each batch then goes down one pipe once,
    whatever the number of sinks.
    """

    maxsize: int | None = None
    overflow: str | None = None
    linger: float | None = None

    def __init__(
        self, specs: Sequence[str], *, name: str, kinds: frozenset[str] | None = None
    ) -> None:
        self.specs = list(specs)
        self.name = name
        self.kinds = kinds
        self.bus: Any = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._down: multiprocessing.connection.Connection | None = None
        self._up: multiprocessing.connection.Connection | None = None
        self._dead: str | None = None  # why the child is gone, once it is
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
            self._start()

    def write(self, batch: Sequence[Event], /) -> None:
        if not batch:
            return
        data = encode_batch(batch)
        with self._lock:
            self._start()
            errors: list[str] = []
            if self._dead is None:
                try:
                    self._conn().send_bytes(data)
                except (OSError, ValueError):
                    self._dead = self._gone()
                else:
                    # Written when this returns, as the in-process sink's would be: a
                    # drained bus means a complete file (catch-up reads the event log).
                    errors = self._read_up("ok", "write")
            if self._dead is not None:
                self._raise(errors, f"{len(batch)} events from seq {batch[0].seq} on not written")
            # A sink of the child failed on this batch; the child's others wrote it.
            self._raise(errors, "it writes nothing more")

    def flush(self) -> None:
        with self._lock:
            if self._proc is not None and not self._closed:
                self._command(_FLUSH, "flush")

    def close(self) -> None:
        with self._lock:
            if self._proc is None or self._closed:
                self._closed = True
                return
            self._closed = True
            try:
                if self._dead is None:  # a dead child's writes said so already
                    self._command(_CLOSE, "close")
            finally:
                # EOF also tells a child that never got the command to close its sinks.
                if self._down is not None:
                    self._down.close()
                try:
                    self._proc.wait(_REPLY_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(10)
                if self._up is not None:
                    self._up.close()

    # -- internals ---------------------------------------------------------------------

    def _start(self) -> None:
        if self._proc is not None:
            return
        self._proc, self._down, self._up = spawn_child("sluice.sinks._child")
        self._down.send(
            {
                "specs": self.specs,
                "run_id": getattr(self.bus, "run_id", None),
                "address": getattr(self.bus, "address", None),
            }
        )
        errors = self._read_up("ready", "start")
        if errors and self._dead is None:
            self._dead = "it could not start"  # it exits after saying why
        self._raise(errors, "nothing is written")

    def _conn(self) -> multiprocessing.connection.Connection:
        assert self._down is not None
        return self._down

    def _command(self, command: bytes, what: str) -> None:
        errors: list[str] = []
        if self._dead is None:
            try:
                self._conn().send_bytes(command)
            except (OSError, ValueError):
                self._dead = self._gone()
            else:
                errors = self._read_up("ok", what)
        self._raise(errors, f"{what} failed")

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
                    errors.append(str(reply[1]))
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
    from sluice.sinks.registry import sink_from_spec

    config = down.recv()
    bus = types.SimpleNamespace(run_id=config["run_id"], address=config["address"])
    sinks: list[Any] = []
    try:
        for spec in config["specs"]:
            sink = sink_from_spec(spec)
            sink.bus = bus
            if hasattr(sink, "start"):
                sink.start()
            sinks.append(sink)
    except Exception as exc:
        for started in sinks:  # a log already opened ends whole
            with contextlib.suppress(Exception):
                started.close()
        up.send(("error", _one_line(exc)))
        return
    up.send(("ready",))
    # A sink that failed a write gets nothing more: a later batch that succeeded
    # would leave a hole in its file. The others go on.
    failed: set[int] = set()

    def each(method: str, *args: Any) -> None:
        for i, sink in enumerate(sinks):
            if i in failed or not hasattr(sink, method):
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
                    up.send(("error", f"{getattr(sink, 'name', sink)}: {_one_line(exc)}"))

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
