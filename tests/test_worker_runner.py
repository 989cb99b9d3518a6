"""The worker's task threads: outcomes come back in batches, in order, and a
shutdown drops the tasks not yet started. Every wait is bounded."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from typing import Any

import anyio
import pytest

from sluice._worker_runner import TaskRunner
from sluice.events import Key

WAIT = 10  # seconds; a bound for any single wait


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


pytestmark = pytest.mark.anyio


class Recorder:
    """``on_done`` for a runner: keeps each batch, and wakes a waiter at ``expect`` outcomes."""

    def __init__(self, expect: int) -> None:
        self.batches: list[list[tuple[Key, Any]]] = []
        self.expect = expect
        self.all_in = anyio.Event()

    def __call__(self, batch: list[tuple[Key, Any]]) -> None:
        self.batches.append(batch)
        if sum(map(len, self.batches)) >= self.expect:
            self.all_in.set()

    @property
    def keys(self) -> list[Key]:
        return [key for batch in self.batches for key, _ in batch]


class CountingLoop:
    """The running loop, counting the callbacks other threads schedule on it."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.wakeups = 0

    def call_soon_threadsafe(self, callback: Any, *args: Any) -> Any:
        self.wakeups += 1
        return self.loop.call_soon_threadsafe(callback, *args)


def double(spec: bytes, deps: Mapping[Key, Any]) -> int:
    return int(spec) * 2


async def test_a_busy_runner_reports_many_outcomes_in_few_batches() -> None:
    gate = threading.Event()

    def run(spec: bytes, deps: Mapping[Key, Any]) -> int:
        gate.wait(WAIT)  # every task is queued before the first one ends
        return double(spec, deps)

    n = 200
    done = Recorder(expect=n)
    loop = CountingLoop()
    runner = TaskRunner(1, loop, run, done, name="test-runner")  # type: ignore[arg-type]
    try:
        for i in range(n):
            runner.submit(f"t-{i}", str(i).encode(), {})
        gate.set()
        with anyio.fail_after(WAIT):
            await done.all_in.wait()
    finally:
        runner.shutdown()
    # One thread: the tasks end in the order they were given, each with its value.
    assert done.keys == [f"t-{i}" for i in range(n)]
    assert [value for batch in done.batches for _, value in batch] == [2 * i for i in range(n)]
    # The loop is woken once per batch, not once per task.
    assert loop.wakeups < n // 4, loop.wakeups
    assert len(done.batches) <= loop.wakeups


async def test_a_quiet_runner_reports_each_task_on_its_own() -> None:
    done = Recorder(expect=1)
    runner = TaskRunner(2, asyncio.get_running_loop(), double, done, name="test-runner")
    try:
        for i in range(3):
            done.all_in = anyio.Event()
            done.expect = i + 1
            runner.submit(f"t-{i}", str(i).encode(), {})
            with anyio.fail_after(WAIT):
                await done.all_in.wait()
    finally:
        runner.shutdown()
    assert done.batches == [[("t-0", 0)], [("t-1", 2)], [("t-2", 4)]]


async def test_shutdown_drops_the_tasks_not_started_and_reports_nothing_more() -> None:
    started = threading.Event()
    gate = threading.Event()
    ran: list[bytes] = []

    def run(spec: bytes, deps: Mapping[Key, Any]) -> bytes:
        ran.append(spec)
        started.set()
        gate.wait(WAIT)
        return spec

    done = Recorder(expect=1)
    runner = TaskRunner(1, asyncio.get_running_loop(), run, done, name="test-runner")
    runner.submit("first", b"first", {})
    for i in range(5):
        runner.submit(f"queued-{i}", b"queued", {})
    assert await anyio.to_thread.run_sync(started.wait, WAIT)
    runner.shutdown()
    gate.set()
    for thread in runner._threads:
        await anyio.to_thread.run_sync(thread.join, WAIT)
        assert not thread.is_alive()
    # A drain the thread scheduled before it ended is on the loop ahead of this.
    flushed = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(flushed.set_result, None)
    await flushed
    assert ran == [b"first"]
    assert done.batches == []
    with pytest.raises(RuntimeError, match="shut down"):
        runner.submit("late", b"late", {})
