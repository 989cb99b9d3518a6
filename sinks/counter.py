"""``counter``: counts task transitions, like the Counter plugin of Dask's docs.

The Dask documentation's first scheduler plugin counts ``processing -> memory``
transitions and resets on restart. This sink does the same from the bus, and
keeps a count of every (start, finish) pair, so a test or a preload script can
read how a run went without a plugin of its own.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

from sluice.events import Event, Restarted, TaskTransition
from sluice.sinks import Sink

__all__ = ("Counter",)


class Counter(Sink):
    """Counts transitions by ``(start, finish)``; ``count`` is processing -> memory.

    ``count`` only counts the scheduler's transitions (a worker's forwarded
    events have their own states); ``by_edge`` counts every source.
    Both reset on ``Restarted``.
    """

    name = "counter"
    kinds = frozenset({TaskTransition.kind, Restarted.kind})

    def __init__(self) -> None:
        self.count = 0
        self.by_edge: collections.Counter[tuple[str, str]] = collections.Counter()

    # async: counting is cheap, so it runs on the loop instead of hopping to a thread.
    async def write(self, batch: Sequence[Event]) -> None:
        by_edge = self.by_edge
        for event in batch:
            if type(event) is TaskTransition:
                by_edge[event.start, event.finish] += 1
                if (
                    event.start == "processing"
                    and event.finish == "memory"
                    and event.source == "scheduler"
                ):
                    self.count += 1
            elif type(event) is Restarted:
                self.count = 0
                by_edge.clear()


def sluice_setup(server: Any) -> None:
    """As a preload (``--preload sluice.sinks.counter``): count on ``server``'s bus."""
    server.add_sink(Counter())
