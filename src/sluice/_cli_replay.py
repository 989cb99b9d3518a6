"""``sluice replay LOG``: what a recorded run did, read back from its event log.

A summary of the run (events by kind, the scheduler's final task states, the
workers, the failures), the state at any seq (``--at``), one key's story
(``--key``), as tables or as JSON (``--json``); or the recorded events
re-published into sinks (``--into SPEC``), e.g. to backfill a RabbitMQ queue
that missed a run. The sinks are given the recorded run's id, so RabbitMQ
message ids are those of the live run and consumers can drop what they had.
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path
from typing import Any

import click

from sluice._cli_common import OneLineCommand, parse_key

__all__ = ("replay",)


def _summary(events: list[Any], state: Any, header: dict[str, Any]) -> dict[str, Any]:
    kinds = collections.Counter(e.kind for e in events)
    task_states = collections.Counter(ts.state for ts in state.tasks.values())
    errors = [
        {"key": ts.key, "exception": ts.exception}
        for ts in state.tasks.values()
        if ts.state == "erred"
    ]
    return {
        "run_id": header.get("run_id"),
        "address": header.get("address"),
        "events": len(events),
        "last_seq": state.seq,
        "by_kind": dict(sorted(kinds.items())),
        "task_states": dict(sorted(task_states.items())),
        "workers": sorted(state.workers),
        "errors": errors,
    }


def _read_with_progress(
    log: Path, at: int | None, *, console: Any = None, threshold: int = 20_000_000
) -> list[Any]:
    """The log's events up to ``at``; a progress line on a terminal's stderr while a long
    log (``threshold`` bytes or more) is read: a million events take a few seconds."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn

    from sluice.replay import read_events

    size = sum(p.stat().st_size for p in [log, *sorted(log.parent.glob(log.name + ".*"))])
    console = console or Console(stderr=True)
    events: list[Any] = []
    if not console.is_terminal or size < threshold:
        for event in read_events(log):
            if at is not None and event.seq > at:
                break
            events.append(event)
        return events
    with Progress(
        TextColumn(f"reading {log.name}"),
        BarColumn(),
        TextColumn("{task.completed:,} events"),
        console=console,
        transient=True,
    ) as progress:
        bar = progress.add_task("read", total=None)
        for event in read_events(log):
            if at is not None and event.seq > at:
                break
            events.append(event)
            if len(events) % 10_000 == 0:
                progress.update(bar, completed=len(events))
    return events


def _concerns(event: Any, key: Any) -> bool:
    return (
        getattr(event, "key", None) == key
        or key in getattr(event, "keys", ())
        or key in getattr(event, "dependencies", {})
    )


def _story(events: list[Any], key: Any) -> list[dict[str, Any]]:
    return [e.to_dict() for e in events if _concerns(e, key)]


def _publish_into(
    specs: tuple[str, ...], events: list[Any], header: dict[str, Any], as_json: bool
) -> None:
    """Feed ``events`` to the sinks ``specs`` name, as the live run fed its own."""
    import time

    from sluice.replay import replay as drive
    from sluice.sinks.registry import SinkSpecError, sink_from_spec

    try:
        sinks = [sink_from_spec(spec) for spec in specs]
    except SinkSpecError as exc:
        raise click.ClickException(str(exc)) from None
    started = time.perf_counter()
    run_id = header.get("run_id") or "unknown-run"
    try:
        drive(events, *sinks, scheduler_view=False, run_id=run_id, address=header.get("address"))
    except Exception as exc:
        raise click.ClickException(
            f"replay into a sink failed: {type(exc).__name__}: {exc}"
        ) from None
    elapsed = time.perf_counter() - started
    report = []
    for spec, sink in zip(specs, sinks, strict=True):
        kinds = getattr(sink, "kinds", None)
        sent = sum(1 for e in events if kinds is None or e.kind in kinds)
        entry: dict[str, Any] = {"into": spec, "events": sent, "run_id": run_id}
        stats = getattr(sink, "stats", None)
        if callable(stats):
            entry["stats"] = stats()
        report.append(entry)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    for entry in report:
        click.echo(
            f"re-published {entry['events']} events of run {run_id} into {entry['into']}"
            f" in {elapsed:.2f}s"
            + (f" ({_stats_line(entry['stats'])})" if "stats" in entry else "")
        )


