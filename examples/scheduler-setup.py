"""A scheduler preload with a command-line option of its own (the Dask docs' example).

    sluice scheduler --preload examples/scheduler-setup.py --print-count

prints each worker's address as it joins and, with ``--print-count``, how
many workers the scheduler has. ``flush=True``: the lines appear at once even
when the output is a pipe.
"""

from __future__ import annotations

from typing import Any

import click

from sluice.plugin import SchedulerPlugin


class MyPlugin(SchedulerPlugin):
    def __init__(self, print_count: bool) -> None:
        self.print_count = print_count
        SchedulerPlugin.__init__(self)

    def add_worker(self, scheduler: Any = None, worker: Any = None, **kwargs: Any) -> None:
        print("Added a new worker at:", worker, flush=True)
        if self.print_count and scheduler is not None:
            print("Total workers:", len(scheduler.workers), flush=True)


@click.command()
@click.option("--print-count/--no-print-count", default=False)
def dask_setup(scheduler: Any, print_count: bool) -> None:
    plugin = MyPlugin(print_count)
    scheduler.add_plugin(plugin)
