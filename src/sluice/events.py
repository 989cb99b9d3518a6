"""The immutable events that flow on every sluice bus.

Every task transition, on the scheduler and on every worker, and every change
of cluster membership is one of these values. They are frozen attrs classes:
nothing mutates an event after it is built, a new ``seq`` is given with
:func:`attrs.evolve`.

``to_dict`` gives a JSON-safe dict carrying ``kind``; :func:`from_dict` rebuilds
the identical event. Task keys are ``str`` or (nested) tuples of str/int; JSON
turns tuples into lists, so :func:`from_dict` turns them back. Mappings keyed by
task keys (``GraphUpdated.dependencies``) are written as lists of pairs, since a
JSON object key must be a string.

The schema has a version (:data:`SCHEMA_VERSION`). A log written with an older
version is upcast step by step by :func:`upcast` when read, so old logs keep
replaying.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, TypeAlias

import attrs
import msgspec

__all__ = (
    "SCHEMA_VERSION",
    "ClientAdded",
    "ClientReleasedKeys",
    "ClientRemoved",
    "ComputeRequested",
    "Event",
    "EventSchemaError",
    "FreeRequested",
    "GraphUpdated",
    "Key",
    "PluginAdded",
    "PluginRemoved",
    "Restarted",
    "SchedulerClosing",
    "SchedulerStarted",
    "TaskTransition",
    "UserEvent",
    "WorkerAdded",
    "WorkerRemoved",
    "from_dict",
    "upcast",
)

#: Version of the event schema; recorded in event-log headers.
SCHEMA_VERSION = 1

#: A task key: a string or a tuple of str/int (possibly nested), as in Dask.
Key: TypeAlias = "str | tuple[Any, ...]"


class EventSchemaError(ValueError):
    """A dict does not describe a known event (unknown kind, missing field...)."""


def to_key(value: Any) -> Key:
    """Turn a key that went through JSON (lists) back into its tuple form."""
    if type(value) is list:
        # Scalars are tested inline: most keys are flat ("name", i) pairs, and
        # this runs once per event when a log is read.
        return tuple([to_key(v) if type(v) is list else v for v in value])
    return value  # type: ignore[no-any-return]


def _keys(values: Iterable[Any]) -> tuple[Key, ...]:
    return tuple([to_key(v) if type(v) is list else v for v in values])


# msgspec rather than orjson: each encoding is kept (cached on its event), and
# orjson's output buffer, sized large and shrunk, made keeping tens of thousands
# of them cost ~4 us an event in allocation; msgspec's cost ~1 us.
_encode_json = msgspec.json.Encoder().encode


class _JsonCache:
    """A slot for an event's JSON, outside attrs: not a field, not compared, not copied."""

    __slots__ = ("_json",)
    _json: bytes | None


