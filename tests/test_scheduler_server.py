"""The scheduler server, against fake workers and clients that speak the protocol.

Each fake peer is a real connection (``sluice.comm``) whose received messages
are recorded, so a test plays the worker's or the client's side by hand and
checks what the scheduler says. Every wait is bounded by ``anyio.fail_after``;
waits on the scheduler's own state hang off its bus, never a sleep.
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import cloudpickle
import pytest
from click.testing import CliRunner

from sluice import SchedulerState
from sluice._cli_scheduler import scheduler as scheduler_command
from sluice.comm import AuthenticationError, Comm, CommClosedError, connect
from sluice.events import (
    PluginAdded,
    SchedulerClosing,
    SchedulerStarted,
    TaskTransition,
    UserEvent,
    WorkerRemoved,
)
from sluice.plugin import SchedulerPlugin
from sluice.replay import read_events
from sluice.scheduler import Scheduler
from sluice.security import Security

WAIT = 20  # seconds; a generous bound for any single wait below


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


pytestmark = pytest.mark.anyio

_fake_ports = itertools.count(40001)


class Peer:
    """A fake worker or client: a real connection; every message it receives is kept."""

    def __init__(self, comm: Comm) -> None:
        self.comm = comm
        self.received: list[dict[str, Any]] = []
        self._arrived = anyio.Event()
        self._rids = itertools.count(1)
        self.closed = False

    async def read_loop(self) -> None:
        try:
            while True:
                self.received.extend(await self.comm.recv())
                self._arrived.set()
                self._arrived = anyio.Event()
        except CommClosedError:
            self.closed = True
            self._arrived.set()

    async def wait_for(
        self, op: str, where: Callable[[dict[str, Any]], bool] = lambda m: True
    ) -> dict[str, Any]:
        """The first received message with this op that satisfies ``where``."""
        with anyio.fail_after(WAIT):
            while True:
                for msg in self.received:
                    if msg.get("op") == op and where(msg):
                        return msg
                if self.closed:
                    raise AssertionError(f"connection closed before a {op!r} arrived")
                await self._arrived.wait()

    async def send(self, **msg: Any) -> None:
        await self.comm.send(msg)

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send a message with a fresh rid; return the reply to it."""
        rid = 1000 + next(self._rids)
        await self.comm.send({"op": op, "rid": rid, **fields})
        return await self.wait_for("reply", lambda m: m.get("rid") == rid)


class Cluster:
    """A scheduler plus helpers that connect fake peers to it."""

    def __init__(self, scheduler: Scheduler, tg: anyio.abc.TaskGroup) -> None:
        self.s = scheduler
        self.tg = tg
        self.peers: list[Peer] = []

    async def _peer(self) -> Peer:
        peer = Peer(await connect(self.s.address, timeout=WAIT))
        self.peers.append(peer)
        self.tg.start_soon(peer.read_loop)
        return peer

    async def aclose(self) -> None:
        for peer in self.peers:
            await peer.comm.aclose()
        self.tg.cancel_scope.cancel()

    async def worker(self, name: str | None = None, nthreads: int = 1) -> tuple[Peer, str]:
        address = f"tcp://127.0.0.1:{next(_fake_ports)}"
        peer = await self._peer()
        reply = await peer.request(
            "register-worker",
            address=address,
            name=name or address,
            nthreads=nthreads,
            memory_limit=0,
            nanny=None,
        )
        assert reply["ok"], reply
        assert reply["result"]["run_id"] == self.s.bus.run_id
        return peer, address

    async def client(self, client_id: str = "client-1") -> Peer:
        peer = await self._peer()
        reply = await peer.request("register-client", client=client_id)
        assert reply["ok"] and reply["result"]["address"] == self.s.address
        return peer


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with (
        Scheduler(port=0, event_log=tmp_path / "events.jsonl") as s,
        anyio.create_task_group() as tg,
    ):
        c = Cluster(s, tg)
        yield c
        await c.aclose()


async def until(s: Scheduler, predicate: Callable[[], bool]) -> None:
    """Wait until ``predicate()`` holds, re-checking after every event on the bus."""
    if predicate():
        return
    changed = anyio.Event()
    name = f"until-{id(changed)}"
    s.bus.subscribe(lambda e: changed.set() if predicate() else None, name=name, mode="inline")
    try:
        with anyio.fail_after(WAIT):
            await changed.wait()
    finally:
        s.bus.unsubscribe(name)


