"""Soak: a local cluster runs waves of graphs for a long time; does its memory grow?

A ``sluice scheduler`` process with the built-in sinks on (the event log,
``json-log`` to a file, ``counter``, ``errors``, and ``amqp://`` to the broker at
``--amqp`` when one answers there, into a queue of its own that this script
consumes as it goes and deletes at the end) and one ``sluice worker`` process
running ``--workers`` nanny-managed worker processes. This process is the client:
it submits waves of graphs with dependencies (``--leaves`` leaves, the sums of
neighbours, then a tree of partial sums), checks every result and releases it, so
the scheduler forgets each wave.

Every ``--interval`` seconds the resident set size (RSS) of the scheduler (and of
its children: the RabbitMQ sink's publisher process), of the nanny process and of
each worker process is sampled (psutil if installed, else
``/proc/PID/status``) into ``rss.csv`` (``elapsed_s,role,pid,rss_mb``), next to
``progress.csv`` (``elapsed_s,waves,tasks``) and ``sinks.csv`` (each sink's backlog
on the scheduler's bus, and whether the bus pushed back on the scheduler). At the
end a summary compares, per process, the RSS just after the warm-up (the median of
the samples in the first 10% of the time after the first ``--warmup`` fraction, 20%
by default) with the RSS at the end (the median of the samples in the last 10% of
the time), gives the growth per minute (least-squares slope over every sample after the warm-up) and
says ``no growth`` when end - warm-up is within the tolerance: ``--tolerance-mb``
(default 10 MB) or ``--tolerance-pct`` (default 5%) of the warm-up RSS, whichever
is larger. The exit code is 1 if any process grew beyond it. Options for the
amqp sink may follow the ``--amqp`` URL (``?process=false``). glibc's per-thread
malloc arenas make a scheduler with thread-backed sinks hold more RSS;
``MALLOC_ARENA_MAX=2`` in the environment shows the difference. ``rss.png`` is
written too if matplotlib happens to be installed (it is not a dependency).

Run: ``.venv/bin/python benchmarks/soak.py [--minutes 30] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sluice import Client

SLUICE = [sys.executable, "-m", "sluice"]
SHARED_AMQP = "amqp://guest:guest@127.0.0.1:5672/"


# -- memory ---------------------------------------------------------------------------------

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is in the dev environment
    psutil = None


def rss_mb(pid: int) -> float | None:
    """Resident set size of ``pid`` in MB (10^6 bytes), or ``None`` if it is gone."""
    if psutil is not None:
        try:
            return float(psutil.Process(pid).memory_info().rss) / 1e6
        except psutil.Error:
            return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        return None
    return None


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (the worker processes of a nanny process)."""
    if psutil is not None:
        try:
            return [c.pid for c in psutil.Process(pid).children()]
        except psutil.Error:
            return []
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


# -- the workload ------------------------------------------------------------------------------


def inc(x: int) -> int:
    return x + 1


def add(x: int, y: int) -> int:
    return x + y


def total(*xs: int) -> int:
    return sum(xs)


def run_wave(client: Client, wave: int, leaves: int) -> int:
    """One graph: leaves, neighbour sums, a tree of partial sums; checked; returns its size."""
    xs = client.map(inc, range(leaves), key=[f"w{wave}-x-{i}" for i in range(leaves)])
    ys = [client.submit(add, xs[i], xs[i + 1], key=f"w{wave}-y-{i}") for i in range(leaves - 1)]
    level, n, depth = ys, len(xs) + len(ys), 0
    while len(level) > 1:
        level = [
            client.submit(total, *level[i : i + 10], key=f"w{wave}-s{depth}-{i}")
            for i in range(0, len(level), 10)
        ]
        n += len(level)
        depth += 1
    got = level[0].result()
    want = sum((i + 1) + (i + 2) for i in range(leaves - 1))
    if got != want:
        raise AssertionError(f"wave {wave}: got {got}, want {want}")
    return n


