"""The small built-in sinks: Counter and ErrorLogger, run on a real bus."""

from __future__ import annotations

import logging

import pytest

from sluice.bus import EventBus
from sluice.events import Restarted, TaskTransition, WorkerAdded
from sluice.sinks import Sink
from sluice.sinks.counter import Counter
from sluice.sinks.errors import ErrorLogger

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def tt(seq: int, start: str, finish: str, **kw: object) -> TaskTransition:
    return TaskTransition(seq=seq, key=f"k{seq}", start=start, finish=finish, **kw)  # type: ignore[arg-type]


async def test_counter_counts_processing_to_memory_and_resets_on_restart() -> None:
    counter = Counter()
    async with EventBus() as bus:
        bus.subscribe(counter)
        bus.publish(tt(1, "waiting", "processing"))
        bus.publish(tt(2, "processing", "memory"))
        bus.publish(tt(3, "processing", "memory"))
        bus.publish(tt(4, "executing", "memory", source="tcp://w:1"))
        bus.publish(tt(5, "processing", "memory", source="tcp://w:1"))
        bus.publish(WorkerAdded(seq=6, worker="tcp://w:1"))
        await bus.drain()
        assert counter.count == 2  # the workers' own transitions are not the scheduler's
        assert counter.by_edge[("processing", "memory")] == 3
        assert counter.by_edge[("executing", "memory")] == 1
        assert bus.stats()["counter"]["delivered"] == 5  # worker-added is not routed to it
        bus.publish(tt(7, "processing", "memory"))
        bus.publish(Restarted(seq=8))
        bus.publish(tt(9, "processing", "memory"))
    assert counter.count == 1
    assert dict(counter.by_edge) == {("processing", "memory"): 1}


async def test_error_logger_logs_failures_with_exception_and_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="sluice.errors")
    errors = ErrorLogger()
    async with EventBus() as bus:
        bus.subscribe(errors)
        bus.publish(tt(1, "processing", "memory"))
        bus.publish(
            tt(
                2,
                "processing",
                "erred",
                worker="tcp://w:1",
                exception="ZeroDivisionError('division by zero')",
                traceback='  File "job.py", line 3, in f',
            )
        )
        bus.publish(tt(3, "executing", "error", source="tcp://w:1", exception="KeyError('a')"))
    assert [e.seq for e in errors.errors] == [2, 3]
    messages = [r.getMessage() for r in caplog.records if r.name == "sluice.errors"]
    assert len(messages) == 2
    assert "'k2' erred on tcp://w:1" in messages[0]
    assert "ZeroDivisionError('division by zero')" in messages[0]
    assert 'File "job.py", line 3' in messages[0]
    assert "KeyError('a')" in messages[1]


def test_a_sink_without_write_cannot_be_made() -> None:
    class Forgetful(Sink):
        def flush(self) -> None:
            pass

    with pytest.raises(TypeError, match=r"abstract method.*write"):
        Forgetful()  # type: ignore[abstract]