def live_tasks(s: Scheduler) -> set[Any]:
    """Keys of the tasks not forgotten (a forgotten task stays readable until the next event)."""
    return {key for key, ts in s.tasks.items() if ts.state != "forgotten"}


def graph(*tasks: tuple[str, tuple[str, ...]], keys: tuple[str, ...]) -> dict[str, Any]:
    """An update-graph message; each task's spec is just bytes naming it."""
    return {
        "tasks": {k: f"spec-{k}".encode() for k, _ in tasks},
        "dependencies": {k: deps for k, deps in tasks},
        "keys": keys,
        "priority": {},
        "retries": {},
    }


def finished(key: str) -> dict[str, Any]:
    return {"op": "task-finished", "key": key, "nbytes": 8, "duration": 0.1, "stimulus_id": "t"}


# ------------------------------------------------------------------ the hot path


async def test_graph_runs_on_a_worker_and_the_client_hears_of_it(cluster: Cluster) -> None:
    worker, waddr = await cluster.worker()
    client = await cluster.client()
    reply = await client.request("update-graph", **graph(("x", ()), ("y", ("x",)), keys=("y",)))
    assert reply["ok"] and reply["result"] is None

    compute = await worker.wait_for("compute-task", lambda m: m["key"] == "x")
    assert compute["spec"] == b"spec-x" and compute["who_has"] == {}
    await worker.send(**finished("x"))
    compute = await worker.wait_for("compute-task", lambda m: m["key"] == "y")
    assert compute["spec"] == b"spec-y" and compute["who_has"] == {"x": (waddr,)}
    await worker.send(**finished("y"))

    update = await client.wait_for("key-updated", lambda m: m["key"] == "y")
    assert update["state"] == "memory" and update["who_has"] == (waddr,)
    assert update["exception"] is None
    # x is not wanted: once y is done the scheduler frees it on the worker.
    free = await worker.wait_for("free-keys")
    assert free["keys"] == ("x",)
    reply = await client.request("who-has", keys=("x", "y"))
    assert reply["result"] == {"y": (waddr,)}

    # Released by the client: the task is forgotten, and so are its bytes.
    await client.send(op="release-keys", keys=("y",))
    await until(cluster.s, lambda: not live_tasks(cluster.s))
    assert cluster.s._specs == {} and cluster.s._exceptions == {}


async def test_task_erred_reaches_the_client_with_the_exception(cluster: Cluster) -> None:
    worker, _ = await cluster.worker()
    client = await cluster.client()
    msg = graph(("x", ()), ("y", ("x",)), ("z", ()), keys=("x", "y", "z"))
    assert (await client.request("update-graph", **msg))["ok"]
    await worker.wait_for("compute-task", lambda m: m["key"] == "x")
    exc = ZeroDivisionError("bad input 7")
    await worker.send(
        op="task-erred",
        key="x",
        exception=cloudpickle.dumps(exc),
        exception_text=repr(exc),
        traceback="Traceback: ...",
        duration=0.1,
        stimulus_id="e",
    )
    update = await client.wait_for("key-updated", lambda m: m["key"] == "x")
    assert update["state"] == "erred" and update["traceback"] == "Traceback: ..."
    assert update["exception_text"] == repr(exc)
    raised = cloudpickle.loads(update["exception"])
    assert isinstance(raised, ZeroDivisionError) and str(raised) == "bad input 7"
    # y failed because x did: the client gets x's exception for it.
    update = await client.wait_for("key-updated", lambda m: m["key"] == "y")
    assert update["state"] == "erred" and "dependency 'x' failed" in update["exception_text"]
    assert isinstance(cloudpickle.loads(update["exception"]), ZeroDivisionError)

    # A later submission of an erred key is answered at once, exception included.
    other = await cluster.client("client-2")
    assert (await other.request("update-graph", **graph(("y", ("x",)), keys=("y",))))["ok"]
    update = await other.wait_for("key-updated", lambda m: m["key"] == "y")
    assert isinstance(cloudpickle.loads(update["exception"]), ZeroDivisionError)


