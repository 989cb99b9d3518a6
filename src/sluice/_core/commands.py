"""Inputs of the scheduler's state machine.

A server turns what arrives from the network (a client's graph, a worker
joining or leaving, ...) into one of these values and hands it to
:meth:`sluice._core.scheduler_state.SchedulerState.handle`. Worker reports
(:class:`~sluice._core.messages.TaskFinishedMsg` and friends) are accepted
as they are, so they are part of :data:`Command` too.

Commands are requests, not facts: the state machine may ignore one (a stale
report, an unknown worker). What it decides is recorded as events.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeAlias

import attrs

from sluice._core.messages import MissingDataMsg, TaskErredMsg, TaskFinishedMsg
from sluice.events import Key

__all__ = (
    "AddClient",
    "AddWorker",
    "Command",
    "ReleaseKeys",
    "RemoveClient",
    "RemoveWorker",
    "Restart",
    "UpdateGraph",
)


@attrs.frozen(kw_only=True, slots=True)
class AddWorker:
    """A worker registered; ready tasks may now run on it."""

    worker: str
    name: str = ""
    nthreads: int = 1
    memory_limit: int = 0
    stimulus_id: str = ""


@attrs.frozen(kw_only=True, slots=True)
class RemoveWorker:
    """A worker left or was lost: its running tasks and sole results must move."""

    worker: str
    reason: str = ""
    stimulus_id: str = ""


@attrs.frozen(kw_only=True, slots=True)
class AddClient:
    """A client connected."""

    client: str


@attrs.frozen(kw_only=True, slots=True)
class RemoveClient:
    """A client went away: every key it alone wanted is released."""

    client: str
    stimulus_id: str = ""


@attrs.frozen(kw_only=True, slots=True)
class UpdateGraph:
    """A client submitted tasks and wants ``keys``.

    ``dependencies`` maps every task of the submission to the keys it depends
    on (which are in the submission or already known). A task that already
    exists keeps its old definition. ``priority`` and ``retries`` are per task;
    absent means 0.
    """

    client: str
    keys: tuple[Key, ...]
    dependencies: Mapping[Key, tuple[Key, ...]]
    priority: Mapping[Key, int] = attrs.field(factory=dict)
    retries: Mapping[Key, int] = attrs.field(factory=dict)
    stimulus_id: str = ""


@attrs.frozen(kw_only=True, slots=True)
class ReleaseKeys:
    """A client no longer holds futures for ``keys``."""

    client: str
    keys: tuple[Key, ...]
    stimulus_id: str = ""


@attrs.frozen(kw_only=True, slots=True)
class Restart:
    """Forget every task (workers and clients stay)."""

    stimulus_id: str = ""


Command: TypeAlias = (
    AddWorker
    | RemoveWorker
    | AddClient
    | RemoveClient
    | UpdateGraph
    | ReleaseKeys
    | Restart
    | TaskFinishedMsg
    | TaskErredMsg
    | MissingDataMsg
)
