"""The scheduler's side of the wire protocol (``docs/protocol.md``).

Kept apart from :mod:`sluice.scheduler` so that module reads as the lifecycle
and the glue between state machine and bus, and this one as message plumbing:
one handler for every connection, which the first message's ``op`` turns into
a worker, client or nanny conversation. Each incoming message becomes one
command for :class:`~sluice._core.scheduler_state.SchedulerState` (through
``Scheduler._handle``), or a request answered here (``who-has``, ``run``...).

Every connection gets one :class:`~sluice.comm.BatchedSend`, used for replies
and pushes alike, so what the scheduler says on a connection arrives in the
order it was said (a ``key-updated`` never overtakes the reply that precedes it).
"""

from __future__ import annotations

import inspect
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.abc
import attrs
import cloudpickle

from sluice._core.commands import (
    AddClient,
    AddWorker,
    Command,
    ReleaseKeys,
    RemoveClient,
    RemoveWorker,
    Restart,
    UpdateGraph,
)
from sluice._core.messages import MissingDataMsg, TaskErredMsg, TaskFinishedMsg
from sluice._core.scheduler_fold import GraphError
from sluice._graph_message import checked_graph
from sluice._worker_exec import dumps_exception
from sluice.comm import BatchedSend, Comm, CommClosedError, parse_address
from sluice.events import (
    ClientAdded,
    ClientReleasedKeys,
    ClientRemoved,
    Event,
    EventSchemaError,
    GraphUpdated,
    Key,
    Restarted,
    WorkerAdded,
    WorkerRemoved,
    from_dict,
)

if TYPE_CHECKING:
    from sluice._core.scheduler_state import SchedulerState
    from sluice.bus import EventBus

__all__ = ("ClientConn", "NannyConn", "SchedulerServing", "WorkerConn")

logger = logging.getLogger("sluice.scheduler")

#: Event kinds a worker may not forward: they would change the scheduler's state.
_STATEFUL: Final = (
    GraphUpdated,
    WorkerAdded,
    WorkerRemoved,
    ClientAdded,
    ClientRemoved,
    ClientReleasedKeys,
    Restarted,
)


def _pickle(value: Any) -> bytes:
    return cloudpickle.dumps(value, protocol=5)  # type: ignore[no-any-return]


def _reply(rid: Any, result: Any = None) -> dict[str, Any]:
    return {"op": "reply", "rid": rid, "ok": True, "result": result}


def _error(rid: Any, text: str, exception: bytes | None = None) -> dict[str, Any]:
    return {"op": "reply", "rid": rid, "ok": False, "error": text, "exception": exception}


def _exc_reply(rid: Any, exc: BaseException) -> dict[str, Any]:
    return _error(rid, f"{type(exc).__name__}: {exc}", dumps_exception(exc))


def _stimulus(what: str) -> str:
    return f"{what}-{time.time()}"


class _Peer:
    """A connection the scheduler pushes to: sends never block and never raise."""

    def __init__(self, comm: Comm, bs: BatchedSend) -> None:
        self.comm = comm
        self.bs = bs
        self.address = ""
        #: rids of requests (``run``, ``plugin-add``...) this peer has not answered yet.
        self.waiting: set[int] = set()

    def send(self, *msgs: dict[str, Any]) -> None:
        try:
            self.bs.send(*msgs)
        except CommClosedError:
            logger.debug("%s is gone; dropping %d messages", self.comm.peer, len(msgs))


class WorkerConn(_Peer):
    """A registered worker's connection."""

    def __init__(
        self, address: str, name: str, nanny: str | None, comm: Comm, bs: BatchedSend
    ) -> None:
        super().__init__(comm, bs)
        self.address = address
        self.name = name
        self.nanny = nanny
        self.last_seen = time.monotonic()


class ClientConn(_Peer):
    """A registered client's connection."""

    def __init__(self, client: str, comm: Comm, bs: BatchedSend) -> None:
        super().__init__(comm, bs)
        self.client = client
        self.events_name: str | None = None  # its bus subscription, if it streams events


class NannyConn(_Peer):
    """A nanny's connection; ``worker`` is the address of its current worker."""

    def __init__(self, address: str, comm: Comm, bs: BatchedSend) -> None:
        super().__init__(comm, bs)
        self.address = address
        self.worker: str | None = None