async def test_lost_worker_tasks_move_to_the_other_worker(cluster: Cluster) -> None:
    w1, a1 = await cluster.worker("w1")
    w2, a2 = await cluster.worker("w2")
    client = await cluster.client()
    msg = graph(("a", ()), ("b", ()), keys=("a", "b"))
    assert (await client.request("update-graph", **msg))["ok"]
    first = await w1.wait_for("compute-task")
    second = await w2.wait_for("compute-task")
    assert {first["key"], second["key"]} == {"a", "b"}  # one each: least loaded first
    await w1.comm.aclose()

    moved = await w2.wait_for("compute-task", lambda m: m["key"] == first["key"])
    assert moved["spec"] == f"spec-{first['key']}".encode()
    assert set(cluster.s.workers) == {a2}
    removed = [e for e in cluster.s.bus.history if isinstance(e, WorkerRemoved)]
    assert [(e.worker, e.reason) for e in removed] == [(a1, "connection lost")]
    await w2.send(**finished("a"))
    await w2.send(**finished("b"))
    for key in ("a", "b"):
        update = await client.wait_for("key-updated", lambda m, k=key: m["key"] == k)  # type: ignore[misc]
        assert update["who_has"] == (a2,)


async def test_silent_worker_is_removed_after_the_heartbeat_timeout() -> None:
    async with Scheduler(port=0, heartbeat_timeout=0.3) as s, anyio.create_task_group() as tg:
        c = Cluster(s, tg)
        _quiet, quiet_addr = await c.worker("quiet")
        assert quiet_addr in s.workers
        await until(s, lambda: quiet_addr not in s.workers)
        removed = [e for e in s.bus.history if isinstance(e, WorkerRemoved)]
        assert removed[-1].reason == "no heartbeat for 0.3s"
        await c.aclose()


async def test_graph_error_is_an_error_reply(cluster: Cluster) -> None:
    client = await cluster.client()
    reply = await client.request("update-graph", **graph(("y", ("nope",)), keys=("y",)))
    assert reply["ok"] is False and "unknown key 'nope'" in reply["error"]
    assert cluster.s._specs == {} and "y" not in cluster.s.tasks
    cycle = graph(("p", ("q",)), ("q", ("p",)), keys=("p",))
    reply = await client.request("update-graph", **cycle)
    assert reply["ok"] is False and "cycle" in reply["error"]
    # The connection stays usable.
    assert (await client.request("update-graph", **graph(("ok", ()), keys=("ok",))))["ok"]


async def test_worker_name_must_be_unique(cluster: Cluster) -> None:
    await cluster.worker("same")
    peer = await cluster._peer()
    reply = await peer.request(
        "register-worker", address="tcp://127.0.0.1:1", name="same", nthreads=1
    )
    assert reply["ok"] is False and "'same' is already registered" in reply["error"]


# ------------------------------------------------------------ the event log


