"""The worker server and the nanny, against a fake scheduler that speaks the protocol.

The fake scheduler records every frame it receives and lets the test send
messages to a worker, so each test plays the scheduler's side by hand and
checks what the worker says back. Every wait is bounded by ``anyio.fail_after``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import cloudpickle
import pytest

from sluice.comm import Comm, connect, listen
from sluice.events import TaskTransition, from_dict
from sluice.nanny import Nanny
from sluice.plugin import WorkerPlugin
from sluice.taskspec import KeyRef, TaskSpec, dumps_spec
from sluice.worker import RegistrationError, Worker, get_worker

WAIT = 20  # seconds; generous bound for any single wait below


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


pytestmark = pytest.mark.anyio


class FakeScheduler:
    """Accepts workers and nannies, answers registrations, records every message."""

    def __init__(self, *, refuse: bool = False) -> None:
        self.refuse = refuse
        self.frames: list[list[dict[str, Any]]] = []
        self.messages: list[tuple[Comm, dict[str, Any]]] = []
        self.workers: dict[str, Comm] = {}
        self._changed = anyio.Event()
        self._rids = iter(range(1, 1_000_000))
        self.address = ""

    async def __aenter__(self) -> FakeScheduler:
        self.listener = await listen("tcp://127.0.0.1:0", self.handler)
        self.address = self.listener.address
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.listener.aclose()

    async def handler(self, comm: Comm) -> None:
        while True:
            msgs = await comm.recv()
            self.frames.append(msgs)
            for msg in msgs:
                op = msg["op"]
                if op == "register-worker":
                    if self.refuse:
                        await comm.send(
                            {"op": "reply", "rid": msg["rid"], "ok": False, "error": "name taken"}
                        )
                        continue
                    self.workers[msg["address"]] = comm
                    result = {"scheduler": self.address, "run_id": "run-1"}
                    await comm.send(
                        {"op": "reply", "rid": msg["rid"], "ok": True, "result": result}
                    )
                elif op == "register-nanny":
                    await comm.send({"op": "reply", "rid": msg["rid"], "ok": True, "result": None})
                self.messages.append((comm, msg))
            self._changed.set()
            self._changed = anyio.Event()

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], count: int = 1
    ) -> list[dict[str, Any]]:
        """The first ``count`` messages received that match ``predicate``."""
        while True:
            found = [m for _, m in self.messages if predicate(m)]
            if len(found) >= count:
                return found[:count]
            await self._changed.wait()

    async def send(self, worker: str, *msgs: dict[str, Any]) -> None:
        await self.workers[worker].send(*msgs)

    def op(self, name: str) -> list[dict[str, Any]]:
        return [m for _, m in self.messages if m["op"] == name]


def compute(key: Any, func: Callable[..., Any], *args: Any, who_has: Any = None) -> dict[str, Any]:
    return {
        "op": "compute-task",
        "key": key,
        "spec": dumps_spec(TaskSpec(func, args)),
        "who_has": who_has or {},
        "priority": 0,
        "stimulus_id": f"compute-{key}",
    }


def finished(key: Any) -> Callable[[dict[str, Any]], bool]:
    return lambda m: m["op"] == "task-finished" and m["key"] == key


def inc(x: int) -> int:
    return x + 1


def fail(x: int) -> int:
    raise ZeroDivisionError(f"bad input {x}")


@pytest.fixture
async def scheduler() -> AsyncIterator[FakeScheduler]:
    async with FakeScheduler() as s:
        yield s


async def test_worker_registers_and_runs_a_task(scheduler: FakeScheduler) -> None:
    async with Worker(scheduler.address, nthreads=2, name="alice") as w:
        (reg,) = scheduler.op("register-worker")
        assert reg["address"] == w.address and reg["name"] == "alice" and reg["nthreads"] == 2
        assert w.run_id == "run-1"
        await scheduler.send(w.address, compute("x", inc, 1))
        with anyio.fail_after(WAIT):
            (msg,) = await scheduler.wait_for(finished("x"))
        assert msg["nbytes"] > 0 and msg["duration"] >= 0
        assert w.data == {"x": 2}
        assert w.state.tasks["x"].state == "memory"


async def test_a_refused_registration_raises() -> None:
    async with FakeScheduler(refuse=True) as s:
        w = Worker(s.address)
        with anyio.fail_after(WAIT), pytest.raises(RegistrationError, match="name taken"):
            await w.start()


_BARRIER = threading.Barrier(4)


def together(i: int) -> int:
    if i < 4:
        _BARRIER.wait(timeout=WAIT)  # the first four finish at the same moment
    return i


async def test_results_reach_the_scheduler_in_batches(scheduler: FakeScheduler) -> None:
    n = 40
    async with Worker(scheduler.address, nthreads=4) as w:
        await scheduler.send(w.address, *[compute(("t", i), together, i) for i in range(n)])
        with anyio.fail_after(WAIT):
            await scheduler.wait_for(lambda m: m["op"] == "task-finished", count=n)
        per_frame = [sum(m["op"] == "task-finished" for m in f) for f in scheduler.frames]
        assert sum(per_frame) == n
        assert max(per_frame) > 1, per_frame
        assert w.data == {("t", i): i for i in range(n)}


async def test_a_failing_task_is_reported_with_its_exception(scheduler: FakeScheduler) -> None:
    async with Worker(scheduler.address) as w:
        await scheduler.send(w.address, compute("bad", fail, 7))
        with anyio.fail_after(WAIT):
            (msg,) = await scheduler.wait_for(lambda m: m["op"] == "task-erred")
        exc = cloudpickle.loads(msg["exception"])
        assert isinstance(exc, ZeroDivisionError) and str(exc) == "bad input 7"
        assert msg["exception_text"] == "ZeroDivisionError('bad input 7')"
        assert "in fail" in msg["traceback"] and "bad input" in msg["traceback"]
        assert "taskspec.py" not in msg["traceback"]  # starts at the task's own code
        assert w.state.tasks["bad"].state == "error"
        assert w.state.tasks["bad"].exception == "ZeroDivisionError('bad input 7')"
        assert "bad" not in w.data


async def test_a_task_without_a_spec_errs_and_its_siblings_still_run(
    scheduler: FakeScheduler,
) -> None:
    async with Worker(scheduler.address, nthreads=2) as w:
        broken = {**compute("nospec", inc, 1), "spec": None}
        await scheduler.send(w.address, broken, compute("fine", inc, 1))
        with anyio.fail_after(WAIT):
            (msg,) = await scheduler.wait_for(lambda m: m["op"] == "task-erred")
            await scheduler.wait_for(finished("fine"))
        assert msg["key"] == "nospec"
        assert "no task spec for 'nospec'" in msg["exception_text"]
        assert w.state.tasks["nospec"].state == "error"
        assert w.data == {"fine": 2}


class Unpicklable(Exception):
    def __reduce__(self) -> Any:
        raise TypeError("no pickling")


def raise_unpicklable() -> None:
    raise Unpicklable("oops")


async def test_an_unpicklable_exception_arrives_as_runtime_error(scheduler: FakeScheduler) -> None:
    async with Worker(scheduler.address) as w:
        await scheduler.send(w.address, compute("u", raise_unpicklable))
        with anyio.fail_after(WAIT):
            (msg,) = await scheduler.wait_for(lambda m: m["op"] == "task-erred")
        exc = cloudpickle.loads(msg["exception"])
        assert type(exc) is RuntimeError and "oops" in str(exc)


async def test_a_dependency_is_fetched_from_a_peer(scheduler: FakeScheduler) -> None:
    async with Worker(scheduler.address) as a, Worker(scheduler.address) as b:
        await scheduler.send(a.address, compute(("x", 1), inc, 1))
        with anyio.fail_after(WAIT):
            await scheduler.wait_for(finished(("x", 1)))
        spec = compute("y", inc, KeyRef(("x", 1)), who_has={("x", 1): (a.address,)})
        await scheduler.send(b.address, spec)
        with anyio.fail_after(WAIT):
            await scheduler.wait_for(finished("y"))
        assert b.data["y"] == 3
        # The fetched copy is dropped once its only dependent ran: the scheduler
        # does not know about it.
        assert ("x", 1) not in b.data and ("x", 1) in a.data
        stories = [
            (e.start, e.finish, e.worker)
            for e in b.bus.history
            if isinstance(e, TaskTransition) and e.key == ("x", 1)
        ]
        assert ("fetch", "flight", a.address) in stories
        assert ("flight", "memory", a.address) in stories


async def test_a_missing_dependency_is_reported(scheduler: FakeScheduler) -> None:
    async with Worker(scheduler.address) as a, Worker(scheduler.address) as b:
        # a does not hold "ghost": its reply lacks the key, which counts as a failure.
        spec = compute("y", inc, KeyRef("ghost"), who_has={"ghost": (a.address,)})
        await scheduler.send(b.address, spec)
        with anyio.fail_after(WAIT):
            (msg,) = await scheduler.wait_for(lambda m: m["op"] == "missing-data")
        assert msg["key"] == "ghost" and tuple(msg["errant_workers"]) == (a.address,)
        assert "y" not in b.state.tasks


async def test_free_keys_drops_data(scheduler: FakeScheduler) -> None:
    async with Worker(scheduler.address) as w:
        await scheduler.send(w.address, compute("x", inc, 1))
        with anyio.fail_after(WAIT):
            await scheduler.wait_for(finished("x"))
        assert "x" in w.data
        await scheduler.send(w.address, {"op": "free-keys", "keys": ("x",), "stimulus_id": "s"})
        with anyio.fail_after(WAIT):
            await scheduler.wait_for(
                lambda m: (
                    m["op"] == "worker-events"
                    and any(e["finish"] == "forgotten" for e in m["events"] if "finish" in e)
                )
            )
        assert "x" not in w.data and "x" not in w.state.tasks


_RELEASE = threading.Event()


def slow() -> int:
    _RELEASE.wait(WAIT)
    return 42


async def test_a_cancelled_tasks_late_result_is_dropped(scheduler: FakeScheduler) -> None:
    _RELEASE.clear()
    async with Worker(scheduler.address) as w:
        await scheduler.send(w.address, compute("slow", slow))
        with anyio.fail_after(WAIT):
            await scheduler.wait_for(
                lambda m: (
                    m["op"] == "worker-events"
                    and any(e.get("finish") == "executing" for e in m["events"])
                )
            )
        await scheduler.send(w.address, {"op": "free-keys", "keys": ("slow",), "stimulus_id": "c"})
        await scheduler.send(w.address, compute("after", inc, 1))
        with anyio.fail_after(WAIT):
            # Only once the worker has cancelled it: the result then comes late.
            await scheduler.wait_for(
                lambda m: (
                    m["op"] == "worker-events"
                    and any(
                        e.get("key") == "slow"
                        and (e.get("start"), e.get("finish")) == ("executing", "released")
                        for e in m["events"]
                    )
                )
            )
            _RELEASE.set()
            await scheduler.wait_for(finished("after"))
        assert [m["key"] for m in scheduler.op("task-finished")] == ["after"]
        assert "slow" not in w.data


async def test_get_data_is_answered(scheduler: FakeScheduler) -> None:
    async with Worker(scheduler.address) as w:
        await scheduler.send(w.address, compute(("x", 0), inc, 41))
        with anyio.fail_after(WAIT):
            await scheduler.wait_for(finished(("x", 0)))
        comm = await connect(w.address)
        try:
            await comm.send({"op": "get-data", "rid": 1, "keys": (("x", 0), "nope")})
            with anyio.fail_after(WAIT):
                (reply,) = await comm.recv()
        finally:
            await comm.aclose()
        assert reply["ok"] and reply["rid"] == 1
        assert {k: cloudpickle.loads(v) for k, v in reply["result"].items()} == {("x", 0): 42}


def big(n: int) -> bytes:
    return b"x" * n


async def test_a_small_result_a_client_waits_for_comes_with_task_finished(
    scheduler: FakeScheduler,
) -> None:
    async with Worker(scheduler.address) as w:
        await scheduler.send(
            w.address,
            {**compute("wanted", inc, 1), "report": True},
            {**compute("large", big, 10_000), "report": True},
            compute("inner", inc, 5),  # nobody waits for it: no report
        )
        with anyio.fail_after(WAIT):
            (wanted,) = await scheduler.wait_for(finished("wanted"))
            (large,) = await scheduler.wait_for(finished("large"))
            (inner,) = await scheduler.wait_for(finished("inner"))
        assert cloudpickle.loads(wanted["data"]) == 2
        assert "data" not in large  # over INLINE_RESULT_BYTES: the client fetches it
        assert "data" not in inner
        assert w.data["large"] == b"x" * 10_000 and w.data["wanted"] == 2


async def test_worker_events_are_forwarded_with_its_address(scheduler: FakeScheduler) -> None:
    async with Worker(scheduler.address) as w:
        await scheduler.send(w.address, compute("x", inc, 1))
        with anyio.fail_after(WAIT):
            await scheduler.wait_for(finished("x"))
            await scheduler.wait_for(
                lambda m: (
                    m["op"] == "worker-events"
                    and any(e.get("finish") == "memory" for e in m["events"])
                )
            )
        events = [from_dict(e) for m in scheduler.op("worker-events") for e in m["events"]]
        assert {e.source for e in events} == {w.address}
        assert "compute-requested" not in {e.kind for e in events}
        story = [(e.start, e.finish) for e in events if isinstance(e, TaskTransition)]
        assert story[:4] == [
            ("released", "waiting"),
            ("waiting", "ready"),
            ("ready", "executing"),
            ("executing", "memory"),
        ]
        # The worker's own seq is gap-free (the local kinds take their numbers too).
        assert [e.seq for e in w.bus.history] == list(range(1, len(w.bus.history) + 1))


async def test_forwarding_can_be_turned_off(scheduler: FakeScheduler) -> None:
    async with Worker(scheduler.address, forward_events=False) as w:
        await scheduler.send(w.address, compute("x", inc, 1))
        with anyio.fail_after(WAIT):
            await scheduler.wait_for(finished("x"))
        assert not scheduler.op("worker-events")
        assert any(isinstance(e, TaskTransition) for e in w.bus.history)


async def test_forwarding_follows_the_config_key(scheduler: FakeScheduler) -> None:
    import sluice.config

    with sluice.config.set({"sluice.worker.forward-events": False}):
        worker = Worker(scheduler.address)
    assert worker.forward_events is False
    async with worker as w:
        await scheduler.send(w.address, compute("x", inc, 1))
        with anyio.fail_after(WAIT):
            await scheduler.wait_for(finished("x"))
        assert not scheduler.op("worker-events")
    assert Worker(scheduler.address).forward_events is True  # the default, once unset


def who_am_i() -> str:
    return get_worker().address


async def test_get_worker_inside_a_task_and_a_run_function(scheduler: FakeScheduler) -> None:
    with pytest.raises(ValueError, match="outside a task"):
        get_worker()
    async with Worker(scheduler.address) as w:
        await scheduler.send(w.address, compute("me", who_am_i))
        with anyio.fail_after(WAIT):
            await scheduler.wait_for(finished("me"))
        assert w.data["me"] == w.address

        function = cloudpickle.dumps((who_am_i, (), {}))
        await scheduler.send(w.address, {"op": "run", "rid": 7, "function": function})
        with anyio.fail_after(WAIT):
            (reply,) = await scheduler.wait_for(lambda m: m["op"] == "reply" and m["rid"] == 7)
        assert reply["ok"] and cloudpickle.loads(reply["result"]) == w.address

        boom = cloudpickle.dumps((fail, (3,), {}))
        await scheduler.send(w.address, {"op": "run", "rid": 8, "function": boom})
        with anyio.fail_after(WAIT):
            (reply,) = await scheduler.wait_for(lambda m: m["op"] == "reply" and m["rid"] == 8)
        assert not reply["ok"] and "bad input 3" in reply["error"]
        assert isinstance(cloudpickle.loads(reply["exception"]), ZeroDivisionError)


class Recorder(WorkerPlugin):
    def __init__(self) -> None:
        self.seen: list[tuple[Any, str, str, dict[str, Any]]] = []

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        self.seen.append((key, start, finish, kwargs))


async def test_worker_plugin_transition_sees_errors(scheduler: FakeScheduler) -> None:
    async with Worker(scheduler.address) as w:
        plugin = Recorder()
        w.plugins["rec"] = plugin
        await scheduler.send(w.address, compute("bad", fail, 1))
        with anyio.fail_after(WAIT):
            await scheduler.wait_for(lambda m: m["op"] == "task-erred")
        (err,) = [s for s in plugin.seen if s[2] == "error"]
        assert err[1] == "executing"
        assert "ZeroDivisionError" in err[3]["exception"] and "in fail" in err[3]["traceback"]


class Broken(WorkerPlugin):
    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        raise KeyError("plugin bug")


async def test_a_failing_plugin_is_reported_and_the_worker_runs_on(
    scheduler: FakeScheduler,
) -> None:
    async with Worker(scheduler.address) as w:
        w.plugins["broken"] = Broken()
        await scheduler.send(w.address, compute("x", inc, 1))
        with anyio.fail_after(WAIT):
            await scheduler.wait_for(finished("x"))
            (msg,) = await scheduler.wait_for(
                lambda m: (
                    m["op"] == "worker-events"
                    and any(e.get("topic") == "consumer-failed" for e in m["events"])
                )
            )
        # One report per failing consumer per second: on a slow machine the batch
        # may span more than one.
        reports = [e for e in msg["events"] if e.get("topic") == "consumer-failed"]
        assert reports
        for report in reports:
            assert report["source"] == w.address
            assert report["msg"]["consumer"] == "worker-plugins"
        assert w.data["x"] == 2
        # The bus stamped its report from the worker's own sequence: still gap-free.
        assert [e.seq for e in w.bus.history] == list(range(1, len(w.bus.history) + 1))


async def test_losing_the_scheduler_closes_the_worker() -> None:
    async with FakeScheduler() as s:
        w = Worker(s.address)
        await w.start()
        try:
            await s.workers[w.address].aclose()
            with anyio.fail_after(WAIT):
                await w.finished()
            assert w.close_reason == "scheduler-lost"
        finally:
            await w.close()


# -- the nanny ---------------------------------------------------------------------------


async def test_nanny_restarts_a_killed_worker(scheduler: FakeScheduler) -> None:
    with anyio.fail_after(60):
        async with Nanny(scheduler.address, name="n1") as nanny:
            first = nanny.worker_address
            assert first is not None and first in scheduler.workers
            (reg,) = scheduler.op("register-nanny")
            assert reg["worker"] == first
            (wreg,) = scheduler.op("register-worker")
            assert wreg["nanny"] == nanny.address and wreg["name"] == "n1"
            assert nanny.process is not None
            old_pid = nanny.process.pid
            os.kill(old_pid, signal.SIGKILL)

            (died,) = await scheduler.wait_for(lambda m: m["op"] == "worker-died")
            assert died["worker"] == first and died["exitcode"] == -signal.SIGKILL
            second = (await scheduler.wait_for(lambda m: m["op"] == "register-worker", 2))[1]
            assert second["address"] != first
            regs = await scheduler.wait_for(lambda m: m["op"] == "register-nanny", 2)
            assert regs[1]["worker"] == second["address"]

            # The fresh worker runs tasks.
            await scheduler.send(second["address"], compute("x", pow, 2, 10))
            await scheduler.wait_for(finished("x"))
            assert nanny.worker_address == second["address"]
            new_proc = nanny.process
            assert new_proc is not None and new_proc.pid != old_pid
        assert new_proc.returncode is not None  # closing the nanny ended its child


async def test_nanny_restart_replaces_the_worker(scheduler: FakeScheduler) -> None:
    with anyio.fail_after(60):
        async with Nanny(scheduler.address) as nanny:
            first = nanny.worker_address
            await nanny.restart()
            assert nanny.worker_address != first
            assert len(scheduler.op("register-worker")) == 2
            assert not scheduler.op("worker-died")  # asked for: not a death


async def test_scheduler_close_messages_restart_or_stop_the_nanny(
    scheduler: FakeScheduler,
) -> None:
    with anyio.fail_after(60):
        async with Nanny(scheduler.address) as nanny:
            first = nanny.worker_address
            assert first is not None
            await scheduler.send(first, {"op": "close", "reason": "restart", "restart": True})
            second = (await scheduler.wait_for(lambda m: m["op"] == "register-worker", 2))[1]
            await scheduler.wait_for(lambda m: m["op"] == "register-nanny", 2)
            assert not scheduler.op("worker-died")
            await scheduler.send(second["address"], {"op": "close", "reason": "retire"})
            await nanny.finished()
            assert nanny.close_reason == "worker-exited"
            assert nanny.process is not None and nanny.process.returncode == 0


async def test_nanny_fails_to_start_without_a_scheduler() -> None:
    with anyio.fail_after(WAIT), pytest.raises(OSError, match="cannot connect"):
        await Nanny("tcp://127.0.0.1:1", connect_timeout=0.2).start()


# -- the command line ------------------------------------------------------------------------

CLI = [sys.executable, "-c", "from sluice._cli_worker import worker; worker()"]


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "missing the scheduler ADDRESS"),
        (("nowhere",), "bad address 'nowhere'"),
        (("tcp://127.0.0.1:1", "--no-nanny", "--connect-timeout", "0.3"), "cannot connect"),
        (("tcp://127.0.0.1:1", "--connect-timeout", "0.3"), "cannot connect"),
        (("tcp://127.0.0.1:1", "--auth-token-file", "/nonexistent/token"), "auth token file"),
    ],
)
def test_cli_errors_are_one_line(args: tuple[str, ...], message: str) -> None:
    proc = run_cli(*args)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


async def test_cli_worker_runs_until_sigterm(scheduler: FakeScheduler) -> None:
    cmd = [*CLI, scheduler.address, "--no-nanny", "--name", "cli", "--nthreads", "2"]
    async with await anyio.open_process(cmd, stdout=subprocess.DEVNULL, stderr=None) as proc:
        try:
            with anyio.fail_after(WAIT):
                (reg,) = await scheduler.wait_for(lambda m: m["op"] == "register-worker")
            assert reg["name"] == "cli" and reg["nthreads"] == 2
            proc.send_signal(signal.SIGTERM)
            with anyio.fail_after(WAIT):
                assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_cli_reads_the_scheduler_file(scheduler: FakeScheduler, tmp_path: Any) -> None:
    path = tmp_path / "scheduler.json"
    path.write_text(json.dumps({"address": scheduler.address}))
    cmd = [*CLI, "--scheduler-file", str(path), "--no-nanny"]
    async with await anyio.open_process(cmd, stdout=subprocess.DEVNULL, stderr=None) as proc:
        try:
            with anyio.fail_after(WAIT):
                await scheduler.wait_for(lambda m: m["op"] == "register-worker")
            proc.send_signal(signal.SIGINT)
            with anyio.fail_after(WAIT):
                assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_cli_nanny_worker_runs_until_sigterm(scheduler: FakeScheduler) -> None:
    cmd = [*CLI, scheduler.address, "--nworkers", "2", "--name", "w"]
    async with await anyio.open_process(cmd, stdout=subprocess.DEVNULL, stderr=None) as proc:
        try:
            with anyio.fail_after(60):
                regs = await scheduler.wait_for(lambda m: m["op"] == "register-worker", 2)
                assert sorted(r["name"] for r in regs) == ["w-0", "w-1"]
                await scheduler.wait_for(lambda m: m["op"] == "register-nanny", 2)
            proc.send_signal(signal.SIGTERM)
            with anyio.fail_after(WAIT):
                assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
