"""The fields of a client's ``update-graph`` message, checked before anything is stored.

A peer that passed the handshake can still send fields of any shape (the chaos
suite's fuzzing does); a malformed graph must get an error reply naming the field
and change nothing in the scheduler.
"""

from __future__ import annotations

from typing import Any

from sluice.events import Key

__all__ = ("checked_graph",)


def _mapping(msg: dict[str, Any], field: str) -> dict[Any, Any]:
    value = msg.get(field) or {}
    if not isinstance(value, dict):
        raise ValueError(f"update-graph: {field!r} must be a map, not {type(value).__name__}")
    return value


def checked_graph(
    msg: dict[str, Any],
) -> tuple[dict[Key, Any], dict[Key, tuple[Key, ...]], dict[Key, Any], dict[Key, int]]:
    """The tasks, dependencies, priorities and retries of an ``update-graph`` message.

    Raises ``ValueError`` naming the field when one has the wrong shape, before
    anything is stored: a malformed graph gets an error reply and changes nothing.
    """
    tasks = _mapping(msg, "tasks")
    submitted = _mapping(msg, "dependencies")
    priority = _mapping(msg, "priority")
    retries = _mapping(msg, "retries")
    for key, spec in tasks.items():
        if not isinstance(spec, bytes):
            raise ValueError(f"update-graph: the spec of task {key!r} is not bytes")
    for key, deps in submitted.items():
        if deps is not None and not isinstance(deps, tuple | list):
            raise ValueError(f"update-graph: the dependencies of {key!r} are not a list")
    for key, value in priority.items():
        if type(value) not in (int, float):
            raise ValueError(f"update-graph: the priority of {key!r} is not a number")
    for key, value in retries.items():
        if type(value) is not int or value < 0:
            raise ValueError(f"update-graph: the retries of {key!r} are not an int >= 0")
    dependencies = {key: tuple(submitted.get(key) or ()) for key in tasks}
    for key, deps in submitted.items():
        dependencies.setdefault(key, tuple(deps or ()))
    return tasks, dependencies, priority, retries
