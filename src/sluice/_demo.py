"""``sluice demo``: a small pipeline, its event log, and a replay that matches it.

The network runtime is not there yet (issue 3), so the demo plays both the
scheduler server and its workers in this process: the decisions are made by
the real :class:`SchedulerState`, every event goes through a real
:class:`EventBus` to the real sinks (event log, counter, error logger), and the
"workers" run each task's function right here. At the end the log is read back
and folded, and the replayed state is compared with the live one.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sluice._core.commands import AddClient, AddWorker, UpdateGraph
from sluice._core.messages import ComputeTaskMsg, TaskErredMsg, TaskFinishedMsg
from sluice._core.scheduler_state import SchedulerState
from sluice._tuning import tune_process
from sluice.bus import EventBus
from sluice.events import Event, Key, TaskTransition
from sluice.replay import read_events
from sluice.sinks.counter import Counter
from sluice.sinks.errors import ErrorLogger
from sluice.sinks.eventlog import EventLog

WORKERS = ("inproc://worker-1", "inproc://worker-2")
CLIENT = "demo-client"


class FlakyOnce:
    """Fails its first call, then works: the demo's task that is retried."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, parts: list[float]) -> float:
        self.calls += 1
        if self.calls == 1:
            raise ConnectionError("upstream API timed out (first try)")
        return sum(parts)


def build_pipeline(n: int) -> tuple[dict[Key, tuple[Callable[..., Any], tuple[Key, ...]]], Key]:
    """load -> clean per record, then sums in groups of 10, then a final total."""
    rng = random.Random(42)
    graph: dict[Key, tuple[Callable[..., Any], tuple[Key, ...]]] = {}
    for i in range(n):
        value = rng.uniform(0, 100)
        graph["load", i] = (lambda v=value: v, ())
        graph["clean", i] = (lambda x: round(x, 2), (("load", i),))
    groups: list[Key] = []
    for g, first in enumerate(range(0, n, 10)):
        deps = tuple(("clean", i) for i in range(first, min(first + 10, n)))
        key: Key = ("group-sum", g)
        graph[key] = (lambda *xs: sum(xs), deps)
        groups.append(key)
    graph["total"] = (FlakyOnce(), tuple(groups))
    return graph, "total"


def _run_task(fn: Callable[..., Any], deps: tuple[Key, ...], data: dict[Key, Any]) -> Any:
    args = [data[d] for d in deps]
    if isinstance(fn, FlakyOnce):
        return fn(args)
    return fn(*args)


async def _live_run(n: int, log_path: Path, console: Console) -> tuple[SchedulerState, Any, int]:
    graph, final = build_pipeline(n)
    state = SchedulerState()
    counter = Counter()
    errors = ErrorLogger()
    data: dict[Key, Any] = {}
    clock = time.time
    with Progress(
        TextColumn("[bold]pipeline"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        bar = progress.add_task("tasks", total=len(graph))

        def advance(event: Event) -> None:
            if (
                type(event) is TaskTransition
                and event.finish == "memory"
                and event.start == "processing"
            ):
                progress.advance(bar)

        async with EventBus(stamp=lambda e: state.record(e, now=clock())) as bus:
            bus.subscribe(EventLog(log_path, fsync="close", run_id=bus.run_id))
            bus.subscribe(counter)
            bus.subscribe(errors)
            bus.subscribe(advance, name="progress")
            todo: deque[ComputeTaskMsg] = deque()

            def handle(cmd: Any) -> None:
                _, messages = state.handle(cmd, now=clock(), emit=bus.publish)
                todo.extend(m for m in messages if isinstance(m, ComputeTaskMsg))

            for worker in WORKERS:
                handle(AddWorker(worker=worker, name=worker.rsplit("/", 1)[-1], nthreads=1))
            handle(AddClient(client=CLIENT))
            handle(
                UpdateGraph(
                    client=CLIENT,
                    keys=(final,),
                    dependencies={k: deps for k, (_, deps) in graph.items()},
                    retries={final: 2},
                    stimulus_id="demo-submit",
                )
            )
            while todo:
                msg = todo.popleft()
                fn, deps = graph[msg.key]
                start = time.perf_counter()
                try:
                    data[msg.key] = _run_task(fn, deps, data)
                except Exception as exc:
                    handle(
                        TaskErredMsg(
                            worker=msg.worker,
                            key=msg.key,
                            exception=repr(exc),
                            traceback=f"{type(exc).__name__}: {exc}",
                            duration=time.perf_counter() - start,
                            stimulus_id=f"task-erred-{msg.key}",
                        )
                    )
                else:
                    handle(
                        TaskFinishedMsg(
                            worker=msg.worker,
                            key=msg.key,
                            nbytes=64,
                            duration=time.perf_counter() - start,
                            stimulus_id=f"task-finished-{msg.key}",
                        )
                    )
                await anyio.sleep(0)  # let the sinks drain, as a server would between reads
    return state, data.get(final), counter.count


def run_demo(*, out: Path | None, n: int) -> int:
    """Run the demo; return the process exit code."""
    tune_process()  # as a server does at startup
    console = Console()
    folder = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="sluice-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / "events.jsonl"
    if log_path.exists():
        log_path.unlink()  # the demo's own file from an earlier run
    console.print(f"[bold]sluice demo[/]: {n} records, {len(WORKERS)} in-process workers")
    live, total, finished = anyio.run(_live_run, n, log_path, console)
    replayed = SchedulerState.from_events(read_events(log_path))
    same = replayed.snapshot() == live.snapshot()

    final = live.tasks.get("total")
    table = Table(title="live run vs. replay of its event log")
    table.add_column("")
    table.add_column("live", justify="right")
    table.add_column("replayed", justify="right")
    table.add_row("events (last seq)", str(live.seq), str(replayed.seq))
    table.add_row("workers", str(len(live.workers)), str(len(replayed.workers)))
    table.add_row("tasks known", str(len(live.tasks)), str(len(replayed.tasks)))
    table.add_row(
        "state of 'total'",
        final.state if final else "-",
        replayed.tasks["total"].state if "total" in replayed.tasks else "-",
    )
    console.print(table)
    story = [
        e
        for e in read_events(log_path)
        if isinstance(e, TaskTransition) and e.key == "total" and e.source == "scheduler"
    ]
    console.print("story of 'total' (note the retry):")
    for e in story:
        why = f"  ({e.exception})" if e.exception else ""
        console.print(f"  seq {e.seq:>5}  {e.start} -> {e.finish}{why}")
    console.print(f"tasks finished: {finished}; result: {json.dumps(total)}")
    console.print(f"event log: {log_path}")
    if same:
        console.print("[green]replayed state == live state[/]")
        console.print(
            "[dim]the network runtime (scheduler, workers, client over TCP) is issue 3;"
            " this demo drives the same state machine in-process.[/]"
        )
        return 0
    console.print("[red]replayed state differs from the live state[/]")
    return 1
