"""Batches of events as bytes for a sink's child process, and back.

The sinks that run in a child process (the RabbitMQ publisher, and ``json-log``
and ``eventlog`` with ``process=true``) are there to take work off the
scheduler's process, so what that process does for them must be as little as
possible. Rendering each event's JSON there (its dict, then the encoding) costs
~2.5 us an event under the GIL the event loop needs; encoding the batch as
msgpack of the events themselves, which msgspec does field by field in C, costs
~0.5 us. The child renders the JSON.

A blob is the msgpack array ``[kinds, items]``, one kind and one item an event.
An item is the event itself (a map of its attrs fields) for the kinds whose dict
is exactly their fields; the event's ``to_dict()`` for the kinds that shape their
dict (``graph-updated``...); and the event's JSON, rendered here, for a user
event, whose payload may hold values that msgpack would carry differently from
JSON (an aware datetime comes back in UTC) or not at all (:func:`event_json`
writes those as their ``repr``, with one warning, as an in-process sink would).

The child gets :class:`EventView` objects for the first kind of item, real
events for the others. A view has the event's fields as msgpack gave them back
(a tuple key as a list) and its JSON, which is byte for byte the event's
:meth:`~sluice.events.Event.to_json`: the same encoder writes the kind first
and the fields in the class's order, and a list is written as a tuple is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, cast

import attrs
import msgspec
import orjson

from sluice.events import EVENT_CLASSES, Event, UserEvent, from_dict
from sluice.sinks._json import event_json

__all__ = ("EventView", "decode_batch", "encode_batch")

_encode = msgspec.msgpack.Encoder().encode
_decode_any = msgspec.msgpack.Decoder().decode
_split = msgspec.msgpack.Decoder(tuple[list[str], list[msgspec.Raw]]).decode
_encode_json = msgspec.json.Encoder().encode
# What msgspec raises for a value it cannot encode: an unknown type, an int past
# 64 bits, a string with lone surrogates.
_UNENCODABLE = (TypeError, ValueError, OverflowError, msgspec.EncodeError)

#: The kinds sent as the events themselves.
_AS_FIELDS = frozenset(cls for cls in EVENT_CLASSES if cls._dict_is_fields and cls is not UserEvent)


def encode_batch(batch: Sequence[Event]) -> bytes:
    """``batch`` as one msgpack blob for :func:`decode_batch`."""
    kinds = [event.kind for event in batch]
    items = [event if type(event) in _AS_FIELDS else _as_item(event) for event in batch]
    try:
        return _encode((kinds, items))
    except _UNENCODABLE:
        # A value msgpack cannot carry (an int past 64 bits in a graph's keys...): as JSON.
        return _encode((kinds, [_carriable(e, item) for e, item in zip(batch, items, strict=True)]))


def _as_item(event: Event) -> Any:
    if type(event) is UserEvent:
        return event_json(event)
    return event.to_dict()


def _carriable(event: Event, item: Any) -> Any:
    try:
        _encode(item)
    except _UNENCODABLE:
        return event_json(event)
    return item


class EventView(msgspec.Struct, kw_only=True, dict=True):
    """An event of a kind in ``_AS_FIELDS`` as a sink's child reads it.

    Each such kind has a subclass with its fields, in order, tagged with its
    kind, so that encoding the view as JSON gives the event's JSON.
    """

    kind: ClassVar[str]

    def to_json(self) -> bytes:
        return self.__dict__["json"]  # type: ignore[no-any-return]

    def _set_json(self, data: bytes) -> None:
        self.__dict__["json"] = data

    def to_dict(self) -> dict[str, Any]:
        """The event's own ``to_dict()``: tuple keys as tuples."""
        return self.event().to_dict()

    def event(self) -> Event:
        """The event this view shows."""
        fields = msgspec.structs.asdict(self)
        fields["kind"] = self.kind
        return from_dict(fields)


def _view_class(cls: type[Event]) -> type[EventView]:
    view = msgspec.defstruct(
        f"{cls.__name__}View",
        [(field.name, Any) for field in attrs.fields(cls)],
        bases=(EventView,),
        tag=cls.kind,
        tag_field="kind",
        kw_only=True,
        dict=True,
        namespace={"kind": cls.kind},
    )
    return cast("type[EventView]", view)


_VIEW_DECODERS = {cls.kind: msgspec.msgpack.Decoder(_view_class(cls)).decode for cls in _AS_FIELDS}


def decode_batch(data: bytes) -> list[EventView | Event]:
    """The events of a blob from :func:`encode_batch`, each with its JSON rendered."""
    kinds, raws = _split(data)
    events: list[EventView | Event] = []
    for kind, raw in zip(kinds, raws, strict=True):
        decode = _VIEW_DECODERS.get(kind)
        view = _view(decode, raw) if decode is not None else None
        events.append(view if view is not None else _event(kind, _decode_any(raw)))
    return events


def _view(decode: Callable[[bytes], EventView], raw: msgspec.Raw) -> EventView | None:
    """The view of an event sent as its fields; None if it came as JSON or a dict."""
    try:
        view = decode(raw)
    except msgspec.ValidationError:  # see _carriable
        return None
    view.__dict__["json"] = _encode_json(view)
    return view


def _event(kind: str, item: Any) -> Event:
    if type(item) is bytes:
        event = from_dict(orjson.loads(item))
        event._set_json(item)  # the bad values as the parent wrote them
        return event
    item["kind"] = kind
    return from_dict(item)
