"""What faulty sinks cost the scheduler: throughput with and without them, in one run.

Two clusters of 2 worker processes x 1 thread run the workload of
``benchmarks/sinks.py`` (its ``run_flat``: ``--tasks`` independent ``inc``, default
10,000, worker event forwarding on; tasks/s from submission to the last result).
Both have the healthy sinks ``counter`` and an event log on a normal disk:

1. no faulty sink;
2. three faulty sinks as well, all on at once:
   - ``raising``: raises on every batch;
   - ``slow``: sleeps 1 s per batch (a plain ``write``, so in a thread of its own);
   - ``disk-full``: an event log on a full disk (a 64 KiB tmpfs that fills up during
     the warm-up, when this process may mount one; else ``/dev/full``).

Both clusters run side by side, each gets a warm-up, then the ``--repeats`` runs
alternate between them (this machine is shared: a burst of load from elsewhere hits
both alike). The table gives each cluster's median and every run, the ratio (target:
(2)/(1) >= 0.85x), and how long closing took (every sink is drained first, the slow
one included: no event is lost); then each sink's ``bus.stats()`` in cluster (2)
after its last run.

Run: ``.venv/bin/python benchmarks/faulty_sinks.py [--quick] [--tasks N] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cloudpickle
from rich.console import Console
from rich.table import Table

# benchmarks/sinks.py sits next to this file: its workload and its measurement.
sys.path.insert(0, str(Path(__file__).parent))

import sinks as sinks_bench
from sluice.events import Event
from sluice.sinks import Sink
from sluice.sinks.eventlog import EventLog

# The worker processes cannot import benchmarks/sinks.py: ship its inc by value.
cloudpickle.register_pickle_by_value(sinks_bench)

console = Console()


class Raising(Sink):
    name = "raising"

    def write(self, batch: Sequence[Event]) -> None:
        raise RuntimeError("this sink fails on every batch")


class Slow(Sink):
    name = "slow"

    def write(self, batch: Sequence[Event]) -> None:
        time.sleep(1.0)


class DiskFull(EventLog):
    name = "disk-full"


@contextlib.contextmanager
def full_disk(tmp: Path) -> Iterator[tuple[Path, str]]:
    """(a path for an event log on a disk that is, or soon gets, full; which disk)."""
    folder = tmp / "tiny"
    folder.mkdir()
    mounted = False
    if os.geteuid() == 0 and shutil.which("mount"):
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)],
            capture_output=True,
            check=False,
        )
        mounted = done.returncode == 0
    try:
        if mounted:
            yield folder / "events.jsonl", "a 64 KiB tmpfs"
        else:
            yield Path("/dev/full"), "/dev/full"
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 tasks, 1 repeat (CI smoke)")
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n = 2_000 if args.quick else args.tasks
    repeats = 1 if args.quick else args.repeats

    from sluice._tuning import tune_process
    from sluice.client import Client
    from sluice.deploy import LocalCluster

    tune_process()
    labels = ("no faulty sink", "raising + slow (1 s/batch) + disk full")
    rates: dict[str, list[float]] = {label: [] for label in labels}
    with (
        tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp,
        full_disk(Path(tmp)) as (full_path, disk),
        contextlib.ExitStack() as stack,
    ):
        # Each failure is logged with its traceback, as in production: to a file here,
        # so the cost is paid but the terminal stays readable.
        handler = logging.FileHandler(Path(tmp) / "bus.log")
        bus_logger = logging.getLogger("sluice.bus")
        bus_logger.addHandler(handler)
        bus_logger.propagate = False
        stack.callback(handler.close)
        # Both clusters run side by side and the repeats alternate between them, so a
        # burst of load from elsewhere on this shared machine hits both alike.
        clusters: dict[str, Any] = {}
        clients: dict[str, Any] = {}
        for i, label in enumerate(labels):
            sinks: list[Any] = ["counter"]
            if i:
                sinks += [Raising(), Slow(), DiskFull(full_path, fsync="never")]
            with console.status(f"starting: {label}..."):
                clusters[label] = LocalCluster(
                    n_workers=2,
                    threads_per_worker=1,
                    processes=True,
                    sinks=sinks,
                    event_log=Path(tmp) / f"events-{i}.jsonl",
                )
                clients[label] = Client(clusters[label])
                sinks_bench.run_flat(clients[label], max(n // 10, 10))  # warm-up
        # How far the slow sink falls behind, and whether its "block" queue (maxsize
        # 100,000 by default) ever puts the scheduler under pressure.
        bus = clusters[labels[1]].scheduler.bus
        peak = {"lag": 0, "pressure": 0}
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(0.05):
                peak["lag"] = max(peak["lag"], bus.subscriptions["slow"].lag)
                peak["pressure"] += bool(bus.under_pressure)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        for r in range(repeats):
            for label in labels:
                with console.status(f"run {r + 1}/{repeats}: {label}..."):
                    rates[label].append(sinks_bench.run_flat(clients[label], n))
        sampling.set()
        sampler.join()
        stats = clusters[labels[1]].scheduler.bus.stats()
        closed: dict[str, float] = {}
        for label in labels:
            start = time.perf_counter()
            clients[label].close()
            clusters[label].close()  # drains every sink, the slow one included
            closed[label] = time.perf_counter() - start
        bus_logger.removeHandler(handler)
        bus_logger.propagate = True

    base = statistics.median(rates[labels[0]])
    table = Table(title=f"faulty sinks: {n:,} independent inc, 2 worker processes x 1 thread")
    table.add_column("cluster (counter + event log in both)")
    table.add_column("tasks/s (median)", justify="right")
    table.add_column("each run", justify="right")
    table.add_column("vs no faulty sink", justify="right")
    table.add_column("close took", justify="right")
    for label in labels:
        rate = statistics.median(rates[label])
        table.add_row(
            label,
            f"{rate:,.0f}",
            " ".join(f"{x:,.0f}" for x in rates[label]),
            f"{rate / base:.2f}x",
            f"{closed[label]:.1f}s",
        )
    console.print(table)
    console.print(f"target: >= 0.85x; the full disk was {disk}; median of {repeats} runs each")

    sub = Table(title="bus.stats() of the faulty cluster after its last run, before closing")
    for column in ("consumer", "delivered", "failed", "dropped", "lag"):
        sub.add_column(column, justify="left" if column == "consumer" else "right")
    for name, st in stats.items():
        sub.add_row(name, *(f"{st[k]:,}" for k in ("delivered", "failed", "dropped", "lag")))
    console.print(sub)
    console.print(
        f"slow sink: largest lag seen {peak['lag']:,} events; the scheduler was under"
        f" pressure (reading no new work) in {peak['pressure']} of the 50 ms samples"
    )


if __name__ == "__main__":
    main()
