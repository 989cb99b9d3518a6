"""What the sinks cost the scheduler, against no sinks and against Dask, in one run.

Clusters of 2 worker processes x 1 thread run the same workload (``--tasks``
independent ``inc``, default 10,000; worker event forwarding on):

1. sluice with no sinks;
2. sluice with every built-in sink on, with their defaults: ``counter``, a JSON
   log to a file, the event log, and RabbitMQ (a queue on the broker at
   ``--amqp``; the scheduler's own transitions, published from a child process);
   then the same with the RabbitMQ sink publishing from a thread
   (``process=false``);
3. sluice with one sink at a time, to show where the cost is (skip with
   ``--no-breakdown``);
4. Dask distributed with no plugin;
5. Dask distributed with the RabbitMQ scheduler plugin from its documentation,
   which publishes from inside ``transition`` with a BlockingConnection.

Figures are tasks/s from submission to the last result, the median of
``--repeats`` runs after a warm-up; with ``--rounds N`` every cluster runs N
times, alternating with the others, and the median of its rounds is shown.
The table gives the two ratios the sinks are held to: (2)/(1), the cost of the
sinks (target >= 0.85x), and (2)/(5) against the runtime ratio (1)/(4) (sluice
with its sinks must be ahead of Dask with its plugin by at least as much as
without). After the clusters, the RabbitMQ sink's sustained publish rate with
confirms is measured on its own (``benchmarks/rabbitmq_rate.py``; target >=
15,000 events/s), and the queue the sluice run filled is checked to hold every
event the sink was given.

Run: ``.venv/bin/python benchmarks/sinks.py [--quick] [--repeats N] [--rounds N]
[--amqp URL]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

# rabbitmq_rate.py sits next to this file.
sys.path.insert(0, str(Path(__file__).parent))

console = Console()


def inc(x: int) -> int:
    return x + 1


def run_flat(client: Any, n: int) -> float:
    start = time.perf_counter()
    futures = client.map(inc, range(n), pure=False)
    results = client.gather(futures)
    elapsed = time.perf_counter() - start
    if results != list(range(1, n + 1)):
        raise SystemExit("wrong results")
    del futures
    return n / elapsed


def measure(client: Any, n: int, repeats: int, accounts: dict[str, float] | None = None) -> float:
    """Median tasks/s; with ``accounts``, fill it with the CPU seconds each kind of
    process spent over the timed runs, and their wall time (``"wall"``)."""
    run_flat(client, max(n // 10, 10))  # warm-up: imports, connections, first pickles
    before = cpu_by_role()
    start = time.perf_counter()
    rates = [run_flat(client, n) for _ in range(repeats)]
    if accounts is not None:
        accounts["wall"] = time.perf_counter() - start
        after = cpu_by_role()
        accounts.update({role: after[role] - before.get(role, 0.0) for role in after})
    return statistics.median(rates)


ROLES = ("scheduler + client", "workers", "RabbitMQ publisher child", "RabbitMQ broker")


def cpu_by_role() -> dict[str, float]:
    """CPU seconds (user + system) so far of this process (scheduler and client), its
    worker processes, the RabbitMQ sink's publisher child and the local broker."""
    import psutil

    totals = dict.fromkeys(ROLES, 0.0)

    def add(role: str, proc: Any) -> None:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            totals[role] += times.user + times.system

    me = psutil.Process()
    add("scheduler + client", me)
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            publisher = "sluice._amqp_process" in child.cmdline()
            add("RabbitMQ publisher child" if publisher else "workers", child)
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] == "beam.smp":
            add("RabbitMQ broker", proc)
    return totals


def bench_sluice(
    n: int,
    repeats: int,
    parts: tuple[str, ...],
    amqp: str,
    queue: str,
    accounts: dict[str, float] | None = None,
) -> Any:
    """tasks/s with the sinks named in ``parts`` (counter, json, eventlog, rabbitmq,
    rabbitmq-thread), and the RabbitMQ sink, to check what it delivered."""
    from sluice._tuning import tune_process
    from sluice.client import Client
    from sluice.deploy import LocalCluster

    tune_process()
    sinks: list[Any] = []
    rabbit = None
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp:
        event_log = Path(tmp) / "events.jsonl" if "eventlog" in parts else None
        if "counter" in parts:
            sinks.append("counter")
        if "json" in parts:
            sinks.append(f"json-log://{tmp}/events.json")
        for mode in ("rabbitmq", "rabbitmq-thread"):
            if mode in parts:
                from sluice.sinks.rabbitmq import RabbitMQ

                sep = "&" if "?" in amqp else "?"
                process = "false" if mode == "rabbitmq-thread" else "true"
                rabbit = RabbitMQ.from_url(
                    f"{amqp}{sep}queue={queue}&spool={Path(tmp) / 'spool'}&process={process}"
                )
                sinks.append(rabbit)
        cluster = LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, sinks=sinks, event_log=event_log
        )
        catch_up = 0.0
        with cluster, Client(cluster) as client:
            rate = measure(client, n, repeats, accounts)
            if rabbit is not None:
                # The sink may lag a busy scheduler (that is its job): how long after
                # the last result until the broker had confirmed everything.
                start = time.perf_counter()
                rabbit.wait_confirmed(600)
                catch_up = time.perf_counter() - start
        # The cluster is closed: every sink was drained and closed.
    return rate, rabbit, catch_up