@attrs.define(eq=False)
class _Waiter:
    """One worker's pending answer to a ``run`` request."""

    worker: str
    done: anyio.Event = attrs.field(factory=anyio.Event)
    reply: dict[str, Any] | None = None


class _EventStream:
    """The queued bus consumer that pushes a client's ``subscribe-events`` stream.

    ``write`` only appends to the client's BatchedSend, so the queue drains as
    fast as events come; a client that reads slowly costs memory in its
    BatchedSend, never a stalled scheduler.
    """

    def __init__(self, peer: ClientConn) -> None:
        self.peer = peer

    async def write(self, batch: Sequence[Event]) -> None:
        self.peer.send({"op": "events", "events": tuple(e.to_dict() for e in batch)})


class SchedulerServing:
    """The connection handlers of :class:`sluice.scheduler.Scheduler`."""

    # Provided by Scheduler.
    address: str
    state: SchedulerState
    bus: EventBus
    _accepting: bool
    _ready: anyio.Event
    _specs: dict[Key, bytes]
    _exceptions: dict[Key, bytes]
    _inline_results: dict[Key, bytes]
    _handle: Callable[[Command], None]
    _spawn: Callable[..., None]
    log_event: Callable[[str, Any], None]
    register_plugin: Callable[..., Awaitable[None]]
    unregister_plugin: Callable[[str], Awaitable[None]]

    def _init_serving(self) -> None:
        self._worker_conns: dict[str, WorkerConn] = {}
        self._client_conns: dict[str, ClientConn] = {}
        self._nanny_conns: dict[str, NannyConn] = {}
        self._rids = itertools.count(1)
        self._waiters: dict[int, _Waiter] = {}
        #: Worker and nanny plugins registered by clients: name -> pickled plugin,
        #: sent to every peer that registers later.
        self._worker_plugins: dict[str, bytes] = {}
        self._nanny_plugins: dict[str, bytes] = {}

    # -- every connection ----------------------------------------------------------------

    async def _handle_comm(self, comm: Comm) -> None:
        """The listener's handler: the first message says who is calling."""
        try:
            first = await comm.recv()
        except CommClosedError:
            return
        await self._ready.wait()
        if not first or not self._accepting:
            return
        msg, rest = first[0], first[1:]
        op = msg.get("op")
        async with anyio.create_task_group() as tg:
            bs = BatchedSend(comm)
            tg.start_soon(bs.run)
            try:
                if op == "register-worker":
                    await self._serve_worker(comm, bs, msg, rest)
                elif op == "register-client":
                    await self._serve_client(comm, bs, msg, rest, tg)
                elif op == "register-nanny":
                    await self._serve_nanny(comm, bs, msg, rest)
                else:
                    logger.warning(
                        "%s opened with %r; expected a register-* message", comm.peer, op
                    )
                    if msg.get("rid") is not None:
                        text = f"the scheduler does not answer {op!r} on a new connection"
                        bs.send(_error(msg["rid"], text))
                        with anyio.move_on_after(5):
                            await bs.aclose()
            except CommClosedError:
                pass
            finally:
                tg.cancel_scope.cancel()

    async def _read(self, comm: Comm) -> list[dict[str, Any]]:
        """The next frame, once no sink is over its high-water mark."""
        await self.bus.wait_for_capacity()
        return await comm.recv()

    # -- workers -----------------------------------------------------------------------

    async def _serve_worker(
        self, comm: Comm, bs: BatchedSend, msg: dict[str, Any], rest: list[dict[str, Any]]
    ) -> None:
        rid = msg.get("rid")
        address = msg.get("address")
        name = msg.get("name") or address
        refusal: str | None = None
        try:
            parse_address(address)  # type: ignore[arg-type]
        except ValueError as exc:
            refusal = str(exc)
        if refusal is None and address in self._worker_conns:
            refusal = f"a worker at {address} is already registered"
        if refusal is None and any(w.name == name for w in self._worker_conns.values()):
            refusal = f"a worker named {name!r} is already registered"
        if refusal is not None:
            logger.warning("refusing worker %s: %s", address, refusal)
            bs.send(_error(rid, refusal))
            with anyio.move_on_after(5):
                await bs.aclose()
            return
        assert isinstance(address, str)
        conn = WorkerConn(address, str(name), msg.get("nanny"), comm, bs)
        self._worker_conns[address] = conn
        bs.send(_reply(rid, {"scheduler": self.address, "run_id": self.bus.run_id}))
        # Before AddWorker: the plugins are set up before the worker's first task.
        for pname, data in self._worker_plugins.items():
            bs.send({"op": "plugin-add", "name": pname, "plugin": data})
        self._handle(
            AddWorker(
                worker=address,
                name=str(name),
                nthreads=int(msg.get("nthreads") or 1),
                memory_limit=int(msg.get("memory_limit") or 0),
                stimulus_id=_stimulus("add-worker"),
            )
        )
        logger.info("worker %s (name %s) registered", address, name)
        try:
            self._worker_frame(conn, rest)
            while self._worker_conns.get(address) is conn:
                msgs = await self._read(comm)
                if self._worker_conns.get(address) is not conn:
                    break  # removed meanwhile (heartbeat timeout, worker-died)
                conn.last_seen = time.monotonic()
                self._worker_frame(conn, msgs)
        except CommClosedError:
            pass
        finally:
            if self._worker_conns.get(address) is conn:
                self._remove_worker(address, "connection lost")

    def _task_finished(self, address: str, msg: dict[str, Any]) -> None:
        key = msg["key"]
        data = msg.get("data")
        if isinstance(data, bytes):
            self._inline_results[key] = data
        try:
            self._handle(
                TaskFinishedMsg(
                    worker=address,
                    key=key,
                    nbytes=msg.get("nbytes") or 0,
                    duration=msg.get("duration") or 0.0,
                    stimulus_id=msg.get("stimulus_id") or "",
                )
            )
        finally:
            if data is not None:
                self._inline_results.pop(key, None)

    def _worker_frame(self, conn: WorkerConn, msgs: Iterable[dict[str, Any]]) -> None:
        address = conn.address
        for msg in msgs:
            op = msg.get("op")
            try:
                if op == "task-finished":
                    self._task_finished(address, msg)
                elif op == "task-erred":
                    self._task_erred(address, msg)
                elif op == "missing-data":
                    self._handle(
                        MissingDataMsg(
                            worker=address,
                            key=msg["key"],
                            errant_workers=tuple(msg.get("errant_workers") or ()),
                            stimulus_id=msg.get("stimulus_id") or "",
                        )
                    )
                elif op == "worker-events":
                    self._worker_events(address, msg.get("events") or ())
                elif op == "heartbeat":
                    continue  # last_seen was updated for the whole frame
                elif op == "closing":
                    self._remove_worker(address, f"worker closed ({msg.get('reason')})")
                    return
                elif op == "reply":
                    self._answered(conn, msg)
                elif msg.get("rid") is not None:
                    conn.send(_error(msg["rid"], f"unknown operation {op!r}"))
                else:
                    logger.warning("ignoring %r from worker %s", op, address)
            except (KeyError, TypeError, ValueError) as exc:
                logger.warning("malformed %r message from worker %s: %r", op, address, exc)

    def _task_erred(self, worker: str, msg: dict[str, Any]) -> None:
        key = msg["key"]
        exception = msg.get("exception")
        if isinstance(exception, bytes):
            # Stored before handling: the key-updated messages it causes carry it.
            self._exceptions[key] = exception
        self._handle(
            TaskErredMsg(
                worker=worker,
                key=key,
                exception=msg.get("exception_text") or "",
                traceback=msg.get("traceback") or "",
                duration=msg.get("duration") or 0.0,
                stimulus_id=msg.get("stimulus_id") or "",
            )
        )
        ts = self.state.tasks.get(key)
        if ts is None or ts.state != "erred":
            self._exceptions.pop(key, None)  # stale report, or retried

    def _worker_events(self, worker: str, dicts: Iterable[Any]) -> None:
        """Re-stamp a worker's events into the scheduler's one sequence and publish them."""
        now = time.time()  # only for events without a time of their own
        state = self.state
        for d in dicts:
            if not self._accepting:
                return
            # Stamped in the dict, before the event is built: evolving a frozen
            # event afterwards would build it twice, for every worker transition.
            fields = dict(d)
            fields["seq"] = state.seq + 1
            fields["source"] = worker
            if not fields.get("time"):
                fields["time"] = now
            try:
                event = from_dict(fields)
            except (EventSchemaError, KeyError, TypeError, ValueError) as exc:
                logger.warning("malformed event from worker %s: %s", worker, exc)
                continue
            if isinstance(event, _STATEFUL):
                logger.warning("worker %s forwarded a %s event; ignored", worker, event.kind)
                continue
            state.apply(event)
            self.bus.publish(event)

    def _remove_worker(self, address: str, reason: str) -> None:
        """Forget a worker's connection and tell the state machine it is gone."""
        conn = self._worker_conns.pop(address, None)
        if conn is None:
            return
        logger.info("removing worker %s: %s", address, reason)
        self._handle(
            RemoveWorker(worker=address, reason=reason, stimulus_id=_stimulus("remove-worker"))
        )
        self._fail_waiters(conn, f"worker {address} left before answering ({reason})")
        if not conn.comm.closed:
            self._spawn(conn.comm.aclose)

    def _fail_waiters(self, conn: _Peer, text: str) -> None:
        for rid in conn.waiting:
            waiter = self._waiters.pop(rid, None)
            if waiter is not None:
                waiter.reply = _error(rid, text)
                waiter.done.set()
        conn.waiting.clear()

    #: When _check_heartbeats last ran (monotonic; None before the first check).
    _heartbeat_checked: float | None = None

    def _check_heartbeats(self, timeout: float) -> None:
        now = time.monotonic()
        previous, self._heartbeat_checked = self._heartbeat_checked, now
        if previous is not None and now - previous > timeout / 2:
            # This process did not run for a while (a graph of 100,000 tasks to
            # take in, a stalled machine): the workers' heartbeats of that time
            # are waiting unread. Judge at the next check, once they are read.
            return
        for conn in list(self._worker_conns.values()):
            if now - conn.last_seen > timeout:
                logger.warning("worker %s sent nothing for %.1fs", conn.address, timeout)
                self._remove_worker(conn.address, f"no heartbeat for {timeout:g}s")

    # -- nannies -----------------------------------------------------------------------

    async def _serve_nanny(
        self, comm: Comm, bs: BatchedSend, msg: dict[str, Any], rest: list[dict[str, Any]]
    ) -> None:
        address = str(msg.get("address") or comm.peer)
        conn = NannyConn(address, comm, bs)
        old = self._nanny_conns.get(address)
        self._nanny_conns[address] = conn
        plugins_sent = False
        try:
            msgs = [msg, *rest]
            while True:
                for m in msgs:
                    op = m.get("op")
                    if op == "register-nanny":
                        before, conn.worker = conn.worker, m.get("worker") or conn.worker
                        if before is not None and before != conn.worker:
                            # Its nanny replaced that worker: it is gone.
                            self._remove_worker(before, "restarted by its nanny")
                        if m.get("rid") is not None:
                            conn.send(_reply(m["rid"]))
                        if not plugins_sent:
                            # After the reply: the nanny sets them up once it runs.
                            plugins_sent = True
                            for pname, data in self._nanny_plugins.items():
                                conn.send({"op": "plugin-add", "name": pname, "plugin": data})
                    elif op == "worker-died":
                        worker = m.get("worker")
                        if isinstance(worker, str):
                            code = m.get("exitcode")
                            self._remove_worker(worker, f"worker died (exit code {code})")
                    elif op == "reply":
                        self._answered(conn, m)
                    elif m.get("rid") is not None:
                        conn.send(_error(m["rid"], f"unknown operation {op!r}"))
                    else:
                        logger.warning("ignoring %r from nanny %s", op, address)
                msgs = await self._read(comm)
        except CommClosedError:
            pass
        finally:
            self._fail_waiters(conn, f"nanny {address} left before answering")
            if self._nanny_conns.get(address) is conn:
                if old is not None:
                    self._nanny_conns[address] = old
                else:
                    del self._nanny_conns[address]

    # -- clients -----------------------------------------------------------------------

    async def _serve_client(
        self,
        comm: Comm,
        bs: BatchedSend,
        msg: dict[str, Any],
        rest: list[dict[str, Any]],
        tg: anyio.abc.TaskGroup,
    ) -> None:
        rid = msg.get("rid")
        client = msg.get("client")
        if not isinstance(client, str) or not client or client in self._client_conns:
            why = "is already connected" if isinstance(client, str) else "is not a string"
            bs.send(_error(rid, f"client id {client!r} {why}"))
            with anyio.move_on_after(5):
                await bs.aclose()
            return
        conn = ClientConn(client, comm, bs)
        self._client_conns[client] = conn
        self._handle(AddClient(client=client))
        bs.send(_reply(rid, {"address": self.address, "run_id": self.bus.run_id}))
        try:
            msgs = rest
            while self._client_frame(conn, msgs, tg):
                msgs = await self._read(comm)
            with anyio.move_on_after(5):
                await bs.aclose()  # the replies to the last frame still go out
        except CommClosedError:
            pass
        finally:
            self._drop_client(conn)

    def _drop_client(self, conn: ClientConn) -> None:
        if self._client_conns.get(conn.client) is not conn:
            return
        del self._client_conns[conn.client]
        self._unsubscribe_events(conn)
        self._handle(RemoveClient(client=conn.client, stimulus_id=_stimulus("remove-client")))

    def _client_frame(
        self, conn: ClientConn, msgs: Iterable[dict[str, Any]], tg: anyio.abc.TaskGroup
    ) -> bool:
        """Handle one frame of a client; False once the client said ``close-client``."""
        for msg in msgs:
            op = msg.get("op")
            rid = msg.get("rid")
            try:
                if op == "update-graph":
                    self._update_graph(conn, msg)
                elif op == "release-keys":
                    self._handle(
                        ReleaseKeys(
                            client=conn.client,
                            keys=tuple(msg.get("keys") or ()),
                            stimulus_id=_stimulus("release-keys"),
                        )
                    )
                elif op == "who-has":
                    conn.send(_reply(rid, self._who_has(msg.get("keys") or ())))
                elif op == "restart":
                    self._handle(Restart(stimulus_id=_stimulus("restart")))
                    conn.send(_reply(rid))
                elif op == "run-on-scheduler":
                    tg.start_soon(self._run_on_scheduler, conn, msg)
                elif op == "run":
                    tg.start_soon(self._request, conn, msg, self._broadcast_run)
                elif op == "subscribe-events":
                    self._subscribe_events(conn, msg.get("since"), msg.get("kinds"))
                elif op == "unsubscribe-events":
                    self._unsubscribe_events(conn)
                elif op == "register-scheduler-plugin":
                    tg.start_soon(self._register_scheduler_plugin, conn, msg)
                elif op == "unregister-scheduler-plugin":
                    tg.start_soon(self._unregister_scheduler_plugin, conn, msg)
                elif op == "register-worker-plugin":
                    tg.start_soon(self._request, conn, msg, self._register_worker_plugin)
                elif op == "unregister-worker-plugin":
                    tg.start_soon(self._request, conn, msg, self._unregister_worker_plugin)
                elif op == "log-event":
                    self.log_event(str(msg["topic"]), msg.get("msg"))
                    if rid is not None:
                        conn.send(_reply(rid))
                elif op == "close-client":
                    self._drop_client(conn)
                    return False
                elif rid is not None:
                    conn.send(_error(rid, f"unknown operation {op!r}"))
                else:
                    logger.warning("ignoring %r from client %s", op, conn.client)
            except (KeyError, TypeError, ValueError) as exc:
                logger.warning("bad %r message from client %s: %r", op, conn.client, exc)
                if rid is not None:
                    conn.send(_exc_reply(rid, exc))
        return True

    async def _request(
        self,
        conn: ClientConn,
        msg: dict[str, Any],
        handler: Callable[[ClientConn, dict[str, Any]], Awaitable[None]],
    ) -> None:
        """Run a request handler in its own task; a malformed request gets an error reply."""
        try:
            await handler(conn, msg)
        except Exception as exc:
            logger.warning("bad %r message from client %s: %r", msg.get("op"), conn.client, exc)
            conn.send(_exc_reply(msg.get("rid"), exc))

    def _update_graph(self, conn: ClientConn, msg: dict[str, Any]) -> None:
        rid = msg.get("rid")
        tasks, dependencies, priority, retries = checked_graph(msg)
        # An existing task keeps its definition (the state machine ignores the new one).
        added = [key for key in tasks if key not in self._specs]
        for key in added:
            self._specs[key] = tasks[key]
        try:
            self._handle(
                UpdateGraph(
                    client=conn.client,
                    keys=tuple(msg.get("keys") or ()),
                    dependencies=dependencies,
                    priority=priority,
                    retries=retries,
                    stimulus_id=_stimulus("update-graph"),
                )
            )
        except GraphError as exc:
            for key in added:
                self._specs.pop(key, None)
            conn.send(_error(rid, str(exc)))
            return
        except BaseException:
            for key in added:
                self._specs.pop(key, None)
            raise
        if rid is not None:
            conn.send(_reply(rid))

    def _who_has(self, keys: Iterable[Key]) -> dict[Key, tuple[str, ...]]:
        tasks = self.state.tasks
        found: dict[Key, tuple[str, ...]] = {}
        for key in keys:
            ts = tasks.get(key)
            if ts is not None and ts.state == "memory":
                found[key] = tuple(sorted(w.address for w in ts.who_has))
        return found

    async def _run_on_scheduler(self, conn: ClientConn, msg: dict[str, Any]) -> None:
        """Call a client's function here, on the event loop, as Dask does."""
        rid = msg.get("rid")
        try:
            fn, args, kwargs = cloudpickle.loads(msg["function"])
            kwargs = dict(kwargs or {})
            try:
                params = inspect.signature(fn).parameters
            except (TypeError, ValueError):
                params = {}  # type: ignore[assignment]
            for name in ("sluice_scheduler", "dask_scheduler"):
                if name in params and name not in kwargs:
                    kwargs[name] = self
            result = fn(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
            reply = _reply(rid, _pickle(result))
        except Exception as exc:
            reply = _exc_reply(rid, exc)
        conn.send(reply)

    async def _broadcast_run(self, conn: ClientConn, msg: dict[str, Any]) -> None:
        """``Client.run``: ask each worker to call the function; gather the answers."""
        rid = msg.get("rid")
        wanted = msg.get("workers")
        addresses = list(self._worker_conns) if wanted is None else list(wanted)
        unknown = [a for a in addresses if a not in self._worker_conns]
        if unknown:
            conn.send(_error(rid, f"unknown workers: {', '.join(map(str, unknown))}"))
            return
        waiters: dict[str, _Waiter] = {}
        for address in addresses:
            worker = self._worker_conns[address]
            waiters[address] = self._ask(worker, {"op": "run", "function": msg["function"]})
        results: dict[str, Any] = {}
        for address, waiter in waiters.items():
            await waiter.done.wait()
            answer = waiter.reply or {}
            if not answer.get("ok"):
                text = f"on worker {address}: {answer.get('error')}"
                conn.send(_error(rid, text, answer.get("exception")))
                return
            results[address] = answer.get("result")
        conn.send(_reply(rid, results))

    def _ask(self, peer: _Peer, msg: dict[str, Any]) -> _Waiter:
        """Send a request to a worker or nanny; the waiter is set when it answers."""
        rid = next(self._rids)
        waiter = self._waiters[rid] = _Waiter(peer.address)
        peer.waiting.add(rid)
        peer.send({**msg, "rid": rid})
        return waiter

    async def _ask_all(
        self, peers: Sequence[_Peer], msg: dict[str, Any]
    ) -> dict[str, dict[str, Any]]:
        """Send ``msg`` to every peer; {address: its reply}."""
        waiters = [self._ask(peer, msg) for peer in peers]
        answers: dict[str, dict[str, Any]] = {}
        for waiter in waiters:
            await waiter.done.wait()
            answers[waiter.worker] = waiter.reply or {}
        return answers

    # -- plugins -----------------------------------------------------------------------

    async def _register_scheduler_plugin(self, conn: ClientConn, msg: dict[str, Any]) -> None:
        rid = msg.get("rid")
        try:
            plugin = cloudpickle.loads(msg["plugin"])
            await self.register_plugin(
                plugin, name=msg.get("name"), idempotent=bool(msg.get("idempotent"))
            )
            reply = _reply(rid)
        except Exception as exc:
            reply = _exc_reply(rid, exc)
        conn.send(reply)

    async def _unregister_scheduler_plugin(self, conn: ClientConn, msg: dict[str, Any]) -> None:
        rid = msg.get("rid")
        try:
            await self.unregister_plugin(str(msg["name"]))
            reply = _reply(rid)
        except Exception as exc:
            reply = _exc_reply(rid, exc)
        conn.send(reply)

    def _plugin_peers(self, nanny: bool) -> tuple[dict[str, bytes], list[_Peer]]:
        if nanny:
            return self._nanny_plugins, list(self._nanny_conns.values())
        return self._worker_plugins, list(self._worker_conns.values())

    async def _register_worker_plugin(self, conn: ClientConn, msg: dict[str, Any]) -> None:
        """Store a worker (or nanny) plugin and set it up on every current peer."""
        rid = msg.get("rid")
        name = str(msg["name"])
        store, peers = self._plugin_peers(bool(msg.get("nanny")))
        if name in store and msg.get("idempotent"):
            conn.send(_reply(rid))
            return
        store[name] = msg["plugin"]
        answers = await self._ask_all(
            peers, {"op": "plugin-add", "name": name, "plugin": msg["plugin"]}
        )
        conn.send(self._gathered(rid, answers))

    async def _unregister_worker_plugin(self, conn: ClientConn, msg: dict[str, Any]) -> None:
        """Forget a worker (or nanny) plugin; every current peer tears it down."""
        rid = msg.get("rid")
        name = str(msg["name"])
        nanny = bool(msg.get("nanny"))
        store, peers = self._plugin_peers(nanny)
        if store.pop(name, None) is None:
            kind = "nanny" if nanny else "worker"
            conn.send(_exc_reply(rid, ValueError(f"no {kind} plugin named {name!r}")))
            return
        answers = await self._ask_all(peers, {"op": "plugin-remove", "name": name})
        conn.send(self._gathered(rid, answers))

    @staticmethod
    def _gathered(rid: Any, answers: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """One reply for many: the first failure (with its exception), else ``None``."""
        for address, answer in answers.items():
            if not answer.get("ok"):
                text = f"on {address}: {answer.get('error')}"
                return _error(rid, text, answer.get("exception"))
        return _reply(rid)

    def _answered(self, conn: _Peer, msg: dict[str, Any]) -> None:
        rid = msg.get("rid")
        if not isinstance(rid, int):
            return
        waiter = self._waiters.pop(rid, None)
        if waiter is None:
            return
        conn.waiting.discard(rid)
        waiter.reply = msg
        waiter.done.set()

    def _subscribe_events(self, conn: ClientConn, since: Any, kinds: Any) -> None:
        self._unsubscribe_events(conn)
        name = f"client-events-{conn.client}"
        kind_set = tuple(kinds) if kinds is not None else None
        stream = _EventStream(conn)
        options: dict[str, Any] = {
            "name": name,
            "kinds": kind_set,
            "mode": "queued",
            "overflow": "drop",
        }
        try:
            self.bus.subscribe(stream, since=since, **options)
        except ValueError as exc:  # too far back for the history and the log
            logger.warning("client %s: %s; streaming live events only", conn.client, exc)
            self.bus.subscribe(stream, **options)
        conn.events_name = name

    def _unsubscribe_events(self, conn: ClientConn) -> None:
        name, conn.events_name = conn.events_name, None
        if name is not None and name in self.bus.subscriptions:
            self.bus.unsubscribe(name)

    # -- closing -----------------------------------------------------------------------

    async def _close_workers(self, reason: str) -> None:
        """Tell every worker and nanny to shut down, and wait until that was sent."""
        peers: list[_Peer] = [*self._worker_conns.values(), *self._nanny_conns.values()]
        for peer in peers:
            peer.send({"op": "close", "reason": reason})
        with anyio.move_on_after(5):
            for peer in peers:
                await peer.bs.aclose()
