"""The event bus: routing, failure isolation, overflow policies, drain-then-close."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest

from sluice.bus import BusClosedError, EventBus
from sluice.events import Event, TaskTransition, UserEvent, WorkerAdded
from sluice.sinks import Sink

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def tt(seq: int, key: str = "x") -> TaskTransition:
    return TaskTransition(seq=seq, time=1.0, key=key, start="waiting", finish="processing")


class ListSink(Sink):
    """Records every batch it is given; sync write, so it runs in a thread."""

    def __init__(self, name: str = "list") -> None:
        self.sub_name = name
        self.events: list[Event] = []
        self.calls: list[str] = []
        self.threads: set[int] = set()

    def start(self) -> None:
        self.calls.append("start")

    def write(self, batch: Sequence[Event]) -> None:
        self.threads.add(threading.get_ident())
        self.calls.append("write")
        self.events.extend(batch)

    def flush(self) -> None:
        self.calls.append("flush")

    def close(self) -> None:
        self.calls.append("close")


class GatedSink(Sink):
    """An async sink that holds its first batch until ``gate`` is set."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.writing = anyio.Event()
        self.gate = anyio.Event()

    async def write(self, batch: Sequence[Event]) -> None:
        self.writing.set()
        await self.gate.wait()
        self.events.extend(batch)


async def hold_first_batch(bus: EventBus, sink: GatedSink) -> None:
    """Publish seq 1 and wait until the sink is stuck writing it."""
    bus.publish(tt(1))
    await sink.writing.wait()


def seqs(events: Sequence[Event]) -> list[int]:
    return [e.seq for e in events]


# -- routing -------------------------------------------------------------------


async def test_inline_consumers_see_events_in_order_filtered_by_kind() -> None:
    seen_all: list[int] = []
    seen_workers: list[int] = []
    async with EventBus() as bus:
        bus.subscribe(lambda e: seen_all.append(e.seq), name="all")
        bus.subscribe(lambda e: seen_workers.append(e.seq), name="w", kinds=["worker-added"])
        bus.publish(tt(1))
        bus.publish(WorkerAdded(seq=2, worker="tcp://w"))
        bus.publish(tt(3))
    assert seen_all == [1, 2, 3]
    assert seen_workers == [2]
    assert seqs(bus.history) == [1, 2, 3]


async def test_history_keeps_the_last_n_events() -> None:
    bus = EventBus(history_size=3)
    for i in range(1, 6):
        bus.publish(tt(i))
    assert seqs(bus.history) == [3, 4, 5]
    await bus.aclose()


async def test_sync_sink_runs_off_the_event_loop_thread_and_is_started_flushed_closed() -> None:
    sink = ListSink()
    async with EventBus() as bus:
        bus.subscribe(sink)
        for i in range(1, 101):
            bus.publish(tt(i))
    assert seqs(sink.events) == list(range(1, 101))
    assert threading.get_ident() not in sink.threads
    assert sink.calls[0] == "start"
    assert sink.calls[-2:] == ["flush", "close"]
    assert set(sink.calls[1:-2]) == {"write"}
    assert sink.bus is bus


async def test_reentrant_publish_is_delivered_after_the_current_event() -> None:
    order: list[tuple[str, int]] = []

    async with EventBus() as bus:

        def echo(event: Event) -> None:
            order.append(("echo", event.seq))
            if event.seq == 1:
                bus.publish(tt(2))

        bus.subscribe(echo, name="echo")
        bus.subscribe(lambda e: order.append(("other", e.seq)), name="other")
        bus.publish(tt(1))
    assert order == [("echo", 1), ("other", 1), ("echo", 2), ("other", 2)]
    assert seqs(bus.history) == [1, 2]


async def test_subscribe_rejects_bad_arguments() -> None:
    async with EventBus() as bus:
        bus.subscribe(ListSink(), name="a")
        with pytest.raises(ValueError, match="already subscribed"):
            bus.subscribe(ListSink(), name="a")
        with pytest.raises(ValueError, match="overflow must be"):
            bus.subscribe(ListSink(), name="b", overflow="explode")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="needs a write"):
            bus.subscribe(print, name="c", mode="queued")
        with pytest.raises(ValueError, match="no consumer named 'zzz'"):
            bus.unsubscribe("zzz")
    with pytest.raises(BusClosedError):
        bus.publish(tt(1))