async def test_event_log_replays_to_the_live_state(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    async with Scheduler(port=0, event_log=path) as s, anyio.create_task_group() as tg:
        c = Cluster(s, tg)
        worker, waddr = await c.worker()
        client = await c.client()
        msg = graph(("x", ()), ("y", ("x",)), keys=("y",))
        assert (await client.request("update-graph", **msg))["ok"]
        await worker.wait_for("compute-task", lambda m: m["key"] == "x")
        # The worker's own transitions, forwarded: re-stamped into the scheduler's sequence.
        worker_event = TaskTransition(
            seq=7, time=123.5, source=waddr, key="x", start="executing", finish="memory"
        )
        await worker.send(op="worker-events", events=(worker_event.to_dict(),))
        await worker.send(**finished("x"))
        await worker.wait_for("compute-task", lambda m: m["key"] == "y")
        await worker.send(**finished("y"))
        await client.wait_for("key-updated")
        s.log_event("my-topic", {"n": 1})
        await c.aclose()
    live = s.state.snapshot()

    events = list(read_events(path))
    assert isinstance(events[0], SchedulerStarted) and events[0].seq == 1
    assert events[0].address == s.address
    assert isinstance(events[-1], SchedulerClosing)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    forwarded = [e for e in events if e.source == waddr]
    assert len(forwarded) == 1 and forwarded[0].time == 123.5 and forwarded[0].seq != 7
    assert any(isinstance(e, UserEvent) and e.topic == "my-topic" for e in events)
    assert SchedulerState.from_events(read_events(path)).snapshot() == live


async def test_subscribe_events_catches_up_then_streams(cluster: Cluster) -> None:
    client = await cluster.client()
    await client.send(op="subscribe-events", since=0, kinds=None)
    batch = await client.wait_for("events")
    assert batch["events"][0]["kind"] == "scheduler-started"
    cluster.s.log_event("later", [1, 2])
    await client.wait_for("events", lambda m: any(d.get("topic") == "later" for d in m["events"]))
    await client.send(op="unsubscribe-events")
    await client.request("who-has", keys=())  # handled after the unsubscribe
    assert "client-events-client-1" not in cluster.s.bus.subscriptions


# ------------------------------------------------------------------- plugins


class Recorder(SchedulerPlugin):
    name = "recorder"

    def __init__(self) -> None:
        self._calls: list[tuple[Any, ...]] = []
        self._changed = anyio.Event()
        self.scheduler: Any = None

    @property
    def calls(self) -> list[tuple[Any, ...]]:
        return self._calls

    def _add(self, *call: Any) -> None:
        self._calls.append(call)
        self._changed.set()
        self._changed = anyio.Event()

    async def called(self, *call: Any) -> None:
        with anyio.fail_after(WAIT):
            while call not in self._calls:
                await self._changed.wait()

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self._add("start")

    def add_worker(self, scheduler: Any, worker: str) -> None:
        assert worker in scheduler.workers
        self._add("add_worker", worker)

    def add_client(self, scheduler: Any, client: str) -> None:
        self._add("add_client", client)

    def update_graph(self, scheduler: Any, *, client: str, keys: set[Any], **kw: Any) -> None:
        self._add("update_graph", client, frozenset(keys))

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kw: Any) -> None:
        # Inline: the scheduler's task is already in its new state.
        assert self.scheduler.tasks[key].state == finish
        self._add("transition", key, start, finish)

    async def log_event(self, topic: str, msg: Any) -> None:  # type: ignore[override]
        self._add("log_event", topic, msg)

    async def close(self) -> None:
        self._add("close")


async def test_scheduler_plugin_hooks_are_called_inline(cluster: Cluster) -> None:
    s = cluster.s
    plugin = Recorder()
    await s.register_plugin(plugin)
    assert s.plugins == {"recorder": plugin} and plugin.calls == [("start",)]
    assert isinstance(s.bus.history[-1], PluginAdded)
    worker, waddr = await cluster.worker()
    client = await cluster.client()
    assert (await client.request("update-graph", **graph(("x", ()), keys=("x",))))["ok"]
    await worker.wait_for("compute-task")
    await worker.send(**finished("x"))
    await client.wait_for("key-updated")
    s.log_event("topic", "hello")
    await plugin.called("log_event", "topic", "hello")
    assert plugin.calls[1:7] == [
        ("add_worker", waddr),
        ("add_client", "client-1"),
        ("update_graph", "client-1", frozenset({"x"})),
        ("transition", "x", "released", "waiting"),
        ("transition", "x", "waiting", "processing"),
        ("transition", "x", "processing", "memory"),
    ]
    s.remove_plugin("recorder")
    await plugin.called("close")
    with pytest.raises(ValueError, match="'recorder'"):
        s.remove_plugin("recorder")


async def test_plugin_replaced_by_name_unless_idempotent(cluster: Cluster) -> None:
    s = cluster.s
    first, second = Recorder(), Recorder()
    await s.register_plugin(first)
    await s.register_plugin(second, idempotent=True)
    assert s.plugins["recorder"] is first
    await s.register_plugin(second)
    assert s.plugins["recorder"] is second
    await first.called("close")


# ------------------------------------------------------------ run and friends


