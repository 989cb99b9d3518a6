"""The worker server: moves messages between the network, its state machine and its bus.

Theory of operation
-------------------
Every decision is :class:`~sluice._core.worker_state.WorkerState`'s. This module
turns what arrives (a scheduler message, a task's thread returning, a peer's
answer) into one command, hands it to ``state.handle``, publishes the resulting
events on the worker's own bus, and carries out the instructions that come back:
run a task in the thread pool, ask a peer for data, drop values, tell the
scheduler. Nothing here decides which task runs or where data comes from.

Values never enter the state machine. A value waits in ``_incoming`` while its
command is handled, and is stored in ``data`` the moment its key's ``-> memory``
event is emitted: a late result for a cancelled task produces no such event and
is dropped, and a plugin's ``transition`` hook already sees the value.

Messages to the scheduler go through one :class:`~sluice.comm.BatchedSend`, so a
burst of finished tasks leaves in one frame. The worker's events are forwarded in
``worker-events`` batches (one per handled command) just before the messages that
command produced, so the scheduler's log shows a worker's transition before the
scheduler's reaction to it.

Lifecycle: :meth:`Worker.start` listens, connects, registers (a refusal raises),
then a background task runs the server until :meth:`Worker.close`. Everything the
worker owns is torn down by that task, so ``close`` may be called from any task,
and the worker may close itself (scheduler gone, ``close`` message) without
waiting on its own teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, Final, Self

import anyio
import anyio.abc
import anyio.to_thread
import attrs
import cloudpickle

from sluice import config
from sluice._core.messages import (
    ComputeTaskMsg,
    FreeKeysMsg,
    TaskErredMsg,
    TaskFinishedMsg,
)
from sluice._core.worker_commands import (
    Execute,
    ExecuteFailure,
    ExecuteSuccess,
    GatherDep,
    GatherDepFailure,
    GatherDepSuccess,
    Instruction,
    ReleaseData,
    WorkerCommand,
)
from sluice._core.worker_state import WorkerState
from sluice._worker_exec import (
    ConnectionPool,
    TaskOutcome,
    dumps_exception,
    error_reply,
    format_traceback,
    get_worker,
    run_task,
    sizeof,
    worker_context,
)
from sluice._worker_plugins import WorkerPlugins
from sluice._worker_runner import TaskRunner
from sluice.bus import EventBus
from sluice.comm import (
    AuthenticationError,
    BatchedSend,
    Comm,
    CommClosedError,
    Listener,
    connect,
    is_loopback,
    listen,
    parse_address,
)
from sluice.events import Event, Key, TaskTransition, UserEvent
from sluice.preload import (
    Preload,
    from_config,
    load_preloads,
    setup_preloads,
    strict_from_config,
    teardown_preloads,
)
from sluice.security import Security
from sluice.sinks.registry import sink_from_spec, sinks_from_config

__all__ = ("EXIT_RESTART", "RegistrationError", "Worker", "get_worker")

logger = logging.getLogger("sluice.worker")

#: Worker-local event kinds: they exist for the worker's own replay, not the cluster's.
LOCAL_KINDS: Final = frozenset({"compute-requested", "free-requested"})

#: Exit code of a worker process asked to restart (``close`` with ``restart: true``):
#: its nanny starts a fresh one without reporting a death.
EXIT_RESTART: Final = 75

_UNSPECIFIED_HOSTS: Final = frozenset({"", "0.0.0.0", "::"})


class RegistrationError(RuntimeError):
    """The scheduler refused this worker (its name is taken, for instance)."""


#: A result a client waits for travels with ``task-finished`` (and on to the client
#: with ``key-updated``) when it pickles to at most this many bytes, so the client
#: needs no ``get-data`` round trip to the worker for it.
INLINE_RESULT_BYTES: Final = 1024


def _pickle(value: Any) -> bytes:
    return cloudpickle.dumps(value, protocol=5)  # type: ignore[no-any-return]


class Worker(WorkerPlugins):
    """Runs tasks for a scheduler and serves their results to peers and clients."""

    def __init__(
        self,
        scheduler_address: str,
        *,
        nthreads: int = 1,
        name: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        security: Security | None = None,
        forward_events: bool | None = None,
        nanny: str | None = None,
        heartbeat_interval: float = 1.0,
        connect_timeout: float = 10.0,
        insecure: bool = False,
        preload: str | Sequence[str] | None = None,
        preload_argv: Sequence[str] | Sequence[Sequence[str]] | None = None,
        preload_strict: bool | None = None,
        sinks: str | Sequence[object] | None = None,
    ) -> None:
        if nthreads < 1:
            raise ValueError(f"nthreads must be at least 1, not {nthreads}")
        parse_address(scheduler_address)  # a bad address fails here, with its text
        # Imported (and their arguments parsed) now: a bad preload fails before any port.
        values, argv = from_config("worker", preload, preload_argv)
        self.preloads: list[Preload] = load_preloads(values, argv)
        self.preload_strict = strict_from_config("worker", preload_strict)
        self.scheduler_address = scheduler_address
        self.nthreads = nthreads
        self.name: str = name or ""
        self.host = host
        self.port = port
        self.security = security
        if forward_events is None:
            forward_events = bool(config.get("sluice.worker.forward-events"))
        self.forward_events = forward_events
        self.nanny = nanny
        self.heartbeat_interval = heartbeat_interval
        self.connect_timeout = connect_timeout
        self.insecure = insecure
        #: Where peers and clients reach this worker; set by :meth:`start`.
        self.address = ""
        self.data: dict[Key, Any] = {}
        self.plugins: dict[str, Any] = {}
        self.state = WorkerState("", nthreads)
        self.bus = EventBus(stamp=self._stamp)
        for sink in sinks_from_config("worker", sinks):
            self.add_sink(sink)
        self.run_id: str | None = None
        #: Why the worker closed: "closed", "scheduler-lost", "scheduler-close",
        #: "scheduler-restart"; ``None`` while it runs.
        self.close_reason: str | None = None
        self.bus.subscribe(self._run_plugin_transitions, name="worker-plugins")
        if forward_events:
            self.bus.subscribe(self._forward_event, name="forward-to-scheduler")

        self._specs: dict[Key, bytes] = {}
        # Keys whose result a client waits for (compute-task said "report").
        self._report: set[Key] = set()
        self._incoming: dict[Key, Any] = {}
        self._exceptions: dict[Key, bytes] = {}
        self._forward: list[dict[str, Any]] = []
        self._task_threads: TaskRunner | None = None
        self._pool = ConnectionPool(security=security, timeout=connect_timeout)
        self._rids = itertools.count(1)
        self._listener: Listener | None = None
        self._comm: Comm | None = None
        self._batched: BatchedSend | None = None
        self._early: list[dict[str, Any]] = []
        self._tg: anyio.abc.TaskGroup | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: asyncio.Task[None] | None = None
        self._stop = anyio.Event()
        self._running = anyio.Event()
        self._done = anyio.Event()
        self._scheduler_closed = anyio.Event()  # the scheduler ended our stream

    @property
    def exceptions(self) -> dict[Key, str]:
        """Exception text of each task that failed here (Dask's ``worker.exceptions``)."""
        return {k: ts.exception for k, ts in self.state.tasks.items() if ts.exception is not None}

    def __repr__(self) -> str:
        return f"<Worker {self.address or '(not started)'} name={self.name!r}>"

    # -- lifecycle -------------------------------------------------------------------------

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
        """Listen for peers, register with the scheduler, then serve in the background."""
        if self._runner is not None:
            raise RuntimeError("worker already started")
        secured = self.security is not None and (
            self.security.tls or self.security.auth_token is not None
        )
        if not is_loopback(self.host) and not secured and not self.insecure:
            raise ValueError(
                f"refusing to listen on {self.host!r} without TLS or an auth token"
                " (give --tls-* or --auth-token-file, or --insecure)"
            )
        scheme = "tls" if self.security is not None and self.security.tls else "tcp"
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._listener = await listen(
            f"{scheme}://{host}:{self.port}", self._serve_peer, security=self.security
        )
        try:
            comm = await connect(
                self.scheduler_address, security=self.security, timeout=self.connect_timeout
            )
            try:
                self.address = self._advertised_address(self._listener.address, comm)
                self.name = self.name or self.address
                self.state = WorkerState(self.address, self.nthreads)
                self.bus.address = self.address
                # Set up before registering: what setup adds sees every event.
                await setup_preloads(self.preloads, self, strict=self.preload_strict)
                await self._register(comm)
            except BaseException:
                await comm.aclose()
                raise
        except BaseException:
            await self._listener.aclose()
            raise
        self._comm = comm
        self._batched = BatchedSend(comm)
        self._loop = asyncio.get_running_loop()
        self._task_threads = TaskRunner(
            self.nthreads,
            self._loop,
            functools.partial(run_task, self, loop=self._loop),
            self._finished_tasks,
            name=f"sluice-worker-{self.name}",
        )
        self._runner = self._loop.create_task(self._run(), name=f"sluice-worker-{self.address}")
        await self._running.wait()
        logger.info(
            "worker %s (name %s, %d threads) registered with %s",
            self.address,
            self.name,
            self.nthreads,
            self.scheduler_address,
        )

    @staticmethod
    def _advertised_address(bound: str, comm: Comm) -> str:
        """Bound to every interface? Advertise the one that reaches the scheduler."""
        scheme, host, port = parse_address(bound)
        if host not in _UNSPECIFIED_HOSTS:
            return bound
        _, local_host, _ = parse_address(comm.local)
        if ":" in local_host:
            local_host = f"[{local_host}]"
        return f"{scheme}://{local_host}:{port}"

    async def _register(self, comm: Comm) -> None:
        rid = next(self._rids)
        await comm.send(
            {
                "op": "register-worker",
                "rid": rid,
                "address": self.address,
                "name": self.name,
                "nthreads": self.nthreads,
                "memory_limit": 0,
                "nanny": self.nanny,
            }
        )
        with anyio.fail_after(self.connect_timeout):
            while True:
                for msg in await comm.recv():
                    if msg.get("op") == "reply" and msg.get("rid") == rid:
                        if not msg.get("ok"):
                            raise RegistrationError(
                                f"the scheduler at {self.scheduler_address} refused worker"
                                f" {self.name!r}: {msg.get('error')}"
                            )
                        result = msg.get("result") or {}
                        self.run_id = result.get("run_id") if isinstance(result, dict) else None
                        rid = -1  # the rest of this frame is ordinary traffic
                    else:
                        self._early.append(msg)
                if rid == -1:
                    return

    async def close(self, reason: str = "closed") -> None:
        """Stop serving, flush what the scheduler must still hear, close everything."""
        self._request_close(reason)
        if self._runner is None:
            if self._listener is not None:
                await self._listener.aclose()
            return
        with anyio.CancelScope(shield=True):  # a cancelled caller must not leave it half-closed
            await self._done.wait()

    def _request_close(self, reason: str) -> None:
        if self.close_reason is None:
            self.close_reason = reason
        self._stop.set()

    async def finished(self) -> None:
        """Wait until the worker has closed (by :meth:`close` or by itself)."""
        if self._runner is None:
            return
        await self._done.wait()

    async def _run(self) -> None:
        assert self._batched is not None and self._comm is not None
        try:
            async with self.bus, anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._batched.run)
                tg.start_soon(self._read_scheduler)
                tg.start_soon(self._heartbeat)
                self._running.set()
                await self._stop.wait()
                await self._shutdown()
                tg.cancel_scope.cancel()
        except Exception:
            logger.exception("worker %s failed", self.address)
        finally:
            self._tg = None
            if self._task_threads is not None:
                # Running task threads cannot be interrupted; they finish on their own.
                self._task_threads.shutdown()
            self._running.set()
            self._done.set()

    async def _shutdown(self) -> None:
        logger.info("worker %s closing (%s)", self.address, self.close_reason)
        if self._listener is not None:
            await self._listener.aclose()
        for name, plugin in list(self.plugins.items()):
            try:
                result = plugin.teardown(self)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("teardown of worker plugin %r failed", name)
        await teardown_preloads(self.preloads, self)  # before the bus is drained
        self._flush_forward()
        assert self._batched is not None and self._comm is not None
        said_closing = False
        if self.close_reason not in ("scheduler-close", "scheduler-lost", "scheduler-restart"):
            # Said, so the scheduler (and its event log) can tell a clean stop from a crash.
            with contextlib.suppress(CommClosedError):
                self._batched.send({"op": "closing", "reason": self.close_reason})
                said_closing = True
        with anyio.move_on_after(5):
            await self._batched.aclose()
            if said_closing:
                # The scheduler ends the stream once it has handled "closing", so
                # everything sent before it (the last forwarded events) is on its bus
                # when close() returns, even if the scheduler itself closes next.
                await self._scheduler_closed.wait()
        await self._comm.aclose()
        await self._pool.aclose()

    # -- the bus -------------------------------------------------------------------------

    def _stamp(self, event: Event) -> Event:
        """Stamp an event the bus makes itself: WorkerState owns the worker's seq."""
        stamped = attrs.evolve(event, seq=self.state.seq + 1, source=self.address)
        self.state.apply(stamped)
        return stamped

    def _emit(self, event: Event) -> None:
        """Each event, right after the state machine applied it."""
        if type(event) is TaskTransition:
            finish = event.finish
            if finish == "memory":
                if event.key in self._incoming:
                    self.data[event.key] = self._incoming.pop(event.key)
            elif finish == "forgotten":
                self._specs.pop(event.key, None)
                self._report.discard(event.key)
        self.bus.publish(event)

    def _forward_event(self, event: Event) -> None:
        """Inline consumer: queue the event for the scheduler's bus (sent per command)."""
        if event.kind not in LOCAL_KINDS:
            self._forward.append(event.to_dict())

    def _flush_forward(self) -> None:
        if self._forward and self._batched is not None:
            events, self._forward = self._forward, []
            with contextlib.suppress(CommClosedError):
                self._batched.send_later({"op": "worker-events", "events": events})

    def log_event(self, topic: str, msg: Any) -> None:
        """Publish a ``UserEvent`` on ``topic`` on this worker's bus (forwarded as usual)."""
        self.bus.publish(self._stamp(UserEvent(topic=topic, msg=msg, time=time.time())))

    def add_sink(self, sink: Any, **options: Any) -> Any:
        """Subscribe a sink (object or spec, as for the scheduler) to this worker's bus."""
        if isinstance(sink, str):
            sink = sink_from_spec(sink, service="worker")
        return self.bus.subscribe(sink, **options)

    # -- the state machine ------------------------------------------------------------------

    def _handle(self, cmd: WorkerCommand) -> None:
        """Hand one command to the state machine, publish, and carry out the instructions."""
        try:
            _, instructions = self.state.handle(cmd, now=time.time(), emit=self._emit)
        finally:
            self._incoming.clear()
        self._flush_forward()
        for instruction in instructions:
            self._carry_out(instruction)

    def _carry_out(self, ins: Instruction) -> None:
        if isinstance(ins, Execute):
            self._start_execute(ins)
        elif isinstance(ins, TaskFinishedMsg):
            finished: dict[str, Any] = {
                "op": "task-finished",
                "key": ins.key,
                "nbytes": ins.nbytes,
                "duration": ins.duration,
                "stimulus_id": ins.stimulus_id,
            }
            if ins.key in self._report:
                self._report.discard(ins.key)
                data = self._small_result(ins.key, ins.nbytes)
                if data is not None:
                    finished["data"] = data
            self._to_scheduler(finished)
        elif isinstance(ins, GatherDep):
            assert self._tg is not None
            self._tg.start_soon(self._gather, ins)
        elif isinstance(ins, ReleaseData):
            for key in ins.keys:
                self.data.pop(key, None)
        elif isinstance(ins, TaskErredMsg):
            exception = self._exceptions.pop(ins.key, None)
            if exception is None:
                exception = dumps_exception(RuntimeError(ins.exception))
            self._to_scheduler(
                {
                    "op": "task-erred",
                    "key": ins.key,
                    "exception": exception,
                    "exception_text": ins.exception,
                    "traceback": ins.traceback,
                    "duration": ins.duration,
                    "stimulus_id": ins.stimulus_id,
                }
            )
        else:
            self._to_scheduler(
                {
                    "op": "missing-data",
                    "key": ins.key,
                    "errant_workers": ins.errant_workers,
                    "stimulus_id": ins.stimulus_id,
                }
            )

    def _small_result(self, key: Key, nbytes: int) -> bytes | None:
        """``key``'s pickled value if it is at most INLINE_RESULT_BYTES, else None."""
        if nbytes > INLINE_RESULT_BYTES or key not in self.data:
            return None
        try:
            data = _pickle(self.data[key])
        except Exception:  # the client's get-data will report it
            return None
        return data if len(data) <= INLINE_RESULT_BYTES else None

    def _to_scheduler(self, msg: dict[str, Any]) -> None:
        assert self._batched is not None
        try:
            self._batched.send(msg)
        except CommClosedError:
            logger.debug("scheduler connection closed; dropping %s", msg.get("op"))

    # -- executing ---------------------------------------------------------------------------

    def _start_execute(self, ins: Execute) -> None:
        key = ins.key
        ts = self.state.tasks[key]
        # The dependencies are read now, on the loop: a cancelled task's inputs
        # may be released while its thread still runs.
        deps = {d.key: self.data[d.key] for d in ts.dependencies if d.key in self.data}
        spec = self._specs.get(key)
        assert self._task_threads is not None and self._loop is not None
        if spec is None:
            # Reported from the loop, like any outcome: not inside the _handle
            # that is still carrying out this instruction's siblings.
            outcome = TaskOutcome(None, RuntimeError(f"no task spec for {key!r}"), 0.0)
            self._loop.call_soon(self._finished_tasks, [(key, outcome)])
            return
        self._task_threads.submit(key, spec, deps)

    def _finished_tasks(self, batch: list[tuple[Key, TaskOutcome]]) -> None:
        """The outcomes the task threads gathered since the loop last looked."""
        if self._tg is None:  # closed: nothing is reported any more
            return
        try:
            for key, outcome in batch:
                if outcome.error is None:
                    value = outcome.value
                    self._incoming[key] = value
                    self._handle(
                        ExecuteSuccess(
                            key=key,
                            nbytes=sizeof(value),
                            duration=outcome.duration,
                            stimulus_id=f"task-finished-{time.time()}",
                        )
                    )
                else:
                    self._fail(key, outcome.error, outcome.duration)
        except Exception:
            # A loop callback, not a task: what a task group would do with the error
            # (fail the worker) is done here, rather than losing the rest of the batch
            # to asyncio's default handler and going on.
            logger.exception("worker %s failed on its finished tasks", self.address)
            self._request_close("failed")

    def _fail(self, key: Key, exc: BaseException, duration: float) -> None:
        self._exceptions[key] = dumps_exception(exc)
        try:
            self._handle(
                ExecuteFailure(
                    key=key,
                    exception=repr(exc),
                    traceback=format_traceback(exc),
                    duration=duration,
                    stimulus_id=f"task-erred-{time.time()}",
                )
            )
        finally:
            self._exceptions.pop(key, None)

    # -- fetching from peers ---------------------------------------------------------------

    async def _gather(self, ins: GatherDep) -> None:
        peer, keys = ins.worker, ins.keys
        stimulus = f"gather-dep-{time.time()}"
        try:
            raw = await self._get_data(peer, keys)
            values: dict[Key, Any] = {}
            nbytes: dict[Key, int] = {}
            for key in keys:
                if key in raw:
                    try:
                        values[key] = cloudpickle.loads(raw[key])
                    except Exception:
                        logger.exception("cannot unpickle %r from %s", key, peer)
                        continue
                    nbytes[key] = len(raw[key])
        except (OSError, CommClosedError, AuthenticationError, RuntimeError) as exc:
            logger.warning("fetching %d keys from %s failed: %s", len(keys), peer, exc)
            self._handle(GatherDepFailure(worker=peer, keys=keys, stimulus_id=stimulus))
            return
        if values:
            self._incoming.update(values)
            self._handle(GatherDepSuccess(worker=peer, nbytes=nbytes, stimulus_id=stimulus))
        missing = tuple(k for k in keys if k not in values)
        if missing:
            self._handle(GatherDepFailure(worker=peer, keys=missing, stimulus_id=stimulus))

    async def _get_data(self, peer: str, keys: Iterable[Key]) -> dict[Key, bytes]:
        comm = await self._pool.acquire(peer)
        try:
            rid = next(self._rids)
            await comm.send({"op": "get-data", "rid": rid, "keys": tuple(keys)})
            reply: dict[str, Any] | None = None
            while reply is None:
                for msg in await comm.recv():
                    if msg.get("op") == "reply" and msg.get("rid") == rid:
                        reply = msg
        except BaseException:
            await comm.aclose()
            raise
        await self._pool.release(peer, comm)
        if not reply.get("ok"):
            raise RuntimeError(f"get-data refused: {reply.get('error')}")
        result = reply.get("result")
        return dict(result) if isinstance(result, dict) else {}

    # -- serving peers and clients -----------------------------------------------------------

    async def _serve_peer(self, comm: Comm) -> None:
        """Answer ``get-data`` (peers and clients) on one connection until it closes."""
        while True:
            replies = []
            for msg in await comm.recv():
                op = msg.get("op")
                rid = msg.get("rid")
                if op == "get-data":
                    try:
                        result = self._pickled_values(msg.get("keys") or ())
                    except Exception as exc:
                        replies.append(error_reply(rid, exc))
                    else:
                        replies.append({"op": "reply", "rid": rid, "ok": True, "result": result})
                elif rid is not None:
                    error = ValueError(f"unknown operation {op!r}")
                    replies.append(error_reply(rid, error))
                else:
                    logger.warning("ignoring %r from %s", op, comm.peer)
            if replies:
                await comm.send(*replies)

    def _pickled_values(self, keys: Iterable[Key]) -> dict[Key, bytes]:
        result: dict[Key, bytes] = {}
        data = self.data
        for key in keys:
            if key in data:
                try:
                    result[key] = _pickle(data[key])
                except Exception:
                    logger.exception("cannot pickle the value of %r; not sending it", key)
        return result

    # -- the scheduler connection -------------------------------------------------------------

    async def _read_scheduler(self) -> None:
        assert self._comm is not None
        early, self._early = self._early, []
        self._dispatch(early)
        try:
            while True:
                if self.bus.under_pressure:
                    await self.bus.wait_for_capacity()
                self._dispatch(await self._comm.recv())
        except CommClosedError:
            self._scheduler_closed.set()
            if not self._stop.is_set():
                logger.warning(
                    "worker %s lost its scheduler %s; closing", self.address, self.scheduler_address
                )
            self._request_close("scheduler-lost")

    def _dispatch(self, msgs: list[dict[str, Any]]) -> None:
        for msg in msgs:
            op = msg.get("op")
            try:
                if op == "compute-task":
                    key = msg["key"]
                    self._specs[key] = msg["spec"]
                    if msg.get("report"):
                        self._report.add(key)
                    who_has = msg.get("who_has") or {}
                    self._handle(
                        ComputeTaskMsg(
                            worker=self.address,
                            key=key,
                            who_has={k: tuple(v) for k, v in who_has.items()},
                            priority=msg.get("priority") or 0,
                            stimulus_id=msg.get("stimulus_id") or "",
                        )
                    )
                elif op == "free-keys":
                    self._handle(
                        FreeKeysMsg(
                            worker=self.address,
                            keys=tuple(msg.get("keys") or ()),
                            stimulus_id=msg.get("stimulus_id") or "",
                        )
                    )
                elif op == "run":
                    assert self._tg is not None
                    self._tg.start_soon(self._run_function, msg)
                elif op == "plugin-add":
                    self._plugin_add(msg)
                elif op == "plugin-remove":
                    assert self._tg is not None
                    self._tg.start_soon(self._plugin_remove, msg.get("rid"), str(msg["name"]))
                elif op == "close":
                    reason = msg.get("reason") or ""
                    restart = bool(msg.get("restart"))
                    logger.info("the scheduler closes worker %s: %s", self.address, reason)
                    self._request_close("scheduler-restart" if restart else "scheduler-close")
                elif op == "reply":
                    continue  # nothing the worker asks the scheduler expects an answer yet
                elif msg.get("rid") is not None:
                    self._to_scheduler(error_reply(msg["rid"], ValueError(f"unknown op {op!r}")))
                else:
                    logger.warning("ignoring unknown message %r from the scheduler", op)
            except (KeyError, TypeError) as exc:
                logger.warning("malformed %r message from the scheduler: %r", op, exc)

    async def _run_function(self, msg: dict[str, Any]) -> None:
        """``Client.run``: call a function here, with :func:`get_worker` set."""
        rid = msg.get("rid")
        try:
            fn, args, kwargs = cloudpickle.loads(msg["function"])
            kwargs = dict(kwargs or {})
            fn = self._with_worker_argument(fn, kwargs)
            if inspect.iscoroutinefunction(fn):
                with worker_context(self):
                    result = await fn(*args, **kwargs)
            else:
                call = functools.partial(_call_in_context, self, fn, tuple(args), kwargs)
                result = await anyio.to_thread.run_sync(call, abandon_on_cancel=True)
            reply = {"op": "reply", "rid": rid, "ok": True, "result": _pickle(result)}
        except Exception as exc:
            reply = error_reply(rid, exc)
        if rid is not None:
            self._to_scheduler(reply)

    def _with_worker_argument(self, fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        """As in Dask: a parameter named ``sluice_worker``/``dask_worker`` gets this worker."""
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            return fn
        for name in ("sluice_worker", "dask_worker"):
            if name in params and name not in kwargs:
                kwargs[name] = self
        return fn

    async def _heartbeat(self) -> None:
        while True:
            await anyio.sleep(self.heartbeat_interval)
            self._flush_forward()
            with contextlib.suppress(CommClosedError):
                assert self._batched is not None
                self._batched.send({"op": "heartbeat"})


def _call_in_context(
    worker: Worker, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Any
) -> Any:
    with worker_context(worker):
        return fn(*args, **kwargs)