async def test_unsubscribe_finishes_the_queue_then_closes_the_sink() -> None:
    sink = ListSink()
    async with EventBus() as bus:
        bus.subscribe(sink, name="s")
        for i in range(1, 11):
            bus.publish(tt(i))
        sub = bus.unsubscribe("s")
        bus.publish(tt(11))
        await sub.wait_closed()
        assert seqs(sink.events) == list(range(1, 11))
        assert sink.calls[-1] == "close"
        assert "s" not in bus.stats()


# -- failures ------------------------------------------------------------------


async def test_a_raising_consumer_does_not_affect_the_others(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sluice.bus._clock", lambda: 100.0)
    good_inline: list[Event] = []
    good_sink = ListSink()

    def bad_inline(event: Event) -> None:
        raise RuntimeError("inline boom")

    class BadSink(Sink):
        name = "bad-sink"

        def write(self, batch: Sequence[Event]) -> None:
            raise OSError("disk on fire")

    async with EventBus() as bus:
        bus.subscribe(bad_inline, name="bad-inline", kinds=["task-transition"])
        bus.subscribe(good_inline.append, name="good-inline")
        bus.subscribe(BadSink())
        bus.subscribe(good_sink, name="good-sink")
        for i in range(1, 4):
            bus.publish(tt(i))
        await bus.drain()
        stats = bus.stats()
    assert [e.seq for e in good_inline if isinstance(e, TaskTransition)] == [1, 2, 3]
    assert [e.seq for e in good_sink.events if isinstance(e, TaskTransition)] == [1, 2, 3]
    assert stats["bad-inline"]["failed"] == 3
    assert stats["good-inline"]["failed"] == 0
    assert stats["bad-sink"]["failed"] >= 1
    assert stats["bad-sink"]["delivered"] == 0
    assert stats["good-sink"]["delivered"] == len(good_sink.events)
    # One consumer-failed report per consumer within the same second, not one per failure.
    reports = [e for e in bus.history if isinstance(e, UserEvent)]
    assert {r.topic for r in reports} == {"consumer-failed"}
    assert sorted(r.msg["consumer"] for r in reports) == ["bad-inline", "bad-sink"]
    assert any("inline boom" in r.msg["error"] for r in reports)
    assert "consumer 'bad-inline' failed" in caplog.text
    assert "RuntimeError: inline boom" in caplog.text  # the traceback is logged


async def test_strict_bus_reraises_consumer_errors() -> None:
    bus = EventBus(strict=True)

    def bad(event: Event) -> None:
        raise KeyError("plugin bug")

    bus.subscribe(bad)
    with pytest.raises(KeyError, match="plugin bug"):
        bus.publish(tt(1))
    await bus.aclose()


async def test_strict_bus_reraises_sink_errors_on_drain() -> None:
    class Bad(Sink):
        async def write(self, batch: Sequence[Event]) -> None:
            raise ValueError("sink bug")

    with pytest.raises(ValueError, match="sink bug"):
        async with EventBus(strict=True) as bus:
            bus.subscribe(Bad())
            bus.publish(tt(1))
            await bus.drain()


# -- overflow --------------------------------------------------------------------


async def test_drop_discards_the_oldest_and_counts_them() -> None:
    sink = GatedSink()
    async with EventBus() as bus:
        bus.subscribe(sink, name="slow", maxsize=10, overflow="drop")
        await hold_first_batch(bus, sink)
        for i in range(2, 102):
            bus.publish(tt(i))
        assert bus.stats()["slow"]["dropped"] == 90
        assert not bus.under_pressure
        sink.gate.set()
    assert seqs(sink.events) == [1, *range(92, 102)]
    assert bus.stats()["slow"]["delivered"] == 11


async def test_spill_loses_nothing_and_keeps_order(tmp_path: Path) -> None:
    sink = GatedSink()
    n = 25_000
    async with EventBus(spill_dir=str(tmp_path)) as bus:
        bus.subscribe(sink, name="slow", maxsize=100, overflow="spill")
        await hold_first_batch(bus, sink)
        for i in range(2, n + 1):
            bus.publish(tt(i, key=f"k{i}"))
        assert not bus.under_pressure
        assert bus.stats()["slow"]["lag"] == n - 1
        # The first 100 after the held batch fit the queue; every later one spilled.
        assert bus.stats()["slow"]["spilled"] == n - 1 - 100
        spill_files = os.listdir(tmp_path)
        assert len(spill_files) == 1 and spill_files[0].startswith("sluice-spill-slow-")
        assert (tmp_path / spill_files[0]).stat().st_size > 0
        sink.gate.set()
        await bus.drain()
        assert os.listdir(tmp_path) == []  # the spill file is gone once fed back
    assert seqs(sink.events) == list(range(1, n + 1))
    assert [e.key for e in sink.events[1:] if isinstance(e, TaskTransition)] == [
        f"k{i}" for i in range(2, n + 1)
    ]
    assert bus.stats()["slow"]["dropped"] == 0
    assert bus.stats()["slow"]["spilled"] == n - 1 - 100  # a total, not what waits


async def test_what_a_sinks_accepts_refuses_is_never_queued_nor_spilled(tmp_path: Path) -> None:
    sink = GatedSink()
    sink.accepts = lambda event: event.seq % 2 == 1  # type: ignore[assignment]
    async with EventBus(spill_dir=str(tmp_path)) as bus:
        bus.subscribe(sink, name="odd", maxsize=10, overflow="spill")
        await hold_first_batch(bus, sink)
        bus.publish_many([tt(i) for i in range(2, 101)])
        # 49 odd events wait (seq 3..99): 10 in the queue, 39 spilled; no even one.
        assert bus.stats()["odd"]["lag"] == 49
        assert bus.stats()["odd"]["spilled"] == 39
        sink.gate.set()
        await bus.drain()
    assert seqs(sink.events) == list(range(1, 101, 2))


async def test_a_sink_chooses_its_queue_size_and_overflow(tmp_path: Path) -> None:
    """``maxsize`` / ``overflow`` attributes of the sink stand when subscribe gives none."""

    class SpillingSink(GatedSink):
        maxsize = 50
        overflow = "spill"

    sink = SpillingSink()
    async with EventBus(spill_dir=str(tmp_path)) as bus:
        sub = bus.subscribe(sink, name="spilling")
        assert (sub.maxsize, sub.overflow) == (50, "spill")
        await hold_first_batch(bus, sink)
        for i in range(2, 502):
            bus.publish(tt(i))
        assert not bus.under_pressure and os.listdir(tmp_path)
        sink.gate.set()
        await bus.drain()
        # The arguments win over the attributes.
        other = bus.subscribe(SpillingSink(), name="blocking", maxsize=7, overflow="block")
        assert (other.maxsize, other.overflow) == (7, "block")
    assert seqs(sink.events) == list(range(1, 502))


async def test_block_applies_back_pressure_until_the_sink_catches_up() -> None:
    sink = GatedSink()
    async with EventBus() as bus:
        bus.subscribe(sink, name="slow", maxsize=10, overflow="block")
        await hold_first_batch(bus, sink)
        for i in range(2, 12):
            bus.publish(tt(i))
        assert not bus.under_pressure  # exactly full
        bus.publish(tt(12))
        assert bus.under_pressure  # past maxsize: the server must stop reading

        resumed = anyio.Event()

        async def server_reader() -> None:
            await bus.wait_for_capacity()
            resumed.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(server_reader)
            await anyio.wait_all_tasks_blocked()
            assert not resumed.is_set()
            sink.gate.set()
            await resumed.wait()
        assert not bus.under_pressure
    assert seqs(sink.events) == list(range(1, 13))  # block keeps everything
    assert bus.stats()["slow"]["dropped"] == 0


# -- close and catch-up ------------------------------------------------------------


async def test_close_drains_every_sink() -> None:
    thread_sink = ListSink()
    async_sink = GatedSink()
    async_sink.gate.set()
    n = 20_000
    async with EventBus() as bus:
        bus.subscribe(thread_sink, name="thread", maxsize=1_000_000)
        bus.subscribe(async_sink, name="async", maxsize=1_000_000)
        for i in range(1, n + 1):
            bus.publish(tt(i))
        assert bus.stats()["thread"]["lag"] > 0  # nothing awaited yet: all still queued
    assert seqs(thread_sink.events) == list(range(1, n + 1))
    assert seqs(async_sink.events) == list(range(1, n + 1))
    assert thread_sink.calls[-2:] == ["flush", "close"]
    assert all(s["lag"] == 0 for s in bus.stats().values())


async def test_close_delivers_even_if_the_bus_was_never_started() -> None:
    sink = ListSink()
    bus = EventBus()
    bus.subscribe(sink)
    bus.publish(tt(1))
    bus.publish(tt(2))
    await bus.aclose()
    assert seqs(sink.events) == [1, 2]
    assert sink.calls[-1] == "close"


async def test_subscribe_since_catches_up_from_history_without_gap_or_duplicate() -> None:
    seen: list[int] = []
    async with EventBus() as bus:
        for i in range(1, 6):
            bus.publish(tt(i))
        bus.subscribe(lambda e: seen.append(e.seq), name="late", since=2)
        bus.publish(tt(6))
    assert seen == [3, 4, 5, 6]


async def test_subscribe_since_reads_older_events_from_the_catch_up_source() -> None:
    logged = [tt(i) for i in range(1, 11)]
    bus = EventBus(history_size=3, catch_up=lambda since: iter(logged))
    for event in logged:
        bus.publish(event)
    seen: list[int] = []
    bus.subscribe(lambda e: seen.append(e.seq), name="late", since=4)
    assert seen == list(range(5, 11))

    no_log = EventBus(history_size=3)
    for event in logged:
        no_log.publish(event)
    with pytest.raises(ValueError, match="history starts at seq 8"):
        no_log.subscribe(print, since=2)
    await bus.aclose()
    await no_log.aclose()


async def test_consumer_failures_are_logged_at_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="sluice.bus")

    def bad(event: Event) -> None:
        raise RuntimeError("x")

    async with EventBus() as bus:
        bus.subscribe(bad, name="bad", kinds=["task-transition"])
        bus.publish(tt(1))
    assert [r.levelno for r in caplog.records if r.name == "sluice.bus"] == [logging.WARNING]