# -- the broker -------------------------------------------------------------------------------


def broker_up(url: str) -> bool:
    import pika

    params = pika.URLParameters(url.partition("?")[0])
    try:
        with socket.create_connection((params.host, params.port), timeout=2):
            return True
    except OSError:
        return False


class QueueDrain(threading.Thread):
    """Consumes ``queue`` as the sink fills it (auto-ack), counting messages."""

    def __init__(self, url: str, queue: str) -> None:
        super().__init__(name="soak-amqp-drain", daemon=True)
        self.url, self.queue = url, queue
        self.count = 0
        self.error: str | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        import pika

        try:
            connection = pika.BlockingConnection(pika.URLParameters(self.url))
            channel = connection.channel()
            channel.queue_declare(self.queue, durable=True)
            channel.basic_qos(prefetch_count=5000)
            for method, _props, _body in channel.consume(
                self.queue, auto_ack=True, inactivity_timeout=1
            ):
                if method is not None:
                    self.count += 1
                elif self._halt.is_set():
                    break
            channel.cancel()
            channel.queue_delete(self.queue)
            connection.close()
        except Exception as exc:  # reported in the summary, the soak goes on
            self.error = f"{type(exc).__name__}: {exc}"

    def stop(self) -> None:
        """Stop once the queue has been empty for a second."""
        self._halt.set()


# -- the cluster -------------------------------------------------------------------------------


