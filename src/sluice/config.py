"""Configuration: defaults, YAML files, environment variables, and ``set()``.

Keys are dotted paths such as ``"sluice.worker.forward-events"``; ``_`` and
``-`` are the same inside a key. Later sources win:

1. the defaults below;
2. YAML files in ``/etc/sluice/``, then ``~/.config/sluice/``, then
   ``$SLUICE_CONFIG`` (a file or a folder);
3. environment variables: ``SLUICE_WORKER__FORWARD_EVENTS=false`` sets
   ``sluice.worker.forward-events``; a double underscore nests, values are read
   as YAML (so ``false``, ``3``, ``[a, b]`` have their types);
4. :func:`set`, as a plain call or as a context manager that undoes itself.

Child processes (a nanny's worker) get what :func:`set` changed through the
environment (:func:`child_environment`), so configuration set in a script
reaches the workers it starts.
"""

from __future__ import annotations

import copy
import json
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

__all__ = (
    "DEFAULTS",
    "ConfigError",
    "child_environment",
    "get",
    "refresh",
    "set",
)

#: Every key sluice reads, with its default.
DEFAULTS: dict[str, Any] = {
    "sluice": {
        "scheduler": {
            "preload": [],
            "preload-argv": [],
            "sinks": [],
            # Its file sinks (json-log to a file, eventlog, --event-log) run in a
            # child process unless their spec says process=false: off the GIL of
            # the one process every task goes through.
            "file-sinks-in-child": True,
            # Tasks per worker thread before root tasks wait on the scheduler
            # (SchedulerState's worker_saturation); .inf sends everything at once.
            "worker-saturation": 1024.0,
        },
        "worker": {
            "preload": [],
            "preload-argv": [],
            "sinks": [],
            "file-sinks-in-child": False,
            "forward-events": True,
        },
        "nanny": {"preload": [], "preload-argv": []},
        "client": {"preload": [], "preload-argv": []},
        "sinks": {
            # How far below its parent's the CPU priority of a sink's child process
            # is (the RabbitMQ publisher, the file sinks with process=true).
            "child-nice": 19,
        },
    }
}

_ENV_PREFIX = "SLUICE_"
_INHERITED = "SLUICE_INTERNAL_INHERITED_CONFIG"  # set() overrides handed to child processes
_NOT_GIVEN: Any = object()

_lock = threading.RLock()
_base: dict[str, Any] = {}  # defaults + files + environment
_overrides: list[tuple[str, Any]] = []  # from set(), in order


class ConfigError(ValueError):
    """A configuration file or variable that cannot be read, named in one line."""


def _norm(part: str) -> str:
    return part.strip().lower().replace("_", "-")


def _split(key: str) -> list[str]:
    parts = [_norm(p) for p in key.split(".")]
    if not key or any(not p for p in parts):
        raise ConfigError(f"bad configuration key {key!r}")
    return parts


def _merge(into: dict[str, Any], new: Mapping[str, Any]) -> None:
    for raw_key, value in new.items():
        key = _norm(str(raw_key))
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        elif isinstance(value, Mapping):
            into[key] = {}
            _merge(into[key], value)
        else:
            into[key] = value


