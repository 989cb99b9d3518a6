"""Inputs and outputs of one worker's state machine.

The worker server turns what happens around it (a scheduler message, a task
function returning or raising in the thread pool, a peer answering a data
request) into one of the *commands* below and hands it to
:meth:`sluice._core.worker_state.WorkerState.handle`. The state machine
answers with *instructions*: things the server must do (run a function, ask a
peer for data, drop values) and messages for the scheduler.

Data values never enter the state machine, only their sizes: the server keeps
the values in ``worker.data`` and uses the returned events to know which ones
to keep (a value is stored when its key goes ``-> memory``).

Commands are requests, not facts: a stale or duplicate one is ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeAlias

import attrs

from sluice._core.messages import (
    ComputeTaskMsg,
    FreeKeysMsg,
    MissingDataMsg,
    TaskErredMsg,
    TaskFinishedMsg,
)
from sluice.events import Key

__all__ = (
    "Execute",
    "ExecuteFailure",
    "ExecuteSuccess",
    "GatherDep",
    "GatherDepFailure",
    "GatherDepSuccess",
    "Instruction",
    "ReleaseData",
    "SecedeTask",
    "WorkerCommand",
)


# -- commands (server -> state machine) -------------------------------------


@attrs.frozen(kw_only=True, slots=True)
class ExecuteSuccess:
    """The function of ``key`` returned; its result is ``nbytes`` large.

    Accepted only while ``key`` is executing (or long-running): a result for a
    task that was cancelled meanwhile is discarded.
    """

    key: Key
    nbytes: int = 0
    duration: float = 0.0
    stimulus_id: str = ""


@attrs.frozen(kw_only=True, slots=True)
class ExecuteFailure:
    """The function of ``key`` raised; exception and traceback as text."""

    key: Key
    exception: str = ""
    traceback: str = ""
    duration: float = 0.0
    stimulus_id: str = ""


@attrs.frozen(kw_only=True, slots=True)
class GatherDepSuccess:
    """Peer ``worker`` sent the values of these keys (key -> size in bytes).

    Keys that were asked for but are absent from the reply must be reported by
    the server with :class:`GatherDepFailure`, so each reply is unambiguous.
    """

    worker: str
    nbytes: Mapping[Key, int]
    stimulus_id: str = ""


@attrs.frozen(kw_only=True, slots=True)
class GatherDepFailure:
    """Peer ``worker`` could not be reached, or does not hold these keys."""

    worker: str
    keys: tuple[Key, ...]
    stimulus_id: str = ""


@attrs.frozen(kw_only=True, slots=True)
class SecedeTask:
    """The task called ``secede()``: it keeps running but gives up its thread."""

    key: Key
    stimulus_id: str = ""


WorkerCommand: TypeAlias = (
    ComputeTaskMsg
    | FreeKeysMsg
    | ExecuteSuccess
    | ExecuteFailure
    | GatherDepSuccess
    | GatherDepFailure
    | SecedeTask
)


# -- instructions (state machine -> server) ---------------------------------


@attrs.frozen(kw_only=True, slots=True)
class Execute:
    """Run the function of ``key`` in the thread pool.

    Its dependencies are all in ``worker.data`` when this is given.
    """

    key: Key
    stimulus_id: str = ""


@attrs.frozen(kw_only=True, slots=True)
class GatherDep:
    """Ask peer ``worker`` for the values of ``keys``; answer with GatherDep*."""

    worker: str
    keys: tuple[Key, ...]
    stimulus_id: str = ""


@attrs.frozen(kw_only=True, slots=True)
class ReleaseData:
    """Delete the values of ``keys`` from ``worker.data``: they left memory."""

    keys: tuple[Key, ...]
    stimulus_id: str = ""


Instruction: TypeAlias = (
    Execute | GatherDep | ReleaseData | TaskFinishedMsg | TaskErredMsg | MissingDataMsg
)
