"""Tests of the Client: first against a fake scheduler and a fake worker that speak
docs/protocol.md (so the client's side of the protocol is checked message by message),
then end to end against a real in-process LocalCluster."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import cloudpickle
import pytest

from sluice import _loop
from sluice.client import (
    FIRST_COMPLETED,
    Client,
    Future,
    FutureCancelledError,
    as_completed,
    wait,
)
from sluice.comm import Comm, CommClosedError, listen
from sluice.taskspec import KeyRef, TaskSpec, loads_spec
from sluice.taskspec import run as run_spec


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def inc(x: int) -> int:
    return x + 1


def add(x: int, y: int) -> int:
    return x + y


class Boom(ValueError):
    pass


def fail(x: int) -> int:
    raise Boom(f"boom {x}")


# -------------------------------------------------------------------- fakes


class FakeScheduler:
    """Records what the client sends; answers requests; lets the test push."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.comm: Comm | None = None
        self.graph_error: str | None = None
        self.who_has: dict[Any, tuple[str, ...]] = {}
        self.address = ""
        self._arrived = anyio.Event()
        self._connected = anyio.Event()

    async def handler(self, comm: Comm) -> None:
        self.comm = comm
        self._connected.set()
        while True:
            try:
                msgs = await comm.recv()
            except CommClosedError:
                return
            for msg in msgs:
                self.received.append(msg)
                await self._answer(comm, msg)
            self._arrived.set()
            self._arrived = anyio.Event()

    async def _answer(self, comm: Comm, msg: dict[str, Any]) -> None:
        rid = msg.get("rid")
        op = msg["op"]
        if rid is None:
            return
        if op == "register-client":
            result: Any = {"address": self.address, "run_id": "run-1"}
        elif op == "update-graph" and self.graph_error:
            await comm.send(
                {
                    "op": "reply",
                    "rid": rid,
                    "ok": False,
                    "error": self.graph_error,
                    "exception": None,
                }
            )
            return
        elif op == "who-has":
            result = {k: self.who_has[k] for k in msg["keys"] if k in self.who_has}
        elif op == "run-on-scheduler":
            fn, args, kwargs = cloudpickle.loads(msg["function"])
            result = cloudpickle.dumps(fn(*args, **kwargs))
        else:
            result = None
        await comm.send({"op": "reply", "rid": rid, "ok": True, "result": result})

    def ops(self, op: str) -> list[dict[str, Any]]:
        return [m for m in self.received if m["op"] == op]

    async def wait_for(self, op: str, n: int = 1) -> list[dict[str, Any]]:
        while len(self.ops(op)) < n:
            await self._arrived.wait()
        return self.ops(op)

    async def push(self, **msg: Any) -> None:
        assert self.comm is not None
        await self.comm.send(msg)

    async def memory(self, key: Any, *workers: str) -> None:
        await self.push(op="key-updated", key=key, state="memory", who_has=workers)

    async def erred(self, key: Any, exc: BaseException, tb: str) -> None:
        await self.push(
            op="key-updated",
            key=key,
            state="erred",
            who_has=(),
            exception=cloudpickle.dumps(exc),
            exception_text=repr(exc),
            traceback=tb,
        )


class FakeWorker:
    """Answers get-data from ``data`` (results already computed by the test)."""

    def __init__(self) -> None:
        self.data: dict[Any, Any] = {}
        self.requests: list[tuple[Any, ...]] = []
        self.address = ""

    async def handler(self, comm: Comm) -> None:
        while True:
            try:
                msgs = await comm.recv()
            except CommClosedError:
                return
            for msg in msgs:
                assert msg["op"] == "get-data"
                self.requests.append(msg["keys"])
                found = {k: cloudpickle.dumps(self.data[k]) for k in msg["keys"] if k in self.data}
                await comm.send({"op": "reply", "rid": msg["rid"], "ok": True, "result": found})


