"""The scheduler's task lifecycle, as data.

``LEGAL_EDGES`` holds exactly the ``(start, finish)`` pairs the scheduler
emits; :meth:`SchedulerState.apply` rejects any other, so a log that does not
follow this diagram cannot be replayed silently. Docs draw the diagram from
this table (:func:`to_mermaid`), so it never drifts from the code.
"""

from __future__ import annotations

from typing import Final

__all__ = (
    "ACTIVE",
    "ERRED",
    "FORGOTTEN",
    "LEGAL_EDGES",
    "MEMORY",
    "NO_WORKER",
    "PROCESSING",
    "RELEASED",
    "SCHEDULER_STATES",
    "WAITING",
    "edges_from",
    "to_mermaid",
)

RELEASED: Final = "released"
WAITING: Final = "waiting"
NO_WORKER: Final = "no-worker"
PROCESSING: Final = "processing"
MEMORY: Final = "memory"
ERRED: Final = "erred"
FORGOTTEN: Final = "forgotten"

SCHEDULER_STATES: Final[tuple[str, ...]] = (
    RELEASED,
    WAITING,
    NO_WORKER,
    PROCESSING,
    MEMORY,
    ERRED,
    FORGOTTEN,
)

#: States of a task that still has to run: its dependencies' results are needed.
ACTIVE: Final[frozenset[str]] = frozenset({WAITING, NO_WORKER, PROCESSING})

LEGAL_EDGES: Final[frozenset[tuple[str, str]]] = frozenset(
    {
        (RELEASED, WAITING),  # needed by a client or by a dependent that must run
        (RELEASED, FORGOTTEN),  # nothing refers to it any more
        (WAITING, PROCESSING),  # every dependency in memory: sent to a worker
        (WAITING, NO_WORKER),  # ready, but there is no worker
        (WAITING, ERRED),  # a dependency failed
        (WAITING, RELEASED),  # nobody needs it any more
        (NO_WORKER, PROCESSING),  # a worker joined
        (NO_WORKER, RELEASED),  # nobody needs it any more
        (PROCESSING, MEMORY),  # the worker finished it
        (PROCESSING, ERRED),  # it raised and has no retries left
        (PROCESSING, WAITING),  # it raised; retried
        (PROCESSING, RELEASED),  # cancelled, its worker died or a dependency was lost
        (MEMORY, RELEASED),  # no longer needed, or its only replica was lost
        (ERRED, RELEASED),  # no longer referred to
    }
)


def edges_from(state: str) -> frozenset[str]:
    """The states a task in ``state`` may move to."""
    return frozenset(finish for start, finish in LEGAL_EDGES if start == state)


def to_mermaid() -> str:
    """The lifecycle as a Mermaid state diagram, for the docs."""
    lines = ["stateDiagram-v2"]
    order = {s: i for i, s in enumerate(SCHEDULER_STATES)}
    for start, finish in sorted(LEGAL_EDGES, key=lambda e: (order[e[0]], order[e[1]])):
        lines.append(f"    {start} --> {finish}")
    return "\n".join(lines)
