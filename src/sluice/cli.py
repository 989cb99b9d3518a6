"""The ``sluice`` command line (click).

Each subcommand lives in a module of its own and is attached here, so that
``sluice --help`` stays fast: heavy imports happen inside the commands.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from sluice import __version__
from sluice._cli_common import OneLineCommand, OneLineGroup
from sluice._cli_events import events
from sluice._cli_replay import replay
from sluice._cli_scheduler import scheduler
from sluice._cli_worker import worker

__all__ = ("main",)


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sluice")
def main() -> None:
    """sluice: a distributed task scheduler whose every task transition is an event."""


@main.command(cls=OneLineCommand)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the event log and JSON log (default: a new temporary folder).",
)
@click.option(
    "--tasks",
    type=click.IntRange(1, 100_000),
    default=200,
    show_default=True,
    help="Number of records the demo pipeline processes.",
)
@click.option(
    "--rabbitmq",
    "rabbitmq",
    metavar="URL",
    default=None,
    help="Also stream the task transitions to RabbitMQ, e.g."
    " 'amqp://guest:guest@127.0.0.1:5672/%2F?queue=sluice-demo'.",
)
def demo(out: Path | None, tasks: int, rabbitmq: str | None) -> None:
    """Run a small pipeline on an embedded cluster, then replay its event log.

    The event log (events.jsonl) and a JSON log (events.json) are written to
    --out (default: a new temporary folder, named at the end).
    """
    from sluice._demo import run_demo

    if rabbitmq is not None and not rabbitmq.startswith(("amqp://", "amqps://")):
        raise click.BadParameter("expected an amqp:// or amqps:// URL", param_hint="--rabbitmq")
    sys.exit(run_demo(out=out, n=tasks, rabbitmq=rabbitmq))


main.add_command(events)
main.add_command(replay)
main.add_command(scheduler)
main.add_command(worker)