def bench_dask(n: int, repeats: int, rabbit_host: str | None, queue: str) -> float:
    import dask
    from distributed import Client, LocalCluster

    dask.config.set({"distributed.worker.daemon": False})
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        if rabbit_host is not None:
            cluster.scheduler.add_plugin(_dask_docs_plugin(rabbit_host, queue))
        return measure(client, n, repeats)


def _dask_docs_plugin(host: str, queue: str) -> Any:
    """The RabbitMQ plugin of Dask's scheduler-plugin documentation, as written there."""
    import pika
    from distributed.diagnostics.plugin import SchedulerPlugin

    class RabbitMQPlugin(SchedulerPlugin):  # type: ignore[misc]
        def __init__(self) -> None:
            self.queue = queue
            self.connection = pika.BlockingConnection(pika.ConnectionParameters(host=host))
            self.channel = self.connection.channel()
            self.channel.queue_declare(queue=queue, durable=True)

        def transition(self, key: Any, start: str, finish: str, *args: Any, **kw: Any) -> None:
            message = {"key": key, "start": start, "finish": finish}
            self.channel.basic_publish(
                exchange="",
                routing_key=self.queue,
                body=json.dumps(message, default=str),
                properties=pika.BasicProperties(delivery_mode=2),
            )

        async def close(self) -> None:
            self.connection.close()

    return RabbitMQPlugin()


def print_accounts(accounts: dict[str, dict[str, float]], tasks: int) -> None:
    """Where the CPU went in the timed runs, and how busy that kept the machine."""
    cores = os.cpu_count() or 1
    table = Table(title=f"CPU seconds over the timed runs ({tasks:,} tasks), by process")
    table.add_column("")
    for label in accounts:
        table.add_column(label.replace(" (", "\n("), justify="right")
    table.add_row("wall time", *(f"{a['wall']:.1f}" for a in accounts.values()))
    for role in ROLES:
        table.add_row(role, *(f"{a[role]:.1f}" for a in accounts.values()))
    busy = [sum(a[r] for r in ROLES) / (a["wall"] * cores) for a in accounts.values()]
    table.add_row(f"busy share of the {cores} cores", *(f"{b:.0%}" for b in busy))
    console.print(table)
    labels = list(accounts)
    base = accounts[labels[0]]
    budget = base["wall"] / 0.85 * cores
    for label in labels[1:]:
        used = sum(accounts[label][r] for r in ROLES)
        console.print(
            f"{label}: {used:.1f} s of CPU in all. At 0.85x of the no-sink rate these tasks"
            f" would have {budget:.1f} s of CPU ({cores} cores x {budget / cores:.1f} s),"
            f" and the no-sink run alone used {sum(base[r] for r in ROLES):.1f} s of it."
        )


def queue_depth_and_delete(url: str, queue: str) -> int:
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        depth = channel.queue_declare(queue=queue, passive=True).method.message_count
        channel.queue_delete(queue=queue)
        return int(depth)
    finally:
        connection.close()