def compute(msg: dict[str, Any], key: Any, data: dict[Any, Any] | None = None) -> Any:
    """Run the spec the client sent for ``key``, as a worker would."""
    return run_spec(loads_spec(msg["tasks"][key]), data or {})


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeScheduler, FakeWorker]]:
    sched, worker = FakeScheduler(), FakeWorker()
    async with (
        await listen("tcp://127.0.0.1:0", sched.handler) as l1,
        await listen("tcp://127.0.0.1:0", worker.handler) as l2,
    ):
        sched.address, worker.address = l1.address, l2.address
        yield sched, worker


@pytest.fixture
async def client(fake: tuple[FakeScheduler, FakeWorker]) -> AsyncIterator[Client]:
    async with Client(fake[0].address, asynchronous=True) as c:
        yield c


# -------------------------------------------------------------- fake: async


@pytest.mark.anyio
async def test_register_and_close(fake: tuple[FakeScheduler, FakeWorker]) -> None:
    sched, _ = fake
    async with Client(sched.address, asynchronous=True, name="me") as c:
        assert c.status == "running"
        assert c.scheduler_address == sched.address
        assert c.run_id == "run-1"
        (reg,) = sched.ops("register-client")
        assert reg["client"] == c.id and c.id.startswith("client-me-")
    assert c.status == "closed"
    await sched.wait_for("close-client")


@pytest.mark.anyio
async def test_submit_sends_graph_with_keyref_dependencies(
    fake: tuple[FakeScheduler, FakeWorker], client: Client
) -> None:
    sched, _ = fake
    x = client.submit(inc, 1)
    assert str(x.key).startswith("inc-")
    assert client.submit(inc, 1).key == x.key  # pure: same call, same key
    assert client.submit(inc, 1, pure=False).key != x.key
    y = client.submit(add, x, y=10)
    graphs = await sched.wait_for("update-graph", 4)
    g = graphs[-1]
    assert g["keys"] == (y.key,)
    assert g["dependencies"] == {y.key: (x.key,)}
    spec = loads_spec(g["tasks"][y.key])
    assert isinstance(spec, TaskSpec)
    assert spec.args == (KeyRef(x.key),) and spec.kwargs == {"y": 10}
    assert compute(g, y.key, {x.key: 2}) == 12
    assert compute(graphs[0], x.key) == 2
    assert client.submit(inc, 5, key="mine").key == "mine"


@pytest.mark.anyio
async def test_result_fetched_from_who_has(
    fake: tuple[FakeScheduler, FakeWorker], client: Client
) -> None:
    sched, worker = fake
    x = client.submit(inc, 1)
    assert not x.done() and x.status == "pending"
    (g,) = await sched.wait_for("update-graph")
    worker.data[x.key] = compute(g, x.key)
    await sched.memory(x.key, worker.address)
    assert await x == 2
    assert await x.result() == 2
    assert x.done() and x.status == "finished"
    assert await x.exception() is None
    assert worker.requests == [(x.key,), (x.key,)]


@pytest.mark.anyio
async def test_a_result_sent_with_key_updated_needs_no_fetch(
    fake: tuple[FakeScheduler, FakeWorker], client: Client
) -> None:
    sched, worker = fake
    x = client.submit(inc, 1)
    await sched.wait_for("update-graph")
    await sched.push(
        op="key-updated", key=x.key, state="memory", who_has=(worker.address,), data=b"junk"
    )
    await sched.push(
        op="key-updated",
        key=x.key,
        state="memory",
        who_has=(worker.address,),
        data=cloudpickle.dumps(2),
    )
    with anyio.fail_after(10):
        while x._state.generation < 2:
            await x._state.wait_changed(x._state.generation)
    assert await x == 2
    assert await client.gather([x, x]) == [2, 2]
    assert worker.requests == []  # nothing asked of the worker


@pytest.mark.anyio
async def test_erred_raises_original_type_with_worker_traceback(
    fake: tuple[FakeScheduler, FakeWorker], client: Client
) -> None:
    sched, _ = fake
    x = client.submit(fail, 1)
    await sched.wait_for("update-graph")
    await sched.erred(x.key, Boom("boom 1"), "Traceback ...\n  in fail\nBoom: boom 1")
    with pytest.raises(Boom, match="boom 1") as info:
        await x
    assert any("in fail" in note for note in info.value.__notes__)
    exc = await x.exception()
    assert isinstance(exc, Boom)
    assert x.status == "error"
    assert "in fail" in (x.traceback() or "")


