"""Speed of the event-sourced core, on this machine.

Four figures, each with the target issue #2 set for it:

- bus publish rate with one queued no-op sink (events/s, publish and drain);
- event-log write rate (events/s through ``EventLog.write`` in bus-sized batches);
- read + ``SchedulerState.from_events`` rate (events/s from a log on disk);
- ``SchedulerState`` throughput on a 100,000-task flat graph (tasks/s, from
  submission to the last result, through ``handle``).

Run: ``make bench`` or ``.venv/bin/python benchmarks/core.py [--quick]``.
These are absolute rates of pure-Python code with no Dask counterpart; the
comparisons against Dask live in ``benchmarks/compare.py``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio
from rich.console import Console
from rich.table import Table

from sluice import EventBus, SchedulerState
from sluice._core.commands import AddClient, AddWorker, UpdateGraph
from sluice._core.messages import ComputeTaskMsg, TaskFinishedMsg
from sluice._tuning import tune_process
from sluice.events import Event, TaskTransition
from sluice.replay import read_events
from sluice.sinks import Sink
from sluice.sinks.eventlog import EventLog

console = Console()


def best_of(repeats: int, fn: Callable[[], float]) -> float:
    """Run ``fn`` (which returns a rate) ``repeats`` times; keep the median.

    The median, not the best, because this machine is shared: one lucky run
    is not what a user gets.
    """
    rates = []
    for _ in range(repeats):
        gc.collect()
        rates.append(fn())
    return statistics.median(rates)


def transitions(n: int) -> list[Event]:
    return [
        TaskTransition(
            seq=i + 1,
            time=1_700_000_000.0 + i,
            key=("inc", i),
            start="processing",
            finish="memory",
            stimulus_id=f"task-finished-{i}",
            worker="tcp://127.0.0.1:40001",
            nbytes=28,
            duration=0.001,
        )
        for i in range(n)
    ]


# -- 1. bus ---------------------------------------------------------------------------


class NoopSink(Sink):
    name = "noop"

    async def write(self, batch: Sequence[Event]) -> None:
        pass


def bus_rate(events: list[Event]) -> float:
    async def run() -> float:
        async with EventBus(history_size=10_000) as bus:
            bus.subscribe(NoopSink(), maxsize=len(events) + 1)
            publish = bus.publish
            start = time.perf_counter()
            # Yield to the loop every 10,000 events, as a server does between reads.
            for i in range(0, len(events), 10_000):
                for event in events[i : i + 10_000]:
                    publish(event)
                await anyio.sleep(0)
            await bus.drain()
            elapsed = time.perf_counter() - start
        return len(events) / elapsed

    return anyio.run(run)


# -- 2. event-log write ---------------------------------------------------------------


def eventlog_write_rate(events: list[Event], folder: Path) -> float:
    path = folder / f"write-{time.monotonic_ns()}.jsonl"
    log = EventLog(path, fsync="batch", run_id="bench")
    start = time.perf_counter()
    for i in range(0, len(events), 10_000):
        log.write(events[i : i + 10_000])
    log.close()
    elapsed = time.perf_counter() - start
    path.unlink()
    return len(events) / elapsed


# -- 3 and 4. SchedulerState -------------------------------------------------------------


def flat_graph_run(n_tasks: int, n_workers: int = 4) -> tuple[float, list[Event]]:
    """Submit ``n_tasks`` independent tasks, finish them all; return (tasks/s, events)."""
    state = SchedulerState()
    log: list[Event] = []
    now = 1_700_000_000.0
    keys = tuple(("inc", i) for i in range(n_tasks))
    start = time.perf_counter()
    for w in range(n_workers):
        events, _ = state.handle(AddWorker(worker=f"tcp://127.0.0.1:{40000 + w}"), now=now)
        log += events
    events, _ = state.handle(AddClient(client="client-1"), now=now)
    log += events
    graph = UpdateGraph(
        client="client-1", keys=keys, dependencies=dict.fromkeys(keys, ()), stimulus_id="submit"
    )
    events, messages = state.handle(graph, now=now)
    log += events
    # Finish each task as the scheduler hands it out: it holds roots back while the
    # workers are saturated, and a finished task's handle() sends the next ones.
    pending = deque(m for m in messages if isinstance(m, ComputeTaskMsg))
    sent = len(pending)
    i = 0
    while pending:
        msg = pending.popleft()
        done = TaskFinishedMsg(
            worker=msg.worker, key=msg.key, nbytes=28, duration=0.001, stimulus_id=f"f-{i}"
        )
        i += 1
        events, messages = state.handle(done, now=now)
        log += events
        more = [m for m in messages if isinstance(m, ComputeTaskMsg)]
        sent += len(more)
        pending.extend(more)
    elapsed = time.perf_counter() - start
    if sent != n_tasks:
        raise SystemExit(f"expected {n_tasks} compute messages, got {sent}")
    return n_tasks / elapsed, log


def read_fold_rate(log: list[Event], folder: Path) -> tuple[float, int]:
    path = folder / f"fold-{time.monotonic_ns()}.jsonl"
    writer = EventLog(path, fsync="never", run_id="bench")
    for i in range(0, len(log), 10_000):
        writer.write(log[i : i + 10_000])
    writer.close()
    start = time.perf_counter()
    state = SchedulerState.from_events(read_events(path))
    elapsed = time.perf_counter() - start
    path.unlink()
    if state.seq != log[-1].seq:
        raise SystemExit(f"fold stopped at seq {state.seq}, log ends at {log[-1].seq}")
    return len(log) / elapsed, len(log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat (CI smoke)")
    parser.add_argument(
        "--untuned",
        action="store_true",
        help="keep CPython's GC and glibc's malloc defaults (servers tune both at startup)",
    )
    args = parser.parse_args()
    tuned = {} if args.untuned else tune_process()
    n_events = 100_000 if args.quick else 1_000_000
    n_tasks = 10_000 if args.quick else 100_000
    repeats = 1 if args.quick else 3

    events = transitions(n_events)
    rows: list[tuple[str, float, float, str]] = []
    with console.status("bus publish rate..."):
        rows.append(
            (
                "bus publish, 1 queued no-op sink",
                best_of(repeats, lambda: bus_rate(events)),
                1_000_000,
                "events/s",
            )
        )
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp:
        folder = Path(tmp)
        with console.status("event-log write rate..."):
            rate = best_of(repeats, lambda: eventlog_write_rate(events, folder))
            rows.append(("event-log write (fsync per batch)", rate, 300_000, "events/s"))
        with console.status(f"SchedulerState, {n_tasks:,}-task flat graph..."):
            runs = [flat_graph_run(n_tasks) for _ in range(repeats)]
            rate = statistics.median(r for r, _ in runs)
            rows.append((f"SchedulerState, {n_tasks:,}-task flat graph", rate, 30_000, "tasks/s"))
        with console.status("read + from_events..."):
            log = runs[0][1]
            folds = [read_fold_rate(log, folder) for _ in range(repeats)]
            rate = statistics.median(r for r, _ in folds)
            rows.append((f"read + from_events ({len(log):,} events)", rate, 150_000, "events/s"))

    title = "sluice core" + (" (--quick)" if args.quick else "")
    if tuned:
        title += (
            ", process tuned as servers run (" + ", ".join(k for k, v in tuned.items() if v) + ")"
        )
    else:
        title += ", CPython and glibc defaults"
    table = Table(title=title)
    table.add_column("measure")
    table.add_column("rate", justify="right")
    table.add_column("target", justify="right")
    table.add_column("", justify="center")
    for name, rate, target, unit in rows:
        ok = "[green]met[/]" if rate >= target else "[red]below[/]"
        table.add_row(name, f"{rate:,.0f} {unit}", f">= {target:,.0f}", ok)
    console.print(table)


if __name__ == "__main__":
    main()