ALL = ("counter", "json", "eventlog")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 tasks, 1 repeat (CI smoke)")
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--rounds", type=int, default=1, help="run every cluster this many times, alternating"
    )
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    parser.add_argument("--rate-events", type=int, default=200_000)
    parser.add_argument(
        "--no-breakdown", action="store_true", help="skip the runs with one sink at a time"
    )
    args = parser.parse_args()
    n = 2_000 if args.quick else args.tasks
    repeats = 1 if args.quick else args.repeats
    try:
        import distributed  # noqa: F401
        import pika  # noqa: F401
    except ImportError:
        sys.exit("needs the bench and rabbitmq extras: pip install -e '.[bench,rabbitmq]'")
    import urllib.parse

    host = urllib.parse.urlsplit(args.amqp).hostname or "localhost"
    tag = uuid.uuid4().hex[:8]
    runs: list[tuple[str, tuple[str, ...]]] = [
        ("sluice, no sinks", ()),
        ("sluice, all sinks (defaults: RabbitMQ from a child process)", (*ALL, "rabbitmq")),
        ("sluice, all sinks (RabbitMQ from a thread)", (*ALL, "rabbitmq-thread")),
    ]
    if not args.no_breakdown:
        runs += [
            (f"sluice, {part} only", (part,))
            for part in ("counter", "json", "eventlog", "rabbitmq", "rabbitmq-thread")
        ]
    # Each round runs every cluster once, in the same order; a cluster's figure is
    # the median over rounds, so a slow minute of the shared machine weighs on one
    # round of each cluster rather than on one cluster.
    per_round: dict[str, list[float]] = {}
    accounts: dict[str, dict[str, float]] = {}
    delivered: list[tuple[str, dict[str, int], int, float]] = []
    dask_queue = f"dask-bench-{tag}"
    for r in range(args.rounds):
        tick = f" (round {r + 1} of {args.rounds})" if args.rounds > 1 else ""
        for i, (label, parts) in enumerate(runs):
            with console.status(f"{label}{tick}..."):
                queue = f"sluice-bench-{tag}-{r}-{i}"
                accounts[label] = {}  # the last round's
                rate, rabbit, catch_up = bench_sluice(
                    n, repeats, parts, args.amqp, queue, accounts[label]
                )
                per_round.setdefault(label, []).append(rate)
                if rabbit is not None:
                    depth = queue_depth_and_delete(args.amqp, queue)
                    delivered.append((f"{label}{tick}", rabbit.stats(), depth, catch_up))
        for label, plugin_host in (
            ("Dask, no plugin", None),
            ("Dask, RabbitMQ plugin from its docs", host),
        ):
            with console.status(f"{label}{tick}..."):
                rate = bench_dask(n, repeats, plugin_host, dask_queue)
                per_round.setdefault(label, []).append(rate)
        queue_depth_and_delete(args.amqp, dask_queue)
    rates = {label: statistics.median(values) for label, values in per_round.items()}

    table = Table(title=f"sinks: {n:,} independent inc, 2 worker processes x 1 thread")
    table.add_column("cluster")
    table.add_column("tasks/s", justify="right")
    table.add_column("vs no sinks", justify="right")
    base = rates["sluice, no sinks"]
    for label, rate in rates.items():
        vs = f"{rate / base:.2f}x" if label.startswith("sluice") else ""
        table.add_row(label, f"{rate:,.0f}", vs)
    console.print(table)
    runtime = base / rates["Dask, no plugin"]
    dask_rabbit = rates["Dask, RabbitMQ plugin from its docs"]
    ratios = Table(title="ratios")
    ratios.add_column("measure")
    ratios.add_column("value", justify="right")
    ratios.add_column("target", justify="right")
    for label, _ in runs[1:3]:
        ratios.add_row(f"{label} / no sinks", f"{rates[label] / base:.2f}x", ">= 0.85x")
    ratios.add_row("runtime ratio: sluice / Dask (no sinks, no plugin)", f"{runtime:.2f}x", "")
    # The target compares every sink on against Dask's one plugin; the RabbitMQ-only
    # runs (with the breakdown) give the like-for-like figure beside it.
    like_for_like = [label for label in rates if label.startswith("sluice, rabbitmq")]
    for label in [label for label, _ in runs[1:3]] + like_for_like:
        ratios.add_row(
            f"{label} / Dask with the RabbitMQ plugin",
            f"{rates[label] / dask_rabbit:.2f}x",
            f">= {runtime:.2f}x",
        )
    console.print(ratios)
    print_accounts({label: accounts[label] for label, _ in runs[:3]}, n * repeats)
    for label, stats, depth, catch_up in delivered:
        console.print(
            f"{label}: the sink published {stats['published']:,}, confirmed"
            f" {stats['confirmed']:,}, spooled {stats['spooled']:,}; the queue held {depth:,};"
            f" all confirmed {catch_up:.1f} s after the last result"
        )

    from rabbitmq_rate import LAZY_V2, measure_rate

    events = 20_000 if args.quick else args.rate_events
    for queue_args, what in ((None, "a default durable queue"), (LAZY_V2, "lazy, version 2")):
        with console.status(f"RabbitMQ sink sustained rate, {what}..."):
            rate = measure_rate(args.amqp, events, process=True, queue_args=queue_args)
        console.print(
            f"RabbitMQ sink sustained rate with confirms ({what}): {rate:,.0f} events/s (>= 15,000)"
        )


if __name__ == "__main__":
    main()