@pytest.mark.anyio
async def test_gather_nested(fake: tuple[FakeScheduler, FakeWorker], client: Client) -> None:
    sched, worker = fake
    futs = client.map(inc, [1, 2, 3])
    (g,) = await sched.wait_for("update-graph")
    for f in futs:
        worker.data[f.key] = compute(g, f.key)
        await sched.memory(f.key, worker.address)
    a, b, c = futs
    out = await client.gather({"x": [a, (b, 7)], "y": {c}, "z": a})
    assert out == {"x": [2, (3, 7)], "y": {4}, "z": 2}
    assert await client.gather(futs) == [2, 3, 4]
    assert await client.gather(a) == 2


@pytest.mark.anyio
async def test_map_sends_one_update_graph(
    fake: tuple[FakeScheduler, FakeWorker], client: Client
) -> None:
    sched, _ = fake
    futs = client.map(lambda x, y: x * y, range(5), [10] * 5, key="mul")
    (g,) = await sched.wait_for("update-graph")
    assert len(g["tasks"]) == 5
    assert g["keys"] == tuple(f.key for f in futs)
    assert all(str(f.key).startswith("mul-") for f in futs)
    assert [compute(g, f.key) for f in futs] == [0, 10, 20, 30, 40]
    deps_map = client.map(inc, futs)
    g2 = (await sched.wait_for("update-graph", 2))[1]
    assert g2["dependencies"][deps_map[0].key] == (futs[0].key,)


@pytest.mark.anyio
async def test_map_of_many_tasks_sends_one_graph(
    fake: tuple[FakeScheduler, FakeWorker], client: Client
) -> None:
    # How fast is a question for benchmarks/compare.py, not for a timed test.
    sched, _ = fake
    futs = client.map(lambda x: x + 1, range(10_000))
    assert len({f.key for f in futs}) == 10_000
    (g,) = await sched.wait_for("update-graph")
    assert len(g["tasks"]) == 10_000
    assert compute(g, futs[1234].key) == 1235


@pytest.mark.anyio
async def test_last_future_released_sends_release_keys(
    fake: tuple[FakeScheduler, FakeWorker], client: Client
) -> None:
    sched, _ = fake
    x = client.submit(inc, 1)
    x2 = Future(x.key, client)
    key = x.key
    del x
    gc.collect()
    await anyio.wait_all_tasks_blocked()
    assert not sched.ops("release-keys")
    del x2
    msgs = await sched.wait_for("release-keys")
    assert msgs[0]["keys"] == (key,)
    assert key not in client._states


@pytest.mark.anyio
async def test_as_completed_and_wait(
    fake: tuple[FakeScheduler, FakeWorker], client: Client
) -> None:
    sched, worker = fake
    a, b, c = client.map(inc, [1, 2, 3])
    (g,) = await sched.wait_for("update-graph")
    for f in (a, b, c):
        worker.data[f.key] = compute(g, f.key)
    done, not_done = await wait([a, b], timeout=0.05)
    assert done == set() and not_done == {a, b}
    await sched.memory(c.key, worker.address)
    done, not_done = await wait([a, b, c], return_when=FIRST_COMPLETED)
    assert done == {c} and not_done == {a, b}
    await sched.memory(b.key, worker.address)
    await sched.memory(a.key, worker.address)
    order = [f async for f in as_completed([a, b, c])]
    assert order == [c, b, a]
    pairs = [(f.key, r) async for f, r in as_completed([a, b], with_results=True)]
    assert sorted(r for _, r in pairs) == [2, 3]
    done, not_done = await wait([a, b, c])
    assert len(done) == 3 and not not_done


@pytest.mark.anyio
async def test_graph_error_raises_value_error_when_awaited(
    fake: tuple[FakeScheduler, FakeWorker], client: Client
) -> None:
    sched, _ = fake
    sched.graph_error = "missing dependency 'nope'"
    x = client.submit(inc, 1)
    with pytest.raises(ValueError, match="missing dependency"):
        await x
    with pytest.raises(ValueError, match="missing dependency"):
        await client.get({"a": (inc, 1)}, "a")


