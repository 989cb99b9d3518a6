"""``errors``: logs every task that fails, with its exception and traceback.

The sink form of the ErrorLogger plugin from Dask's docs: each transition into
``erred`` (scheduler) or ``error`` (worker) is logged at ERROR on the
``sluice.errors`` logger, so failures reach whatever handlers the service has
(console, JSON log) without a plugin of the user's own.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from sluice.events import Event, TaskTransition
from sluice.sinks import Sink

__all__ = ("ErrorLogger",)

logger = logging.getLogger("sluice.errors")

_FAILED_STATES = frozenset({"erred", "error"})


class ErrorLogger(Sink):
    """Logs each transition to ``erred``/``error``; keeps the last ``keep`` of them."""

    name = "errors"
    kinds = frozenset({TaskTransition.kind})

    def __init__(self, *, keep: int = 1000) -> None:
        self.keep = keep
        self.errors: list[TaskTransition] = []

    # Sync on purpose: logging handlers may block on I/O, so this runs in a thread.
    def write(self, batch: Sequence[Event]) -> None:
        for event in batch:
            if type(event) is TaskTransition and event.finish in _FAILED_STATES:
                where = f" on {event.worker}" if event.worker else ""
                detail = f"\n{event.traceback}" if event.traceback else ""
                logger.error(
                    "task %r erred%s (%s): %s%s",
                    event.key,
                    where,
                    event.source,
                    event.exception,
                    detail,
                )
                self.errors.append(event)
        if len(self.errors) > self.keep:
            del self.errors[: len(self.errors) - self.keep]


def sluice_setup(server: Any) -> None:
    """As a preload (``--preload sluice.sinks.errors``): log ``server``'s failed tasks."""
    server.add_sink(ErrorLogger())
