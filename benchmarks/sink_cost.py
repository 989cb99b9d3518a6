"""What each built-in sink costs the scheduler's process, in CPU per event, with no cluster.

The cluster benchmarks (``sinks.py``) measure throughput on a machine whose cores
the scheduler shares with its workers, the RabbitMQ broker and the publisher
child, so their figures move with whatever else runs. This one isolates the part
that is sluice's own: the CPU that the sinks take in the process that publishes
the events.

It records the events of a real run once (a local cluster, ``--tasks``
independent ``inc``, event log on: 11 events per task), then, for each sink set,
publishes fresh copies of them on an :class:`~sluice.bus.EventBus` at about the
rate a busy scheduler makes them (``--rate`` events/s, in chunks every 5 ms),
drains the bus, and reads this process's CPU time (all its threads: the loop and
the sinks' threads; not the RabbitMQ child, the file sinks' child with
``process=true``, nor the broker). The figure is the
CPU per event above the same run with no sink. Each set runs ``--repeats``
times, interleaved, and the median is shown.

Run: ``.venv/bin/python benchmarks/sink_cost.py [--tasks 5000] [--repeats 3] [--amqp URL]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
from rich.console import Console
from rich.table import Table

console = Console()

SETS: dict[str, tuple[str, ...]] = {
    "none": (),
    "counter": ("counter",),
    "json-log to a file": ("json",),
    "event log": ("eventlog",),
    "RabbitMQ (child process)": ("rabbitmq",),
    "all four, file sinks in this process (process=false)": (
        "counter",
        "json",
        "eventlog",
        "rabbitmq",
    ),
    "all four, as the scheduler runs them (file sinks in a child)": (
        "counter",
        "json",
        "eventlog",
        "rabbitmq",
        "child",
    ),
}


def inc(x: int) -> int:
    return x + 1


def record(tasks: int, path: Path) -> list[dict[str, Any]]:
    """A real run's events, as dicts (fresh events are built from them for each run)."""
    from sluice.client import Client
    from sluice.deploy import LocalCluster
    from sluice.replay import read_events

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, event_log=path) as lc,
        Client(lc) as client,
    ):
        futures = client.map(inc, range(tasks), pure=False)
        client.gather(futures)
        del futures
    return [event.to_dict() for event in read_events(path)]


def make_sinks(parts: tuple[str, ...], tmp: Path, amqp: str, queue: str) -> list[Any]:
    from sluice.sinks.counter import Counter
    from sluice.sinks.eventlog import EventLog
    from sluice.sinks.jsonlog import JsonLog
    from sluice.sinks.registry import sinks_from_config

    sinks: list[Any] = []
    if "counter" in parts:
        sinks.append(Counter())
    if "child" in parts:
        # The two file sinks in one child process, as the scheduler builds them.
        sinks += sinks_from_config(
            "scheduler", [f"json-log://{tmp}/events.json", f"eventlog://{tmp}/events.jsonl"]
        )
    else:
        if "json" in parts:
            sinks.append(JsonLog(tmp / "events.json"))
        if "eventlog" in parts:
            sinks.append(EventLog(tmp / "events.jsonl"))
    if "rabbitmq" in parts:
        from sluice.sinks.rabbitmq import RabbitMQ

        sep = "&" if "?" in amqp else "?"
        sinks.append(RabbitMQ(f"{amqp}{sep}queue={queue}&spool={tmp / 'spool'}"))
    return sinks


async def publish_all(dicts: list[dict[str, Any]], sinks: list[Any], rate: float) -> float:
    """CPU seconds this process spent publishing ``dicts`` and draining them into ``sinks``."""
    from sluice.bus import EventBus
    from sluice.events import from_dict

    events = [from_dict(d) for d in dicts]  # fresh: no JSON cached from an earlier run
    chunk = max(1, int(rate * 0.005))
    async with EventBus() as bus:
        for sink in sinks:
            bus.subscribe(sink)
        start = time.process_time()
        due = time.monotonic()
        for i in range(0, len(events), chunk):
            bus.publish_many(events[i : i + chunk])
            due += chunk / rate
            await anyio.sleep(max(0.0, due - time.monotonic()))
        await bus.drain()
        used = time.process_time() - start
    return used


def delete_queue(url: str, queue: str) -> None:
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        connection.channel().queue_delete(queue=queue)
    finally:
        connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=5_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rate", type=float, default=30_000, help="events/s published")
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    parser.add_argument("--quick", action="store_true", help="1,000 tasks, 1 repeat")
    args = parser.parse_args()
    tasks, repeats = (1_000, 1) if args.quick else (args.tasks, args.repeats)
    from sluice._tuning import tune_process

    tune_process()
    with tempfile.TemporaryDirectory(prefix="sluice-sink-cost-") as tmp_name:
        tmp = Path(tmp_name)
        with console.status(f"recording a run of {tasks:,} tasks..."):
            dicts = record(tasks, tmp / "recorded.jsonl")
        cpu: dict[str, list[float]] = {name: [] for name in SETS}
        for repeat in range(repeats):
            for name, parts in SETS.items():
                with console.status(f"{name} ({repeat + 1}/{repeats})..."):
                    run_dir = tmp / f"{repeat}-{len(cpu[name])}-{'-'.join(parts) or 'none'}"
                    run_dir.mkdir()
                    queue = f"sluice-sink-cost-{uuid.uuid4().hex[:8]}"
                    sinks = make_sinks(parts, run_dir, args.amqp, queue)
                    try:
                        cpu[name].append(anyio.run(publish_all, dicts, sinks, args.rate))
                    finally:
                        if "rabbitmq" in parts:
                            delete_queue(args.amqp, queue)
    base = statistics.median(cpu["none"])
    table = Table(
        title=f"CPU of the publishing process per event ({len(dicts):,} events of a real"
        f" run, published at {args.rate:,.0f}/s; median of {repeats})"
    )
    table.add_column("sinks")
    table.add_column("CPU s", justify="right")
    table.add_column("us per event, above none", justify="right")
    for name, values in cpu.items():
        median = statistics.median(values)
        extra = "" if name == "none" else f"{(median - base) / len(dicts) * 1e6:.2f}"
        table.add_row(name, f"{median:.2f}", extra)
    console.print(table)


if __name__ == "__main__":
    main()