@pytest.mark.anyio
async def test_forgotten_and_cancel(fake: tuple[FakeScheduler, FakeWorker], client: Client) -> None:
    sched, _ = fake
    x = client.submit(inc, 1)
    y = client.submit(inc, 2)
    await sched.wait_for("update-graph", 2)
    await sched.push(op="key-updated", key=x.key, state="forgotten")
    with pytest.raises(FutureCancelledError):
        await x
    await y.cancel()
    assert y.cancelled()
    assert (await sched.wait_for("release-keys"))[0]["keys"] == (y.key,)
    with pytest.raises(FutureCancelledError):
        await y.result(timeout=1)
    # Submitting a cancelled key again starts it over.
    y2 = client.submit(inc, 2)
    assert y2.key == y.key and y.status == "pending"


@pytest.mark.anyio
async def test_missing_data_asks_who_has_again(
    fake: tuple[FakeScheduler, FakeWorker], client: Client
) -> None:
    sched, worker = fake
    x = client.submit(inc, 1)
    (g,) = await sched.wait_for("update-graph")
    empty = FakeWorker()
    async with await listen("tcp://127.0.0.1:0", empty.handler) as l3:
        await sched.memory(x.key, l3.address)  # claims a worker that lost the data
        sched.who_has[x.key] = (worker.address,)
        worker.data[x.key] = compute(g, x.key)
        assert await x.result(timeout=5) == 2
    assert empty.requests == [(x.key,)]
    assert sched.ops("who-has")[0]["keys"] == (x.key,)


@pytest.mark.anyio
async def test_result_waits_for_recomputation_when_nobody_has_it(
    fake: tuple[FakeScheduler, FakeWorker], client: Client
) -> None:
    sched, worker = fake
    x = client.submit(inc, 1)
    (g,) = await sched.wait_for("update-graph")
    client.data_connect_timeout = 0.05
    await sched.memory(x.key, "tcp://127.0.0.1:1")  # a dead worker
    async with anyio.create_task_group() as tg:
        results: list[int] = []

        async def get() -> None:
            results.append(await x.result(timeout=10))

        tg.start_soon(get)
        await sched.wait_for("who-has")
        worker.data[x.key] = compute(g, x.key)
        await sched.memory(x.key, worker.address)
    assert results == [2]


@pytest.mark.anyio
async def test_run_on_scheduler_and_timeout(
    fake: tuple[FakeScheduler, FakeWorker], client: Client
) -> None:
    assert await client.run_on_scheduler(add, 1, y=2) == 3
    x = client.submit(inc, 1)
    with pytest.raises(TimeoutError):
        await x.result(timeout=0.01)


@pytest.mark.anyio
async def test_events_stream(fake: tuple[FakeScheduler, FakeWorker], client: Client) -> None:
    from sluice.events import UserEvent, WorkerAdded

    sched, _ = fake
    stream = client.events(kinds=["user-event"])
    (sub,) = await sched.wait_for("subscribe-events")
    assert sub["kinds"] == ("user-event",) and sub["since"] is None
    ev1 = UserEvent(seq=1, time=1.0, source="scheduler", topic="t", msg={"a": 1})
    ev2 = WorkerAdded(
        seq=2, time=2.0, source="scheduler", worker="w", name="w", nthreads=1, memory_limit=0
    )
    ev3 = UserEvent(seq=3, time=3.0, source="scheduler", topic="t", msg=[1, 2])
    await sched.push(op="events", events=(ev1.to_dict(), ev2.to_dict(), ev3.to_dict()))
    got = []
    async for ev in stream:
        got.append(ev)
        if len(got) == 2:
            break
    assert [e.seq for e in got] == [1, 3]
    assert got[0] == ev1
    await stream.aclose()
    await sched.wait_for("unsubscribe-events")


# ------------------------------------------- relay: a real Worker, a fake scheduler