def _assign(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    for part in parts[:-1]:
        child = tree.get(part)
        if not isinstance(child, dict):
            child = tree[part] = {}
        tree = child
    if isinstance(value, Mapping):
        tree[parts[-1]] = {}
        _merge(tree[parts[-1]], value)
    else:
        tree[parts[-1]] = value


def _yaml_files() -> Iterator[Path]:
    folders = [Path("/etc/sluice"), Path.home() / ".config" / "sluice"]
    for folder in folders:
        if folder.is_dir():
            yield from sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml"))
    extra = os.environ.get("SLUICE_CONFIG")
    if extra:
        path = Path(extra)
        if path.is_dir():
            yield from sorted(path.glob("*.yaml")) + sorted(path.glob("*.yml"))
        else:
            yield path


def _read_yaml(path: Path) -> Mapping[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f":{where.line + 1}" if where is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def _from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, text in sorted(environ.items()):
        if not name.startswith(_ENV_PREFIX) or name in ("SLUICE_CONFIG", _INHERITED):
            continue
        parts = ["sluice", *(_norm(p) for p in name[len(_ENV_PREFIX) :].split("__"))]
        if any(not p for p in parts):
            continue
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text  # not YAML: keep the string as it is
        _assign(tree, parts, value)
    return tree


def refresh(environ: Mapping[str, str] | None = None) -> None:
    """Read the files and the environment again (``set()`` overrides are kept)."""
    environ = os.environ if environ is None else environ
    base = copy.deepcopy(DEFAULTS)
    for path in _yaml_files():
        _merge(base, _read_yaml(path))
    _merge(base, _from_environment(environ))
    inherited = environ.get(_INHERITED)
    if inherited:
        for key, value in json.loads(inherited):
            _assign(base, _split(key), value)
    _check_sections(base)
    with _lock:
        _base.clear()
        _base.update(base)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)


def _is_argv(value: Any) -> bool:
    """A list of strings, or a list of such lists (one per preload)."""
    return isinstance(value, list | tuple) and all(
        isinstance(v, str) or _is_str_list(v) for v in value
    )


def _is_sinks(value: Any) -> bool:
    """A spec string, or a list of specs and sink objects (``set()`` may pass objects)."""
    return isinstance(value, str) or (
        isinstance(value, list | tuple)
        and all(isinstance(v, str) or hasattr(v, "write") for v in value)
    )


#: What the keys sluice reads may hold: (check, what the error says is expected).
_CHECKS: dict[str, tuple[Any, str]] = {
    "preload": (
        lambda v: (
            isinstance(v, str | os.PathLike)
            or (isinstance(v, list | tuple) and all(isinstance(p, str | os.PathLike) for p in v))
        ),
        "a string or a list of strings",
    ),
    "preload-argv": (_is_argv, "a list of strings (or of lists of strings)"),
    "preload-strict": (lambda v: isinstance(v, bool), "true or false"),
    "sinks": (_is_sinks, "a sink spec or a list of sink specs"),
    "forward-events": (lambda v: isinstance(v, bool), "true or false"),
    "file-sinks-in-child": (lambda v: isinstance(v, bool), "true or false"),
    "child-nice": (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 19,
        "a whole number from 0 to 19",
    ),
    "worker-saturation": (
        lambda v: isinstance(v, int | float) and not isinstance(v, bool) and v > 0,
        "a number > 0 (.inf: no queue)",
    ),
}


def _check(parts: list[str], value: Any) -> None:
    """Raise :class:`ConfigError` if a key sluice reads has a value of the wrong type."""
    if len(parts) != 3 or parts[0] != "sluice" or value is _NOT_GIVEN or value is None:
        return
    if _lookup(DEFAULTS, parts) is _NOT_GIVEN and parts[2] != "preload-strict":
        return  # not a key sluice reads (unknown keys are left alone, as Dask does)
    check = _CHECKS.get(parts[2])
    if check is not None and not check[0](value):
        raise ConfigError(
            f"configuration value {'.'.join(parts)} must be {check[1]}, not {value!r}"
            " (from a YAML file, a SLUICE_ variable or sluice.config.set)"
        )


def _check_sections(tree: Mapping[str, Any]) -> None:
    """Each section of the defaults must stay a mapping (``SLUICE_WORKER=3`` is refused)."""
    if not isinstance(tree.get("sluice"), dict):
        raise ConfigError(
            f"configuration value sluice must be a mapping, not {tree.get('sluice')!r}"
        )
    for name, default in DEFAULTS["sluice"].items():
        value = _lookup(tree, ["sluice", name])
        if isinstance(default, dict) and not isinstance(value, dict):
            raise ConfigError(f"configuration value sluice.{name} must be a mapping, not {value!r}")


def _lookup(tree: Mapping[str, Any], parts: list[str]) -> Any:
    node: Any = tree
    for part in parts:
        if not isinstance(node, Mapping) or part not in node:
            return _NOT_GIVEN
        node = node[part]
    return node


def get(key: str, default: Any = _NOT_GIVEN) -> Any:
    """The value at ``key``; ``default`` (or KeyError naming the key) if it is unset."""
    parts = _split(key)
    with _lock:
        if not _base:
            refresh()
        value = _lookup(_base, parts)
        for set_key, set_value in _overrides:
            set_parts = _split(set_key)
            if parts[: len(set_parts)] == set_parts:
                found = _lookup({"v": set_value}, ["v", *parts[len(set_parts) :]])
                if found is not _NOT_GIVEN:
                    value = found
            elif set_parts[: len(parts)] == parts and isinstance(value, dict):
                value = copy.deepcopy(value)
                _assign(value, set_parts[len(parts) :], set_value)
    _check(parts, value)
    if value is _NOT_GIVEN:
        if default is _NOT_GIVEN:
            raise KeyError(f"no configuration value for {key!r}")
        return default
    return copy.deepcopy(value)


class set:
    """Override keys: ``sluice.config.set({"sluice.worker.forward-events": False})``.

    Also accepts keywords with ``__`` for dots (``set(sluice__worker__nthreads=2)``).
    Used as a context manager, the override ends with the block.
    """

    def __init__(self, arg: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        items = dict(arg or {})
        items.update({k.replace("__", "."): v for k, v in kwargs.items()})
        for key in items:
            _split(key)  # reject bad keys before changing anything
        self._items = list(items.items())
        with _lock:
            _overrides.extend(self._items)

    def __enter__(self) -> set:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with _lock:
            for item in self._items:
                for i in range(len(_overrides) - 1, -1, -1):
                    if _overrides[i] is item:
                        del _overrides[i]
                        break


def child_environment() -> dict[str, str]:
    """Environment variables that carry this process's ``set()`` overrides to a child."""
    with _lock:
        if not _overrides:
            return {}
        return {_INHERITED: json.dumps(_overrides)}