class Cluster:
    """``sluice scheduler`` and ``sluice worker --nworkers N`` processes, logs in ``out``."""

    def __init__(self, out: Path, workers: int, amqp: str | None) -> None:
        self.out = out
        self.scheduler_file = out / "scheduler.json"
        self.event_log = out / "events.jsonl"
        self.json_log = out / "json.log"
        self.procs: list[subprocess.Popen[bytes]] = []
        sinks = ["--sink", f"json-log://{self.json_log}", "--sink", "counter", "--sink", "errors"]
        if amqp is not None:
            sinks += ["--sink", amqp]
        self.scheduler = self._spawn(
            "scheduler",
            "--port",
            "0",
            "--scheduler-file",
            str(self.scheduler_file),
            "--event-log",
            str(self.event_log),
            "--log-level",
            "warning",
            *sinks,
        )
        _wait(self.scheduler_file.exists, 60, "the scheduler file")
        self.address = json.loads(self.scheduler_file.read_text())["address"]
        self.nanny = self._spawn(
            "worker",
            self.address,
            "--nworkers",
            str(workers),
            "--nthreads",
            "1",
            "--log-level",
            "warning",
        )

    def _spawn(self, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.out / f"{args[0]}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([*SLUICE, *args], stdout=log, stderr=subprocess.STDOUT)
        log.close()  # the child has its own descriptor
        self.procs.append(proc)
        return proc

    def processes(self) -> Iterator[tuple[str, int]]:
        """``(role, pid)`` of every process to sample, workers found afresh each time."""
        yield "scheduler", self.scheduler.pid
        # The RabbitMQ sink's publisher process (its default backend), if any.
        for i, pid in enumerate(sorted(children(self.scheduler.pid))):
            yield f"sched-child-{i}", pid
        yield "nanny", self.nanny.pid
        for i, pid in enumerate(sorted(children(self.nanny.pid))):
            yield f"worker-{i}", pid

    def stop(self) -> list[str]:
        """SIGTERM to each process, newest first; kill what hangs; how each ended."""
        started = time.monotonic()
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        ended = []
        for proc, name in zip(self.procs, ("scheduler", "worker"), strict=True):
            try:
                code = proc.wait(timeout=120)
                how = f"exit code {code}"
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                how = "KILLED after 120 s"
            ended.append(f"{name}: {how} ({time.monotonic() - started:.1f} s after SIGTERM)")
        return ended


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


# -- sampling ----------------------------------------------------------------------------------


class Sampler(threading.Thread):
    """Writes one RSS row per process every ``interval`` seconds, and the progress."""

    def __init__(self, cluster: Cluster, out: Path, interval: float, progress: dict[str, int]):
        super().__init__(name="soak-sampler", daemon=True)
        self.cluster, self.interval, self.progress = cluster, interval, progress
        self.rows: list[tuple[float, str, int, float]] = []
        self.rss_csv = out / "rss.csv"
        self.progress_csv = out / "progress.csv"
        self.start_time = time.monotonic()
        self._halt = threading.Event()

    def run(self) -> None:
        with (
            open(self.rss_csv, "w", newline="") as rss_file,
            open(self.progress_csv, "w", newline="") as progress_file,
        ):
            rss_out, progress_out = csv.writer(rss_file), csv.writer(progress_file)
            rss_out.writerow(["elapsed_s", "role", "pid", "rss_mb"])
            progress_out.writerow(["elapsed_s", "waves", "tasks"])
            while True:
                elapsed = time.monotonic() - self.start_time
                for role, pid in self.cluster.processes():
                    mb = rss_mb(pid)
                    if mb is not None:
                        row = (round(elapsed, 1), role, pid, round(mb, 2))
                        self.rows.append(row)
                        rss_out.writerow(row)
                progress_out.writerow(
                    [round(elapsed, 1), self.progress["waves"], self.progress["tasks"]]
                )
                rss_file.flush()
                progress_file.flush()
                if self._halt.wait(self.interval):
                    return

    def stop(self) -> None:
        self._halt.set()
        self.join()


# -- the summary -------------------------------------------------------------------------------


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) points, in MB per minute."""
    if len(points) < 2:
        return 0.0
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    if den == 0:
        return 0.0
    return 60 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den


def summarize(
    rows: list[tuple[float, str, int, float]],
    duration: float,
    warmup: float,
    tolerance_mb: float,
    tolerance_pct: float,
) -> list[dict[str, Any]]:
    """One verdict per (role, pid): warm-up RSS vs end RSS (see the module docstring)."""
    warm_from = warmup * duration
    tail = 0.1 * duration
    by_proc: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
    for elapsed, role, pid, mb in rows:
        by_proc[(role, pid)].append((elapsed, mb))
    out = []
    for (role, pid), points in sorted(by_proc.items()):
        after = [p for p in points if p[0] >= warm_from]
        first = [mb for t, mb in after if t <= warm_from + tail]
        last = [mb for t, mb in after if t >= duration - tail]
        if not first or not last:
            out.append({"role": role, "pid": pid, "verdict": "too few samples"})
            continue
        warm, end = statistics.median(first), statistics.median(last)
        allowed = max(tolerance_mb, warm * tolerance_pct / 100)
        growth = end - warm
        out.append(
            {
                "role": role,
                "pid": pid,
                "samples": len(points),
                "start_mb": points[0][1],
                "warm_mb": warm,
                "end_mb": end,
                "max_mb": max(mb for _, mb in after),
                "growth_mb": growth,
                "mb_per_min": slope_per_minute(after),
                "allowed_mb": allowed,
                "verdict": "no growth" if growth <= allowed else "GROWTH",
            }
        )
    return out


def curve(rows: list[tuple[float, str, int, float]], duration: float) -> str:
    """RSS per process at ten points in time, as a text table (the curve, without a plot)."""
    by_proc: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
    for elapsed, role, pid, mb in rows:
        by_proc[(role, pid)].append((elapsed, mb))
    marks = [duration * i / 10 for i in range(11)]
    lines = ["minute        " + "".join(f"{m / 60:>8.1f}" for m in marks)]
    for (role, _pid), points in sorted(by_proc.items()):
        cells = []
        for m in marks:
            nearest = min(points, key=lambda p, m=m: abs(p[0] - m))
            cells.append(f"{nearest[1]:>8.1f}")
        lines.append(f"{role:<14}" + "".join(cells))
    return "\n".join(lines)


def plot(rows: list[tuple[float, str, int, float]], path: Path, warm_from: float) -> bool:
    """``rss.png`` if matplotlib is installed; False otherwise."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    by_proc: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
    for elapsed, role, pid, mb in rows:
        by_proc[(role, pid)].append((elapsed, mb))
    fig, ax = plt.subplots(figsize=(9, 5))
    for (role, pid), points in sorted(by_proc.items()):
        ax.plot([t / 60 for t, _ in points], [mb for _, mb in points], label=f"{role} ({pid})")
    ax.axvline(warm_from / 60, linestyle="--", color="grey", label="end of warm-up")
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MB)")
    ax.legend()
    fig.savefig(path, dpi=100)
    return True