class RelayScheduler(FakeScheduler):
    """Just enough scheduler to run independent tasks on one real Worker: the specs
    the client packs must run there, and its results and errors reach the client."""

    def __init__(self) -> None:
        super().__init__()
        self.worker_comm: Comm | None = None
        self.worker_address = ""
        self.worker_ready = anyio.Event()

    async def _answer(self, comm: Comm, msg: dict[str, Any]) -> None:
        op = msg["op"]
        if op == "register-worker":
            self.worker_comm, self.worker_address = comm, msg["address"]
            result = {"scheduler": self.address, "run_id": "run-1"}
            await comm.send({"op": "reply", "rid": msg["rid"], "ok": True, "result": result})
            self.worker_ready.set()
            return
        if op == "update-graph" and self.worker_comm is not None:
            for key, spec in msg["tasks"].items():
                await self.worker_comm.send(
                    {
                        "op": "compute-task",
                        "key": key,
                        "spec": spec,
                        "who_has": {},
                        "priority": 0,
                        "stimulus_id": "relay",
                    }
                )
        elif op == "task-finished":
            await self.memory(msg["key"], self.worker_address)
        elif op == "task-erred":
            await self.push(
                op="key-updated",
                key=msg["key"],
                state="erred",
                who_has=(),
                exception=msg["exception"],
                exception_text=msg.get("exception_text"),
                traceback=msg.get("traceback"),
            )
        elif self.comm is comm:
            await super()._answer(comm, msg)


@pytest.mark.anyio
async def test_specs_run_on_a_real_worker() -> None:
    from sluice.worker import Worker

    sched = RelayScheduler()
    async with await listen("tcp://127.0.0.1:0", sched.handler) as lst:
        sched.address = lst.address
        async with Worker(lst.address, nthreads=2) as w:
            await sched.worker_ready.wait()
            sched.comm = None  # the next connection, the client's, takes it
            async with Client(lst.address, asynchronous=True) as c:
                offset = 100
                futs = c.map(lambda x: x + offset, range(50))
                assert await c.gather(futs) == list(range(100, 150))
                assert await c.submit(add, 1, y=2) == 3
                with pytest.raises(Boom, match="boom 7") as info:
                    await c.submit(fail, 7)
                assert any("fail" in n for n in info.value.__notes__)
            assert w.address == sched.worker_address


# --------------------------------------------------------------- fake: sync


def test_sync_client_against_fake() -> None:
    portal = _loop.get_portal()
    sched, worker = FakeScheduler(), FakeWorker()

    async def start() -> tuple[Any, Any]:
        l1 = await listen("tcp://127.0.0.1:0", sched.handler)
        l2 = await listen("tcp://127.0.0.1:0", worker.handler)
        sched.address, worker.address = l1.address, l2.address
        return l1, l2

    l1, l2 = portal.call(start)
    try:
        with Client(sched.address) as c:
            x = c.submit(inc, 41)
            (g,) = portal.call(sched.wait_for, "update-graph")
            worker.data[x.key] = compute(g, x.key)
            portal.call(sched.memory, x.key, worker.address)
            assert x.result(timeout=5) == 42
            assert c.gather([x, {"k": x}]) == [42, {"k": 42}]
            done, _ = wait([x])
            assert done == {x}
            assert list(as_completed([x])) == [x]
            called = threading.Event()
            x.add_done_callback(lambda f: called.set() if f is x else None)
            assert called.wait(5)
            y = c.submit(inc, 2)
            portal.call(partial(sched.push, op="key-updated", key=y.key, state="forgotten"))
            with pytest.raises(FutureCancelledError):
                y.result(timeout=5)
            # A graph the scheduler may refuse (here: a forgotten dependency) is
            # acknowledged before submit returns, so its error raises at the call.
            sched.graph_error = "missing dependency"
            with pytest.raises(ValueError, match="missing dependency"):
                c.submit(inc, y)
            with pytest.raises(ValueError, match="missing dependency"):
                c.map(add, [1, 2], [y, y])
            with pytest.raises(ValueError, match="missing dependency"):
                c.get({"a": (inc, 1)}, "a")
            # One that cannot be refused returns at once (errors land in the future).
            z = c.submit(inc, 0)
            with pytest.raises(ValueError, match="missing dependency"):
                z.result(timeout=5)
        assert c.status == "closed"
    finally:
        portal.call(l1.aclose)
        portal.call(l2.aclose)