async def test_run_on_scheduler_passes_the_scheduler(cluster: Cluster) -> None:
    await cluster.worker()
    client = await cluster.client()

    def count(dask_scheduler: Any, extra: int = 0) -> int:
        return len(dask_scheduler.workers) + extra

    reply = await client.request(
        "run-on-scheduler", function=cloudpickle.dumps((count, (), {"extra": 10}))
    )
    assert reply["ok"] and cloudpickle.loads(reply["result"]) == 11

    async def address(sluice_scheduler: Any) -> str:
        return str(sluice_scheduler.address)

    reply = await client.request("run-on-scheduler", function=cloudpickle.dumps((address, (), {})))
    assert cloudpickle.loads(reply["result"]) == cluster.s.address

    def boom() -> None:
        raise KeyError("nope")

    reply = await client.request("run-on-scheduler", function=cloudpickle.dumps((boom, (), {})))
    assert reply["ok"] is False and "nope" in reply["error"]
    assert isinstance(cloudpickle.loads(reply["exception"]), KeyError)


async def test_run_fans_out_to_every_worker(cluster: Cluster) -> None:
    (w1, a1), (w2, a2) = await cluster.worker("w1"), await cluster.worker("w2")
    client = await cluster.client()
    fn = cloudpickle.dumps((len, ("abc",), {}))
    await client.send(op="run", rid=1, function=fn, workers=None)
    for worker in (w1, w2):
        ask = await worker.wait_for("run")
        assert ask["function"] == fn
        answer = cloudpickle.dumps(3 if worker is w1 else 4)
        await worker.send(op="reply", rid=ask["rid"], ok=True, result=answer)
    reply = await client.wait_for("reply", lambda m: m["rid"] == 1)
    assert {a: cloudpickle.loads(r) for a, r in reply["result"].items()} == {a1: 3, a2: 4}


async def test_restart_forgets_everything(cluster: Cluster) -> None:
    worker, _ = await cluster.worker()
    client = await cluster.client()
    assert (await client.request("update-graph", **graph(("x", ()), keys=("x",))))["ok"]
    await worker.wait_for("compute-task")
    reply = await client.request("restart")
    assert reply["ok"]
    update = await client.wait_for("key-updated")
    assert update["state"] == "forgotten"
    assert (await worker.wait_for("free-keys"))["keys"] == ("x",)
    assert cluster.s.tasks == {} and cluster.s._specs == {}


async def test_client_disconnect_releases_its_keys(cluster: Cluster) -> None:
    worker, _ = await cluster.worker()
    client = await cluster.client()
    assert (await client.request("update-graph", **graph(("x", ()), keys=("x",))))["ok"]
    await worker.wait_for("compute-task")
    await client.send(op="close-client")
    await until(cluster.s, lambda: not cluster.s.clients and not live_tasks(cluster.s))
    assert (await worker.wait_for("free-keys"))["keys"] == ("x",)


async def test_close_workers_sends_close(tmp_path: Path) -> None:
    scheduler_file = tmp_path / "sched.json"
    s = Scheduler(port=0, scheduler_file=scheduler_file)
    async with anyio.create_task_group() as tg:
        await s.start()
        assert json.loads(scheduler_file.read_text()) == {"address": s.address}
        c = Cluster(s, tg)
        worker, _ = await c.worker()
        await s.close(close_workers=True)
        assert (await worker.wait_for("close"))["reason"] == "scheduler-close"
        await c.aclose()
    assert not scheduler_file.exists()


# ------------------------------------------------------------------ security, CLI


def test_non_loopback_needs_security() -> None:
    with pytest.raises(ValueError, match="without TLS or an auth token"):
        Scheduler(host="0.0.0.0")
    Scheduler(host="0.0.0.0", insecure=True)  # allowed when asked for explicitly


async def test_auth_token_is_required_when_set() -> None:
    security = Security(auth_token=b"s3cret")
    async with Scheduler(host="0.0.0.0", port=0, security=security) as s:
        assert s.address.startswith("tcp://0.0.0.0:")
        target = s.address.replace("0.0.0.0", "127.0.0.1")
        with pytest.raises(AuthenticationError):
            await connect(target, timeout=WAIT)
        async with await connect(target, security=security, timeout=WAIT) as comm:
            await comm.send({"op": "register-client", "rid": 1, "client": "c"})
            (reply,) = await comm.recv()
            assert reply["ok"] and reply["result"]["run_id"] == s.run_id


async def test_port_in_use_fails_cleanly(tmp_path: Path) -> None:
    async with Scheduler(port=0) as first:
        port = int(first.address.rsplit(":", 1)[1])
        second = Scheduler(port=port, event_log=tmp_path / "events.jsonl")
        with pytest.raises(OSError, match="Address already in use"):
            await second.start()
        await second.close()
    assert not (tmp_path / "events.jsonl").exists()  # so the same path works next time


