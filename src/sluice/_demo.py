"""``sluice demo``: a small pipeline on a local cluster, its event log, and a replay.

A scheduler and two worker processes (each under a nanny) start on this
machine; a client submits a pipeline (load, clean, sum in groups, total) whose
last step fails once, as a flaky upstream would, and is retried. The
scheduler writes its event log and a JSON log into the demo's folder (and, with
``--rabbitmq URL``, streams its task transitions to RabbitMQ); at the end the log is read
back and folded, and the replayed state is compared with the live scheduler's.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from sluice._core.scheduler_state import SchedulerState
from sluice._tuning import tune_process
from sluice.client import Client
from sluice.deploy import LocalCluster
from sluice.events import TaskTransition
from sluice.replay import read_events

N_WORKERS = 2


def load(i: int) -> float:
    """A record from the source (deterministic, so every run gives the same total)."""
    return random.Random(i).uniform(0, 100)


def clean(x: float) -> float:
    return round(x, 2)


def group_sum(*xs: float) -> float:
    return sum(xs)


def flaky_total(marker: str, *parts: float) -> float:
    """Fails on its first call, like an upstream API timing out once, then works.

    The marker file remembers the first try across worker processes (a retry
    may run on the other worker).
    """
    flag = Path(marker)
    if not flag.exists():
        flag.touch()
        raise ConnectionError("upstream API timed out (first try)")
    return round(sum(parts), 2)


def _snapshot(dask_scheduler: Any) -> dict[str, Any]:
    return dask_scheduler.state.snapshot()  # type: ignore[no-any-return]


def _live_run(
    n: int, folder: Path, console: Console, sinks: list[str]
) -> tuple[float, dict[str, Any], float]:
    """Run the pipeline; return (result, live snapshot, seconds)."""
    marker = folder / "flaky.marker"
    marker.unlink(missing_ok=True)
    cluster = LocalCluster(
        n_workers=N_WORKERS,
        threads_per_worker=1,
        processes=True,
        event_log=folder / "events.jsonl",
        sinks=sinks,
    )
    with cluster, Client(cluster) as client:
        start = time.perf_counter()
        loaded = client.map(load, range(n), key=[("load", i) for i in range(n)])
        cleaned = client.map(clean, loaded, key=[("clean", i) for i in range(n)])
        groups = [
            client.submit(group_sum, *cleaned[g : g + 10], key=("group-sum", g // 10))
            for g in range(0, n, 10)
        ]
        total = client.submit(flaky_total, str(marker), *groups, key="total", retries=2)
        everything = [*loaded, *cleaned, *groups, total]
        client.progress(everything, console=console, transient=True)
        result = total.result()
        elapsed = time.perf_counter() - start
        snapshot = client.run_on_scheduler(_snapshot)
    return result, snapshot, elapsed


def run_demo(*, out: Path | None, n: int, rabbitmq: str | None = None) -> int:
    """Run the demo; return the process exit code."""
    tune_process()  # as a server does at startup
    console = Console()
    folder = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="sluice-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / "events.jsonl"
    json_path = folder / "events.json"
    for old in [log_path, json_path, *folder.glob("events.jsonl.*")]:
        old.unlink(missing_ok=True)  # the demo's own logs from an earlier run
    sinks = [f"json-log:{json_path.resolve()}"]
    if rabbitmq is not None:
        sinks.append(rabbitmq)
    console.print(
        f"[bold]sluice demo[/]: {n} records through load -> clean -> group sums -> total,"
        f" on a local cluster of {N_WORKERS} worker processes"
    )
    result, live, elapsed = _live_run(n, folder, console, sinks)
    events = list(read_events(log_path))
    replayed = SchedulerState.from_events(events, until=live["seq"]).snapshot()
    same = replayed == live

    table = Table(title="live scheduler vs. replay of its event log")
    table.add_column("")
    table.add_column("live", justify="right")
    table.add_column("replayed", justify="right")
    table.add_row("at seq", str(live["seq"]), str(replayed["seq"]))
    table.add_row("workers", str(len(live["workers"])), str(len(replayed["workers"])))
    table.add_row("tasks known", str(len(live["tasks"])), str(len(replayed["tasks"])))
    for state in ("memory", "erred", "released"):
        table.add_row(f"tasks {state}", str(_count(live, state)), str(_count(replayed, state)))
    table.add_row("identical", "", "[green]yes[/]" if same else "[red]no[/]")
    console.print(table)
    story = [
        e
        for e in events
        if isinstance(e, TaskTransition) and e.key == "total" and e.source == "scheduler"
    ]
    console.print("story of 'total' (note the retry):")
    for e in story:
        why = f"  ({e.exception})" if e.exception else ""
        console.print(f"  seq {e.seq:>5}  {e.start} -> {e.finish}{why}")
    workers_seen = {e.source for e in events if e.source != "scheduler"}
    console.print(
        f"{len(events)} events ({len(workers_seen)} workers forwarding theirs);"
        f" result {json.dumps(result)} in {elapsed:.2f}s"
    )
    json_lines = sum(1 for _ in json_path.open("rb"))
    # soft_wrap: paths stay whole, to be copied from the terminal.
    console.print(f"event log: {log_path}", soft_wrap=True)
    console.print(f"JSON log:  {json_path} ({json_lines} lines, one per event)", soft_wrap=True)
    if rabbitmq is not None:
        console.print(
            f"RabbitMQ:  task transitions published to {_redact(rabbitmq)}", soft_wrap=True
        )
    console.print(
        f"next: [bold]sluice replay {log_path}[/] (summary),"
        f" [bold]--key total[/] (one task's story), [bold]--at SEQ[/] (the state at a seq)",
        soft_wrap=True,
    )
    if same:
        console.print("[green]replayed state == live state[/]")
        return 0
    console.print("[red]replayed state differs from the live state[/]")
    return 1


def _count(snapshot: dict[str, Any], state: str) -> int:
    return sum(1 for task in snapshot["tasks"].values() if task["state"] == state)


def _redact(url: str) -> str:
    """The URL without its password, for printing."""
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