# ------------------------------------------------------------- end to end

_have_servers: bool
try:
    import sluice.scheduler
    import sluice.worker  # noqa: F401

    _have_servers = True
except ImportError:
    _have_servers = False

needs_servers = pytest.mark.skipif(not _have_servers, reason="scheduler/worker not available")


def slow_identity(x: Any, event_name: str | None = None) -> Any:
    return x


@needs_servers
@pytest.mark.anyio
async def test_e2e_async_local_cluster() -> None:
    from sluice.deploy import LocalCluster

    async with (
        LocalCluster(n_workers=2, processes=False, asynchronous=True) as cluster,
        Client(cluster, asynchronous=True) as c,
    ):
        assert len(cluster.workers) == 2
        assert await c.submit(inc, 1) == 2
        x = c.submit(inc, 10)
        y = c.submit(add, x, 5)
        assert await y == 16
        futs = c.map(inc, range(20))
        assert await c.gather(futs) == list(range(1, 21))
        assert await c.get({"x": 1, "y": (inc, "x"), "z": (add, "x", "y")}, ["y", ["z"]]) == [
            2,
            [3],
        ]
        assert await c.get({("a", 0): 5, "b": (inc, ("a", 0))}, "b") == 6
        bad = c.submit(fail, 3)
        with pytest.raises(Boom, match="boom 3") as info:
            await bad
        assert any("fail" in n for n in getattr(info.value, "__notes__", []))
        dep = c.submit(inc, bad)
        with pytest.raises(Boom):
            await dep
        ran = await c.run(inc, 1)
        assert set(ran) == {w.address for w in cluster.workers} and set(ran.values()) == {2}
        assert await c.run_on_scheduler(add, 2, 3) == 5
        count = await c.run_on_scheduler(lambda sluice_scheduler: len(sluice_scheduler.workers))
        assert count == 2


def payload(n: int) -> bytes:
    return b"x" * n


@needs_servers
@pytest.mark.anyio
async def test_e2e_small_results_come_inline_large_ones_from_the_worker() -> None:
    from sluice.deploy import LocalCluster

    async with (
        LocalCluster(n_workers=1, processes=False, asynchronous=True) as cluster,
        Client(cluster, asynchronous=True) as c,
    ):
        assert await c.gather(c.map(inc, range(50))) == list(range(1, 51))
        assert await c.submit(add, c.submit(inc, 1), 2) == 4
        assert not c._pool  # no connection to a worker was needed
        assert await c.submit(payload, 100_000) == b"x" * 100_000
        assert set(c._pool) == {cluster.workers[0].address}


@needs_servers
@pytest.mark.anyio
async def test_e2e_events_and_scale() -> None:
    from sluice.deploy import LocalCluster

    async with (
        LocalCluster(n_workers=1, processes=False, asynchronous=True) as cluster,
        Client(cluster, asynchronous=True) as c,
    ):
        stream = c.events(kinds=["task-transition"])
        x = c.submit(inc, 1, key="watched")
        assert await x == 2
        finishes = []
        async for ev in stream:
            if getattr(ev, "key", None) == "watched":
                finishes.append(ev.finish)  # type: ignore[attr-defined]
                if ev.finish == "memory":  # type: ignore[attr-defined]
                    break
        assert finishes[-1] == "memory"
        await stream.aclose()
        await cluster.scale(2)
        assert len(cluster.workers) == 2
        futs = c.map(inc, range(10))
        assert sum(await c.gather(futs)) == sum(range(1, 11))
        await cluster.scale(1)
        assert len(cluster.scheduler.workers) == 1
        assert await c.submit(inc, 100) == 101


