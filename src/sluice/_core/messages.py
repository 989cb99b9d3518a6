"""Typed messages that cross between the scheduler and worker state machines.

The state machines never send anything themselves: they return these values
and a server (or the pure test harness) delivers them. Scheduler -> worker
messages end in ``Msg`` and name the worker they are for; worker -> scheduler
messages name the worker they come from.

Every message carries the ``stimulus_id`` of the input that caused it, so a
key's story can be followed across processes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeAlias

import attrs

from sluice.events import Key


@attrs.frozen(kw_only=True)
class ComputeTaskMsg:
    """Scheduler -> worker: run ``key``; its dependencies live on ``who_has``."""

    worker: str
    key: Key
    who_has: Mapping[Key, tuple[str, ...]]
    priority: int = 0
    stimulus_id: str = ""


@attrs.frozen(kw_only=True)
class FreeKeysMsg:
    """Scheduler -> worker: forget these keys (cancel or drop their data)."""

    worker: str
    keys: tuple[Key, ...]
    stimulus_id: str = ""


@attrs.frozen(kw_only=True)
class TaskFinishedMsg:
    """Worker -> scheduler: ``key`` is in memory on ``worker``."""

    worker: str
    key: Key
    nbytes: int = 0
    duration: float = 0.0
    stimulus_id: str = ""


@attrs.frozen(kw_only=True)
class TaskErredMsg:
    """Worker -> scheduler: ``key`` raised; exception and traceback as text."""

    worker: str
    key: Key
    exception: str = ""
    traceback: str = ""
    duration: float = 0.0
    stimulus_id: str = ""


@attrs.frozen(kw_only=True)
class MissingDataMsg:
    """Worker -> scheduler: ``key`` was not found on any worker in its who_has.

    The scheduler drops those replicas and recomputes the key if needed.
    """

    worker: str
    key: Key
    errant_workers: tuple[str, ...] = ()
    stimulus_id: str = ""


@attrs.frozen(kw_only=True)
class KeyUpdatedMsg:
    """Scheduler -> client: a key the client wants reached a final state.

    ``state`` is ``"memory"`` (result on ``who_has``), ``"erred"`` (with exception
    text) or ``"forgotten"`` (the key is gone, e.g. after a restart).
    """

    client: str
    key: Key
    state: str
    who_has: tuple[str, ...] = ()
    exception: str | None = None
    traceback: str | None = None


SchedulerToWorker: TypeAlias = ComputeTaskMsg | FreeKeysMsg
WorkerToScheduler: TypeAlias = TaskFinishedMsg | TaskErredMsg | MissingDataMsg
Message: TypeAlias = SchedulerToWorker | WorkerToScheduler | KeyUpdatedMsg

__all__ = (
    "ComputeTaskMsg",
    "FreeKeysMsg",
    "KeyUpdatedMsg",
    "Message",
    "MissingDataMsg",
    "SchedulerToWorker",
    "TaskErredMsg",
    "TaskFinishedMsg",
    "WorkerToScheduler",
)
