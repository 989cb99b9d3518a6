"""Sink specs: the short strings ``--sink SPEC`` and config ``sluice.<service>.sinks`` take.

A spec names a sink and, after a colon, where it writes::

    counter                          Counter()
    errors                           ErrorLogger()
    json-log:stderr                  JsonLog("stderr")   (also json-log:stdout)
    json-log:///var/log/sluice.json  JsonLog("/var/log/sluice.json")
    eventlog:///data/run.jsonl       EventLog("/data/run.jsonl")
    amqp://guest:guest@host:5672/%2F?queue=q   RabbitMQ.from_url(...)  (also amqps://)

A path may also be given relative (``json-log:run.json``). ``eventlog`` takes
``?fsync=batch|close|never`` and ``?rotate-bytes=N``. Both file sinks take
``?process=true|false``: with true the sink runs in a child process
(:mod:`sluice.sinks._child`), off the GIL of the service's event loop; a
service's such sinks share one child. The default is the service's
``sluice.<service>.file-sinks-in-child`` (true on the scheduler, whose one
process every task goes through; false on a worker; false where no service is
named). A JSON log to ``stderr`` or ``stdout`` stays in the process unless
``process=true``: its lines then keep their place among the service's own.

Other packages add sinks with the entry-point group ``sluice.sinks``: the
entry point's name is the spec's scheme and its object a callable taking the
whole spec string and returning a sink::

    [project.entry-points."sluice.sinks"]
    kafka = "mypackage.sinks:kafka_from_spec"

Built-in names cannot be overridden. Every error is a :class:`SinkSpecError`
(a ``ValueError``) whose message is one line naming the spec and the problem.
"""

from __future__ import annotations

import importlib.metadata
import os
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = (
    "ENTRY_POINT_GROUP",
    "SinkSpecError",
    "available",
    "event_log_sink",
    "files_in_child",
    "sink_from_spec",
    "sinks_from_config",
)

ENTRY_POINT_GROUP = "sluice.sinks"


class SinkSpecError(ValueError):
    """A sink spec that cannot be turned into a sink; the message is one line."""


def _no_target(spec: str, name: str, target: str) -> None:
    if target:
        raise SinkSpecError(f"sink spec {spec!r}: {name!r} takes no argument after the colon")


def _path_of(spec: str, target: str) -> tuple[str, dict[str, str]]:
    """``///abs/path?x=1`` or ``rel/path`` -> (path, query)."""
    parts = urllib.parse.urlsplit(target)
    if target.startswith("//") and parts.netloc not in ("", "localhost"):
        raise SinkSpecError(
            f"sink spec {spec!r}: a file path cannot name a host ({parts.netloc!r});"
            " write three slashes for an absolute path"
        )
    path = urllib.parse.unquote(parts.path)
    if not path:
        raise SinkSpecError(f"sink spec {spec!r}: missing the file path")
    query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    return path, query


def _counter(spec: str, target: str, _in_child: bool, _resume: bool) -> Any:
    from sluice.sinks.counter import Counter

    _no_target(spec, "counter", target)
    return Counter()


def _errors(spec: str, target: str, _in_child: bool, _resume: bool) -> Any:
    from sluice.sinks.errors import ErrorLogger

    _no_target(spec, "errors", target)
    return ErrorLogger()


def _process_option(query: dict[str, str], default: bool) -> bool:
    """Take ``process=true|false`` out of ``query`` (a bad value: ``ValueError``)."""
    from sluice._amqp_url import parse_bool  # the RabbitMQ sink's own flags read the same

    value = query.pop("process", None)
    return default if value is None else parse_bool("process", value)


def files_in_child(service: str | None) -> bool:
    """Whether ``service``'s file sinks run in a child unless their spec says.

    ``sluice.<service>.file-sinks-in-child``; false for a service without the key
    (and for ``None``: a spec built outside any service).
    """
    if service is None:
        return False
    from sluice import config

    return bool(config.get(f"sluice.{service}.file-sinks-in-child", False))