@needs_servers
def test_e2e_sync_local_cluster() -> None:
    from sluice.deploy import LocalCluster

    with LocalCluster(n_workers=2, processes=False) as cluster, Client(cluster) as c:
        x = c.submit(inc, 1)
        assert x.result(timeout=30) == 2
        assert c.gather(c.map(inc, [1, 2, 3])) == [2, 3, 4]
        assert c.get({"x": 1, "y": (inc, "x")}, "y") == 2
        with pytest.raises(Boom):
            c.submit(fail, 1).result(timeout=30)
        assert c.run_on_scheduler(add, 1, 1) == 2
        assert set(c.run(inc, 1).values()) == {2}
        futs = c.map(inc, range(5))
        assert sorted(f.result() for f in as_completed(futs)) == [1, 2, 3, 4, 5]
        done, _ = wait(futs)
        assert len(done) == 5
        with c.events(kinds=["task-transition"], since=0) as stream:
            first = next(iter(stream))
            assert first.kind == "task-transition"
    assert cluster.status == "closed"


def _n_workers(dask_scheduler: Any) -> int:
    return len(dask_scheduler.workers)


def slow_inc(x: int) -> int:
    time.sleep(0.002)
    return x + 1


@needs_servers
def test_e2e_default_client_with_processes_restart_and_lost_worker() -> None:
    import sys

    # The worker processes cannot import this test module: ship its functions by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        _run_default_client_scenario()
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _run_default_client_scenario() -> None:
    import os
    import signal

    with Client() as c:
        assert c.cluster is not None and c.cluster.processes
        pids = c.run(os.getpid)
        assert len(pids) == 2 and os.getpid() not in pids.values()
        leaves = c.map(slow_inc, range(300))
        sums = [c.submit(add, leaves[i], leaves[i + 1]) for i in range(299)]
        done = threading.Event()
        for f in sums[:20]:
            f.add_done_callback(lambda _: done.set())
        assert done.wait(30)
        victim = sorted(pids.values())[0]
        os.kill(victim, signal.SIGKILL)  # some results are lost and recomputed
        assert c.gather(sums) == [2 * i + 3 for i in range(299)]
        c.restart()
        assert sums[0].status == "cancelled"
        with pytest.raises(FutureCancelledError):
            sums[0].result()
        with pytest.raises(ValueError):
            c.submit(inc, sums[0])  # a dependency the scheduler no longer has
        assert c.submit(inc, 1).result(timeout=30) == 2
        # restart() does not wait for the nannies' new workers (Dask's does): on a
        # loaded machine the second may still be starting.
        deadline = time.monotonic() + 60
        while c.run_on_scheduler(_n_workers) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)  # polling another process's progress
        assert c.run_on_scheduler(_n_workers) == 2
    assert c.cluster.status == "closed"


@pytest.mark.anyio
async def test_client_reads_the_scheduler_file_waiting_for_it(tmp_path: Path) -> None:
    """Client(scheduler_file=...) as in Dask; the file may appear after the client starts."""
    from sluice.scheduler import Scheduler
    from sluice.worker import Worker

    path = tmp_path / "sched.json"
    async with anyio.create_task_group() as tg:
        results: list[int] = []
        done = anyio.Event()

        async def use_client() -> None:
            async with Client(scheduler_file=path, asynchronous=True) as c:
                results.append(await c.submit(abs, -5))
            done.set()

        tg.start_soon(use_client)
        for _ in range(5):  # let the client start and look for the file at least once
            await anyio.lowlevel.checkpoint()
        assert not path.exists()
        async with Scheduler(port=0, scheduler_file=path) as s, Worker(s.address):
            with anyio.fail_after(30):
                await done.wait()
    assert results == [5]
    with pytest.raises(ValueError, match="not both"):
        Client("tcp://127.0.0.1:1", scheduler_file=path, asynchronous=True)
    with pytest.raises(OSError, match="does not exist"):
        await Client(scheduler_file=tmp_path / "none.json", timeout=0.2, asynchronous=True)


def test_submit_on_futures_that_die_with_the_call() -> None:
    """submit(f, client.map(...)): the map's futures are gone when submit returns; their
    release must not reach the scheduler before the graph that depends on them."""
    from sluice.deploy import LocalCluster

    with LocalCluster(1, processes=False) as cluster, Client(cluster) as client:
        # The race is between this thread and the client's loop: tried many times.
        for i in range(12):
            n = 10 if i % 2 else 500
            total = client.submit(sum, client.map(abs, range(-n, n)), key=f"total-{i}")
            assert total.result() == n * n
            del total