def test_cli_refuses_a_public_host_without_security() -> None:
    result = CliRunner().invoke(scheduler_command, ["--host", "0.0.0.0", "--port", "0"])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: refusing to listen on '0.0.0.0'")


def test_cli_unreadable_token_file(tmp_path: Path) -> None:
    missing = tmp_path / "token"
    result = CliRunner().invoke(scheduler_command, ["--auth-token-file", str(missing)])
    assert result.exit_code != 0
    assert result.output.strip().splitlines() == [
        f"Error: cannot read auth token file {str(missing)!r}: No such file or directory"
    ]


def test_cli_runs_until_sigterm_and_flushes_the_log(tmp_path: Path) -> None:
    scheduler_file, log = tmp_path / "s.json", tmp_path / "events.jsonl"
    code = "from sluice._cli_scheduler import scheduler; scheduler()"
    args = ["--port", "0", "--scheduler-file", str(scheduler_file), "--event-log", str(log)]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + WAIT
        # Another process: there is nothing to await but its file.
        while not scheduler_file.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no scheduler file"
            time.sleep(0.05)
        address = json.loads(scheduler_file.read_text())["address"]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()
    assert f"Scheduler at: {address}" in err.decode()
    kinds = [e.kind for e in read_events(log)]
    assert kinds == ["scheduler-started", "scheduler-closing"]

    # The same log again: refused with one line, before any port is opened.
    again = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, timeout=WAIT, check=False
    )
    assert again.returncode != 0
    lines = again.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "already exists" in lines[0], lines


async def test_a_worker_that_closes_cleanly_says_so() -> None:
    """The event log tells a clean stop from a crash: 'worker closed (...)', not
    'connection lost'."""
    from sluice.testing import Recorder
    from sluice.worker import Worker

    async with Scheduler(port=0) as s:
        recorder = Recorder(kinds=["worker-removed"])
        recorder.attach(s)
        worker = Worker(s.address)
        await worker.start()
        address = worker.address
        await worker.close()
        removed = await recorder.wait_for(lambda e: isinstance(e, WorkerRemoved), timeout=10)
    assert (removed.worker, removed.reason) == (address, "worker closed (closed)")
    assert len(recorder.events) == 1


async def test_a_closed_workers_last_forwarded_events_are_on_the_bus(tmp_path: Path) -> None:
    """When Worker.close() returns, the scheduler has handled everything the worker
    sent before closing, its last forwarded transitions too, so a scheduler closing
    right after still has them on its bus (and in its event log)."""
    from sluice.client import Client
    from sluice.testing import Recorder
    from sluice.worker import Worker

    n = 1000
    log = tmp_path / "log.jsonl"
    async with Scheduler(port=0, event_log=log) as s:
        on_scheduler = Recorder(kinds=["task-transition"])
        on_scheduler.attach(s)
        # A sink that keeps the bus near its high-water mark, so the scheduler reads
        # each worker frame a little late, as with a busy broker behind a sink.
        s.bus.subscribe(_SlowSink(), name="slow", maxsize=50, max_batch=50)
        worker = Worker(s.address, nthreads=1)
        on_worker = Recorder(kinds=["task-transition"])
        async with worker, Client(s.address, asynchronous=True) as c:
            on_worker.attach(worker)
            futures = c.map(_inc, range(n), key=[f"x-{i}" for i in range(n)])
            assert await c.gather(futures) == list(range(1, n + 1))
        # The client's release made the worker forget keys just before it closed.
    # The scheduler closed right after the worker: what it had not read is lost.

    def story(events: list[Any]) -> list[tuple[Any, str, str]]:
        return [
            (e.key, e.start, e.finish)
            for e in events
            if isinstance(e, TaskTransition) and e.source == worker.address
        ]

    sent = story(on_worker.events)
    assert sum(finish == "forgotten" for _, _, finish in sent) > 0
    assert story(on_scheduler.events) == sent
    assert story(list(read_events(log))) == sent


def _inc(x: int) -> int:
    return x + 1


class _SlowSink:
    def write(self, batch: list[Any]) -> None:  # in a thread of its own
        time.sleep(0.01)  # the cost of a slow sink, not a wait for anything
