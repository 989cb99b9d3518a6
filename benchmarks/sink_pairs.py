"""Every built-in sink against no sinks, in pairs of back-to-back runs: a ratio a pair.

``sinks.py`` runs each cluster for a minute or more, one after the other, and on
a shared VM a cluster's speed moves by a third from one minute to the next: one
configuration's rounds in one run were 1.24x, 0.45x and 0.90x of the no-sink
rounds beside them. Here both sluice clusters, one with no sinks and one with
every built-in sink on (counter, a JSON log to a file, the event log, RabbitMQ),
are up at once in this process and take turns: one run of ``--tasks``
independent ``inc`` on each, the order swapped every pair, ``--pairs`` times.
Each pair gives the ratio of two runs seconds apart. Before every run, the sinks
catch up with the previous one (the bus drained, the file sinks' child through
its pipe, the broker's confirms in), so no run pays for another's work; a sink
that lags a run (the niced publisher child) still does its work after it, as in
``sinks.py``.

``--sinks``: ``defaults`` (the JSON log and the event log in the scheduler's
child for file sinks, RabbitMQ from its own child process), ``in-process`` (the
file sinks in the scheduler's process, ``sluice.scheduler.file-sinks-in-child:
false``) or ``thread`` (the defaults, but RabbitMQ from a thread of the
scheduler's process, ``process=false``). ``--pin`` starts a RabbitMQ node of the script's own on the
last core and runs the clusters on the others; ``--beside-broker`` then moves
the sinks' children to the broker's core (a scheduler machine with a core to
spare for them). Without ``--pin`` the shared broker at ``--amqp`` is used.

Run: ``.venv/bin/python benchmarks/sink_pairs.py [--pairs 10] [--tasks 10000]
[--sinks defaults|in-process|thread] [--pin [--beside-broker]]``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import cloudpickle
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))

import sinks as sinks_script
from sinks import (
    ALL,
    console,
    queue_depth_and_delete,
    run_flat,
    sluice_cluster,
    start_own_broker,
)

TARGET = 0.85

# The workers cannot import this directory: send them sinks.py's inc by value.
cloudpickle.register_pickle_by_value(sinks_script)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--sinks", choices=("defaults", "in-process", "thread"), default="defaults")
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    parser.add_argument(
        "--pin", action="store_true", help="a broker of this run's own on the last core"
    )
    parser.add_argument(
        "--beside-broker", action="store_true", help="with --pin: the sinks' children on its core"
    )
    parser.add_argument("--quick", action="store_true", help="2 pairs of 1,000 tasks (CI smoke)")
    args = parser.parse_args()
    if args.beside_broker and not args.pin:
        parser.error("--beside-broker needs --pin")
    if args.pairs < 1 or args.tasks < 10:
        parser.error("--pairs must be at least 1 and --tasks at least 10")
    pairs, n = (2, 1_000) if args.quick else (args.pairs, args.tasks)
    try:
        import pika  # noqa: F401
    except ImportError:
        sys.exit("needs the rabbitmq extra: pip install -e '.[rabbitmq]'")
    parts = (
        *ALL,
        "rabbitmq-thread" if args.sinks == "thread" else "rabbitmq",
        *(("in-process",) if args.sinks == "in-process" else ()),
    )
    where = ", children on the broker's core" if args.beside_broker else ""
    label = f"all sinks ({args.sinks}{where})"
    queue = f"sluice-bench-pairs-{uuid.uuid4().hex[:8]}"
    with contextlib.ExitStack() as stack:
        broker_cores = None
        if args.pin:
            with console.status("starting a RabbitMQ node of this run's own..."):
                args.amqp, broker_cores = start_own_broker(stack, policy=False, pin=True)
        with contextlib.ExitStack() as clusters:
            with console.status("starting the two clusters..."):
                bare = clusters.enter_context(sluice_cluster((), args.amqp, queue))
                sinks = clusters.enter_context(
                    sluice_cluster(
                        parts,
                        args.amqp,
                        queue,
                        publisher_cores=broker_cores if args.beside_broker else None,
                    )
                )
            rows = take_turns(bare, sinks, pairs, n)
            stats = sinks.rabbit.stats()
        # Both clusters are closed: the sink drained and closed, its queue is complete.
        depth = queue_depth_and_delete(args.amqp, queue)
    report(rows, label, n)
    console.print(
        f"RabbitMQ: the sink published {stats['published']:,} and had"
        f" {stats['confirmed']:,} confirmed before closing; the queue held {depth:,}"
    )


def take_turns(bare: Any, sinks: Any, pairs: int, n: int) -> list[tuple[float, float, float]]:
    """(no sinks, sinks, seconds the sinks took to catch up) tasks/s for each pair."""
    for cluster in (bare, sinks):  # imports, connections, first pickles
        run_flat(cluster.client, max(n // 10, 10))
        cluster.catch_up()
    rows: list[tuple[float, float, float]] = []
    for i in range(pairs):
        with console.status(f"pair {i + 1} of {pairs}..."):
            rate: dict[str, float] = {}
            lag = 0.0
            for cluster in (bare, sinks) if i % 2 == 0 else (sinks, bare):
                rate["sinks" if cluster is sinks else "bare"] = run_flat(cluster.client, n)
                start = time.perf_counter()
                cluster.catch_up()
                if cluster is sinks:
                    lag = time.perf_counter() - start
            rows.append((rate["bare"], rate["sinks"], lag))
    return rows


def report(rows: list[tuple[float, float, float]], label: str, n: int) -> None:
    table = Table(title=f"{label} against no sinks: {n:,} independent inc a run, in pairs")
    for column in ("pair", "no sinks, tasks/s", "all sinks, tasks/s", "ratio", "us added a task"):
        table.add_column(column, justify="right")
    table.add_column("sinks caught up after, s", justify="right")
    ratios = [s / b for b, s, _ in rows]
    added = [(1 / s - 1 / b) * 1e6 for b, s, _ in rows]
    for i, ((b, s, lag), ratio, us) in enumerate(zip(rows, ratios, added, strict=True)):
        cells = (f"{b:,.0f}", f"{s:,.0f}", f"{ratio:.2f}x", f"{us:.0f}", f"{lag:.1f}")
        table.add_row(str(i + 1), *cells)
    console.print(table)
    quartiles = (
        statistics.quantiles(ratios, n=4, method="inclusive")
        if len(ratios) > 1
        else [ratios[0]] * 3
    )
    met = sum(r >= TARGET for r in ratios)
    console.print(
        f"ratio: median {statistics.median(ratios):.2f}x (quartiles {quartiles[0]:.2f}x -"
        f" {quartiles[2]:.2f}x; {met} of {len(ratios)} pairs >= {TARGET}x); time added"
        f" to a task: median {statistics.median(added):.0f} us"
    )


if __name__ == "__main__":
    main()
