"""Real processes: `sluice scheduler` and two `sluice worker` (with nannies) from the CLI.

These tests start the services exactly as a user does, talk to them with a
Client, and read the scheduler's event log afterwards.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from sluice import SchedulerState
from sluice.client import Client
from sluice.events import TaskTransition, WorkerRemoved
from sluice.replay import read_events
from sluice_processes import SluiceProcesses, wait_until

pytestmark = pytest.mark.timeout(180)

# The worker and scheduler processes cannot import this test module: ship its
# functions by value, as they would a user's script.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Cluster(SluiceProcesses):
    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.event_log = folder / "events.jsonl"

    def start(self, n_workers: int = 2) -> None:
        self.scheduler = self.spawn(
            "scheduler",
            "--port",
            "0",
            "--scheduler-file",
            str(self.scheduler_file),
            "--event-log",
            str(self.event_log),
        )
        wait_until(self.scheduler_file.exists, 30, "the scheduler file")
        for i in range(n_workers):
            self.spawn("worker", "--scheduler-file", str(self.scheduler_file), "--name", f"w{i}")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    c.start()
    try:
        yield c
    finally:
        c.stop()


def connect(cluster: Cluster) -> Client:
    client = Client(cluster.address)
    wait_until(lambda: client.run_on_scheduler(_n_workers) == 2, 60, "two workers to register")
    return client


def _n_workers(dask_scheduler: Any) -> int:
    return len(dask_scheduler.workers)


def _snapshot(dask_scheduler: Any) -> dict[str, Any]:
    return dask_scheduler.state.snapshot()  # type: ignore[no-any-return]


def inc(x: int) -> int:
    return x + 1


def add(x: int, y: int) -> int:
    return x + y


def slow_inc(x: int) -> int:
    time.sleep(0.005)
    return x + 1


def fail(x: int) -> int:
    raise ZeroDivisionError(f"bad input {x}")


def test_cli_cluster_runs_a_graph_with_a_failing_task(cluster: Cluster) -> None:
    with connect(cluster) as client:
        # 1,000 tasks: 500 leaves, 498 sums of neighbours, a failing task and its dependent.
        leaves = client.map(inc, range(500))
        sums = [client.submit(add, leaves[i], leaves[i + 1]) for i in range(498)]
        bad = client.submit(fail, 7)
        after = client.submit(inc, bad)
        assert client.gather(sums) == [(i + 1) + (i + 2) for i in range(498)]
        for future in (bad, after):
            error = future.exception()
            assert type(error) is ZeroDivisionError and str(error) == "bad input 7"
        with pytest.raises(ZeroDivisionError, match="bad input 7") as info:
            after.result()
        # The worker's traceback, down to the frame that raised (functions shipped by
        # value have no source file to quote lines from).
        notes = "\n".join(getattr(info.value, "__notes__", []))
        assert "in fail" in notes and "ZeroDivisionError: bad input 7" in notes

        snapshot = client.run_on_scheduler(_snapshot)
    cluster.stop()
    events = list(read_events(cluster.event_log))
    assert sum(isinstance(e, TaskTransition) and e.finish == "erred" for e in events) == 2
    replayed = SchedulerState.from_events(events, until=snapshot["seq"])
    assert replayed.snapshot() == snapshot


def test_a_killed_worker_is_restarted_and_its_work_recomputed(cluster: Cluster) -> None:
    with connect(cluster) as client:
        pids = client.run(os.getpid)
        assert len(pids) == 2
        leaves = client.map(slow_inc, range(1000))
        futures = [client.submit(add, leaves[i], leaves[i + 1]) for i in range(999)]
        victim, pid = sorted(pids.items())[0]
        # Kill once some results exist, so some are lost and must be recomputed.
        wait_until(lambda: sum(f.done() for f in futures) >= 50, 60, "some results")
        os.kill(pid, signal.SIGKILL)
        results = client.gather(futures)
        assert results == [(i + 1) + (i + 2) for i in range(999)]
        wait_until(lambda: client.run_on_scheduler(_n_workers) == 2, 60, "the restarted worker")
        new_pids = client.run(os.getpid)
        assert pid not in new_pids.values() and len(new_pids) == 2
        snapshot = client.run_on_scheduler(_snapshot)
    cluster.stop()
    events = list(read_events(cluster.event_log))
    removed = [e for e in events if isinstance(e, WorkerRemoved) and e.worker == victim]
    assert removed, cluster.logs()
    lost_at = removed[0].seq
    # What was on the lost worker is released first (the WorkerRemoved event comes
    # once it holds nothing), under the same stimulus, then computed again.
    redone = {
        e.key
        for e in events
        if isinstance(e, TaskTransition)
        and e.seq < lost_at
        and e.source == "scheduler"
        and e.start in ("processing", "memory")
        and e.finish == "released"
        and e.stimulus_id == removed[0].stimulus_id
    }
    assert redone, "the lost worker held no work when it was killed"
    recomputed = {
        e.key
        for e in events
        if isinstance(e, TaskTransition)
        and e.seq > lost_at
        and e.source == "scheduler"
        and e.finish == "memory"
    }
    assert redone & recomputed
    replayed = SchedulerState.from_events(events, until=snapshot["seq"])
    assert replayed.snapshot() == snapshot
