"""Events to JSON lines and back, fast: the event log's encoder and decoder.

Encoding is ``orjson.dumps(event.to_dict())``. Decoding is where the time goes
when a log is replayed: building a frozen attrs event field by field from a
dict costs twice the JSON parse. So for the common kinds (every kind whose
fields are plain JSON values, which includes ``task-transition``) the line is
decoded by msgspec straight into the event class, with types checked, and the
dict step is skipped. ``to_dict`` writes ``kind`` first, so the decoder can pick
the class from the line's first bytes.

Anything the fast path does not take (another kind, an older schema version, a
line written by another tool with its keys in another order, a line that does
not validate) goes through ``orjson.loads`` and :func:`sluice.events.from_dict`,
which give the precise error for a bad line.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import orjson

from sluice.events import (
    EVENT_CLASSES,
    SCHEMA_VERSION,
    ClientReleasedKeys,
    Event,
    EventSchemaError,
    GraphUpdated,
    from_dict,
    to_key,
)

__all__ = ("decode_line", "encode_line")

_NL = orjson.OPT_APPEND_NEWLINE
_PREFIX = b'{"kind":"'
_START = len(_PREFIX)


def encode_line(event: Event) -> bytes:
    """One JSON line (newline included) for ``event``."""
    return orjson.dumps(event.to_dict(), option=_NL)


def _typed_decoders() -> dict[bytes, Callable[[bytes], Event]]:
    decoders: dict[bytes, Callable[[bytes], Event]] = {}
    for cls in EVENT_CLASSES:
        # Kinds with their own _from_fields store mappings as pair lists, which
        # only the dict path turns back into mappings.
        if cls._fast_build is not None:
            decoders[cls.kind.encode()] = msgspec.json.Decoder(cls).decode
    return decoders


#: A task key as the typed paths of the kinds with key collections take it: a
#: string or a flat tuple of str/int (nearly every key). A nested tuple or any
#: other part does not validate, so the line takes the dict path, which handles it.
_FlatKey = str | tuple[str | int, ...]


class _GraphUpdatedLine(msgspec.Struct, forbid_unknown_fields=True):
    """A ``graph-updated`` line as written: mappings are lists of pairs."""

    kind: str
    seq: int
    time: float
    source: str
    client: str
    keys: tuple[_FlatKey, ...]
    dependencies: list[tuple[_FlatKey, tuple[_FlatKey, ...]]]
    priority: list[tuple[_FlatKey, int]] = []
    retries: list[tuple[_FlatKey, int]] = []
    stimulus_id: str = ""


class _KeysLine(msgspec.Struct, forbid_unknown_fields=True):
    """A ``client-released-keys`` line."""

    kind: str
    seq: int
    time: float
    source: str
    client: str
    keys: tuple[_FlatKey, ...]
    stimulus_id: str = ""


def _graph_updated_decoder() -> Callable[[bytes], Event]:
    # A graph of a few hundred thousand tasks is one line of megabytes: decoded
    # in C, the pair lists become dicts in C, instead of a comprehension per key.
    decode = msgspec.json.Decoder(_GraphUpdatedLine).decode

    def decode_graph_updated(line: bytes) -> Event:
        g = decode(line)
        return GraphUpdated(
            seq=g.seq,
            time=g.time,
            source=g.source,
            client=g.client,
            keys=g.keys,
            dependencies=dict(g.dependencies),
            priority=dict(g.priority),
            retries=dict(g.retries),
            stimulus_id=g.stimulus_id,
        )

    return decode_graph_updated


def _released_keys_decoder() -> Callable[[bytes], Event]:
    decode = msgspec.json.Decoder(_KeysLine).decode

    def decode_released_keys(line: bytes) -> Event:
        r = decode(line)
        return ClientReleasedKeys(
            seq=r.seq,
            time=r.time,
            source=r.source,
            client=r.client,
            keys=r.keys,
            stimulus_id=r.stimulus_id,
        )

    return decode_released_keys


_DECODERS = _typed_decoders()
_DECODERS[GraphUpdated.kind.encode()] = _graph_updated_decoder()
_DECODERS[ClientReleasedKeys.kind.encode()] = _released_keys_decoder()
_TRANSITION_PREFIX = b'{"kind":"task-transition",'
_decode_transition = _DECODERS[b"task-transition"]


def decode_line(line: bytes, version: int = SCHEMA_VERSION) -> Event:
    """The event a JSON line describes; :class:`EventSchemaError` if it is not one.

    Raises ``orjson.JSONDecodeError`` (a ``ValueError``) for a line that is
    not JSON at all.
    """
    # try/except, not contextlib.suppress: free when nothing is raised, and this
    # runs once per line of a log. A line that does not validate goes on to the
    # dict path below, which names the problem.
    if version == SCHEMA_VERSION:
        if line.startswith(_TRANSITION_PREFIX):
            # Transitions are nearly every line of a log: their own short path.
            try:
                event: Event = _decode_transition(line)
            except msgspec.DecodeError:
                pass
            else:
                key = event.key  # type: ignore[attr-defined]
                # ``list in map(type, key)`` scans the parts in C: most keys have none.
                if type(key) is tuple and list in map(type, key):
                    object.__setattr__(event, "key", to_key(list(key)))
                return event
        elif line.startswith(_PREFIX):
            decode = _DECODERS.get(line[_START : line.find(b'"', _START)])
            if decode is not None:
                try:
                    event = decode(line)
                except msgspec.DecodeError:
                    pass
                else:
                    _restore_nested_keys(event)
                    return event
    d = orjson.loads(line)
    if type(d) is not dict:
        raise EventSchemaError(f"not an event object: {line[:60]!r}")
    return from_dict(d, version=version)


def _restore_nested_keys(event: Event) -> None:
    """Turn lists nested in a tuple key back into tuples.

    msgspec makes the outer list of a key a tuple (the field's type says so)
    but cannot know that lists inside it were tuples too. The event is fixed
    in place before anyone else has seen it, which is why setting a field of
    a frozen object is acceptable here.
    """
    for name in event._key_fields:
        key = getattr(event, name)
        # ``list in map(type, key)`` scans the parts in C: most keys have none.
        if type(key) is tuple and list in map(type, key):
            object.__setattr__(event, name, to_key(list(key)))
