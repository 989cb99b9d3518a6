"""What the sinks cost the scheduler, against no sinks and against Dask, in one run.

Clusters of 2 worker processes x 1 thread run the same workload (``--tasks``
independent ``inc``, default 10,000; worker event forwarding on):

1. sluice with no sinks;
2. sluice with every built-in sink on, with their defaults: ``counter``, a JSON
   log to a file, the event log (``event_log=``, as ``--event-log``), both
   written from one child process (the scheduler's default), and RabbitMQ (a
   queue on the broker at ``--amqp``; the scheduler's own transitions, published
   from a child process); then the same with the RabbitMQ sink publishing from a
   thread (``process=false``), and with the JSON log and the event log in the
   scheduler's process (``sluice.scheduler.file-sinks-in-child: false``);
3. sluice with one sink at a time, to show where the cost is (skip with
   ``--no-breakdown``);
4. Dask distributed with no plugin;
5. Dask distributed with the RabbitMQ scheduler plugin from its documentation,
   which publishes from inside ``transition`` with a BlockingConnection.

6. sluice with no sinks and with every sink, with the workers' event forwarding
   off (``sluice.worker.forward-events: false``): the scheduler's bus then
   carries the scheduler's own transitions only, as a Dask scheduler plugin sees
   them, so the sinks write 5 events per task rather than 11 (skip with
   ``--no-forwarding-off``).

With ``--broker-policy`` the script starts a RabbitMQ node of its own on a spare
port (``tests/rabbitmq_node.py``; the shared broker is not touched), gives it the
policy ``{"queue-mode": "lazy", "queue-version": 2}`` for the benchmark's queues,
sluice's and Dask's alike, and runs everything against it: the broker-side setting
that cuts the broker's CPU per message by about 40% without changing how the
queue is declared (see ``docs/rabbitmq.md``). With ``--pin`` it starts
such a node on the machine's last core and runs every cluster (sluice's and Dask's,
the RabbitMQ publisher child included) on the other cores: the broker as if on a
machine of its own, so the ratios show what the sinks cost the cluster itself;
it adds runs with the sinks' children moved to the broker's core (as if the
scheduler's machine had a core to spare for them), with and without the workers'
events forwarded, and one with the file sinks in the scheduler's process and the
publisher child alone moved there.
The clusters then have one core fewer: compare ratios, not rates, with a run
without ``--pin``.

Figures are tasks/s from submission to the last result, the median of
``--repeats`` runs after a warm-up; with ``--rounds N`` every cluster runs N
times, alternating with the others, and the median of its rounds is shown.
The table gives the two ratios the sinks are held to: (2)/(1), the cost of the
sinks (target >= 0.85x), and (2)/(5) against the runtime ratio (1)/(4) (sluice
with its sinks must be ahead of Dask with its plugin by at least as much as
without). Because that second ratio weighs a cost against each runtime's own
speed, the script also prints the time each task took longer, in microseconds,
with the sinks and with Dask's plugin (on one saturated core, with ``--pin``, that
is their CPU a task), and the CPU one ``transition`` of Dask's plugin takes on its
own after each round (it follows how dear system calls are at the time). After
the clusters, the RabbitMQ sink's sustained publish rate with
confirms is measured on its own (``benchmarks/rabbitmq_rate.py``; target >=
15,000 events/s), and the queue the sluice run filled is checked to hold every
event the sink was given.

Run: ``.venv/bin/python benchmarks/sinks.py [--quick] [--repeats N] [--rounds N]
[--amqp URL] [--broker-policy] [--pin] [--no-breakdown] [--no-forwarding-off]``.
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


def move_publisher(cores: set[int], children: set[str]) -> None:
    """Run the sinks' children (every thread of them) on ``cores``: ``children`` names
    the modules they run, ``sluice._amqp_process`` and ``sluice.sinks._child``."""
    import psutil

    moved: set[str] = set()
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            found = children & set(child.cmdline())
            if found:
                for thread in child.threads():
                    with contextlib.suppress(OSError):
                        os.sched_setaffinity(thread.id, cores)
                moved |= found
    if moved != children:
        raise SystemExit(f"no child process running {sorted(children - moved)} to move")


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


ROLES = (
    "scheduler + client",
    "workers",
    "RabbitMQ publisher child",
    "file sinks' child",
    "RabbitMQ broker",
)
#: Processes of a RabbitMQ node; the broker's work is counted from its beam.smp.
ERLANG = frozenset({"beam.smp", "erl_child_setup", "epmd", "inet_gethost", "rabbitmq-server", "sh"})


def cpu_by_role() -> dict[str, float]:
    """CPU seconds (user + system) so far of this process (scheduler and client), its
    worker processes, the RabbitMQ sink's publisher child, the child of the file sinks
    with ``process=true`` and the local broker."""
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
            if child.name() in ERLANG:
                continue  # a broker node this script started (--broker-policy, --pin): below
            cmdline = child.cmdline()
            if "sluice._amqp_process" in cmdline:
                add("RabbitMQ publisher child", child)
            elif "sluice.sinks._child" in cmdline:
                add("file sinks' child", child)
            else:
                add("workers", child)
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] == "beam.smp":
            add("RabbitMQ broker", proc)
    return totals


def check_settings(cluster: Any, settings: dict[str, Any]) -> None:
    """Exit if the running cluster does not have ``settings``: a figure labelled with
    a configuration it did not run would be worse than none."""
    from sluice.sinks._child import ChildSink
    from sluice.sinks.eventlog import EventLog
    from sluice.sinks.jsonlog import JsonLog

    sinks = [sub.consumer for sub in cluster.scheduler.bus.subscriptions.values()]
    file_sinks = [s for s in sinks if isinstance(s, (ChildSink, EventLog, JsonLog))]
    in_child = settings["sluice.scheduler.file-sinks-in-child"]
    if file_sinks and any(isinstance(s, ChildSink) != in_child for s in file_sinks):
        raise SystemExit(f"the scheduler's file sinks are not where asked: {file_sinks}")


def check_forwarding(cluster: Any, forward: bool) -> None:
    """Exit unless the scheduler's bus got the workers' events exactly when asked
    (after a run: its history ring holds the last 10,000 events)."""
    forwarded = any(e.source != "scheduler" for e in cluster.scheduler.bus.history)
    if forwarded != forward:
        raise SystemExit(f"the workers' events {'were' if forwarded else 'were not'} forwarded")


class SinkCluster:
    """A running sluice cluster with the sinks of ``parts``, and its client."""

    def __init__(self, cluster: Any, client: Any, rabbit: Any) -> None:
        self.cluster = cluster
        self.client = client
        self.rabbit = rabbit  # the RabbitMQ sink, to check what it delivered

    def catch_up(self, timeout: float = 600) -> None:
        """Wait until every sink has done its work for the events so far: the bus
        drained, the file sinks' child through its pipe, the broker's confirms in."""
        from sluice.sinks._child import ChildSink

        bus = self.cluster.scheduler.bus
        self.cluster._portal.call(bus.drain)
        for sub in list(bus._subs.values()):
            if isinstance(sub.consumer, ChildSink):
                sub.consumer.flush()  # answered once the child wrote every batch before it
        if self.rabbit is not None:
            self.rabbit.wait_confirmed(timeout)


@contextlib.contextmanager
def sluice_cluster(
    parts: tuple[str, ...],
    amqp: str,
    queue: str,
    *,
    forward: bool = True,
    publisher_cores: set[int] | None = None,
) -> Any:
    """A :class:`SinkCluster` of 2 worker processes x 1 thread with the sinks named in
    ``parts`` (counter, json, eventlog, rabbitmq, rabbitmq-thread; in-process: the
    file sinks in the scheduler's process rather than its child). ``forward``:
    whether workers forward their events to the scheduler. ``publisher_cores``: the
    cores to move the sinks' children to."""
    import sluice.config
    from sluice._tuning import tune_process
    from sluice.client import Client
    from sluice.deploy import LocalCluster
    from sluice.sinks._child import ChildSink

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
        settings = {
            "sluice.worker.forward-events": forward,
            "sluice.scheduler.file-sinks-in-child": "in-process" not in parts,
        }
        # The settings go around the cluster's construction: a LocalCluster starts in
        # its constructor, and its workers take their configuration when spawned.
        with (
            sluice.config.set(settings),
            LocalCluster(
                n_workers=2, threads_per_worker=1, processes=True, sinks=sinks, event_log=event_log
            ) as cluster,
            Client(cluster) as client,
        ):
            check_settings(cluster, settings)
            if rabbit is not None and publisher_cores is not None:
                rabbit.start()  # idempotent: the child exists once this returns
                children = {"sluice._amqp_process"}
                for sub in cluster.scheduler.bus.subscriptions.values():
                    if isinstance(sub.consumer, ChildSink):
                        sub.consumer.start()  # idempotent, as rabbit.start()
                        children.add("sluice.sinks._child")
                move_publisher(publisher_cores, children)
            yield SinkCluster(cluster, client, rabbit)
        # The cluster is closed: every sink was drained and closed.


def bench_sluice(
    n: int,
    repeats: int,
    parts: tuple[str, ...],
    amqp: str,
    queue: str,
    accounts: dict[str, float] | None = None,
    *,
    forward: bool = True,
    publisher_cores: set[int] | None = None,
) -> Any:
    """tasks/s with the sinks named in ``parts`` (see :func:`sluice_cluster`), the
    RabbitMQ sink, how long after the last result the broker had confirmed all, and
    how many events the scheduler's bus spilled to disk for a sink that lagged."""
    catch_up = 0.0
    with sluice_cluster(
        parts, amqp, queue, forward=forward, publisher_cores=publisher_cores
    ) as running:
        rate = measure(running.client, n, repeats, accounts)
        check_forwarding(running.cluster, forward)
        if running.rabbit is not None:
            # The sink may lag a busy scheduler (that is its job): how long after
            # the last result until the broker had confirmed everything.
            start = time.perf_counter()
            running.rabbit.wait_confirmed(600)
            catch_up = time.perf_counter() - start
        subs = running.cluster.scheduler.bus.stats().values()
        spilled = sum(sub.get("spilled", 0) for sub in subs)
    return rate, running.rabbit, catch_up, spilled


def bench_dask(n: int, repeats: int, rabbit: tuple[str, int] | None, queue: str) -> float:
    import dask
    from distributed import Client, LocalCluster

    dask.config.set({"distributed.worker.daemon": False})
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        if rabbit is not None:
            cluster.scheduler.add_plugin(_dask_docs_plugin(*rabbit, queue))
        return measure(client, n, repeats)


def _dask_docs_plugin(host: str, port: int, queue: str) -> Any:
    """The RabbitMQ plugin of Dask's scheduler-plugin documentation, as written there
    (with the broker's port, which the docs leave at its default)."""
    import pika
    from distributed.diagnostics.plugin import SchedulerPlugin

    class RabbitMQPlugin(SchedulerPlugin):  # type: ignore[misc]
        def __init__(self) -> None:
            self.queue = queue
            self.connection = pika.BlockingConnection(
                pika.ConnectionParameters(host=host, port=port)
            )
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


def docs_plugin_publish_cpu(host: str, port: int, queue: str, n: int = 10_000) -> float:
    """Microseconds of CPU one ``transition`` of Dask's docs plugin takes, outside Dask.

    It is three socket writes and a poll a message, so what it costs follows how
    dear system calls are on the machine at the time, which on this shared machine
    changes from hour to hour; the run prints it beside the ratios.
    """
    plugin = _dask_docs_plugin(host, port, queue)
    try:
        start = time.process_time()
        for i in range(n):
            plugin.transition(f"inc-{i}", "processing", "memory")
        return (time.process_time() - start) / n * 1e6
    finally:
        plugin.channel.queue_delete(queue=queue)
        plugin.connection.close()


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


def print_added_time(rates: dict[str, float], bases: dict[str, str]) -> None:
    """What each task took longer with the sinks, and with Dask's plugin, in microseconds.

    The two ratios the target sets compare costs relative to each runtime's own
    speed, so a plugin of a fixed cost weighs four to nine times less on Dask than
    the same cost on sluice. The added time per task is the cost itself; with
    ``--pin`` the cluster's one core is saturated, so it is CPU per task.
    """
    table = Table(title="time each task took longer (1/rate - 1/rate without), microseconds")
    table.add_column("cluster")
    table.add_column("against")
    table.add_column("us a task", justify="right")
    pairs = [*bases.items(), ("Dask, RabbitMQ plugin from its docs", "Dask, no plugin")]
    for label, base in pairs:
        added = 1e6 / rates[label] - 1e6 / rates[base]
        table.add_row(label, base, f"{added:,.0f}")
    console.print(table)


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
NO_SINKS = "sluice, no sinks"
NO_SINKS_OWN = "sluice, no sinks, workers' events not forwarded"
DEFAULTS = "sluice, all sinks (defaults: the file sinks' child and RabbitMQ's)"
BESIDE_BROKER = "sluice, all sinks (both children on the broker's core)"
IN_PROCESS = "sluice, all sinks, file sinks in the scheduler's process"
BESIDE_BROKER_IN_PROCESS = (
    "sluice, all sinks, file sinks in the scheduler's process (publisher child on the"
    " broker's core)"
)
BESIDE_BROKER_OWN = (
    "sluice, all sinks, workers' events not forwarded (both children on the broker's core)"
)


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
    parser.add_argument(
        "--no-forwarding-off",
        action="store_true",
        help="skip the runs with the workers' event forwarding off",
    )
    parser.add_argument(
        "--broker-policy",
        action="store_true",
        help="run against a RabbitMQ node of the script's own with a lazy, version 2 policy",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="run against a RabbitMQ node of the script's own on the last core, and every"
        " cluster (scheduler, client, workers, publisher child) on the other cores",
    )
    args = parser.parse_args()
    args.broker_cores = None
    with contextlib.ExitStack() as stack:
        if args.broker_policy or args.pin:
            with console.status("starting a RabbitMQ node of this run's own..."):
                args.amqp, args.broker_cores = start_own_broker(
                    stack, policy=args.broker_policy, pin=args.pin
                )
        run_all(args)


#: The queue settings RabbitMQ 3.13 gives classic queues by default, as a policy.
POLICY = '{"queue-mode": "lazy", "queue-version": 2}'


def start_own_broker(
    stack: contextlib.ExitStack, *, policy: bool, pin: bool
) -> tuple[str, set[int] | None]:
    """A RabbitMQ node of this script's own (the shared one is never changed): its URL,
    and with ``pin`` the cores it runs on.

    ``policy``: the benchmark queues are lazy, version 2. ``pin``: the node runs on
    the last core and this process, with whatever it starts from now on, on the
    others, as if the broker had a machine of its own.
    """
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    import psutil

    from rabbitmq_node import RabbitNode

    base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sluice-bench-broker-")))
    node = stack.enter_context(RabbitNode(base))
    what = [f"RabbitMQ node of this run: {node.url}"]
    broker_cores: set[int] | None = None
    if policy:
        node.rabbitmqctl(
            "set_policy", "--apply-to", "queues", "bench-lazy-v2", "^(sluice|dask)-bench-", POLICY
        )
        what.append(f"policy {POLICY} on the benchmark queues")
    if pin:
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < 2:
            sys.exit("--pin needs at least 2 cores")
        broker_cores, cluster_cores = {cores[-1]}, set(cores[:-1])
        me = psutil.Process()
        for proc in me.children(recursive=True):
            for thread in proc.threads():  # affinity is per thread; Erlang's exist by now
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(thread.id, broker_cores)
        for thread in me.threads():
            os.sched_setaffinity(thread.id, cluster_cores)
        what.append(f"on core {cores[-1]}; the clusters on {sorted(cluster_cores)}")
    console.print(", ".join(what))
    return str(node.url), broker_cores


def run_all(args: argparse.Namespace) -> None:
    n = 2_000 if args.quick else args.tasks
    repeats = 1 if args.quick else args.repeats
    try:
        import distributed  # noqa: F401
        import pika  # noqa: F401
    except ImportError:
        sys.exit("needs the bench and rabbitmq extras: pip install -e '.[bench,rabbitmq]'")
    import urllib.parse

    split = urllib.parse.urlsplit(args.amqp)
    broker = (split.hostname or "localhost", split.port or 5672)
    tag = uuid.uuid4().hex[:8]
    # (label, sinks, whether workers forward their events)
    runs: list[tuple[str, tuple[str, ...], bool]] = [
        (NO_SINKS, (), True),
        (DEFAULTS, (*ALL, "rabbitmq"), True),
        ("sluice, all sinks (RabbitMQ from a thread)", (*ALL, "rabbitmq-thread"), True),
        (IN_PROCESS, (*ALL, "rabbitmq", "in-process"), True),
    ]
    if args.pin:
        runs.append((BESIDE_BROKER, (*ALL, "rabbitmq"), True))
        runs.append((BESIDE_BROKER_IN_PROCESS, (*ALL, "rabbitmq", "in-process"), True))
    if not args.no_forwarding_off:
        runs += [
            (NO_SINKS_OWN, (), False),
            ("sluice, all sinks, workers' events not forwarded", (*ALL, "rabbitmq"), False),
        ]
        if args.pin:
            runs.append((BESIDE_BROKER_OWN, (*ALL, "rabbitmq"), False))
    if not args.no_breakdown:
        runs += [
            (f"sluice, {part} only", (part,), True)
            for part in ("counter", "json", "eventlog", "rabbitmq", "rabbitmq-thread")
        ]
    # Each round runs every cluster once, in the same order; a cluster's figure is
    # the median over rounds, so a slow minute of the shared machine weighs on one
    # round of each cluster rather than on one cluster.
    per_round: dict[str, list[float]] = {}
    publish_cpu: list[float] = []  # Dask's docs plugin outside Dask, us a transition
    accounts: dict[str, dict[str, float]] = {}
    delivered: list[tuple[str, dict[str, int], int, float, int]] = []
    dask_queue = f"dask-bench-{tag}"
    for r in range(args.rounds):
        tick = f" (round {r + 1} of {args.rounds})" if args.rounds > 1 else ""
        for i, (label, parts, forward) in enumerate(runs):
            with console.status(f"{label}{tick}..."):
                queue = f"sluice-bench-{tag}-{r}-{i}"
                accounts[label] = {}  # the last round's
                rate, rabbit, catch_up, spilled = bench_sluice(
                    n,
                    repeats,
                    parts,
                    args.amqp,
                    queue,
                    accounts[label],
                    forward=forward,
                    publisher_cores=(
                        args.broker_cores
                        if label in (BESIDE_BROKER, BESIDE_BROKER_IN_PROCESS, BESIDE_BROKER_OWN)
                        else None
                    ),
                )
                per_round.setdefault(label, []).append(rate)
                if rabbit is not None:
                    depth = queue_depth_and_delete(args.amqp, queue)
                    stats = rabbit.stats()
                    delivered.append((f"{label}{tick}", stats, depth, catch_up, spilled))
        for label, plugin_broker in (
            ("Dask, no plugin", None),
            ("Dask, RabbitMQ plugin from its docs", broker),
        ):
            with console.status(f"{label}{tick}..."):
                rate = bench_dask(n, repeats, plugin_broker, dask_queue)
                per_round.setdefault(label, []).append(rate)
        queue_depth_and_delete(args.amqp, dask_queue)
        publish_cpu.append(docs_plugin_publish_cpu(*broker, f"{dask_queue}-alone"))
    rates = {label: statistics.median(values) for label, values in per_round.items()}

    # Each sluice cluster is held against the no-sink cluster with the same forwarding.
    base_of = {label: NO_SINKS if forward else NO_SINKS_OWN for label, _, forward in runs}
    table = Table(title=f"sinks: {n:,} independent inc, 2 worker processes x 1 thread")
    table.add_column("cluster")
    table.add_column("tasks/s", justify="right")
    table.add_column("vs no sinks", justify="right")
    # Each round's figures too: on a shared machine one cluster's rate moves by a
    # third within the hour, and the spread says how much a median can be trusted.
    table.add_column("each round, tasks/s", justify="right")
    table.add_column("each round, vs no sinks", justify="right")
    for label, rate in rates.items():
        vs = f"{rate / rates[base_of[label]]:.2f}x" if label in base_of else ""
        each = " / ".join(f"{r:,.0f}" for r in per_round[label])
        each_vs = ""
        if label in base_of:
            pairs = zip(per_round[label], per_round[base_of[label]], strict=True)
            each_vs = " / ".join(f"{r / b:.2f}x" for r, b in pairs)
        table.add_row(label, f"{rate:,.0f}", vs, each, each_vs)
    console.print(table)
    dask_rabbit = rates["Dask, RabbitMQ plugin from its docs"]
    ratios = Table(title="ratios")
    ratios.add_column("measure")
    ratios.add_column("value", justify="right")
    ratios.add_column("target", justify="right")
    all_sinks = [label for label, parts, _ in runs if "counter" in parts and len(parts) > 1]
    for label in all_sinks:
        ratios.add_row(
            f"{label} / {base_of[label]}",
            f"{rates[label] / rates[base_of[label]]:.2f}x",
            ">= 0.85x",
        )
    runtime = {
        base: rates[base] / rates["Dask, no plugin"]
        for base in (NO_SINKS, NO_SINKS_OWN)
        if base in rates
    }
    for base, ratio in runtime.items():
        ratios.add_row(f"runtime ratio: {base} / Dask, no plugin", f"{ratio:.2f}x", "")
    # The target compares every sink on against Dask's one plugin; the RabbitMQ-only
    # runs (with the breakdown) give the like-for-like figure beside it.
    like_for_like = [label for label in rates if label.startswith("sluice, rabbitmq")]
    for label in all_sinks + like_for_like:
        ratios.add_row(
            f"{label} / Dask with the RabbitMQ plugin",
            f"{rates[label] / dask_rabbit:.2f}x",
            f">= {runtime[base_of[label]]:.2f}x",
        )
    console.print(ratios)
    print_added_time(rates, {label: base_of[label] for label in all_sinks})
    console.print(
        "Dask's docs plugin alone, outside Dask, after each round: "
        + ", ".join(f"{us:.0f}" for us in publish_cpu)
        + " us of CPU a transition (three socket writes and a poll each)"
    )
    for base in runtime:
        group = [base, *(label for label in all_sinks if base_of[label] == base)]
        print_accounts({label: accounts[label] for label in group}, n * repeats)
    for label, stats, depth, catch_up, spilled in delivered:
        console.print(
            f"{label}: the sink published {stats['published']:,}, confirmed"
            f" {stats['confirmed']:,}, spooled {stats['spooled']:,}; the queue held {depth:,};"
            f" all confirmed {catch_up:.1f} s after the last result; the scheduler's bus"
            f" spilled {spilled:,} events to disk"
        )

    from rabbitmq_rate import LAZY_V2, measure_rate

    events = 20_000 if args.quick else args.rate_events
    queues: list[tuple[dict[str, Any] | None, str]] = [
        (None, "a default durable queue"),
        (LAZY_V2, "lazy, version 2"),
    ]
    if args.broker_policy:
        # The node's policy makes every benchmark queue lazy, version 2.
        queues = [(None, "a default durable queue under the lazy, version 2 policy")]
    for queue_args, what in queues:
        with console.status(f"RabbitMQ sink sustained rate, {what}..."):
            rate = measure_rate(args.amqp, events, process=True, queue_args=queue_args)
        console.print(
            f"RabbitMQ sink sustained rate with confirms ({what}): {rate:,.0f} events/s (>= 15,000)"
        )


if __name__ == "__main__":
    main()