# -- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long (default 30)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: new)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--leaves", type=int, default=1000, help="leaves per graph (default 1000)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=0.2, help="warm-up fraction (0.2)")
    parser.add_argument("--tolerance-mb", type=float, default=10.0)
    parser.add_argument("--tolerance-pct", type=float, default=5.0)
    parser.add_argument(
        "--amqp",
        default=SHARED_AMQP,
        help="broker for the amqp:// sink (default: the local one, if it answers); sink"
        " options may follow, e.g. ?process=false",
    )
    parser.add_argument("--no-amqp", action="store_true", help="no RabbitMQ sink")
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the event and JSON logs (large)"
    )
    args = parser.parse_args(argv)

    out = args.out or Path(f"/tmp/sluice-soak-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("events.jsonl", "json.log", "scheduler.json"):
        (out / name).unlink(missing_ok=True)
    for stale in out.glob("events.jsonl.*"):
        stale.unlink()
    duration = args.minutes * 60

    amqp_url: str | None = None
    drain: QueueDrain | None = None
    if not args.no_amqp and broker_up(args.amqp):
        queue = f"sluice-soak-{uuid.uuid4().hex[:12]}"
        base, _, extra = args.amqp.partition("?")
        amqp_url = f"{base}?queue={queue}&kinds=all&spool={out / ('spool-' + queue)}"
        if extra:  # the sink's own options given with --amqp, e.g. process=false
            amqp_url += f"&{extra}"
        drain = QueueDrain(base, queue)
        drain.start()
    elif not args.no_amqp:
        print(f"no broker at {args.amqp}: running without the amqp sink")

    print(f"soak: {args.minutes:g} min, {args.workers} workers, output in {out}")
    cluster = Cluster(out, args.workers, amqp_url)
    progress = {"waves": 0, "tasks": 0}
    sampler: Sampler | None = None
    failure: str | None = None
    try:
        with Client(cluster.address) as client:
            _wait(
                lambda: len(client.run(os.getpid)) == args.workers,
                120,
                f"{args.workers} workers",
            )
            sampler = Sampler(cluster, out, args.interval, progress)
            sampler.start()
            end = sampler.start_time + duration
            lags = LagLog(out / "sinks.csv", sampler.start_time)
            while time.monotonic() < end:
                progress["tasks"] += run_wave(client, progress["waves"], args.leaves)
                progress["waves"] += 1
                lags.maybe_sample(client, args.interval)
            lags.close()
            tasks_left = client.run_on_scheduler(_n_tasks)
            time.sleep(min(args.interval, 5))  # one more sample after the last wave
    except Exception as exc:
        failure = f"{type(exc).__name__}: {exc}"
    finally:
        try:
            if sampler is not None:
                sampler.stop()
        finally:
            ended = cluster.stop()
            if drain is not None:
                drain.stop()
                drain.join(timeout=120)

    rows = sampler.rows if sampler is not None else []
    elapsed = max((row[0] for row in rows), default=0.0)  # the time of the last sample
    report = summarize(rows, elapsed, args.warmup, args.tolerance_mb, args.tolerance_pct)
    last_seq = _last_seq(cluster.event_log)
    print()
    print(
        f"ran {elapsed / 60:.1f} min: {progress['waves']} graphs, {progress['tasks']} tasks"
        f" ({progress['tasks'] / max(elapsed, 1e-9):.0f} tasks/s); event log last seq {last_seq}"
    )
    if failure is None:
        print(f"scheduler tasks left after the last graph: {tasks_left}")
    print("stopped: " + "; ".join(ended))
    if drain is not None:
        print(
            f"amqp queue: {drain.count} messages consumed"
            + (f"; consumer error: {drain.error}" if drain.error else "")
        )
    print(
        f"warm-up: first {args.warmup:.0%} of the time; tolerance: max({args.tolerance_mb:g} MB,"
        f" {args.tolerance_pct:g}% of the warm-up RSS) between warm-up and end"
    )
    header = (
        f"{'process':<14} {'pid':>7} {'start':>8} {'warm-up':>8} {'end':>8} {'max':>8}"
        f" {'growth':>8} {'MB/min':>8}  verdict"
    )
    print(header)
    for r in report:
        if "warm_mb" not in r:
            print(f"{r['role']:<14} {r['pid']:>7}  {r['verdict']}")
            continue
        print(
            f"{r['role']:<14} {r['pid']:>7} {r['start_mb']:>8.1f} {r['warm_mb']:>8.1f}"
            f" {r['end_mb']:>8.1f} {r['max_mb']:>8.1f} {r['growth_mb']:>+8.1f}"
            f" {r['mb_per_min']:>+8.3f}  {r['verdict']}"
        )
    if rows:
        print()
        print("RSS (MB) over time:")
        print(curve(rows, elapsed))
    (out / "summary.json").write_text(json.dumps({"report": report, **progress}, indent=2))
    if plot(rows, out / "rss.png", args.warmup * elapsed):
        print(f"plot: {out / 'rss.png'}")
    print(f"samples: {out / 'rss.csv'}, progress: {out / 'progress.csv'}")
    if not args.keep_logs:
        for path in [cluster.event_log, *out.glob("events.jsonl.*"), cluster.json_log]:
            with contextlib.suppress(OSError):
                path.unlink()
    if failure is not None:
        print(f"FAILED: {failure}")
        return 2
    return 0 if all(r["verdict"] == "no growth" for r in report) else 1


class LagLog:
    """Every ``interval`` seconds (between waves), each sink's queue on the scheduler's
    bus into ``sinks.csv`` (``elapsed_s,sink,lag,dropped,under_pressure``): where a
    backlog, and so the memory it takes, builds up."""

    def __init__(self, path: Path, start: float) -> None:
        self.file = open(path, "w", newline="")  # noqa: SIM115 - closed in close()
        self.out = csv.writer(self.file)
        self.out.writerow(["elapsed_s", "sink", "lag", "dropped", "under_pressure"])
        self.start = start
        self.last = 0.0

    def maybe_sample(self, client: Client, interval: float) -> None:
        now = time.monotonic()
        if now - self.last < interval:
            return
        self.last = now
        stats, pressure = client.run_on_scheduler(_bus_stats)
        for name, s in sorted(stats.items()):
            if s.get("lag") is not None:
                self.out.writerow(
                    [round(now - self.start, 1), name, s["lag"], s["dropped"], int(pressure)]
                )
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _bus_stats(dask_scheduler: Any) -> tuple[dict[str, Any], bool]:
    bus = dask_scheduler.bus
    return bus.stats(), bool(bus.under_pressure)


def _n_tasks(dask_scheduler: Any) -> int:
    return len(dask_scheduler.tasks)


def _last_seq(log: Path) -> int | None:
    """The seq of the event log's last complete line (read from the end: the log is big)."""
    try:
        with open(log, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 65536))
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        with contextlib.suppress(ValueError):
            return int(json.loads(line)["seq"])
    return None


if __name__ == "__main__":
    sys.exit(main())
