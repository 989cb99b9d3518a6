"""Framing and the msgpack codec of the wire protocol.

A frame is an 8-byte little-endian unsigned length followed by that many bytes of body.
The body is msgpack of a *list of maps*: several messages travel in one frame so that a
hot path pays the per-frame costs (a syscall, a header, a wake-up of the reader) once
for many messages.

Decoding uses ``use_list=False``: every msgpack array comes back as a **tuple**, not a
list.  That is deliberate: task keys such as ``("x", 1)`` survive a round trip intact
and stay hashable, so they can be map keys (``strict_map_key=False`` allows that).  The
price is that a list sent is a tuple received; code on the receiving side must not rely
on getting lists back.

Nothing here ever unpickles: the comm layer only moves msgpack.  Pickled payloads are
``bytes`` values that the application decodes itself, after the peer authenticated.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import msgpack  # type: ignore[import-untyped]  # msgpack ships no type stubs

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "HEADER",
    "CommClosedError",
    "FrameError",
    "decode_body",
    "encode_body",
    "encode_frame",
]

#: Largest frame body a comm accepts unless told otherwise (256 MiB).  A bigger declared
#: length is refused before any of the body is read, so a hostile or broken peer cannot
#: make us allocate arbitrary memory.
DEFAULT_MAX_FRAME_BYTES = 256 * 2**20

#: The frame header: body length as an unsigned 64-bit little-endian integer.
HEADER = struct.Struct("<Q")


class CommClosedError(ConnectionError):
    """The connection is closed: by us, by the peer, or after a bad frame from the peer."""


class FrameError(ValueError):
    """A frame body that is not msgpack of a list of maps with ``str`` keys."""


def encode_body(msgs: Sequence[dict[str, Any]]) -> bytes:
    """Encode messages as the body of one frame (a msgpack array of maps)."""
    return msgpack.packb(msgs, use_bin_type=True)  # type: ignore[no-any-return]


def encode_frame(msgs: Sequence[dict[str, Any]]) -> bytes:
    """Encode messages as one complete frame, header included, in a single buffer."""
    body = msgpack.packb(msgs, use_bin_type=True)
    return HEADER.pack(len(body)) + body  # type: ignore[no-any-return]


def decode_body(body: bytes) -> list[dict[str, Any]]:
    """Decode a frame body into its messages.

    Raises :class:`FrameError` (with a short reason) when the body is not valid msgpack
    or not an array of maps whose keys are all ``str``.  Arrays inside the messages come
    back as tuples (see the module docstring).
    """
    try:
        obj = msgpack.unpackb(body, raw=False, use_list=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise FrameError(f"not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(obj, tuple):
        raise FrameError(f"expected an array of maps, got {type(obj).__name__}")
    for msg in obj:
        if not isinstance(msg, dict):
            raise FrameError(f"expected an array of maps, found {type(msg).__name__}")
        for k in msg:
            if type(k) is not str:
                raise FrameError(f"message keys must be str, found {type(k).__name__}")
    return list(obj)