def _in_child(spec: str, sink: Any) -> Any:
    """``sink``, built from ``spec`` with ``process=true``, run in a child process instead."""
    from sluice.sinks._child import ChildSink

    parts = urllib.parse.urlsplit(spec)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    inner = parts._replace(query=urllib.parse.urlencode([q for q in query if q[0] != "process"]))
    return ChildSink([inner.geturl()], name=sink.name, kinds=sink.kinds)


def _json_log(spec: str, target: str, in_child: bool, resume: bool) -> Any:
    from sluice.sinks.jsonlog import JsonLog

    where, _, options = target.partition("?")
    if where in ("", "stderr", "stdout"):
        query = dict(urllib.parse.parse_qsl(options, keep_blank_values=True))
        path = where or "stderr"
        in_child = False  # unless asked: its lines stay among the service's own
    else:
        path, query = _path_of(spec, target)
    process = _process_option(query, in_child)
    if query:
        raise SinkSpecError(
            f"sink spec {spec!r}: json-log takes no options but process ({sorted(query)})"
        )
    sink = JsonLog(path, resume=resume)
    return _in_child(spec, sink) if process else sink


def _eventlog(spec: str, target: str, in_child: bool, resume: bool) -> Any:
    from sluice.sinks.eventlog import EventLog, FsyncPolicy

    path, query = _path_of(spec, target)
    process = _process_option(query, in_child)
    fsync: FsyncPolicy = "batch"
    rotate: int | None = None
    for name, value in query.items():
        if name == "fsync":
            if value not in ("batch", "close", "never"):
                raise SinkSpecError(
                    f"sink spec {spec!r}: fsync must be batch, close or never, not {value!r}"
                )
            fsync = value  # type: ignore[assignment]
        elif name in ("rotate-bytes", "rotate_bytes"):
            try:
                rotate = int(value)
            except ValueError:
                raise SinkSpecError(
                    f"sink spec {spec!r}: rotate-bytes must be an integer, not {value!r}"
                ) from None
        else:
            raise SinkSpecError(f"sink spec {spec!r}: unknown eventlog option {name!r}")
    try:
        # Built here even for a child: a log that exists fails now, with one line.
        sink = EventLog(path, fsync=fsync, rotate_bytes=rotate, resume=resume)
    except (OSError, ValueError) as exc:
        raise SinkSpecError(f"sink spec {spec!r}: {exc}") from None
    return _in_child(spec, sink) if process else sink


def _rabbitmq(spec: str, target: str, _in_child: bool, _resume: bool) -> Any:
    try:
        from sluice.sinks.rabbitmq import RabbitMQ
    except ImportError as exc:
        raise SinkSpecError(f"sink spec {spec!r}: {exc}") from None
    return RabbitMQ.from_url(spec)


#: name -> builder(spec, target after the colon, in a child by default, resume).
_BUILTIN: dict[str, Callable[[str, str, bool, bool], Any]] = {
    "counter": _counter,
    "errors": _errors,
    "json-log": _json_log,
    "eventlog": _eventlog,
    "amqp": _rabbitmq,
    "amqps": _rabbitmq,
}


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available() -> list[str]:
    """The spec names that can be used: the built-ins, then those of installed packages."""
    extra = sorted(set(_entry_points()) - set(_BUILTIN))
    return [*_BUILTIN, *extra]


