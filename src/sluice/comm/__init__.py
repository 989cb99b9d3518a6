"""Connections between sluice processes: framed msgpack over TCP/TLS, with a handshake.

See :mod:`sluice.comm.frames` for the wire format (arrays arrive as tuples),
:mod:`sluice.comm.auth` for the handshake, :mod:`sluice.comm.tcp` for listen/connect.
"""

from sluice.comm.auth import HANDSHAKE_TIMEOUT, AuthenticationError
from sluice.comm.batched import BatchedSend
from sluice.comm.frames import DEFAULT_MAX_FRAME_BYTES, CommClosedError
from sluice.comm.tcp import Comm, Listener, connect, is_loopback, listen, parse_address

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "HANDSHAKE_TIMEOUT",
    "AuthenticationError",
    "BatchedSend",
    "Comm",
    "CommClosedError",
    "Listener",
    "connect",
    "is_loopback",
    "listen",
    "parse_address",
]
