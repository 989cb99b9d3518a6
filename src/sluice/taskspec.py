"""What a task runs: a function, its arguments, and references to other tasks' results.

The scheduler never looks inside a task: a client turns each task into a
:class:`TaskSpec`, pickles it with cloudpickle, and the bytes travel through
the scheduler to the worker that runs it. The arguments may hold
:class:`KeyRef` placeholders (a future passed to ``submit``, a key named in a
Dask-style graph); the worker swaps them for the results they name. A nested
``TaskSpec`` inside the arguments is run inline, before the outer one, which
is how a Dask graph's nested task tuples are honoured.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

import attrs
import cloudpickle

from sluice.events import Key

__all__ = (
    "KeyRef",
    "TaskSpec",
    "dependencies",
    "dumps_spec",
    "from_dask_graph",
    "loads_spec",
    "run",
)


@attrs.frozen(slots=True)
class KeyRef:
    """Stands for the result of task ``key`` in a task's arguments."""

    key: Key


@attrs.frozen(slots=True)
class TaskSpec:
    """Call ``func(*args, **kwargs)`` once every KeyRef inside is resolved."""

    func: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = attrs.field(factory=dict)


def _identity(x: Any) -> Any:
    return x


def dumps_spec(spec: TaskSpec) -> bytes:
    """Bytes for the wire; functions defined in ``__main__`` travel by value."""
    return cloudpickle.dumps(spec, protocol=5)  # type: ignore[no-any-return]


def loads_spec(data: bytes) -> TaskSpec:
    spec = cloudpickle.loads(data)
    if not isinstance(spec, TaskSpec):
        raise TypeError(f"not a task spec: {type(spec).__name__}")
    return spec


def dependencies(spec: TaskSpec) -> set[Key]:
    """The keys a spec refers to, however deeply nested."""
    found: set[Key] = set()
    _collect(spec.args, found)
    _collect(spec.kwargs, found)
    return found


def _collect(obj: Any, found: set[Key]) -> None:
    kind = type(obj)
    if kind is KeyRef:
        found.add(obj.key)
    elif kind is TaskSpec:
        _collect(obj.args, found)
        _collect(obj.kwargs, found)
    elif kind in (tuple, list, set, frozenset):
        for item in obj:
            _collect(item, found)
    elif kind is dict:
        for item in obj.values():
            _collect(item, found)


def run(spec: TaskSpec, data: Mapping[Key, Any]) -> Any:
    """Run ``spec`` with the results in ``data`` standing in for its KeyRefs."""
    args = _resolve(spec.args, data)
    kwargs = _resolve(spec.kwargs, data) if spec.kwargs else {}
    return spec.func(*args, **kwargs)


def _resolve(obj: Any, data: Mapping[Key, Any]) -> Any:
    kind = type(obj)
    if kind is KeyRef:
        return data[obj.key]
    if kind is TaskSpec:
        return run(obj, data)
    if kind is tuple:
        return tuple([_resolve(x, data) for x in obj])
    if kind is list:
        return [_resolve(x, data) for x in obj]
    if kind is dict:
        return {k: _resolve(v, data) for k, v in obj.items()}
    if kind in (set, frozenset):
        return kind(_resolve(x, data) for x in obj)
    return obj


# -- Dask-style graphs ---------------------------------------------------------------


def _is_task(value: Any) -> bool:
    return type(value) is tuple and bool(value) and callable(value[0])


def _is_key(value: Any, graph: Mapping[Key, Any]) -> bool:
    try:
        return isinstance(value, Hashable) and value in graph
    except TypeError:  # a tuple holding something unhashable
        return False


def _convert(value: Any, graph: Mapping[Key, Any]) -> Any:
    if _is_key(value, graph):
        return KeyRef(value)
    if _is_task(value):
        return TaskSpec(value[0], tuple(_convert(a, graph) for a in value[1:]))
    if type(value) is list:
        return [_convert(v, graph) for v in value]
    return value


def from_dask_graph(graph: Mapping[Key, Any]) -> dict[Key, TaskSpec]:
    """Turn a Dask-style graph (``{key: (func, *args) | key | value}``) into specs.

    As in Dask: a tuple whose first item is callable is a task; an argument
    that is a key of the graph stands for that task's result; lists are
    walked; anything else is a literal. A value that is just another key is
    an alias; a plain value becomes a task returning it.
    """
    specs: dict[Key, TaskSpec] = {}
    for key, value in graph.items():
        if _is_task(value):
            specs[key] = _convert(value, graph)
        elif _is_key(value, graph) and value != key:
            specs[key] = TaskSpec(_identity, (KeyRef(value),))
        else:
            specs[key] = TaskSpec(_identity, (_convert(value, graph),))
    return specs
