"""The scheduler server: moves messages between the network, its state machine and its bus.

Theory of operation
-------------------
Every decision is :class:`~sluice._core.scheduler_state.SchedulerState`'s. A
message from a worker or a client becomes one command; ``state.handle`` applies
and returns the events it decided, each published on the scheduler's bus the
moment it is applied (so an inline plugin sees the state right after that
event), and the messages to send, which go out through each peer's
:class:`~sluice.comm.BatchedSend`. The protocol side lives in
:mod:`sluice._scheduler_serve`.

``SchedulerState`` owns the one sequence of the scheduler's bus: the events it
decides, the ones the server makes itself (``SchedulerStarted``, ``UserEvent``,
plugin changes) and the workers' forwarded events are all stamped by it
(``state.record``), so the event log is gap-free and folding it rebuilds
``scheduler.state`` exactly.

Values never pass through the scheduler, but two kinds of bytes do: each task's
spec (from the client's ``update-graph`` to the worker's ``compute-task``) and
each pickled exception (from ``task-erred`` to the client's ``key-updated``).
Both are kept per key and dropped when the task is forgotten.

Lifecycle: :meth:`Scheduler.start` listens, then a background task runs the bus
and the scheduler's own tasks until :meth:`Scheduler.close`, which may be
called from any task. Once closing starts no command reaches the state machine
any more, so the state that ``close`` leaves is exactly the one its log replays.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import logging
import os
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import anyio
import anyio.abc

from sluice import config
from sluice._core.commands import Command
from sluice._core.messages import ComputeTaskMsg, FreeKeysMsg, KeyUpdatedMsg, Message
from sluice._core.scheduler_state import (
    ClientRecord,
    SchedulerState,
    SchedulerTask,
    WorkerRecord,
)
from sluice._replay_driver import _plugin_dispatch
from sluice._scheduler_serve import SchedulerServing
from sluice.bus import EventBus, Subscription
from sluice.comm import Listener, is_loopback, listen
from sluice.events import (
    Event,
    Key,
    PluginAdded,
    PluginRemoved,
    Restarted,
    SchedulerClosing,
    SchedulerStarted,
    TaskTransition,
    UserEvent,
)
from sluice.plugin import SchedulerPlugin
from sluice.preload import (
    Preload,
    from_config,
    load_preloads,
    setup_preloads,
    strict_from_config,
    teardown_preloads,
)
from sluice.security import Security
from sluice.sinks.registry import event_log_sink, sink_from_spec, sinks_from_config

__all__ = ("Scheduler",)

logger = logging.getLogger("sluice.scheduler")

_plugin_ids = itertools.count(1)


class Scheduler(SchedulerServing):
    """Assigns tasks to workers and tells clients when their results are ready.

    ``async with Scheduler(port=0) as s:`` runs it; ``s.address`` is where
    workers and clients connect. A non-loopback ``host`` needs TLS or an auth
    token in ``security``, or ``insecure=True``. ``worker_saturation`` (default:
    config ``sluice.scheduler.worker-saturation``, 1024): tasks per worker thread
    before ready root tasks wait in the scheduler's queue; ``math.inf`` sends
    every ready task at once.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        security: Security | None = None,
        insecure: bool = False,
        event_log: str | os.PathLike[str] | None = None,
        sinks: str | Sequence[object] | None = None,
        heartbeat_timeout: float = 10.0,
        scheduler_file: str | os.PathLike[str] | None = None,
        plugins: Sequence[SchedulerPlugin] = (),
        preload: str | Sequence[str] | None = None,
        preload_argv: Sequence[str] | Sequence[Sequence[str]] | None = None,
        preload_strict: bool | None = None,
        worker_saturation: float | None = None,
    ) -> None:
        secured = security is not None and (security.tls or security.auth_token is not None)
        if not is_loopback(host) and not secured and not insecure:
            raise ValueError(
                f"refusing to listen on {host!r} without TLS or an auth token"
                " (give --tls-cert/--tls-key or --auth-token-file, or --insecure)"
            )
        if heartbeat_timeout <= 0:
            raise ValueError(f"heartbeat_timeout must be positive, not {heartbeat_timeout}")
        # Imported (and their arguments parsed) now: a bad preload fails before any port.
        values, argv = from_config("scheduler", preload, preload_argv)
        self.preloads: list[Preload] = load_preloads(values, argv)
        self.preload_strict = strict_from_config("scheduler", preload_strict)
        self.host = host
        self.port = port
        self.security = security
        self.heartbeat_timeout = heartbeat_timeout
        self.scheduler_file = Path(scheduler_file) if scheduler_file is not None else None
        self.event_log = Path(event_log) if event_log is not None else None
        #: ``tcp://host:port`` once :meth:`start` has bound the port.
        self.address = ""
        if worker_saturation is None:
            worker_saturation = float(config.get("sluice.scheduler.worker-saturation"))
        self.state = SchedulerState(worker_saturation)
        self.bus = EventBus(
            stamp=lambda e: self.state.record(e, now=time.time()),
            catch_up=self._read_log if self.event_log is not None else None,
        )
        self.plugins: dict[str, Any] = {}
        self._init_serving()
        self._specs: dict[Key, bytes] = {}
        self._exceptions: dict[Key, bytes] = {}
        # A small result a worker sent with task-finished, held only while that
        # message is handled, so the key-updated it causes carries it to the client.
        self._inline_results: dict[Key, bytes] = {}
        self._accepting = False
        self._started = False
        self._closing = False
        self._listener: Listener | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._runner: asyncio.Task[None] | None = None
        self._deferred: list[tuple[Callable[..., Coroutine[Any, Any, Any]], tuple[Any, ...]]] = []
        self._early_events: list[Event] = []
        self._ready = anyio.Event()
        self._running = anyio.Event()
        self._stop = anyio.Event()
        self._done = anyio.Event()

        self.bus.subscribe(
            self._forget_bytes, name="scheduler-forget", kinds=("task-transition", "restarted")
        )
        log: list[Any] = []
        if self.event_log is not None:
            # The log is what makes the run replayable: a folder it cannot be written
            # in fails here, before any port, not at the first event.
            folder = self.event_log.absolute().parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OSError(
                    f"cannot create the folder of the event log {self.event_log}:"
                    f" {exc.strerror or exc}"
                ) from None
            if not os.access(folder, os.W_OK):
                raise OSError(f"cannot write the event log {self.event_log}: {folder} is read-only")

            log.append(event_log_sink(self.event_log))
        # Built now (specs and config included): a bad sink spec fails before any port.
        # The log goes first, subscribed before anything is published: it starts at
        # seq 1. In a child (the default) it shares the one of the file sinks.
        for sink in sinks_from_config("scheduler", sinks, first=log):
            self.add_sink(sink)
        for plugin in plugins:
            self.add_plugin(plugin)

    def __repr__(self) -> str:
        return (
            f"<Scheduler {self.address or '(not started)'} workers={len(self.workers)}"
            f" tasks={len(self.tasks)}>"
        )

    # -- views -----------------------------------------------------------------------

    @property
    def tasks(self) -> dict[Key, SchedulerTask]:
        return self.state.tasks

    @property
    def workers(self) -> dict[str, WorkerRecord]:
        return self.state.workers

    @property
    def clients(self) -> dict[str, ClientRecord]:
        return self.state.clients

    @property
    def run_id(self) -> str:
        return self.bus.run_id

    # -- lifecycle -------------------------------------------------------------------

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
        """Listen, start the bus, announce ``SchedulerStarted``, then accept peers."""
        if self._runner is not None or self._closing:
            raise RuntimeError("a scheduler can be started only once")
        scheme = "tls" if self.security is not None and self.security.tls else "tcp"
        host = f"[{self.host}]" if ":" in self.host else self.host
        try:
            self._listener = await listen(
                f"{scheme}://{host}:{self.port}", self._handle_comm, security=self.security
            )
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise OSError(exc.errno, f"cannot listen on {host}:{self.port}: {why}") from None
        self.address = self._listener.address
        self.bus.address = self.address
        # Before the bus runs and before any peer is served: what setup adds sees seq 1.
        try:
            await setup_preloads(self.preloads, self, strict=self.preload_strict)
        except BaseException:
            self._closing = True
            with anyio.CancelScope(shield=True):
                await self._listener.aclose()
            raise
        self._runner = asyncio.get_running_loop().create_task(
            self._run(), name=f"sluice-scheduler-{self.address}"
        )
        await self._running.wait()
        self._record(SchedulerStarted(address=self.address))
        self._started = True
        for name in self.plugins:
            self._record(PluginAdded(name=name))
        early, self._early_events = self._early_events, []
        for event in early:
            self._record(event)
        for name, plugin in list(self.plugins.items()):
            await self._call_plugin(name, plugin, "start", self)
        self._accepting = True
        self._ready.set()
        if self.scheduler_file is not None:
            _write_json_atomically(self.scheduler_file, {"address": self.address})
        logger.info("Scheduler at: %s", self.address)

    async def _run(self) -> None:
        """The background task: the bus and the scheduler's own tasks live here."""
        try:
            async with self.bus, anyio.create_task_group() as tg:
                self._tg = tg
                deferred, self._deferred = self._deferred, []
                for fn, args in deferred:
                    tg.start_soon(fn, *args)
                tg.start_soon(self._watchdog)
                self._running.set()
                await self._stop.wait()
                tg.cancel_scope.cancel()
        except Exception:
            logger.exception("scheduler %s failed", self.address)
        finally:
            self._tg = None
            self._running.set()
            self._done.set()

    async def close(self, close_workers: bool = False) -> None:
        """Stop accepting work, close every connection, drain the bus (sinks flushed).

        With ``close_workers=True`` the workers and nannies are told to shut
        down first; otherwise they just see the connection drop.
        """
        if self._closing:
            if self._runner is not None:
                with anyio.CancelScope(shield=True):
                    await self._done.wait()
            return
        self._closing = True
        with anyio.CancelScope(shield=True):
            if self._runner is None:  # never started: nothing was published
                if self._listener is not None:
                    await self._listener.aclose()
                return
            for name, plugin in list(self.plugins.items()):
                await self._call_plugin(name, plugin, "before_close")
            if close_workers:
                await self._close_workers("scheduler-close")
            self._accepting = False
            self._ready.set()  # connections still waiting for startup give up
            assert self._listener is not None
            await self._listener.aclose()
            self._record(SchedulerClosing(address=self.address))
            for name, plugin in list(self.plugins.items()):
                await self._call_plugin(name, plugin, "close")
            await teardown_preloads(self.preloads, self)  # before the bus is drained
            self._stop.set()
            await self._done.wait()
            self._remove_scheduler_file()
            logger.info("scheduler %s closed", self.address)

    async def finished(self) -> None:
        """Wait until the scheduler has closed."""
        if self._runner is not None:
            await self._done.wait()

    async def _watchdog(self) -> None:
        """Remove workers that have been silent for ``heartbeat_timeout`` seconds."""
        interval = min(max(self.heartbeat_timeout / 4, 0.01), 1.0)
        while True:
            await anyio.sleep(interval)
            if self._accepting:
                self._check_heartbeats(self.heartbeat_timeout)

    def _remove_scheduler_file(self) -> None:
        path = self.scheduler_file
        if path is None:
            return
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("address") == self.address:
                path.unlink()

    def _read_log(self, since: int) -> Iterable[Event]:
        from sluice.replay import read_events

        assert self.event_log is not None
        return read_events(self.event_log)

    # -- state machine and bus ---------------------------------------------------------

    def _handle(self, cmd: Command) -> None:
        """One command through the state machine; its events published, its messages sent."""
        if not self._accepting:
            return
        _, messages = self.state.handle(cmd, now=time.time(), emit=self.bus.publish)
        if messages:
            self._send_messages(messages)

    def _record(self, event: Event) -> Event:
        """Stamp an event the server makes itself into the state's sequence; publish it."""
        event = self.state.record(event, now=time.time())
        self.bus.publish(event)
        return event

    def _send_messages(self, messages: Iterable[Message]) -> None:
        workers = self._worker_conns
        clients = self._client_conns
        tasks = self.state.tasks

        def key_wanted(key: Key) -> bool:
            ts = tasks.get(key)
            return ts is not None and bool(ts.who_wants)

        for msg in messages:
            kind = type(msg)
            if kind is ComputeTaskMsg:
                assert isinstance(msg, ComputeTaskMsg)
                worker = workers.get(msg.worker)
                if worker is not None:
                    worker.send(
                        {
                            "op": "compute-task",
                            "key": msg.key,
                            "spec": self._specs.get(msg.key),
                            "who_has": dict(msg.who_has),
                            "priority": msg.priority,
                            "stimulus_id": msg.stimulus_id,
                            # A client waits for it: a small result comes back inline.
                            "report": key_wanted(msg.key),
                        }
                    )
            elif kind is FreeKeysMsg:
                assert isinstance(msg, FreeKeysMsg)
                worker = workers.get(msg.worker)
                if worker is not None:
                    worker.send(
                        {"op": "free-keys", "keys": msg.keys, "stimulus_id": msg.stimulus_id}
                    )
            elif kind is KeyUpdatedMsg:
                assert isinstance(msg, KeyUpdatedMsg)
                client = clients.get(msg.client)
                if client is not None:
                    erred = msg.state == "erred"
                    client.send(
                        {
                            "op": "key-updated",
                            "key": msg.key,
                            "state": msg.state,
                            "who_has": msg.who_has,
                            "exception": self._exception_bytes(msg.key) if erred else None,
                            "exception_text": msg.exception,
                            "traceback": msg.traceback,
                            "data": self._inline_results.get(msg.key),
                        }
                    )

    def _exception_bytes(self, key: Key) -> bytes | None:
        """The pickled exception behind an erred key: its own, or its failed dependency's."""
        found = self._exceptions.get(key)
        if found is not None:
            return found
        ts = self.state.tasks.get(key)
        if ts is None:
            return None
        stack = [ts]
        seen = {ts}
        while stack:
            task = stack.pop()
            for dep in sorted(task.dependencies, key=lambda t: t.uid, reverse=True):
                if dep.state == "erred" and dep not in seen:
                    found = self._exceptions.get(dep.key)
                    if found is not None:
                        return found
                    seen.add(dep)
                    stack.append(dep)
        return None

    def _forget_bytes(self, event: Event) -> None:
        """Inline consumer: a forgotten task's spec and exception are no longer needed."""
        if type(event) is TaskTransition:
            assert isinstance(event, TaskTransition)
            if event.finish == "forgotten" and event.source == "scheduler":
                self._specs.pop(event.key, None)
                self._exceptions.pop(event.key, None)
        elif type(event) is Restarted:
            self._specs.clear()
            self._exceptions.clear()

    def _spawn(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        """Run ``fn(*args)`` in the scheduler's task group (or as soon as it exists)."""
        if self._tg is not None:
            self._tg.start_soon(fn, *args)
        elif not self._done.is_set():
            self._deferred.append((fn, args))

    def log_event(self, topic: str, msg: Any) -> None:
        """Record a ``UserEvent`` on ``topic`` (``msg`` must be JSON-safe)."""
        if self._done.is_set():
            raise RuntimeError(f"scheduler {self.address} is closed")
        event = UserEvent(topic=topic, msg=msg)
        if not self._started:
            # The log starts with SchedulerStarted: earlier events wait for it.
            self._early_events.append(event)
            return
        self._record(event)

    # -- sinks ---------------------------------------------------------------------------

    def add_sink(self, sink: Any, **subscribe_opts: Any) -> Subscription:
        """Subscribe a sink to the scheduler's bus: an object with ``write(batch)``,
        or a spec such as ``"json-log:stderr"`` (see :mod:`sluice.sinks.registry`)."""
        if isinstance(sink, str):
            sink = sink_from_spec(sink, service="scheduler")
        return self.bus.subscribe(sink, **subscribe_opts)

    # -- plugins -------------------------------------------------------------------------

    def add_plugin(self, plugin: Any, name: str | None = None, idempotent: bool = False) -> None:
        """Register a SchedulerPlugin: an inline consumer of the bus, called with its hooks.

        A name already in use is replaced (the old plugin's ``close()`` runs)
        unless ``idempotent`` (the argument or the plugin's attribute) is true.
        On a running scheduler the plugin's ``start(scheduler)`` is scheduled.
        """
        name = self._plugin_name(plugin, name)
        if self._install_plugin(plugin, name, idempotent) and self._started:
            self._spawn(self._call_plugin, name, plugin, "start", self)

    async def register_plugin(
        self, plugin: Any, name: str | None = None, idempotent: bool = False
    ) -> None:
        """:meth:`add_plugin`, then await the plugin's ``start(scheduler)``."""
        name = self._plugin_name(plugin, name)
        taken = name in self.plugins
        if taken and not (idempotent or getattr(plugin, "idempotent", False)):
            # The old plugin's close() has finished before the new one starts.
            await self.unregister_plugin(name)
        if self._install_plugin(plugin, name, idempotent) and self._started:
            await self._call_plugin(name, plugin, "start", self, raise_=True)

    async def unregister_plugin(self, name: str) -> None:
        """:meth:`remove_plugin`, awaiting the plugin's ``close()``."""
        try:
            plugin = self.plugins.pop(name)
        except KeyError:
            raise ValueError(f"no scheduler plugin named {name!r}") from None
        self.bus.unsubscribe(f"plugin-{name}")
        if self._started and not self._done.is_set():
            self._record(PluginRemoved(name=name))
            await self._call_plugin(name, plugin, "close")

    def remove_plugin(self, name: str) -> None:
        """Unregister the plugin ``name``; its ``close()`` is scheduled."""
        try:
            plugin = self.plugins.pop(name)
        except KeyError:
            raise ValueError(f"no scheduler plugin named {name!r}") from None
        self.bus.unsubscribe(f"plugin-{name}")
        if self._started and not self._done.is_set():
            self._record(PluginRemoved(name=name))
            self._spawn(self._call_plugin, name, plugin, "close")

    @staticmethod
    def _plugin_name(plugin: Any, name: str | None) -> str:
        if name:
            return name
        own = getattr(plugin, "name", None)
        if isinstance(own, str) and own:
            return own
        return f"{type(plugin).__name__}-{next(_plugin_ids)}"

    def _install_plugin(self, plugin: Any, name: str, idempotent: bool) -> bool:
        """Subscribe ``plugin``; False if an idempotent registration found ``name`` taken."""
        if name in self.plugins:
            if idempotent or getattr(plugin, "idempotent", False):
                return False
            self.remove_plugin(name)
        self.plugins[name] = plugin

        def dispatch(event: Event) -> None:
            _plugin_dispatch(event, plugin, self, self._run_hook)

        self.bus.subscribe(dispatch, name=f"plugin-{name}", mode="inline")
        if self._started:
            self._record(PluginAdded(name=name))
        return True

    def _run_hook(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Call a plugin hook; an ``async def`` hook is scheduled on the loop."""
        result = fn(*args, **kwargs)
        if inspect.isawaitable(result):
            self._spawn(self._await_hook, result, getattr(fn, "__qualname__", repr(fn)))

    @staticmethod
    async def _await_hook(awaitable: Awaitable[Any], what: str) -> None:
        try:
            await awaitable
        except Exception:
            logger.warning("plugin hook %s failed", what, exc_info=True)

    async def _call_plugin(
        self, name: str, plugin: Any, hook: str, *args: Any, raise_: bool = False
    ) -> None:
        """Await a lifecycle hook (start, before_close, close); a failure is logged."""
        fn = getattr(plugin, hook, None)
        if fn is None:
            return
        try:
            result = fn(*args)
            if inspect.isawaitable(result):
                await result
        except Exception:
            if raise_:
                raise
            logger.exception("%s() of scheduler plugin %r failed", hook, name)


def _write_json_atomically(path: Path, data: Mapping[str, Any]) -> None:
    """Readers polling for the file never see it half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
