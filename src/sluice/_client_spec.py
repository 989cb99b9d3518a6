"""Turning ``submit``/``map`` calls into task keys and spec bytes, cheaply.

The costly part of submitting many tasks is pickling the function: cloudpickle
serialises a lambda or a function from ``__main__`` by value, every time. So the
function is pickled once per call of ``submit``/``map`` and each task's spec carries
those bytes in a :class:`_PackedSpec`, whose pickle is built from bytes already made
(the function's, and the task's arguments' cloudpickle). On the worker, unpickling a
packed spec rebuilds a plain :class:`~sluice.taskspec.TaskSpec`, so
:func:`sluice.taskspec.loads_spec` and the worker see nothing new; the function is
unpickled once per process thanks to a small cache keyed by its token.
"""

from __future__ import annotations

import hashlib
import pickle
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import cloudpickle

from sluice.events import Key
from sluice.taskspec import KeyRef, TaskSpec

__all__ = ("FunctionPack", "funcname", "pack_args", "replace_futures")

_SCALARS: frozenset[type] = frozenset({int, float, str, bytes, bool, type(None), complex})

_FUNC_CACHE: OrderedDict[str, Callable[..., Any]] = OrderedDict()
_FUNC_CACHE_SIZE = 128
_FUNC_CACHE_LOCK = threading.Lock()


def _load_func(token: str, data: bytes) -> Callable[..., Any]:
    with _FUNC_CACHE_LOCK:
        fn = _FUNC_CACHE.get(token)
        if fn is not None:
            _FUNC_CACHE.move_to_end(token)
            return fn
    fn = cloudpickle.loads(data)
    with _FUNC_CACHE_LOCK:
        _FUNC_CACHE[token] = fn
        while len(_FUNC_CACHE) > _FUNC_CACHE_SIZE:
            _FUNC_CACHE.popitem(last=False)
    return fn  # type: ignore[no-any-return]


def _build_spec(token: str, func_data: bytes, args_data: bytes) -> TaskSpec:
    """Unpickling entry point of a packed spec (runs on the worker)."""
    args, kwargs = cloudpickle.loads(args_data)
    return TaskSpec(_load_func(token, func_data), args, kwargs)


class _PackedSpec:
    """Pickles as a call to :func:`_build_spec`; never unpickles as itself."""

    __slots__ = ("args_data", "func_data", "token")

    def __init__(self, token: str, func_data: bytes, args_data: bytes) -> None:
        self.token = token
        self.func_data = func_data
        self.args_data = args_data

    def __reduce__(self) -> tuple[Any, ...]:
        return (_build_spec, (self.token, self.func_data, self.args_data))


def funcname(fn: Any) -> str:
    """The name Dask would use as a key prefix."""
    while hasattr(fn, "func") and not hasattr(fn, "__name__"):  # functools.partial
        fn = fn.func
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return "lambda" if name == "<lambda>" else str(name)


class FunctionPack:
    """A function pickled once, ready to stamp out the spec of each call of it."""

    __slots__ = ("data", "name", "token")

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.name = funcname(fn)
        try:
            self.data: bytes = cloudpickle.dumps(fn, protocol=5)
            self.token: str | None = hashlib.sha1(self.data, usedforsecurity=False).hexdigest()
        except Exception as exc:
            raise TypeError(f"cannot pickle the function {fn!r}: {exc}") from exc

    def spec(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[bytes, bytes]:
        """(spec bytes, argument bytes) of one call; the latter feeds the key's token."""
        args_data = pack_args(args, kwargs)
        token = self.token or ""
        spec = pickle.dumps(_PackedSpec(token, self.data, args_data), protocol=5)
        return spec, args_data

    def key(self, args_data: bytes | None, pure: bool) -> str:
        if pure and args_data is not None:
            h = hashlib.sha1(args_data, usedforsecurity=False)
            h.update((self.token or "").encode())
            return f"{self.name}-{h.hexdigest()[:32]}"
        return f"{self.name}-{uuid.uuid4().hex}"


def pack_args(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bytes:
    try:
        return cloudpickle.dumps((args, dict(kwargs)), protocol=5)  # type: ignore[no-any-return]
    except Exception as exc:
        raise TypeError(f"cannot pickle the task's arguments: {exc}") from exc


def replace_futures(obj: Any, deps: set[Key], future_type: type) -> Any:
    """``obj`` with each Future swapped for a KeyRef; their keys go into ``deps``."""
    kind = type(obj)
    if kind in _SCALARS:
        return obj
    if isinstance(obj, future_type):
        key: Key = obj.key  # type: ignore[attr-defined]
        deps.add(key)
        return KeyRef(key)
    if kind is tuple:
        return tuple([replace_futures(x, deps, future_type) for x in obj])
    if kind is list:
        return [replace_futures(x, deps, future_type) for x in obj]
    if kind is dict:
        return {k: replace_futures(v, deps, future_type) for k, v in obj.items()}
    if kind in (set, frozenset):
        return kind(replace_futures(x, deps, future_type) for x in obj)
    return obj
