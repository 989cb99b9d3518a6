"""A RabbitMQ node of a test's own, on spare ports, that the test may stop and start.

The shared broker at 127.0.0.1:5672 is never touched: this node has its own
node name (``sluice-test-<random>@localhost``), AMQP port, distribution port,
data (mnesia), log and pid paths under a directory the test owns, an empty
enabled-plugins file (so no management listener competes for port 15672) and
its own configuration and environment files, so nothing in ``/etc/rabbitmq``
applies to it.

``rabbitmq-server`` runs in the foreground as a child process of the test
(never ``-detached``), in its own process group, so :meth:`RabbitNode.kill`
can always end it, whatever state the test left it in. ``stop()`` then
``start()`` restart the node on the same port and the same data directory, so
durable queues and persistent messages survive, as on a real broker restart.

Use it as a context manager::

    with RabbitNode(tmp_path) as node:
        url = node.url            # amqp://guest:guest@127.0.0.1:<port>/
        node.stop(); node.start()
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import IO, Self

__all__ = ("RabbitNode", "rabbitmq_available")

_SERVER = "rabbitmq-server"
_CTL = "rabbitmqctl"
# The package's own scripts: /usr/sbin/rabbitmq-server switches to the rabbitmq
# user when run as root, which would make the node unreachable for our own
# directories and cookie, so prefer the unwrapped ones.
_LIB_BIN = Path("/usr/lib/rabbitmq/bin")


def _tool(name: str) -> str | None:
    direct = _LIB_BIN / name
    if direct.exists():
        return str(direct)
    return shutil.which(name)


def rabbitmq_available() -> bool:
    """True if ``rabbitmq-server`` and ``rabbitmqctl`` can be run here."""
    return _tool(_SERVER) is not None and _tool(_CTL) is not None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


class RabbitNode:
    """One private RabbitMQ node; see the module docstring."""

    def __init__(self, base: Path, *, startup_timeout: float = 60.0) -> None:
        server, ctl = _tool(_SERVER), _tool(_CTL)
        if server is None or ctl is None:
            raise FileNotFoundError("rabbitmq-server / rabbitmqctl not found")
        self._server = server
        self._ctl = ctl
        self.base = Path(base)
        self.startup_timeout = startup_timeout
        self.nodename = f"sluice-test-{uuid.uuid4().hex[:10]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        while self.dist_port == self.port:
            self.dist_port = free_port()
        self.home = self.base / "home"  # the Erlang cookie lives here
        for d in ("home", "mnesia", "log"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        (self.base / "enabled_plugins").write_text("[].\n")
        (self.base / "rabbitmq-env.conf").write_text("")
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
            "log.console = false\n"
            "log.file.level = warning\n"
        )
        self._proc: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            HOME=str(self.home),
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.base / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.base / "log"),
            RABBITMQ_PID_FILE=str(self.base / "rabbit.pid"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.base / "enabled_plugins"),
            RABBITMQ_CONF_ENV_FILE=str(self.base / "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=str(self.base / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.base / "advanced.config"),
            ERL_EPMD_ADDRESS="127.0.0.1",
        )
        return env

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Start the node (same port, same data) and wait until it accepts AMQP."""
        if self._proc is not None and self._proc.poll() is None:
            raise RuntimeError(f"node {self.nodename} is already running")
        self._output = open(self.base / "server-output.log", "ab")  # noqa: SIM115
        self._proc = subprocess.Popen(
            [self._server],
            env=self.env(),
            cwd=self.base,
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: kill() ends every child
        )
        deadline = time.monotonic() + self.startup_timeout
        try:
            # await_startup fails at once while the node has not registered with
            # epmd yet, so it is retried until the node is up or the deadline passes.
            while True:
                left = deadline - time.monotonic()
                try:
                    self._ctl_run(
                        ["await_startup", "--timeout", str(max(int(left), 1))],
                        timeout=max(left, 1) + 10,
                    )
                    break
                except RuntimeError:
                    if self._proc.poll() is not None:
                        raise RuntimeError(f"node {self.nodename} exited: {self._tail()}") from None
                    if time.monotonic() > deadline:
                        raise
                time.sleep(0.5)  # the node is not registered yet; nothing to wait on
            while not port_open(self.port):
                if self._proc.poll() is not None:
                    raise RuntimeError(f"node {self.nodename} exited: {self._tail()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"node {self.nodename} not listening on {self.port}")
                time.sleep(0.1)  # polling a port: there is nothing to wait on
        except BaseException:
            self.kill()
            raise

    def stop(self) -> None:
        """Stop the node gracefully (``rabbitmqctl stop``) and wait for the process to end."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        try:
            self._ctl_run(["stop"], timeout=60)
            proc.wait(timeout=60)
        except BaseException:
            self.kill()
            raise
        finally:
            self._close_output()

    def kill(self) -> None:
        """End the node however it is; always safe to call."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        self._close_output()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self.running and exc_type is None:
                self.stop()
        finally:
            self.kill()

    def rabbitmqctl(self, *args: str, timeout: float = 60.0) -> str:
        """Run ``rabbitmqctl`` against this node (``set_policy ...``, say); its output."""
        return self._ctl_run(list(args), timeout=timeout)

    # -- internals ----------------------------------------------------------------------

    def _ctl_run(self, args: list[str], *, timeout: float) -> str:
        result = subprocess.run(
            [self._ctl, "-n", self.nodename, *args],
            env=self.env(),
            cwd=self.base,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            out = (result.stdout + result.stderr).decode(errors="replace").strip()
            raise RuntimeError(
                f"rabbitmqctl {' '.join(args)} failed ({result.returncode}): {out[-2000:]}"
                f"\nserver output: {self._tail()}"
            )
        return result.stdout.decode(errors="replace")

    def _tail(self) -> str:
        path = self.base / "server-output.log"
        try:
            return path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no output)"

    def _close_output(self) -> None:
        if self._output is not None:
            self._output.close()
            self._output = None


def delete_queue(url: str, queue: str) -> None:
    """Delete ``queue`` on the broker at ``url``; nothing if the broker is away."""
    import pika

    try:
        connection = pika.BlockingConnection(pika.URLParameters(url))
    except Exception:
        return
    try:
        connection.channel().queue_delete(queue)
    finally:
        connection.close()