@attrs.frozen(kw_only=True)
class Event(_JsonCache):
    """Base of every event: a position on its bus, a time and a source.

    ``seq`` is strictly increasing per bus, from 1 (0 means "not stamped yet");
    ``time`` is epoch seconds, carried in from the stimulus so replay is exact;
    ``source`` is ``"scheduler"`` or a worker's address.
    """

    kind: ClassVar[str] = ""
    seq: int = 0
    time: float = 0.0
    source: str = "scheduler"

    # Fields holding a task key, turned back from JSON lists into tuples.
    _key_fields: ClassVar[tuple[str, ...]] = ()
    # Filled in for each subclass by _register.
    _field_names: ClassVar[tuple[str, ...]] = ()
    # True when to_dict() is the kind plus the attrs fields as they are, so
    # msgspec can encode the event itself in place of its dict (_event_wire).
    _dict_is_fields: ClassVar[bool] = False
    _fast_build: ClassVar[Callable[[Mapping[str, Any]], Event] | None] = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict of this event, with its ``kind``."""
        # Replaced by _register with a generated dict literal, for speed.
        d = {"kind": self.kind}
        d.update((name, getattr(self, name)) for name in self._field_names)
        return d

    def to_json(self) -> bytes:
        """``to_dict()`` as compact JSON, computed once per event.

        The event log, the JSON log and the RabbitMQ sink each need these bytes
        for every event on a busy scheduler; encoding once instead of once per sink
        takes most of their cost off the scheduler's process. Raises ``TypeError``
        (or ``msgspec.EncodeError``) for a value JSON cannot hold.
        """
        # The slot is unset until the first call; getattr's default is cheaper than
        # catching the AttributeError in Python (~0.9 us an event).
        data: bytes | None = getattr(self, "_json", None)
        if data is None:
            data = _encode_json(self.to_dict())
            # Frozen for users; this slot is a cache. Two threads racing here
            # store equal bytes.
            object.__setattr__(self, "_json", data)
        return data

    def _set_json(self, data: bytes) -> None:
        """Store the bytes a sink encoded in place of what ``to_json`` could not."""
        object.__setattr__(self, "_json", data)

    @classmethod
    def _from_fields(cls, fields: dict[str, Any]) -> Event:
        return cls(**fields)


@attrs.frozen(kw_only=True)
class TaskTransition(Event):
    """A task moved from ``start`` to ``finish`` on the scheduler or a worker."""

    kind: ClassVar[str] = "task-transition"
    key: Key
    start: str
    finish: str
    stimulus_id: str = ""
    worker: str | None = None
    nbytes: int | None = None
    duration: float | None = None
    exception: str | None = None
    traceback: str | None = None

    _key_fields: ClassVar[tuple[str, ...]] = ("key",)


@attrs.frozen(kw_only=True)
class GraphUpdated(Event):
    """A client submitted tasks.

    ``keys`` are the keys the client wants (holds futures for); ``dependencies``
    maps every task of the submission to the keys it depends on; ``priority``
    and ``retries`` are per task (absent means 0).
    """

    kind: ClassVar[str] = "graph-updated"
    client: str
    keys: tuple[Key, ...]
    dependencies: Mapping[Key, tuple[Key, ...]]
    priority: Mapping[Key, int] = attrs.field(factory=dict)
    retries: Mapping[Key, int] = attrs.field(factory=dict)
    stimulus_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "seq": self.seq,
            "time": self.time,
            "source": self.source,
            "client": self.client,
            "keys": list(self.keys),
            "dependencies": [[k, list(v)] for k, v in self.dependencies.items()],
            "priority": [[k, p] for k, p in self.priority.items()],
            "retries": [[k, r] for k, r in self.retries.items()],
            "stimulus_id": self.stimulus_id,
        }

    @classmethod
    def _from_fields(cls, fields: dict[str, Any]) -> Event:
        fields["keys"] = _keys(fields["keys"])
        fields["dependencies"] = {to_key(k): _keys(v) for k, v in fields["dependencies"]}
        fields["priority"] = {to_key(k): p for k, p in fields.get("priority", ())}
        fields["retries"] = {to_key(k): r for k, r in fields.get("retries", ())}
        return cls(**fields)


@attrs.frozen(kw_only=True)
class ClientReleasedKeys(Event):
    """A client no longer wants these keys (its futures were released)."""

    kind: ClassVar[str] = "client-released-keys"
    client: str
    keys: tuple[Key, ...]
    stimulus_id: str = ""

    @classmethod
    def _from_fields(cls, fields: dict[str, Any]) -> Event:
        fields["keys"] = _keys(fields["keys"])
        return cls(**fields)


@attrs.frozen(kw_only=True)
class WorkerAdded(Event):
    """A worker joined the cluster."""

    kind: ClassVar[str] = "worker-added"
    worker: str
    name: str = ""
    nthreads: int = 1
    memory_limit: int = 0


@attrs.frozen(kw_only=True)
class WorkerRemoved(Event):
    """A worker left the cluster or was lost; ``reason`` says which."""

    kind: ClassVar[str] = "worker-removed"
    worker: str
    reason: str = ""
    stimulus_id: str = ""


@attrs.frozen(kw_only=True)
class ClientAdded(Event):
    """A client connected."""

    kind: ClassVar[str] = "client-added"
    client: str


@attrs.frozen(kw_only=True)
class ClientRemoved(Event):
    """A client disconnected; the keys it alone wanted are released."""

    kind: ClassVar[str] = "client-removed"
    client: str


@attrs.frozen(kw_only=True)
class SchedulerStarted(Event):
    """The scheduler is up and listening at ``address``."""

    kind: ClassVar[str] = "scheduler-started"
    address: str = ""


@attrs.frozen(kw_only=True)
class SchedulerClosing(Event):
    """The scheduler at ``address`` is shutting down."""

    kind: ClassVar[str] = "scheduler-closing"
    address: str = ""


@attrs.frozen(kw_only=True)
class Restarted(Event):
    """The cluster was restarted: every task was forgotten."""

    kind: ClassVar[str] = "restarted"
    stimulus_id: str = ""


@attrs.frozen(kw_only=True)
class PluginAdded(Event):
    """A plugin was registered under ``name``."""

    kind: ClassVar[str] = "plugin-added"
    name: str


@attrs.frozen(kw_only=True)
class PluginRemoved(Event):
    """The plugin registered under ``name`` was removed."""

    kind: ClassVar[str] = "plugin-removed"
    name: str


@attrs.frozen(kw_only=True)
class UserEvent(Event):
    """A free-form event on ``topic``; ``msg`` must be JSON-safe."""

    kind: ClassVar[str] = "user-event"
    topic: str
    msg: Any = None


@attrs.frozen(kw_only=True)
class ComputeRequested(Event):
    """Worker-local: the scheduler asked this worker to compute ``key``.

    Records what a transition cannot carry: the priority, and every dependency
    with the peers that hold it, so a replay knows what the task waits for and
    where to fetch from.
    """

    kind: ClassVar[str] = "compute-requested"
    key: Key
    priority: int = 0
    who_has: Mapping[Key, tuple[str, ...]] = attrs.field(factory=dict)
    stimulus_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "seq": self.seq,
            "time": self.time,
            "source": self.source,
            "key": self.key,
            "priority": self.priority,
            "who_has": [[k, list(v)] for k, v in self.who_has.items()],
            "stimulus_id": self.stimulus_id,
        }

    @classmethod
    def _from_fields(cls, fields: dict[str, Any]) -> Event:
        fields["key"] = to_key(fields["key"])
        fields["who_has"] = {to_key(k): tuple(v) for k, v in fields.get("who_has", ())}
        return cls(**fields)


@attrs.frozen(kw_only=True)
class FreeRequested(Event):
    """Worker-local: the scheduler gave up these keys on this worker.

    Transitions follow for the keys nothing else needs; a key that a task here
    still depends on stays until that task is done, which only this event can
    explain to a replay.
    """

    kind: ClassVar[str] = "free-requested"
    keys: tuple[Key, ...]
    stimulus_id: str = ""

    @classmethod
    def _from_fields(cls, fields: dict[str, Any]) -> Event:
        fields["keys"] = _keys(fields["keys"])
        return cls(**fields)


EVENT_CLASSES: tuple[type[Event], ...] = (
    TaskTransition,
    GraphUpdated,
    ClientReleasedKeys,
    WorkerAdded,
    WorkerRemoved,
    ClientAdded,
    ClientRemoved,
    SchedulerStarted,
    SchedulerClosing,
    Restarted,
    PluginAdded,
    PluginRemoved,
    UserEvent,
    ComputeRequested,
    FreeRequested,
)

#: kind -> event class.
KINDS: dict[str, type[Event]] = {}


def _compile(name: str, source: str, namespace: dict[str, Any]) -> Any:
    exec(compile(source, f"<sluice.events {name}>", "exec"), namespace)
    return namespace[name]


def _register(cls: type[Event]) -> None:
    """Record ``cls`` under its kind and give it fast encode/decode paths.

    The event log writes and reads hundreds of thousands of events a second,
    and most of that time is spent turning events into dicts and back. A dict
    literal written out field by field is about twice as fast as a generic
    loop, and setting the slots of a new object directly skips the keyword
    call of the attrs ``__init__``; so both are generated here, per class.
    The generic paths stay for dicts that do not have exactly the expected
    fields, so that a bad dict still gets attrs' own error.
    """
    fields = attrs.fields(cls)
    names = tuple(f.name for f in fields)
    cls._field_names = names
    KINDS[cls.kind] = cls
    if "to_dict" not in cls.__dict__:
        cls._dict_is_fields = True
        items = "".join(f"{n!r}: self.{n}, " for n in names)
        # kind first: the event-log reader picks the decoder from a line's first bytes.
        source = f"def to_dict(self):\n    return {{'kind': {cls.kind!r}, {items}}}\n"
        to_dict = _compile("to_dict", source, {})
        to_dict.__doc__ = Event.to_dict.__doc__
        cls.to_dict = to_dict  # type: ignore[method-assign]
    if "_from_fields" not in cls.__dict__ and all(
        f.default is attrs.NOTHING or not isinstance(f.default, attrs.Factory)  # type: ignore[arg-type]
        for f in fields
    ):
        # Helpers bound as defaults: locals are cheaper to reach than globals.
        lines = [
            "def build(d, new=new, cls=cls, setattr=setattr, to_key=to_key):",
            "    self = new(cls)",
        ]
        for f in fields:
            value = f"d[{f.name!r}]"
            if f.name in cls._key_fields:
                value = f"to_key({value})"
            lines.append(f"    setattr(self, {f.name!r}, {value})")
        lines.append("    return self")
        namespace = {"new": object.__new__, "cls": cls, "setattr": object.__setattr__}
        namespace["to_key"] = to_key
        cls._fast_build = _compile("build", "\n".join(lines) + "\n", namespace)


for _cls in EVENT_CLASSES:
    _register(_cls)

#: Upcasters: ``UPCASTERS[v]`` turns a dict of schema version ``v`` into ``v + 1``.
UPCASTERS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def upcast(d: dict[str, Any], version: int) -> dict[str, Any]:
    """Bring an event dict written with schema ``version`` up to the current one."""
    if version > SCHEMA_VERSION:
        raise EventSchemaError(
            f"event schema version {version} is newer than this sluice ({SCHEMA_VERSION})"
        )
    while version < SCHEMA_VERSION:
        d = UPCASTERS[version](d)
        version += 1
    return d


def from_dict(d: Mapping[str, Any], *, version: int = SCHEMA_VERSION) -> Event:
    """Rebuild the event that ``event.to_dict()`` described.

    ``version`` is the schema version the dict was written with; older dicts
    are upcast first. Raises :class:`EventSchemaError` on an unknown kind or a
    missing or unexpected field.
    """
    if version != SCHEMA_VERSION:
        d = upcast(dict(d), version)
    kind = d.get("kind")
    cls = KINDS.get(kind)  # type: ignore[arg-type]
    if cls is None:
        raise EventSchemaError(f"unknown event kind {kind!r}")
    build = cls._fast_build
    if build is not None and len(d) == len(cls._field_names) + 1:
        # Exactly the fields to_dict writes (plus kind): the fast path is exact.
        # A KeyError means one field is missing and another extra: attrs explains below.
        with contextlib.suppress(KeyError):
            return build(d)
    fields = dict(d)
    del fields["kind"]
    try:
        return cls._from_fields(fields)
    except (TypeError, KeyError, ValueError) as exc:
        raise EventSchemaError(f"bad {kind!r} event: {exc}") from None
