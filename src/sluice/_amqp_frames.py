"""The AMQP 0-9-1 frames of ``basic.publish``, encoded for a whole chunk of messages.

pika builds the three frames of each message (method, content header, body) from
objects, one Python call per field, and hands each frame to its transport on its
own: about two thirds of the publisher's CPU went there, at ~8 us a message. The
messages the sink publishes differ only in routing key, message id and body,
so their frames are a few ``struct.pack`` calls each, and a chunk goes to the
transport as one buffer. The bytes are what pika writes, field for field
(``tests/test_sink_rabbitmq.py`` compares them with pika's own frames).

:meth:`FrameWriter.for_channel` reaches into pika's connection
(``_adapter_emit_data``, ``_body_max_length``, its byte and frame counters); if
a pika release no longer has them, it returns ``None`` and the publisher calls
``basic_publish`` as before.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ("CONTENT_TYPE", "FrameWriter")

#: The content type of every message the sink publishes.
CONTENT_TYPE = "application/json"

_FRAME_END = b"\xce"
_METHOD, _HEADER, _BODY = 1, 2, 3
_BASIC_CLASS, _PUBLISH = 60, 40
# Property flags, in the order AMQP lists the properties: content-type,
# delivery-mode, message-id (the only three the sink sets).
_FLAGS = 0x8000 | 0x1000 | 0x0080
_PERSISTENT = 2
_FRAME_HEAD = struct.Struct(">BHI")
_HEADER_HEAD = struct.Struct(">HHQH")
_METHOD_CACHE = 4096  # routing keys whose method frame is kept (a per-key template makes many)


def _short_string(value: str, what: str) -> bytes:
    data = value.encode()
    if len(data) > 255:
        raise ValueError(f"{what} is longer than 255 bytes: {value[:40]!r}...")
    return bytes((len(data),)) + data


class FrameWriter:
    """Writes ``basic.publish`` of persistent JSON messages to one channel."""

    def __init__(self, connection: Any, channel_number: int, exchange: str, body_max: int) -> None:
        if body_max <= 0:
            raise ValueError(f"body_max must be positive, not {body_max}")
        self._connection = connection
        self._channel_number = channel_number
        self._body_max = body_max
        self._method_payload_head = struct.pack(">HHH", _BASIC_CLASS, _PUBLISH, 0) + (
            _short_string(exchange, "exchange name")
        )
        self._content_type = _short_string(CONTENT_TYPE, "content type")
        self._methods: dict[str, bytes] = {}

    @classmethod
    def for_channel(cls, connection: Any, channel: Any, exchange: str) -> FrameWriter | None:
        """A writer for ``channel`` of ``connection``, or ``None`` where pika's
        internals are not what this module relies on."""
        body_max = getattr(connection, "_body_max_length", None)
        emit = getattr(connection, "_adapter_emit_data", None)
        number = getattr(channel, "channel_number", None)
        if not (
            type(body_max) is int
            and body_max > 0
            and callable(emit)
            and type(number) is int
            and type(getattr(connection, "bytes_sent", None)) is int
            and type(getattr(connection, "frames_sent", None)) is int
        ):
            return None
        return cls(connection, number, exchange, body_max)

    def encode(self, messages: Iterable[Sequence[Any]]) -> tuple[bytes, int]:
        """The frames of ``(message_id, routing_key, body, ...)`` messages (what
        follows the body is not read), and their number."""
        parts: list[bytes] = []
        append = parts.append
        channel = self._channel_number
        frame_head = _FRAME_HEAD.pack
        header_head = _HEADER_HEAD.pack
        content_type = self._content_type
        body_max = self._body_max
        methods = self._methods
        frames = 0
        for message in messages:
            message_id, routing_key, body = message[0], message[1], message[2]
            method = methods.get(routing_key)
            if method is None:
                method = self._method_frame(routing_key)
            mid = message_id.encode()
            if len(mid) > 255:
                raise ValueError(f"message id is longer than 255 bytes: {message_id[:40]!r}...")
            size = len(body)
            header = (
                header_head(_BASIC_CLASS, 0, size, _FLAGS)
                + content_type
                + bytes((_PERSISTENT, len(mid)))
                + mid
            )
            append(method)
            append(frame_head(_HEADER, channel, len(header)))
            append(header)
            append(_FRAME_END)
            frames += 2
            for start in range(0, size, body_max):
                chunk = body[start : start + body_max]
                append(frame_head(_BODY, channel, len(chunk)))
                append(chunk)
                append(_FRAME_END)
                frames += 1
        return b"".join(parts), frames

    def write(self, messages: Iterable[Sequence[Any]]) -> None:
        """Hand the frames of ``messages`` (as for :meth:`encode`) to the connection's
        transport, as one buffer."""
        data, frames = self.encode(messages)
        if not data:
            return
        connection = self._connection
        connection.bytes_sent += len(data)
        connection.frames_sent += frames
        connection._adapter_emit_data(data)

    def _method_frame(self, routing_key: str) -> bytes:
        payload = self._method_payload_head + _short_string(routing_key, "routing key") + b"\0"
        frame = _FRAME_HEAD.pack(_METHOD, self._channel_number, len(payload)) + payload + _FRAME_END
        if len(self._methods) >= _METHOD_CACHE:
            self._methods.clear()
        self._methods[routing_key] = frame
        return frame