class TimedSink(Sink):
    """A sync sink that notes when each write began and signals each one."""

    def __init__(self, linger: float) -> None:
        vars(self)["linger"] = linger
        self.starts: list[float] = []
        self.sizes: list[int] = []
        self.written = threading.Event()

    def write(self, batch: Sequence[Event]) -> None:
        self.starts.append(time.monotonic())  # the event loop's clock
        self.sizes.append(len(batch))
        self.written.set()


async def test_a_busy_sink_writes_at_most_once_per_linger() -> None:
    sink = TimedSink(linger=0.05)
    async with EventBus() as bus:
        bus.subscribe(sink)
        seq = 0
        with anyio.fail_after(10):
            for _ in range(300):  # a steady stream for about 0.3 s or more
                seq += 1
                bus.publish(tt(seq))
                await anyio.sleep(0.001)
            await bus.drain()
    assert sum(sink.sizes) == seq
    gaps = [b - a for a, b in zip(sink.starts, sink.starts[1:], strict=False)]
    # Without the linger, each event or two would have had a write of its own.
    assert len(sink.sizes) <= 2 + (sink.starts[-1] - sink.starts[0]) / 0.05
    assert gaps and min(gaps[:-1], default=0.05) >= 0.05 * 0.95


async def test_linger_never_holds_back_an_event_after_a_quiet_spell_nor_a_drain() -> None:
    sink = TimedSink(linger=60.0)
    with anyio.fail_after(10):
        async with EventBus() as bus:
            bus.subscribe(sink)
            bus.publish(tt(1))
            # The first event after a quiet spell is written at once, not 60 s later.
            assert await anyio.to_thread.run_sync(sink.written.wait, 10)
            bus.publish(tt(2))
            await anyio.wait_all_tasks_blocked()  # the drain task is lingering now
            assert sink.sizes == [1]
            await bus.drain()  # a drain does not wait out the linger
            assert sink.sizes == [1, 1]
            bus.publish(tt(3))
        # Nor does closing the bus: the block ended well within the timeout.
    assert sink.sizes == [1, 1, 1]


def test_linger_comes_from_the_argument_then_the_sink_then_the_default() -> None:
    from sluice.bus import DEFAULT_LINGER

    bus = EventBus()
    assert bus.subscribe(ListSink(), name="a").linger == DEFAULT_LINGER  # type: ignore[attr-defined]
    assert bus.subscribe(TimedSink(0.5), name="b").linger == 0.5  # type: ignore[attr-defined]
    assert bus.subscribe(TimedSink(0.5), name="c", linger=0).linger == 0  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="linger"):
        bus.subscribe(ListSink(), name="d", linger=-1)