def sink_from_spec(spec: str, *, service: str | None = None) -> Any:
    """Build the sink ``spec`` describes; :class:`SinkSpecError` if it cannot.

    ``service`` (``"scheduler"``, ``"worker"``): whose sink it is, for the
    default of a file sink's ``process`` option (:func:`files_in_child`).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise SinkSpecError(f"a sink spec must be a non-empty string, not {spec!r}")
    spec = spec.strip()
    name, _, target = spec.partition(":")
    builtin = _BUILTIN.get(name)
    if builtin is not None:
        in_child = files_in_child(service)  # a bad config value is its own error
        return _build(builtin, spec, target, in_child=in_child, resume=False)
    entry_point = _entry_points().get(name)
    if entry_point is None:
        raise SinkSpecError(
            f"unknown sink {name!r} in spec {spec!r}: expected one of {', '.join(available())}"
            f" (or a package's {ENTRY_POINT_GROUP!r} entry point)"
        )
    try:
        factory = entry_point.load()
        return factory(spec)
    except ValueError as exc:  # the factory's own word on a bad spec (SinkSpecError too)
        message = str(exc)
        raise SinkSpecError(
            message if message.startswith("sink spec ") else f"sink spec {spec!r}: {message}"
        ) from None
    except Exception as exc:
        raise SinkSpecError(
            f"sink spec {spec!r}: the {ENTRY_POINT_GROUP!r} entry point {entry_point.value!r}"
            f" failed: {type(exc).__name__}: {exc}"
        ) from None


def resumed_sink(spec: str) -> Any:
    """The file sink ``spec`` describes (it must be a built-in), continuing the
    file a writer of the same run left when it died: what the file sinks'
    child builds when its parent restarted it (``resume=True`` of the sinks)."""
    name, _, target = spec.partition(":")
    builtin = _BUILTIN.get(name)
    if builtin is None:
        raise SinkSpecError(f"sink spec {spec!r}: only a built-in sink can be resumed")
    return _build(builtin, spec, target, in_child=False, resume=True)


def _build(
    builtin: Callable[[str, str, bool, bool], Any],
    spec: str,
    target: str,
    *,
    in_child: bool,
    resume: bool,
) -> Any:
    """Call a built-in's builder; its ``ValueError`` becomes a one-line spec error."""
    try:
        return builtin(spec, target, in_child, resume)
    except SinkSpecError:
        raise
    except ValueError as exc:
        raise SinkSpecError(f"sink spec {spec!r}: {exc}") from None


def sinks_from_config(service: str, sinks: Any, *, first: Sequence[Any] = ()) -> list[Any]:
    """The sinks a service was given, else ``sluice.<service>.sinks``; specs built.

    ``sinks`` is ``None`` (use the configuration), one spec or sink, or a list
    of specs and sink objects. Specs are built now, so a bad one fails before
    the service opens any port. ``first``: sinks of the service's own to put
    before them (the scheduler's event log), sharing their child if hosted.
    """
    if sinks is None:
        from sluice import config

        sinks = config.get(f"sluice.{service}.sinks", None) or []
    if isinstance(sinks, str) or hasattr(sinks, "write"):
        sinks = [sinks]
    built = [sink_from_spec(s, service=service) if isinstance(s, str) else s for s in sinks]
    return _share_child([*first, *built])


def event_log_sink(path: str | os.PathLike[str], *, service: str = "scheduler") -> Any:
    """The sink of ``--event-log PATH``: an :class:`EventLog`, in a child process
    if the service's file sinks are (:func:`files_in_child`).

    The log is built here either way, so that one that exists fails now, with
    the EventLog's own message.
    """
    from sluice.sinks.eventlog import EventLog

    sink = EventLog(path)
    if not files_in_child(service):
        return sink
    absolute = urllib.parse.quote(os.fspath(Path(path).absolute()))
    return _in_child(f"eventlog://{absolute}", sink)


def _share_child(sinks: list[Any]) -> list[Any]:
    """The ``process=true`` sinks built from specs, merged into one child process
    (at the place of the first): each batch then goes down one pipe once."""
    from sluice.sinks._child import ChildSink

    hosted = [s for s in sinks if type(s) is ChildSink]
    if len(hosted) < 2:
        return sinks
    kinds: frozenset[str] | None = frozenset()
    for sink in hosted:
        kinds = None if kinds is None or sink.kinds is None else kinds | sink.kinds
    shared = ChildSink(
        [spec for sink in hosted for spec in sink.specs],
        name="+".join(sink.name for sink in hosted),
        kinds=kinds,
    )
    first = sinks.index(hosted[0])
    rest = [s for s in sinks if type(s) is not ChildSink]
    return [*rest[:first], shared, *rest[first:]]
