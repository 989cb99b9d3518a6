"""sluice against Dask distributed, side by side, in one run on this machine.

One table holds every performance target of issue #7, each with the sluice
figure, the Dask figure, their ratio, the target and whether it is met:

- ``flat``: 10,000 independent ``inc`` tasks (``client.map`` then ``gather``),
  tasks/s, on a ``LocalCluster`` of 2 worker processes x 1 thread (worker event
  forwarding on, sluice's default); target sluice >= 5x Dask.
- ``tree``: a pairwise tree reduction over 10,000 leaves, submitted as one
  Dask-style graph with ``client.get`` (19,999 tasks), same cluster; >= 5x.
- ``round trip``: median latency of ``client.submit(inc, i, pure=False).result()``
  over 200 sequential calls after a warm-up, same cluster; <= 0.5x Dask.
- ``100,000-task graph``: each scheduler runs as its own process from its CLI
  (``sluice scheduler --heartbeat-timeout 300`` / ``dask scheduler --no-dashboard``)
  with two worker processes of 1 thread each (``--no-nanny``) and the client in
  this process. 300 s is Dask's own liveness timeout (``worker-ttl``); with
  sluice's default of 10 s, a worker handed 50,000 tasks at once can be removed
  on a loaded machine before it reports back.
  The graph is 100,000 independent ``inc`` tasks submitted with one
  ``client.map`` (the most common large graph, and the one where everything
  the scheduler keeps is per task; both schedulers take the whole graph in one
  message and know every task before the first one runs).

  - *submission to first result*: from the start of ``client.map`` to the first
    result out of ``as_completed``; <= Dask.
  - *scheduler memory per task*: the scheduler process's RSS is sampled every
    5 ms from just before submission until 1 s after the first result (by then
    it knows every task: checked with ``run_on_scheduler``); the peak minus the
    RSS before submission, divided by the number of tasks; <= Dask. The graph is
    then cancelled and the processes stopped, without waiting for 100,000 tasks.
- ``replay``: a log of >= 1,000,000 events written from a real
  ``SchedulerState`` run (333,334 tasks submitted, assigned to 4 workers and
  finished, 3 transitions each), then ``SchedulerState.from_events(read_events(path))``
  timed from opening the log to the final state; sluice only, <= 5 s.
- ``sinks``: flat tasks/s with every built-in sink on over tasks/s with none,
  measured by ``benchmarks/sinks.py`` (:func:`sinks_ratio`); sluice only, >= 0.85x.

Each figure is the median of ``--repeats`` runs after a warm-up (the 100,000-task
graph runs once per scheduler). Dask comes from the ``bench`` extra: ``make
bench`` or ``.venv/bin/pip install -e '.[bench]'``. ``--quick`` shrinks every
size and runs once (a CI smoke: it checks that everything runs, the figures
mean little). The exit code is 0 whether targets are met or not.

Run: ``.venv/bin/python benchmarks/compare.py [--quick] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

# Wide enough for the table when the output is a pipe or a file (as in CI).
console = Console(width=None if sys.stdout.isatty() else 170)
HERE = Path(__file__).resolve().parent


def inc(x: int) -> int:
    return x + 1


def add(x: int, y: int) -> int:
    return x + y


@dataclass(frozen=True)
class Sizes:
    flat: int  # tasks of the flat map and leaves of the tree
    round_trips: int
    big_graph: int
    replay_tasks: int  # the replay log holds 3 events per task, plus 6
    sink_tasks: int


FULL = Sizes(
    flat=10_000, round_trips=200, big_graph=100_000, replay_tasks=333_334, sink_tasks=10_000
)
QUICK = Sizes(flat=500, round_trips=20, big_graph=2_000, replay_tasks=10_000, sink_tasks=500)


# -- flat and tree throughput, round trip (LocalCluster) ------------------------------


def tree_graph(n_leaves: int) -> tuple[dict[Any, Any], Any, int]:
    """A Dask-style graph summing ``inc(i)`` for i < n by pairwise additions."""
    graph: dict[Any, Any] = {("leaf", i): (inc, i) for i in range(n_leaves)}
    level = [("leaf", i) for i in range(n_leaves)]
    depth = 0
    while len(level) > 1:
        depth += 1
        nxt = []
        for j in range(0, len(level) - 1, 2):
            key = ("add", depth, j // 2)
            graph[key] = (add, level[j], level[j + 1])
            nxt.append(key)
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return graph, level[0], len(graph)


def run_flat(client: Any, n: int) -> float:
    start = time.perf_counter()
    futures = client.map(inc, range(n), pure=False)
    results = client.gather(futures)
    elapsed = time.perf_counter() - start
    if results != list(range(1, n + 1)):
        raise SystemExit("flat: wrong results")
    del futures
    return n / elapsed


def run_tree(client: Any, n_leaves: int) -> float:
    graph, root, n_tasks = tree_graph(n_leaves)
    start = time.perf_counter()
    total = client.get(graph, root)
    elapsed = time.perf_counter() - start
    if total != sum(range(1, n_leaves + 1)):
        raise SystemExit(f"tree: wrong result {total}")
    return n_tasks / elapsed


def measure(client: Any, fn: Callable[[Any, int], float], n: int, repeats: int) -> float:
    fn(client, max(n // 10, 10))  # warm-up: imports, connections, first pickles
    return statistics.median(fn(client, n) for _ in range(repeats))


def round_trip(client: Any, n: int) -> float:
    """Median seconds of ``submit(...).result()``, one call at a time, after a warm-up."""
    for i in range(max(n // 10, 5)):
        client.submit(inc, i, pure=False).result()
    times = []
    for i in range(n):
        start = time.perf_counter()
        result = client.submit(inc, i, pure=False).result()
        times.append(time.perf_counter() - start)
        if result != i + 1:
            raise SystemExit(f"round trip: wrong result {result}")
    return statistics.median(times)


def on_cluster(client: Any, sizes: Sizes, repeats: int) -> dict[str, float]:
    return {
        "flat": measure(client, run_flat, sizes.flat, repeats),
        "tree": measure(client, run_tree, sizes.flat, repeats),
        "round trip": round_trip(client, sizes.round_trips),
    }


def bench_sluice(sizes: Sizes, repeats: int) -> dict[str, float]:
    from sluice._tuning import tune_process
    from sluice.client import Client
    from sluice.deploy import LocalCluster

    tune_process()
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True)
    with cluster, Client(cluster) as client:
        return on_cluster(client, sizes, repeats)


def bench_dask(sizes: Sizes, repeats: int) -> dict[str, float]:
    import dask
    from distributed import Client, LocalCluster

    dask.config.set({"distributed.worker.daemon": False})
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        return on_cluster(client, sizes, repeats)


# -- the 100,000-task graph (scheduler and workers from their CLIs) -------------------


def rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes, from /proc (psutil elsewhere)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)


class PeakSampler:
    """Samples a process's RSS in a thread every ``interval`` s; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.005) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = rss(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss(self.pid))

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss(self.pid))


