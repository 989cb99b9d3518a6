"""Faulty sinks on a real scheduler: the graph completes and the healthy sinks get everything.

One scheduler (in process, two in-process workers, worker event forwarding on)
carries three faulty sinks at once:

- ``raising``: raises on every batch;
- ``slow``: sleeps 1 s per batch (in its own thread, as a sink with a plain ``write``);
- ``disk-full``: an event log on a disk that fills up during the run (a 32 KiB tmpfs,
  if this process may mount one), or on ``/dev/full``, where every write fails with
  ENOSPC;

next to two healthy ones, a :class:`~sluice.sinks.counter.Counter` and an event log
on a normal disk. Whether the scheduler keeps its throughput is a speed claim and
lives in ``benchmarks/faulty_sinks.py``; this test checks what must hold every time.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from sluice.client import Client
from sluice.events import Event, UserEvent
from sluice.replay import read_events
from sluice.scheduler import Scheduler
from sluice.sinks import Sink
from sluice.sinks.counter import Counter
from sluice.sinks.eventlog import EventLog
from sluice.worker import Worker

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

N_TASKS = 300


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def inc(x: int) -> int:
    return x + 1


class Raising(Sink):
    """Fails on every batch."""

    name = "raising"

    def write(self, batch: Sequence[Event]) -> None:
        raise RuntimeError(f"raising sink refuses a batch of {len(batch)}")


class Slow(Sink):
    """Takes 1 s per batch, and keeps what it got (it is slow, not lossy)."""

    name = "slow"

    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.batches = 0

    def write(self, batch: Sequence[Event]) -> None:
        time.sleep(1.0)
        self.batches += 1
        self.seqs += [e.seq for e in batch]


@pytest.fixture(params=["tmpfs", "dev-full"])
def full_disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """(path of an event log on a disk that is or gets full, which disk it is)."""
    if request.param == "dev-full":
        if not os.path.exists("/dev/full"):  # pragma: no cover - not Linux
            pytest.skip("no /dev/full here")
        yield Path("/dev/full"), "/dev/full"
        # The files the sink left open sit in reference cycles (exception, traceback,
        # frame): collect them now, in this test's teardown, where its filters apply.
        gc.collect()
        return
    folder = tmp_path / "tiny"
    folder.mkdir()
    if not (hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount")):
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(folder)],
        capture_output=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield folder / "events.jsonl", "tmpfs of 32 KiB"
    finally:
        subprocess.run(["umount", "-l", str(folder)], timeout=30, check=False)


async def test_faulty_sinks_do_not_stop_the_graph_or_the_other_sinks(
    tmp_path: Path, full_disk: tuple[Path, str], caplog: pytest.LogCaptureFixture
) -> None:
    full_path, disk = full_disk
    everything: list[Event] = []
    counter = Counter()
    slow = Slow()
    good_log = tmp_path / "events.jsonl"
    caplog.set_level(logging.WARNING, logger="sluice.bus")
    s = Scheduler(port=0)
    s.bus.subscribe(everything.append, name="everything", mode="inline")
    s.add_sink(counter, name="counter")
    s.add_sink(EventLog(good_log, run_id=s.run_id), name="good-log")
    s.add_sink(Raising(), name="raising")
    s.add_sink(slow, name="slow")
    s.add_sink(EventLog(full_path, run_id=s.run_id, fsync="never"), name="disk-full")
    loop_thread = threading.current_thread()

    async with s:
        async with (
            Worker(s.address, name="a"),
            Worker(s.address, name="b"),
            Client(s.address, asynchronous=True) as client,
        ):
            futures = client.map(inc, range(N_TASKS), pure=False)
            assert await client.gather(futures) == list(range(1, N_TASKS + 1))
            del futures
        assert threading.current_thread() is loop_thread
    # Leaving the scheduler drained every sink (the slow one too), then closed them.

    stats = s.bus.stats()
    seqs = [e.seq for e in everything]
    assert seqs == list(range(1, len(seqs) + 1))  # one gap-free sequence

    # The healthy sinks got every event.
    assert counter.count == N_TASKS
    assert [e.seq for e in read_events(good_log)] == seqs
    assert slow.seqs == seqs  # slow, but lossless
    for name in ("counter", "good-log", "slow"):
        assert stats[name]["failed"] == 0 and stats[name]["lag"] == 0, (name, stats[name])
    assert stats["good-log"]["delivered"] == len(seqs) == stats["slow"]["delivered"]
    assert slow.batches < len(seqs) / 10, "the slow sink must get its events in batches"

    # The faulty ones are reported in bus.stats(), in the log, and on the bus itself.
    assert stats["raising"]["delivered"] == 0 and stats["raising"]["failed"] >= 1
    assert stats["disk-full"]["failed"] >= 1
    assert stats["disk-full"]["delivered"] < len(seqs)
    for name in ("raising", "disk-full"):
        records = [r for r in caplog.records if r.getMessage() == f"consumer {name!r} failed"]
        assert records and records[0].exc_info is not None, name
    assert "raising sink refuses a batch" in caplog.text
    assert "No space left on device" in caplog.text
    reported = {
        e.msg["consumer"]
        for e in everything
        if isinstance(e, UserEvent) and e.topic == "consumer-failed"
    }
    assert reported == {"raising", "disk-full"}

    # What reached the full disk reads back without error (a failed write leaves no torn
    # line), and it is a prefix of the run: after a failed write the sink takes nothing
    # more, so no later batch can leave a hole.
    if disk.startswith("tmpfs"):
        kept = [e.seq for e in read_events(full_path)]
        assert 0 < len(kept) < len(seqs), disk
        assert kept == seqs[: len(kept)]
