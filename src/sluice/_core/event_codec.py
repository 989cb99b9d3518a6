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

import contextlib
from collections.abc import Callable

import msgspec
import orjson

from sluice.events import EVENT_CLASSES, SCHEMA_VERSION, Event, EventSchemaError, from_dict, to_key

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


_DECODERS = _typed_decoders()


def decode_line(line: bytes, version: int = SCHEMA_VERSION) -> Event:
    """The event a JSON line describes; :class:`EventSchemaError` if it is not one.

    Raises ``orjson.JSONDecodeError`` (a ``ValueError``) for a line that is
    not JSON at all.
    """
    if version == SCHEMA_VERSION and line.startswith(_PREFIX):
        decode = _DECODERS.get(line[_START : line.find(b'"', _START)])
        # A line that does not validate goes on to the dict path, which names the problem.
        with contextlib.suppress(msgspec.DecodeError):
            if decode is not None:
                event = decode(line)
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
        if type(key) is tuple:
            for part in key:
                if type(part) is list:
                    object.__setattr__(event, name, to_key(list(key)))
                    break