def _stats_line(stats: Any) -> str:
    if isinstance(stats, dict):
        return ", ".join(f"{k} {v}" for k, v in stats.items() if isinstance(v, (int, float, str)))
    return str(stats)


@click.command(
    "replay", cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.argument("log", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--at", "at", type=click.IntRange(min=0), default=None, help="Stop at this seq.")
@click.option("--key", "key", default=None, help="One key's story (JSON for tuples: '[\"x\", 1]').")
@click.option(
    "--into",
    "into",
    multiple=True,
    metavar="SPEC",
    help="Re-publish the events (up to --at, or of --key) into this sink, as --sink takes"
    " (repeatable): amqp://..., json-log:///path, eventlog:///path...",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def replay(
    log: Path, at: int | None, key: str | None, into: tuple[str, ...], as_json: bool
) -> None:
    """Summarise the run recorded in the event log LOG (and its rotated files)."""
    from sluice._core.scheduler_state import SchedulerState
    from sluice.replay import EventLogError, read_header

    try:
        header = read_header(log)
        events = _read_with_progress(log, at)
        state = SchedulerState.from_events(events)
    except FileNotFoundError:
        raise click.ClickException(f"no such event log: {log}") from None
    except (EventLogError, OSError) as exc:  # these name the file already
        raise click.ClickException(str(exc)) from None
    except ValueError as exc:  # from the fold: a seq gap, not the log of a whole run
        raise click.ClickException(f"{log}: {exc}") from None

    if into:
        selected = events
        if key is not None:
            wanted = parse_key(key)
            selected = [e for e in events if _concerns(e, wanted)]
        _publish_into(into, selected, header, as_json)
        return
    if key is not None:
        story = _story(events, parse_key(key))
        if not story:
            raise click.ClickException(f"key {key!r} does not appear in {log}")
        if as_json:
            click.echo(json.dumps(story, indent=2, default=str))
            return
        _print_story(key, story)
        return
    summary = _summary(events, state, header)
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
        return
    _print_summary(log, summary)


def _print_summary(log: Path, summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stdout)
    console.print(
        f"[bold]{log}[/]: run {summary['run_id']} at {summary['address']},"
        f" {summary['events']} events, last seq {summary['last_seq']}"
    )
    kinds = Table(title="events by kind")
    kinds.add_column("kind")
    kinds.add_column("count", justify="right")
    for kind, n in summary["by_kind"].items():
        kinds.add_row(kind, str(n))
    console.print(kinds)
    if summary["task_states"]:
        states = Table(title="tasks held by the scheduler, by state")
        states.add_column("state")
        states.add_column("tasks", justify="right")
        for name, n in summary["task_states"].items():
            states.add_row(name, str(n))
        console.print(states)
    else:
        console.print("tasks held by the scheduler: none (every task released)")
    console.print(f"workers: {', '.join(summary['workers']) or 'none'}")
    for error in summary["errors"]:
        console.print(f"[red]erred[/] {error['key']!r}: {error['exception']}")


def _print_story(key: str, story: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"story of {key}")
    for column in ("seq", "source", "event", "worker / detail"):
        table.add_column(column)
    for d in story:
        if d["kind"] == "task-transition":
            what = f"{d['start']} -> {d['finish']}"
            detail = d.get("worker") or d.get("exception") or ""
        else:
            what, detail = d["kind"], d.get("client", "")
        table.add_row(str(d["seq"]), d["source"], what, str(detail or ""))
    Console(file=sys.stdout).print(table)