def _stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in reversed(procs):  # workers first, the scheduler last
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in reversed(procs):
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def cli_cluster(which: str, folder: Path) -> Iterator[tuple[int, str]]:
    """A scheduler and two 1-thread worker processes started from ``which``'s CLI;
    yields (scheduler pid, scheduler address)."""
    bindir = Path(sys.executable).parent
    file = folder / f"{which}-scheduler.json"
    if which == "sluice":
        exe = str(bindir / "sluice")
        scheduler = [exe, "scheduler", "--port", "0", "--scheduler-file", str(file)]
        # Dask's liveness timeout (distributed.scheduler.worker-ttl, 5 minutes), not
        # sluice's 10 s: a worker handed 50,000 tasks at once can go quiet for
        # longer than that on a loaded machine, and would be removed mid-run.
        scheduler += ["--log-level", "warning", "--heartbeat-timeout", "300"]
        worker = [exe, "worker", "--scheduler-file", str(file), "--no-nanny", "--nthreads", "1"]
        worker += ["--log-level", "warning"]
    else:
        exe = str(bindir / "dask")
        scheduler = [exe, "scheduler", "--port", "0", "--no-dashboard"]
        scheduler += ["--scheduler-file", str(file)]
        worker = [exe, "worker", "--scheduler-file", str(file), "--no-nanny", "--nthreads", "1"]
        worker += ["--no-dashboard"]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        log = open(folder / f"{which}-scheduler.log", "wb")  # noqa: SIM115
        procs.append(subprocess.Popen(scheduler, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 60
        while not file.exists() or not file.read_text().strip():
            if procs[0].poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{which} scheduler did not start: see {log.name}")
            time.sleep(0.05)
        address = json.loads(file.read_text())["address"]
        for i in range(2):
            wlog = open(folder / f"{which}-worker-{i}.log", "wb")  # noqa: SIM115
            procs.append(subprocess.Popen(worker, stdout=wlog, stderr=subprocess.STDOUT))
        # A run that hangs (a worker lost mid-run) must not hang the benchmark:
        # stopping the processes fails the client's pending calls.
        watchdog = threading.Timer(900, _stop_all, [procs])
        watchdog.daemon = True
        watchdog.start()
        try:
            yield procs[0].pid, address
        finally:
            watchdog.cancel()
    finally:
        _stop_all(procs)


def _count_tasks(dask_scheduler: Any) -> int:
    return len(dask_scheduler.tasks)


def _count_workers(dask_scheduler: Any) -> int:
    return len(dask_scheduler.workers)


def big_graph(which: str, n: int) -> dict[str, float]:
    """Scheduler memory per task (bytes) and submission-to-first-result (s)."""
    if which == "sluice":
        from sluice.client import Client, as_completed
    else:
        from distributed import Client, as_completed

    with (
        tempfile.TemporaryDirectory(prefix=f"compare-{which}-") as tmp,
        cli_cluster(which, Path(tmp)) as (pid, address),
    ):
        client = Client(address)
        try:
            deadline = time.monotonic() + 60
            while client.run_on_scheduler(_count_workers) < 2:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{which}: workers did not join within 60 s")
                time.sleep(0.05)
            run_flat(client, 1_000)  # warm-up: connections, imports, first pickles
            time.sleep(0.5)  # let the warm-up's tasks be forgotten
            base = rss(pid)
            with PeakSampler(pid) as sampler:
                start = time.perf_counter()
                futures = client.map(inc, range(n), pure=False)
                first = next(iter(as_completed(futures)))
                latency = time.perf_counter() - start
                if first.result() not in range(1, n + 1):
                    raise SystemExit(f"{which}: wrong first result")
                time.sleep(1.0)
            known = client.run_on_scheduler(_count_tasks)
            if known < n:
                raise SystemExit(f"{which}: the scheduler knows {known} tasks, not {n}")
            client.cancel(futures)
            del futures, first
        finally:
            client.close()
    return {"memory": (sampler.peak - base) / n, "first result": latency}


# -- replay ---------------------------------------------------------------------------


def write_replay_log(path: Path, n_tasks: int, n_workers: int = 4) -> int:
    """Write the log of a real ``SchedulerState`` run of ``n_tasks`` flat tasks;
    return the seq of its last event."""
    from sluice import SchedulerState
    from sluice._core.commands import AddClient, AddWorker, UpdateGraph
    from sluice._core.messages import ComputeTaskMsg, TaskFinishedMsg
    from sluice.sinks.eventlog import EventLog

    state = SchedulerState()
    writer = EventLog(path, fsync="never", run_id="compare")
    batch: list[Any] = []

    def emit(events: list[Any]) -> None:
        batch.extend(events)
        if len(batch) >= 10_000:
            writer.write(batch)
            batch.clear()

    now = 1_700_000_000.0
    for w in range(n_workers):
        emit(state.handle(AddWorker(worker=f"tcp://127.0.0.1:{40000 + w}"), now=now)[0])
    emit(state.handle(AddClient(client="client-1"), now=now)[0])
    keys = tuple(("inc", i) for i in range(n_tasks))
    graph = UpdateGraph(
        client="client-1", keys=keys, dependencies=dict.fromkeys(keys, ()), stimulus_id="submit"
    )
    events, messages = state.handle(graph, now=now)
    emit(events)
    # Finish each task as the scheduler hands it out (it queues roots while the
    # workers are saturated; each finished task's handle() sends the next).
    pending = deque(m for m in messages if isinstance(m, ComputeTaskMsg))
    i = 0
    while pending:
        msg = pending.popleft()
        done = TaskFinishedMsg(
            worker=msg.worker, key=msg.key, nbytes=28, duration=0.001, stimulus_id=f"f-{i}"
        )
        events, messages = state.handle(done, now=now + i * 1e-4)
        emit(events)
        pending.extend(m for m in messages if isinstance(m, ComputeTaskMsg))
        i += 1
    writer.write(batch)
    writer.close()
    return state.seq


def bench_replay(n_tasks: int, repeats: int) -> tuple[float, float, int]:
    """(median wall seconds of read + fold, median CPU seconds, number of events).

    The CPU time is shown too: on a shared machine the wall time includes the
    time other processes held the CPU, and the fold is one thread of pure Python.
    """
    import gc

    from sluice import SchedulerState
    from sluice.replay import read_events

    with tempfile.TemporaryDirectory(prefix="compare-replay-") as tmp:
        path = Path(tmp) / "events.jsonl"
        last = write_replay_log(path, n_tasks)
        times = []
        cpu = []
        for _ in range(repeats):
            gc.collect()
            start = time.perf_counter()
            cpu_start = time.process_time()
            state = SchedulerState.from_events(read_events(path))
            cpu.append(time.process_time() - cpu_start)
            times.append(time.perf_counter() - start)
            if state.seq != last or len(state.tasks) != n_tasks:
                raise SystemExit(f"replay stopped at seq {state.seq} of {last}")
            del state
    return statistics.median(times), statistics.median(cpu), last


# -- sinks ----------------------------------------------------------------------------


def sinks_ratio(n: int, repeats: int) -> tuple[float, str]:
    """Flat tasks/s with every built-in sink on over tasks/s with none; (ratio, note).

    The measuring code is in ``benchmarks/sinks.py``, loaded by
    file path: the repository's top-level ``sinks/`` package shadows the name.
    Its ``bench_sluice`` runs no sinks and then every built-in sink
    (counter, JSON log, event log, RabbitMQ on the broker at ``$SLUICE_BENCH_AMQP``
    or 127.0.0.1:5672; without a reachable broker, the other three only).
    """
    spec = importlib.util.spec_from_file_location("sluice_bench_sinks", HERE / "sinks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    amqp = os.environ.get("SLUICE_BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2F")
    parts: tuple[str, ...] = tuple(module.ALL)
    note = "counter, json-log, eventlog, rabbitmq"
    if _broker_reachable(amqp):
        parts += ("rabbitmq",)
    else:
        note = "counter, json-log, eventlog (no broker)"
    queue = f"compare-{uuid.uuid4().hex[:8]}"
    # bench_sluice returns (rate, rabbit sink or None, ...): only the first two are used.
    base = module.bench_sluice(n, repeats, (), amqp, queue)[0]
    with_sinks, rabbit = module.bench_sluice(n, repeats, parts, amqp, queue)[:2]
    if rabbit is not None:
        module.queue_depth_and_delete(amqp, queue)
    return with_sinks / base, note


def _broker_reachable(url: str) -> bool:
    import socket
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    try:
        import pika  # noqa: F401

        with socket.create_connection((parts.hostname or "localhost", parts.port or 5672), 2):
            return True
    except (ImportError, OSError):
        return False


# -- the table ------------------------------------------------------------------------


@dataclass
class Row:
    measure: str
    sluice: str
    dask: str
    value: str
    target: str
    met: bool | None  # None: not measured


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.2f} ms"


def throughput_row(label: str, ours: float, theirs: float) -> Row:
    ratio = ours / theirs
    return Row(label, f"{ours:,.0f}/s", f"{theirs:,.0f}/s", f"{ratio:.2f}x", ">= 5x", ratio >= 5)


def lower_is_better(
    label: str, ours: float, theirs: float, fmt: Callable[[float], str], limit: float
) -> Row:
    ratio = ours / theirs
    target = f"<= {limit:g}x"
    return Row(label, fmt(ours), fmt(theirs), f"{ratio:.2f}x", target, ratio <= limit)


def not_measured(label: str, target: str, reason: str) -> Row:
    return Row(label, "-", "-", f"not measured: {reason}", target, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 repeat (CI smoke)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-sinks", action="store_true", help="skip the sinks row")
    args = parser.parse_args()
    # Stopped by SIGTERM: unwind, so the scheduler and worker processes are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sizes = QUICK if args.quick else FULL
    repeats = 1 if args.quick else args.repeats
    try:
        import distributed  # noqa: F401
    except ImportError:
        sys.exit("Dask distributed is not installed: pip install -e '.[bench]'")
    if shutil.which("dask", path=str(Path(sys.executable).parent)) is None:
        sys.exit(f"no dask command next to {sys.executable}")
    started = time.perf_counter()
    with console.status("sluice, LocalCluster..."):
        ours = bench_sluice(sizes, repeats)
    with console.status("Dask distributed, LocalCluster..."):
        theirs = bench_dask(sizes, repeats)
    with console.status(f"sluice, {sizes.big_graph:,}-task graph..."):
        ours |= big_graph("sluice", sizes.big_graph)
    with console.status(f"Dask, {sizes.big_graph:,}-task graph..."):
        theirs |= big_graph("dask", sizes.big_graph)
    with console.status("replay..."):
        replay_s, replay_cpu, n_events = bench_replay(sizes.replay_tasks, repeats)

    n, g = sizes.flat, sizes.big_graph
    rows = [
        throughput_row(f"flat: {n:,} independent inc, tasks/s", ours["flat"], theirs["flat"]),
        throughput_row(f"tree reduction over {n:,} leaves, tasks/s", ours["tree"], theirs["tree"]),
        lower_is_better(
            f"1-task round trip, median of {sizes.round_trips}",
            ours["round trip"],
            theirs["round trip"],
            _ms,
            0.5,
        ),
        lower_is_better(
            f"{g:,}-task graph: scheduler memory per task (peak RSS)",
            ours["memory"],
            theirs["memory"],
            lambda b: f"{b:,.0f} B",
            1.0,
        ),
        lower_is_better(
            f"{g:,}-task graph: submission to first result",
            ours["first result"],
            theirs["first result"],
            lambda s: f"{s:,.2f} s",
            1.0,
        ),
        Row(
            f"replay: read + fold {n_events:,} events",
            f"{replay_s:.2f} s (CPU {replay_cpu:.2f} s)",
            "",
            f"{n_events / replay_s:,.0f} events/s",
            f"<= 5 s per 1M events ({replay_s * 1e6 / n_events:.2f} s)",
            replay_s * 1e6 / n_events <= 5.0,
        ),
    ]
    sink_label = f"all built-in sinks on / no sinks, flat {sizes.sink_tasks:,}"
    if args.no_sinks:
        rows.append(not_measured(sink_label, ">= 0.85x", "--no-sinks"))
    else:
        try:
            with console.status("sinks..."):
                ratio, note = sinks_ratio(sizes.sink_tasks, repeats)
            rows.append(
                Row(f"{sink_label} ({note})", "", "", f"{ratio:.2f}x", ">= 0.85x", ratio >= 0.85)
            )
        except Exception as exc:  # a broken sink bench must not hide the other rows
            rows.append(not_measured(sink_label, ">= 0.85x", f"{type(exc).__name__}: {exc}"))

    title = "sluice vs Dask distributed, 2 worker processes x 1 thread"
    title += " (--quick: sizes too small to mean much)" if args.quick else ""
    table = Table(title=title)
    table.add_column("measure")
    table.add_column("sluice", justify="right")
    table.add_column("Dask", justify="right")
    table.add_column("sluice/Dask or value", justify="right")
    table.add_column("target", justify="right")
    table.add_column("", justify="center")
    for row in rows:
        verdict = {True: "[green]met[/]", False: "[red]not met[/]", None: "[yellow]-[/]"}[row.met]
        table.add_row(row.measure, row.sluice, row.dask, row.value, row.target, verdict)
    console.print(table)
    console.print(f"{len(rows)} rows; {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
