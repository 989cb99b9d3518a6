"""The Client: submit work to a sluice cluster and get results back.

It only moves messages (docs/protocol.md): one connection to the scheduler carries
``update-graph`` / ``release-keys`` / requests out and ``key-updated`` / ``events``
pushes in; results are fetched straight from the workers with ``get-data``.

Sync and async: the implementation is async. A sync client (the default) runs it on
the process's background loop (:mod:`sluice._loop`) and blocks for the answer; with
``asynchronous=True`` the methods that talk to the cluster (``gather``, ``get``,
``run``, ``run_on_scheduler``, ``restart``, ``close``, ``Future.result``) are
coroutines, while ``submit`` and ``map`` return futures at once in both modes, as in
Dask.

Graph errors (a missing dependency, a cycle): a sync ``submit``/``map``/``get`` raises
``ValueError`` at the call. To keep a sync ``submit`` cheap it only waits for the
scheduler's acknowledgement when the graph could be refused (a dependency that this
client does not hold live, or a key among its own dependencies); otherwise it returns
at once. An async ``submit``/``map`` cannot wait, so the error lands in its futures:
awaiting them raises the ``ValueError``. An async ``get`` raises it when awaited.

All messages to the scheduler go through one ordered BatchedSend, so a
``release-keys`` for a key can never overtake a later ``update-graph`` resubmitting it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import threading
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import anyio
import cloudpickle

from sluice import _loop
from sluice._client_data import (
    drop_failed,
    flatten_keys,
    gather_states,
    load_exception,
    pack_keys,
    rebuild,
    walk_futures,
)
from sluice._client_events import EventStream
from sluice._client_futures import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    Future,
    FutureCancelledError,
    FutureState,
    as_completed,
    wait,
)
from sluice._client_plugins import ClientPlugins
from sluice._client_refs import ReferenceCounts
from sluice._client_spec import FunctionPack, replace_futures
from sluice.comm import BatchedSend, Comm, CommClosedError, connect
from sluice.events import Key, from_dict
from sluice.security import Security
from sluice.taskspec import TaskSpec, dependencies, from_dask_graph

if TYPE_CHECKING:
    from sluice.deploy import LocalCluster

__all__ = (
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "Client",
    "EventStream",
    "Future",
    "FutureCancelledError",
    "as_completed",
    "default_client",
    "wait",
)

logger = logging.getLogger("sluice.client")

_current: weakref.ref[Client] | None = None


def default_client() -> Client:
    """The most recently started client that is still open."""
    client = _current() if _current is not None else None
    if client is None or client.status == "closed":
        raise ValueError("no running sluice Client; create one with Client(...)")
    return client


class _Pending:
    __slots__ = ("callback", "event", "reply")

    def __init__(self, callback: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.event: anyio.Event | None = None if callback else anyio.Event()
        self.reply: dict[str, Any] | None = None
        self.callback = callback


class Client(ClientPlugins, ReferenceCounts, _loop.SyncOrAsync):
    """Connect to a sluice scheduler (or start a :class:`LocalCluster`) and run tasks.

    ``address`` is ``"tcp://host:port"``, a :class:`~sluice.deploy.LocalCluster`, or
    None to start a local cluster of 2 worker processes with 1 thread each, which the
    client closes with itself.
    """

    _noun = "client"

    def __init__(
        self,
        address: str | LocalCluster | None = None,
        *,
        asynchronous: bool = False,
        security: Security | None = None,
        timeout: float = 10.0,
        name: str | None = None,
        preload: str | Sequence[str] | None = None,
        preload_argv: Sequence[str] | Sequence[Sequence[str]] | None = None,
        preload_strict: bool | None = None,
        scheduler_file: str | os.PathLike[str] | None = None,
    ) -> None:
        from sluice.preload import from_config, load_preloads, strict_from_config

        if address is not None and scheduler_file is not None:
            raise ValueError("give a scheduler address or scheduler_file=, not both")

        # Imported (and their arguments parsed) before connecting.
        self.preloads = load_preloads(*from_config("client", preload, preload_argv))
        self.preload_strict = strict_from_config("client", preload_strict)
        hexid = uuid.uuid4().hex[:12]
        self.id = f"client-{name}-{hexid}" if name else f"client-{hexid}"
        self.name = name
        self.asynchronous = asynchronous
        self.security = security
        self.timeout = timeout
        #: How long to retry a refused connection to a worker before asking the
        #: scheduler where else the data is (a worker that refuses is usually gone).
        self.data_connect_timeout = 2.0
        self.status = "created"
        self.cluster: LocalCluster | None = None
        self._own_cluster = False
        self._address_arg = address
        self.scheduler_file = scheduler_file
        self._scheduler_address: str | None = None
        self.run_id: str | None = None
        self._comm: Comm | None = None
        self._bsend: BatchedSend | None = None
        self._rids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._states: dict[Key, FutureState] = {}
        self._refcount: dict[Key, int] = {}
        self._ref_lock = threading.Lock()
        self._releases: deque[Key] = deque()
        self._release_scheduled = False
        self._priority = itertools.count()
        self._pool: dict[str, list[Comm]] = {}
        self._streams: list[EventStream] = []
        self._aio_loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._scope: anyio.CancelScope | None = None
        self._stopped: anyio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._start_lock: anyio.Lock | None = None
        self._portal = None if asynchronous else _loop.get_portal()
        if not asynchronous:
            assert self._portal is not None
            self._portal.call(self._start)
            _loop.at_exit(self, self._close)

    # ------------------------------------------------------------ sync plumbing

    def _call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run the plain ``fn`` on the client's loop: now if already there."""
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        elif self._aio_loop is not None:
            self._aio_loop.call_soon_threadsafe(fn, *args)

    # ---------------------------------------------------------------- lifecycle

    async def _start(self) -> None:
        global _current
        if self.status == "running":
            return
        if self.status == "closed":
            raise RuntimeError("this client is closed")
        self._aio_loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        address = self._address_arg
        if self.scheduler_file is not None:
            address = await _address_from_file(Path(self.scheduler_file), self.timeout)
        if address is None:
            from sluice.deploy import LocalCluster

            cluster = LocalCluster(
                n_workers=2,
                threads_per_worker=1,
                processes=True,
                asynchronous=True,
                security=self.security,
            )
            await cluster._start()
            if not self.asynchronous:
                cluster._make_sync()
            self.cluster, self._own_cluster = cluster, True
            address = cluster.scheduler_address
        elif not isinstance(address, str):
            self.cluster = address
            address = address.scheduler_address
        self._scheduler_address = address
        try:
            assert address is not None
            comm = await connect(address, security=self.security, timeout=self.timeout)
        except BaseException:
            if self._own_cluster and self.cluster is not None:
                await self.cluster._close()
            raise
        self._comm = comm
        self._bsend = BatchedSend(comm, interval=0)
        self._stopped = anyio.Event()
        started = anyio.Event()
        self._task = self._aio_loop.create_task(self._background(started))
        await started.wait()
        self.status = "running"
        try:
            with anyio.fail_after(self.timeout):
                info = await self._request("register-client", client=self.id)
        except BaseException:
            await self._close()
            raise
        if isinstance(info, dict):
            self.run_id = info.get("run_id")
            self._scheduler_address = info.get("address") or address
        _current = weakref.ref(self)
        logger.debug("%s connected to %s", self.id, self._scheduler_address)
        if self.preloads:
            from sluice.preload import setup_preloads

            try:
                await setup_preloads(self.preloads, self, strict=self.preload_strict)
            except BaseException:
                await self._close()
                raise

    async def _background(self, started: anyio.Event) -> None:
        assert self._stopped is not None and self._bsend is not None
        try:
            async with anyio.create_task_group() as tg:
                self._scope = tg.cancel_scope
                tg.start_soon(self._bsend.run)
                tg.start_soon(self._read_loop)
                started.set()
        except Exception:
            logger.exception("%s: background task failed", self.id)
        finally:
            started.set()
            self._stopped.set()

    async def _read_loop(self) -> None:
        assert self._comm is not None
        try:
            while True:
                for msg in await self._comm.recv():
                    self._dispatch(msg)
        except CommClosedError:
            self._connection_lost()

    def _dispatch(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        try:
            if op == "key-updated":
                self._key_updated(msg)
            elif op == "reply":
                pending = self._pending.pop(msg.get("rid"), None)  # type: ignore[arg-type]
                if pending is not None:
                    pending.reply = msg
                    if pending.callback is not None:
                        pending.callback(msg)
                    elif pending.event is not None:
                        pending.event.set()
            elif op == "events":
                events = [from_dict(d) for d in msg.get("events", ())]
                for stream in list(self._streams):
                    stream._deliver(events)
            else:
                logger.warning("%s: unexpected message %r from the scheduler", self.id, op)
        except Exception:
            logger.exception("%s: failed to handle %r", self.id, op)

    def _key_updated(self, msg: dict[str, Any]) -> None:
        state = self._states.get(msg["key"])
        if state is None:
            return
        what = msg.get("state")
        if what == "memory":
            data = msg.get("data")
            state.finish(tuple(msg.get("who_has") or ()), data if isinstance(data, bytes) else None)
        elif what == "erred":
            state.set_error(load_exception(msg), msg.get("traceback"))
        elif what == "forgotten":
            state.cancel("forgotten by the scheduler")
        else:
            logger.warning("%s: unknown key state %r for %r", self.id, what, msg["key"])

    def _connection_lost(self) -> None:
        if self.status in ("closing", "closed"):
            return
        logger.warning("%s lost its connection to %s", self.id, self._scheduler_address)
        self.status = "disconnected"
        for pending in list(self._pending.values()):
            lost = {"op": "reply", "ok": False, "error": "lost the connection to the scheduler"}
            pending.reply = lost
            if pending.callback is not None:
                pending.callback(lost)
            elif pending.event is not None:
                pending.event.set()
        self._pending.clear()
        for state in list(self._states.values()):
            if not state.done():
                state.cancel("lost the connection to the scheduler", status="lost")
        for stream in list(self._streams):
            stream._deliver(None)

    async def _close(self) -> None:
        if self.status in ("closed", "closing", "created"):
            if self.status == "created":
                self.status = "closed"
            return
        if self.preloads and self.status == "running":
            from sluice.preload import teardown_preloads

            await teardown_preloads(self.preloads, self)
        self.status = "closing"
        for stream in list(self._streams):
            stream._deliver(None)
        if self._bsend is not None:
            with contextlib.suppress(CommClosedError):
                self._bsend.send({"op": "close-client"})
            with anyio.move_on_after(self.timeout):
                await self._bsend.aclose()
        if self._scope is not None:
            self._scope.cancel()
        if self._stopped is not None:
            await self._stopped.wait()
        if self._comm is not None:
            await self._comm.aclose()
        for comms in self._pool.values():
            for comm in comms:
                await comm.aclose()
        self._pool.clear()
        for state in list(self._states.values()):
            if not state.done():
                state.cancel("the client closed")
        if self._own_cluster and self.cluster is not None:
            await self.cluster._close()
        self.status = "closed"
        _loop.at_exit(self, None)

    async def _started(self) -> Self:
        # A sync client started in __init__; an async one starts once, however
        # many tasks await it at the same time.
        if not self.asynchronous:
            return self
        if self._start_lock is None:
            self._start_lock = anyio.Lock()
        async with self._start_lock:
            await self._start()
        return self

    def __repr__(self) -> str:
        return f"<Client {self.id} scheduler={self._scheduler_address!r} {self.status}>"

    @property
    def scheduler_address(self) -> str | None:
        return self._scheduler_address

    # ------------------------------------------------------------ requests

    def _send(self, msg: dict[str, Any]) -> None:
        if self._bsend is None or self.status not in ("running", "closing"):
            raise CommClosedError(f"{self.id} is not connected (status {self.status})")
        self._bsend.send(msg)

    async def _request(self, op: str, **fields: Any) -> Any:
        rid = next(self._rids)
        pending = _Pending()
        self._pending[rid] = pending
        try:
            self._send({"op": op, "rid": rid, **fields})
            assert pending.event is not None
            await pending.event.wait()
        finally:
            self._pending.pop(rid, None)
        reply = pending.reply
        assert reply is not None
        if reply.get("ok"):
            return reply.get("result")
        raise self._reply_error(op, reply)

    def _reply_error(self, op: str, reply: dict[str, Any]) -> BaseException:
        text = str(reply.get("error") or f"{op} failed")
        if text == "lost the connection to the scheduler":
            return CommClosedError(text)
        if op == "update-graph":
            return ValueError(text)
        if isinstance(reply.get("exception"), bytes):
            return load_exception(reply)
        return RuntimeError(f"{op} failed on the scheduler: {text}")

    # ------------------------------------------------------------- submitting

    def submit(
        self,
        fn: Callable[..., Any],
        *args: Any,
        key: Key | None = None,
        pure: bool = True,
        retries: int = 0,
        workers: Any = None,
        **kwargs: Any,
    ) -> Future:
        """Run ``fn(*args, **kwargs)`` on the cluster; Futures among the arguments are
        replaced by their results on the worker.

        ``pure=True`` names the task after a hash of the function and arguments, so
        submitting the same call twice shares one task; ``pure=False`` always runs
        anew. ``workers=`` is accepted for Dask compatibility and ignored for now:
        the scheduler places tasks by itself.
        """
        if not callable(fn):
            raise TypeError("the first argument of submit must be callable")
        pack = FunctionPack(fn)
        deps: set[Key] = set()
        # The arguments may hold the only references to their futures (submit(f,
        # client.map(...))): kept alive until the graph holds its dependencies.
        given = (args, kwargs)
        spec, args_data = pack.spec(
            replace_futures(args, deps, Future), replace_futures(kwargs, deps, Future)
        )
        if key is None:
            key = pack.key(args_data, pure)
        tasks = {key: spec}
        dep_map = {key: tuple(deps)}
        future = self._submit_graph(tasks, dep_map, [key], retries)[0]
        del given
        return future

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        key: str | list[Key] | None = None,
        pure: bool = True,
        retries: int = 0,
        workers: Any = None,
        **kwargs: Any,
    ) -> list[Future]:
        """``submit`` for each item of ``zip(*iterables)``, in one ``update-graph``.

        ``key`` is a prefix for the generated keys or a list of keys.
        """
        if not callable(fn):
            raise TypeError("the first argument of map must be callable")
        pack = FunctionPack(fn)
        if isinstance(key, str):
            pack.name = key
        kw_deps: set[Key] = set()
        given_kwargs = kwargs  # alive until the graph holds its dependencies (see submit)
        kwargs = replace_futures(kwargs, kw_deps, Future)
        calls = list(zip(*iterables, strict=False))
        keys_given = key if isinstance(key, list) else None
        if keys_given is not None and len(keys_given) != len(calls):
            raise ValueError(f"map got {len(keys_given)} keys for {len(calls)} calls")
        tasks: dict[Key, bytes] = {}
        dep_map: dict[Key, tuple[Key, ...]] = {}
        keys: list[Key] = []
        spec_of = pack.spec
        key_of = pack.key
        for i, call in enumerate(calls):
            deps = set(kw_deps)
            call_args = replace_futures(call, deps, Future)
            spec, args_data = spec_of(call_args, kwargs)
            k = keys_given[i] if keys_given is not None else key_of(args_data, pure)
            keys.append(k)
            if k not in tasks:
                tasks[k] = spec
                dep_map[k] = tuple(deps)
        futures = self._submit_graph(tasks, dep_map, keys, retries)
        del given_kwargs
        return futures

    def _submit_graph(
        self,
        tasks: dict[Key, bytes],
        dep_map: dict[Key, tuple[Key, ...]],
        keys: list[Key],
        retries: int,
    ) -> list[Future]:
        if self.status != "running":
            raise RuntimeError(f"{self.id} is not running (status {self.status})")
        futures = self._acquire_futures(keys)
        msg = self._graph_msg(tasks, dep_map, keys, retries)
        msg["held"] = self._hold_dependencies(tasks, dep_map)
        wanted = list(dict.fromkeys(keys))

        def on_reply(reply: dict[str, Any]) -> None:
            if not reply.get("ok"):
                err = self._reply_error("update-graph", reply)
                for k in wanted:
                    state = self._states.get(k)
                    if state is not None:
                        state.set_error(err, None)

        if self.asynchronous:
            self._send_graph(msg, on_reply)
        elif self._cannot_fail(tasks, dep_map):
            # Fire and forget: waiting for the scheduler's acknowledgement costs a
            # round trip per submit, and it cannot refuse this graph.
            self._call_soon(self._send_graph, msg, on_reply)
        else:
            assert self._portal is not None
            self._portal.call(self._send_graph_and_wait, msg)
        return futures

    def _cannot_fail(self, tasks: dict[Key, bytes], dep_map: dict[Key, tuple[Key, ...]]) -> bool:
        """Whether the scheduler surely accepts this graph: no cycle, and every
        dependency is a key of the graph or one this client holds live."""
        states = self._states
        for key, deps in dep_map.items():
            for dep in deps:
                if dep == key:
                    return False
                if dep in tasks:
                    if dep_map.get(dep):
                        return False  # a chain inside the graph: let the scheduler judge
                    continue
                state = states.get(dep)
                if state is None or state.status not in ("pending", "finished", "error"):
                    return False
        return True

    def _graph_msg(
        self,
        tasks: dict[Key, bytes],
        dep_map: dict[Key, tuple[Key, ...]],
        keys: list[Key],
        retries: int,
    ) -> dict[str, Any]:
        counter = self._priority
        return {
            "op": "update-graph",
            "tasks": tasks,
            "dependencies": dep_map,
            "keys": tuple(dict.fromkeys(keys)),
            "priority": {k: next(counter) for k in tasks},
            "retries": {k: retries for k in tasks} if retries else {},
        }

    def _send_graph(self, msg: dict[str, Any], callback: Callable[[dict[str, Any]], None]) -> None:
        """Send an update-graph (on the loop); a resubmitted cancelled key starts over."""
        for k in msg["keys"]:
            state = self._states.get(k)
            if state is not None and state.status in ("cancelled", "lost"):
                state.reset()
        held = msg.pop("held", ())
        rid = next(self._rids)
        self._pending[rid] = _Pending(callback)
        try:
            self._send({**msg, "rid": rid})
        finally:
            for key in held:  # queued after the graph: released once it is on its way
                self._release_later(key)

    async def _send_graph_and_wait(self, msg: dict[str, Any]) -> None:
        done = anyio.Event()
        box: list[dict[str, Any]] = []

        def on_reply(reply: dict[str, Any]) -> None:
            box.append(reply)
            done.set()

        self._send_graph(msg, on_reply)
        await done.wait()
        if not box[0].get("ok"):
            raise self._reply_error("update-graph", box[0])

    # ---------------------------------------------------------------- gather

    def gather(self, futures: Any, errors: str = "raise") -> Any:
        """Results of a Future or of a (nested) list/tuple/set/dict of them, in the same
        shape. ``errors="skip"`` leaves failed futures out of lists (and dicts)."""
        return self._sync(self._gather, futures, errors)

    async def _gather(self, futures: Any, errors: str = "raise") -> Any:
        if errors not in ("raise", "skip"):
            raise ValueError(f"errors must be 'raise' or 'skip', not {errors!r}")
        found: dict[Key, Future] = {}
        walk_futures(futures, found)
        for fut in found.values():
            await fut._state.wait()
        ok = {k: f for k, f in found.items() if f._state.status == "finished"}
        if errors == "raise":
            for fut in found.values():
                fut._state.raise_if_failed()
        results = await self._gather_states([f._state for f in ok.values()])
        if errors == "skip":
            futures = drop_failed(futures, set(ok))
        return rebuild(futures, results)

    async def _gather_keys(self, keys: list[Key]) -> dict[Key, Any]:
        states = []
        for k in keys:
            state = self._states.get(k)
            if state is None:
                raise FutureCancelledError(k, "released")
            states.append(state)
        return await self._gather_states(states)

    async def _gather_states(self, states: list[FutureState]) -> dict[Key, Any]:
        return await gather_states(self, states)

    # ---------------------------------------------------------------- get

    def get(self, graph: dict[Key, Any], keys: Any) -> Any:
        """Compute a Dask-style graph; ``keys`` is a key or a nested list of keys and
        the results come back in the same shape."""
        return self._sync(self._get, graph, keys)

    async def _get(self, graph: dict[Key, Any], keys: Any) -> Any:
        specs = from_dask_graph(graph)
        flat: list[Key] = []
        flatten_keys(keys, flat)
        for k in flat:
            if k not in specs:
                raise ValueError(f"key {k!r} is not in the graph")
        # One FunctionPack per distinct function: a graph of thousands of tasks
        # usually calls a handful of functions, and pickling one by value per
        # task was most of the cost of submitting it.
        packs: dict[int, FunctionPack] = {}

        def pack(spec: TaskSpec) -> bytes:
            fp = packs.get(id(spec.func))
            if fp is None:
                fp = packs[id(spec.func)] = FunctionPack(spec.func)
            return fp.spec(spec.args, spec.kwargs)[0]

        tasks = {k: pack(s) for k, s in specs.items()}
        dep_map = {k: tuple(dependencies(s)) for k, s in specs.items()}
        futures = [Future(k, self) for k in dict.fromkeys(flat)]
        try:
            await self._send_graph_and_wait(self._graph_msg(tasks, dep_map, flat, 0))
            results = await self._gather(futures)
        finally:
            for f in futures:
                f.release()
        return pack_keys(keys, dict(zip([f.key for f in futures], results, strict=True)))

    # ------------------------------------------------------------ cancel etc.

    def cancel(self, futures: Any) -> Any:
        """Stop wanting these futures' keys; they become cancelled."""
        found: dict[Key, Future] = {}
        walk_futures(futures, found)
        return self._sync(self._cancel, list(found))

    async def _cancel(self, keys: list[Key]) -> None:
        for k in keys:
            state = self._states.get(k)
            if state is not None:
                state.cancel("cancelled by the client")
        if keys and self.status == "running":
            self._send({"op": "release-keys", "keys": tuple(keys)})

    def who_has(self, futures: Any = None) -> Any:
        """{key: (worker addresses)} for the given futures (all of this client's)."""
        found: dict[Key, Future] = {}
        walk_futures(futures, found)
        keys = tuple(found) if futures is not None else tuple(self._states)
        return self._sync(self._request, "who-has", keys=keys)

    def run(
        self, fn: Callable[..., Any], *args: Any, workers: list[str] | None = None, **kwargs: Any
    ) -> Any:
        """Call ``fn(*args, **kwargs)`` on every worker (or ``workers``);
        ``{worker address: result}``."""
        return self._sync(self._run, fn, args, kwargs, workers)

    async def _run(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        workers: list[str] | None,
    ) -> dict[str, Any]:
        data = cloudpickle.dumps((fn, args, kwargs), protocol=5)
        result = await self._request(
            "run", function=data, workers=tuple(workers) if workers is not None else None
        )
        return {addr: cloudpickle.loads(value) for addr, value in (result or {}).items()}

    def run_on_scheduler(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call ``fn`` in the scheduler's process; a parameter named
        ``sluice_scheduler`` or ``dask_scheduler`` receives the scheduler."""
        return self._sync(self._run_on_scheduler, fn, args, kwargs)

    async def _run_on_scheduler(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        data = cloudpickle.dumps((fn, args, kwargs), protocol=5)
        result = await self._request("run-on-scheduler", function=data)
        return cloudpickle.loads(result) if result is not None else None

    def restart(self) -> Any:
        """Forget every task and restart the workers; existing futures are cancelled."""
        return self._sync(self._restart)

    async def _restart(self) -> None:
        await self._request("restart")
        for state in list(self._states.values()):
            if state.status != "cancelled":
                state.cancel("the cluster restarted")

    def log_event(self, topic: str, msg: Any) -> Any:
        """Record a ``UserEvent`` on ``topic`` on the scheduler's bus (``msg`` JSON-safe)."""
        return self._sync(self._log_event, topic, msg)

    async def _log_event(self, topic: str, msg: Any) -> None:
        await self._request("log-event", topic=topic, msg=msg)

    def progress(self, futures: Any, *, console: Any = None, transient: bool = False) -> Any:
        """Show progress bars (rich; one per key prefix) until ``futures`` are all done.

        ``futures`` is a future or a nested list/tuple/set/dict of them. Returns
        the counts by final status, e.g. ``{"finished": 98, "error": 2}``; a
        failed future does not raise here (``gather`` does). ``console`` is a
        ``rich.console.Console`` (default: stdout); ``transient`` removes the bars
        when done. Awaitable in async mode.
        """
        from sluice._client_progress import show_progress

        return self._sync(show_progress, futures, console=console, transient=transient)

    def events(self, kinds: Iterable[str] | None = None, since: int | None = None) -> EventStream:
        """A live stream of the scheduler's events (an async iterator in async mode).

        ``since`` replays from that seq on (as far as the scheduler's history goes);
        ``kinds`` filters by event kind. One stream per client at a time.
        """
        if any(not s.closed for s in self._streams):
            raise RuntimeError("this client already has an open event stream")
        stream = EventStream(self, tuple(kinds) if kinds is not None else None, since)
        if self.asynchronous:
            stream._subscribe()
        else:
            assert self._portal is not None
            self._portal.call(stream._subscribe)
        return stream


async def _address_from_file(path: Path, timeout: float) -> str:
    """The ``address`` in a scheduler file, waiting up to ``timeout`` s for it to appear
    (a scheduler started at the same time may not have written it yet)."""
    with anyio.move_on_after(timeout):
        while not path.exists():
            await anyio.sleep(0.05)  # polling a file: there is no event to wait on
    try:
        address = json.loads(path.read_text())["address"]
    except FileNotFoundError:
        raise OSError(f"scheduler file {str(path)!r} does not exist (waited {timeout}s)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OSError(f"cannot read the scheduler address from {str(path)!r}: {exc}") from None
    if not isinstance(address, str):
        raise OSError(f"no scheduler address in {str(path)!r}")
    return address
