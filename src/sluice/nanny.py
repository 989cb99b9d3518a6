"""The nanny: runs a worker in a child process and starts a fresh one when it dies.

Theory of operation
-------------------
The child is ``python -m sluice worker ADDRESS --no-nanny ... --nanny-fd N``.
``N`` is one end of a socket pair; the nanny keeps the other. The pair does two
jobs, with no polling and no temporary file:

- once registered with the scheduler, the child writes its worker address and a
  newline on it, so the nanny learns the address exactly when the worker is
  ready (end of file first means it died while starting);
- the child watches it for end of file: when the nanny goes away, even killed
  with SIGKILL, the kernel closes the nanny's end and the child exits, so a
  worker never outlives its nanny.

The auth token reaches the child through the environment variable
:data:`TOKEN_ENV` (hex), never its command line, which any user can read.

When the child exits while the nanny runs:

- exit code 0 (the scheduler sent ``close``, or someone stopped it on purpose):
  the nanny closes too;
- :data:`~sluice.worker.EXIT_RESTART` (``close`` with ``restart: true``): a fresh
  child starts, nothing is reported;
- anything else (a crash, SIGKILL, the scheduler connection dropped): a WARNING
  with the exit code, ``worker-died`` to the scheduler over the nanny's own
  connection, and a fresh child (backing off if children keep failing to start).

The nanny also closes when its own scheduler connection drops: a scheduler that
is gone for good must not leave nannies restarting workers forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Final, Self

import anyio
import anyio.abc
import cloudpickle

from sluice import config
from sluice._worker_exec import dumps_exception
from sluice._worker_plugins import teardown_plugin
from sluice.comm import Comm, CommClosedError, connect, parse_address
from sluice.preload import (
    Preload,
    from_config,
    load_preloads,
    setup_preloads,
    strict_from_config,
    teardown_preloads,
)
from sluice.security import Security
from sluice.sinks.registry import sinks_from_config
from sluice.worker import EXIT_RESTART

__all__ = ("TOKEN_ENV", "Nanny")

logger = logging.getLogger("sluice.nanny")

#: Environment variable carrying the auth token (hex) from a nanny to its worker.
TOKEN_ENV: Final = "SLUICE_NANNY_AUTH_TOKEN"

_MAX_BACKOFF: Final = 5.0


def _worker_command() -> list[str]:
    """``sluice worker`` run as its own module: it imports only what a worker needs."""
    return [sys.executable, "-m", "sluice._cli_worker"]


class Nanny:
    """Keeps one worker process running for a scheduler."""

    def __init__(
        self,
        scheduler_address: str,
        *,
        nthreads: int = 1,
        name: str | None = None,
        host: str = "127.0.0.1",
        security: Security | None = None,
        worker_port: int = 0,
        forward_events: bool | None = None,
        insecure: bool = False,
        log_format: str = "console",
        log_level: str = "info",
        connect_timeout: float = 10.0,
        terminate_timeout: float = 5.0,
        preload: str | Sequence[str] | None = None,
        preload_argv: Sequence[str] | Sequence[Sequence[str]] | None = None,
        preload_nanny: str | Sequence[str] | None = None,
        preload_nanny_argv: Sequence[str] | Sequence[Sequence[str]] | None = None,
        preload_strict: bool | None = None,
        sinks: str | Sequence[str] | None = None,
    ) -> None:
        parse_address(scheduler_address)
        # The worker's preloads, handed to each child. Read from the configuration
        # now, as the rest of the nanny's settings are: a config.set() block around
        # the constructor may be over by the time a child starts.
        values, worker_argv = from_config("worker", preload, preload_argv)
        self.worker_preload: list[str] | None = values or None
        self.worker_preload_argv = worker_argv or None
        self._child_config = config.child_environment()
        # The worker's are imported here too: a bad one fails before any child starts.
        if self.worker_preload or self.worker_preload_argv:
            load_preloads(self.worker_preload or [], self.worker_preload_argv)
        #: The worker's sink specs, handed to each child (specs: they cross a process).
        self.worker_sinks = _sink_specs(sinks)
        values, argv = from_config("nanny", preload_nanny, preload_nanny_argv)
        #: The nanny's own preloads, run around the nanny's life.
        self.preloads: list[Preload] = load_preloads(values, argv)
        self.preload_strict_arg = preload_strict
        self.preload_strict = strict_from_config("nanny", preload_strict)
        self.scheduler_address = scheduler_address
        self.nthreads = nthreads
        self.name = name
        self.host = host
        self.security = security
        self.worker_port = worker_port
        self.forward_events = forward_events
        self.insecure = insecure
        self.log_format = log_format
        self.log_level = log_level
        self.connect_timeout = connect_timeout
        self.terminate_timeout = terminate_timeout
        #: The nanny's end of its scheduler connection; set by :meth:`start`.
        self.address = ""
        #: The current child's worker address (``None`` between children).
        self.worker_address: str | None = None
        #: The current child process.
        self.process: anyio.abc.Process | None = None
        self.plugins: dict[str, Any] = {}
        #: Why the nanny closed ("closed", "scheduler-lost", "worker-exited");
        #: ``None`` while it runs.
        self.close_reason: str | None = None
        self._lifeline: socket.socket | None = None
        self._comm: Comm | None = None
        self._rids = itertools.count(1)
        #: What came in the frame of the first registration's reply, after it.
        self._early: list[dict[str, Any]] = []
        self._lock = anyio.Lock()
        self._restarting = False
        self._tg: anyio.abc.TaskGroup | None = None
        self._runner: asyncio.Task[None] | None = None
        self._stop = anyio.Event()
        self._running = anyio.Event()
        self._done = anyio.Event()

    def __repr__(self) -> str:
        return f"<Nanny worker={self.worker_address} name={self.name!r}>"

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect to the scheduler, start the worker, register; raise if it cannot start."""
        if self._runner is not None:
            raise RuntimeError("nanny already started")
        comm = await connect(
            self.scheduler_address, security=self.security, timeout=self.connect_timeout
        )
        self._comm = comm
        self.address = comm.local
        try:
            # Before the worker starts and the nanny registers.
            await setup_preloads(self.preloads, self, strict=self.preload_strict)
            await self._spawn()
            await self._register(wait=True)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._terminate_child()
                await comm.aclose()
            raise
        self._runner = asyncio.get_running_loop().create_task(
            self._run(), name=f"sluice-nanny-{self.worker_address}"
        )
        await self._running.wait()

    async def close(self) -> None:
        """Terminate the worker (SIGTERM, then SIGKILL after a timeout) and disconnect."""
        self._request_close("closed")
        if self._runner is None:
            return
        with anyio.CancelScope(shield=True):
            await self._done.wait()

    async def finished(self) -> None:
        """Wait until the nanny has closed (by :meth:`close` or by itself)."""
        if self._runner is not None:
            await self._done.wait()

    def _request_close(self, reason: str) -> None:
        if self.close_reason is None:
            self.close_reason = reason
        self._stop.set()

    async def _run(self) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._read_scheduler)
                assert self.process is not None
                tg.start_soon(self._watch, self.process)
                self._running.set()
                await self._stop.wait()
                await self._shutdown()
                tg.cancel_scope.cancel()
        except Exception:
            logger.exception("nanny of %s failed", self.worker_address)
            with anyio.CancelScope(shield=True):
                await self._terminate_child()
        finally:
            self._tg = None
            self._running.set()
            self._done.set()

    async def _shutdown(self) -> None:
        async with self._lock:  # let a restart in progress finish first
            await self._terminate_child()
        for name, plugin in list(self.plugins.items()):
            try:
                result = plugin.teardown(self)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("teardown of nanny plugin %r failed", name)
        await teardown_preloads(self.preloads, self)
        if self._comm is not None:
            await self._comm.aclose()

    # -- the child ---------------------------------------------------------------------------

    def _command(self, fd: int) -> list[str]:
        cmd = [
            *_worker_command(),
            self.scheduler_address,
            "--no-nanny",
            "--nthreads",
            str(self.nthreads),
            "--host",
            self.host,
            "--port",
            str(self.worker_port),
            "--log-format",
            self.log_format,
            "--log-level",
            self.log_level,
            "--connect-timeout",
            str(self.connect_timeout),
            "--nanny-fd",
            str(fd),
            "--nanny-address",
            self.address,
        ]
        if self.name is not None:
            cmd += ["--name", self.name]
        if self.forward_events is not None:
            # Unset: the child reads sluice.worker.forward-events from its config.
            cmd.append("--forward-events" if self.forward_events else "--no-forward-events")
        if self.insecure:
            cmd.append("--insecure")
        for preload in self.worker_preload or ():
            cmd += ["--preload", preload]
        for spec in self.worker_sinks:
            cmd += ["--sink", spec]
        if self.worker_preload_argv:
            cmd += ["--preload-argv-json", json.dumps(list(self.worker_preload_argv))]
        if self.preload_strict_arg is not None:
            cmd.append("--preload-strict" if self.preload_strict_arg else "--no-preload-strict")
        sec = self.security
        if sec is not None:
            for option, value in (
                ("--tls-ca-file", sec.tls_ca_file),
                ("--tls-cert", sec.tls_cert),
                ("--tls-key", sec.tls_key),
            ):
                if value is not None:
                    cmd += [option, value]
        return cmd

    async def _spawn(self) -> None:
        """Start a child and wait until its worker is registered (it sends its address)."""
        ours, theirs = socket.socketpair()

        env = dict(os.environ)
        # sluice.config.set() reaches the worker: what was set when the nanny was made,
        # and what is set now.
        env.update(self._child_config)
        env.update(config.child_environment())
        env.pop(TOKEN_ENV, None)
        if self.security is not None and self.security.auth_token is not None:
            env[TOKEN_ENV] = self.security.auth_token.hex()
        try:
            proc = await anyio.open_process(
                self._command(theirs.fileno()),
                stdin=subprocess.DEVNULL,
                stdout=None,
                stderr=None,
                pass_fds=(theirs.fileno(),),
                env=env,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self.process = proc
        self._lifeline = ours
        self.worker_address = None
        try:
            # Generous: the child imports sluice, then connects with its own timeout.
            with anyio.fail_after(self.connect_timeout + 60):
                line = await _read_line(ours)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._terminate_child()
            raise
        if not line:
            code = await proc.wait()
            await self._terminate_child()
            raise RuntimeError(f"the worker process exited with code {code} before registering")
        self.worker_address = line
        logger.info("nanny started worker %s (pid %d)", line, proc.pid)

    async def _terminate_child(self) -> None:
        proc, lifeline = self.process, self._lifeline
        self._lifeline = None
        try:
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                with anyio.move_on_after(self.terminate_timeout):
                    await proc.wait()
                if proc.returncode is None:
                    logger.warning(
                        "worker %s (pid %d) ignored SIGTERM for %ss; killing it",
                        self.worker_address,
                        proc.pid,
                        self.terminate_timeout,
                    )
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
            if proc is not None:
                await proc.aclose()
        finally:
            if lifeline is not None:
                lifeline.close()

    async def _watch(self, proc: anyio.abc.Process) -> None:
        """Wait for ``proc`` to exit; restart it if that was not asked for."""
        code = await proc.wait()
        if proc is not self.process or self._restarting or self._stop.is_set():
            return
        address = self.worker_address
        if code == 0:
            logger.info("worker %s exited cleanly; its nanny closes", address)
            self._request_close("worker-exited")
            return
        if code == EXIT_RESTART:
            logger.info("worker %s asked to be restarted", address)
        else:
            reason = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            logger.warning("worker %s (pid %d) died with %s; restarting", address, proc.pid, reason)
            self._send({"op": "worker-died", "worker": address, "exitcode": code})
        async with self._lock:
            if self._stop.is_set() or proc is not self.process:
                return
            await self._terminate_child()  # reap it, close its lifeline
            await self._respawn()

    async def _respawn(self) -> None:
        """Start a fresh child, backing off while children fail to start."""
        delay = 0.1
        while not self._stop.is_set():
            try:
                await self._spawn()
            except (RuntimeError, OSError, TimeoutError) as exc:
                logger.warning("restarting the worker failed: %s; retrying in %.1fs", exc, delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, _MAX_BACKOFF)
                continue
            await self._register(wait=False)
            assert self._tg is not None and self.process is not None
            self._tg.start_soon(self._watch, self.process)
            return

    async def restart(self) -> None:
        """Replace the worker with a fresh process; returns once the new one registered."""
        async with self._lock:
            self._restarting = True
            try:
                await self._terminate_child()
                await self._spawn()
            finally:
                self._restarting = False
            await self._register(wait=False)
            if self._tg is not None and self.process is not None:
                self._tg.start_soon(self._watch, self.process)

    # -- the scheduler connection ------------------------------------------------------------

    async def _register(self, *, wait: bool) -> None:
        assert self._comm is not None
        rid = next(self._rids)
        msg = {"op": "register-nanny", "rid": rid, "address": self.address}
        msg["worker"] = self.worker_address
        if not wait:
            self._send(msg)
            return
        await self._comm.send(msg)
        with anyio.fail_after(self.connect_timeout):
            while True:
                frame = await self._comm.recv()
                for i, reply in enumerate(frame):
                    if reply.get("op") == "reply" and reply.get("rid") == rid:
                        if not reply.get("ok"):
                            raise RuntimeError(
                                f"the scheduler refused the nanny: {reply.get('error')}"
                            )
                        self._early.extend(frame[i + 1 :])
                        return
                    self._early.append(reply)

    def _send(self, msg: dict[str, Any]) -> None:
        """Send without waiting for the write in the caller (rare, small messages)."""
        if self._tg is None or self._comm is None:
            return
        comm = self._comm

        async def send() -> None:
            with contextlib.suppress(CommClosedError):
                await comm.send(msg)

        self._tg.start_soon(send)

    async def _read_scheduler(self) -> None:
        assert self._comm is not None
        try:
            frame, self._early = self._early, []
            while True:
                for msg in frame:
                    op = msg.get("op")
                    if op == "close":
                        logger.info("the scheduler closes the nanny: %s", msg.get("reason"))
                        self._request_close("scheduler-close")
                    elif op == "reply":
                        if not msg.get("ok"):
                            logger.warning("the scheduler answered: %s", msg.get("error"))
                    elif op == "plugin-add" and self._tg is not None:
                        self._tg.start_soon(
                            self._plugin_add, msg.get("rid"), str(msg["name"]), msg["plugin"]
                        )
                    elif op == "plugin-remove" and self._tg is not None:
                        self._tg.start_soon(self._plugin_remove, msg.get("rid"), str(msg["name"]))
                    else:
                        logger.debug("nanny ignores %r from the scheduler", op)
                frame = await self._comm.recv()
        except CommClosedError:
            if not self._stop.is_set():
                logger.warning("nanny lost the scheduler %s; closing", self.scheduler_address)
            self._request_close("scheduler-lost")

    # -- plugins registered by clients ------------------------------------------------------

    async def _plugin_add(self, rid: Any, name: str, data: bytes) -> None:
        """Teardown of a plugin of that name, setup of the new one, then maybe a restart."""
        try:
            plugin = cloudpickle.loads(data)
            with contextlib.suppress(Exception):  # already logged
                await self._plugin_teardown(name)
            self.plugins[name] = plugin
            try:
                result = plugin.setup(self)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                self.plugins.pop(name, None)
                raise
            if getattr(plugin, "restart", False) and not self._stop.is_set():
                await self.restart()
        except Exception as exc:
            self._plugin_answer(rid, name, exc)
        else:
            self._plugin_answer(rid, name, None)

    async def _plugin_teardown(self, name: str) -> None:
        await teardown_plugin(self.plugins, name, self, "nanny")

    async def _plugin_remove(self, rid: Any, name: str) -> None:
        try:
            await self._plugin_teardown(name)
        except Exception as exc:
            self._plugin_answer(rid, name, exc)
        else:
            self._plugin_answer(rid, name, None)

    def _plugin_answer(self, rid: Any, name: str, exc: BaseException | None) -> None:
        """Reply to the scheduler; without a rid (a late joiner) a failure is only logged."""
        if rid is None:
            if exc is not None:
                logger.error("setup of nanny plugin %r failed", name, exc_info=exc)
            return
        reply: dict[str, Any] = {"op": "reply", "rid": rid, "ok": exc is None, "result": None}
        if exc is not None:
            reply["error"] = f"{type(exc).__name__}: {exc}"
            reply["exception"] = dumps_exception(exc)
        self._send(reply)


async def _read_line(sock: socket.socket) -> str:
    """One line from a non-blocking socket; ``""`` at end of file."""
    buf = b""
    while b"\n" not in buf:
        await anyio.wait_readable(sock)
        try:
            chunk = sock.recv(4096)
        except BlockingIOError:
            continue
        if not chunk:
            return ""
        buf += chunk
    return buf.split(b"\n", 1)[0].decode()


def _sink_specs(sinks: str | Sequence[str] | None) -> list[str]:
    """The worker sinks given to a nanny, else from config; checked by building them once."""
    if sinks is None:
        sinks = config.get("sluice.worker.sinks", None) or []
    specs = [sinks] if isinstance(sinks, str) else list(sinks)
    for spec in specs:
        if not isinstance(spec, str):
            raise TypeError(f"a nanny's sinks must be spec strings (they go to a child): {spec!r}")
    sinks_from_config("worker", specs)  # a bad spec fails here, before any child starts
    return specs
