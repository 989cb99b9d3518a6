"""The connection handshake: protocol version check and optional HMAC authentication.

Every connection runs it right after connect/accept (and after TLS, if any), before any
application frame, with frames of at most :data:`HANDSHAKE_MAX_FRAME_BYTES`:

1. server -> client ``{"op": "hello", "version": 1, "auth": bool, "nonce": <32 bytes>}``
2. if ``auth`` is false, client -> server ``{"op": "hello-ok", "version": 1}``; done.
   (A client holding a token still connects: the server simply does not ask for it.)
3. if ``auth`` is true, client -> server ``{"op": "auth", "version": 1, "nonce": <32
   bytes>, "hmac": HMAC-SHA256(token, server_nonce + client_nonce + b"client")}``
   (``"hmac": None`` when the client has no token);
4. server -> client ``{"op": "auth-ok", "hmac": HMAC-SHA256(token, server_nonce +
   client_nonce + b"server")}``, which the client verifies, so the server proves it
   knows the token too; or ``{"op": "auth-failed", "reason": "..."}`` and the server
   closes.

The client contributes a nonce of its own so that the server's proof is fresh: without
it, a fake server could replay a recorded ``hello`` / ``auth-ok`` pair.  The token never
crosses the wire, and digests are compared with :func:`hmac.compare_digest`.  Nothing is
unpickled before the handshake succeeds (nor by the comm layer at all).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
from typing import TYPE_CHECKING, Any

from sluice.comm.frames import CommClosedError

if TYPE_CHECKING:
    from sluice.comm.tcp import Comm

__all__ = [
    "HANDSHAKE_MAX_FRAME_BYTES",
    "HANDSHAKE_TIMEOUT",
    "HANDSHAKE_VERSION",
    "AuthenticationError",
    "client_handshake",
    "server_handshake",
]

#: Version of the handshake (and of the framing behind it).
HANDSHAKE_VERSION = 1
#: Seconds a peer has to complete the handshake (TLS included) before it is dropped, so
#: silent or very slow peers cannot hold connections open.
HANDSHAKE_TIMEOUT = 10.0
#: Handshake frames are tiny; anything bigger is refused before it is read.
HANDSHAKE_MAX_FRAME_BYTES = 4096
NONCE_BYTES = 32


class AuthenticationError(ConnectionError):
    """The handshake failed: wrong/missing token, or the peer does not speak it."""


def _mac(token: bytes, server_nonce: bytes, client_nonce: bytes, side: bytes) -> bytes:
    return hmac.new(token, server_nonce + client_nonce + side, hashlib.sha256).digest()


def _one_line(value: object, limit: int = 200) -> str:
    """Make an untrusted peer-supplied string safe to put in one log/error line."""
    text = value if isinstance(value, str) else repr(value)
    return " ".join(text.split())[:limit]


async def _recv_one(comm: Comm) -> dict[str, Any]:
    msgs = await comm._recv_frame(HANDSHAKE_MAX_FRAME_BYTES)
    if len(msgs) != 1:
        raise AuthenticationError(f"expected one handshake message, got {len(msgs)}")
    return msgs[0]


async def server_handshake(comm: Comm, token: bytes | None) -> None:
    """Run the server side; raise :class:`AuthenticationError` (reason) on failure.

    The caller logs the failure and closes the comm; the application handler must not
    run.  A :class:`CommClosedError` means the peer left (or sent a bad frame).
    """
    nonce = secrets.token_bytes(NONCE_BYTES)
    await comm.send(
        {"op": "hello", "version": HANDSHAKE_VERSION, "auth": token is not None, "nonce": nonce}
    )
    reply = await _recv_one(comm)
    op = reply.get("op")
    if reply.get("version") != HANDSHAKE_VERSION:
        raise AuthenticationError(
            f"client speaks handshake version {_one_line(reply.get('version'))}, "
            f"expected {HANDSHAKE_VERSION}"
        )
    if token is None:
        if op != "hello-ok":
            raise AuthenticationError(f"expected 'hello-ok', got {_one_line(op)}")
        return
    if op != "auth":
        raise AuthenticationError(f"expected 'auth', got {_one_line(op)}")
    client_nonce, mac = reply.get("nonce"), reply.get("hmac")
    if mac is None:
        await _refuse(comm, "no token")
        raise AuthenticationError("client sent no auth token")
    if not (
        isinstance(client_nonce, bytes)
        and len(client_nonce) == NONCE_BYTES
        and isinstance(mac, bytes)
    ):
        await _refuse(comm, "malformed auth message")
        raise AuthenticationError("malformed auth message")
    if not hmac.compare_digest(mac, _mac(token, nonce, client_nonce, b"client")):
        await _refuse(comm, "wrong token")
        raise AuthenticationError("wrong token")
    await comm.send({"op": "auth-ok", "hmac": _mac(token, nonce, client_nonce, b"server")})


async def _refuse(comm: Comm, reason: str) -> None:
    """Tell the client why, best effort (it may already be gone)."""
    with contextlib.suppress(CommClosedError):
        await comm.send({"op": "auth-failed", "reason": reason})


async def client_handshake(comm: Comm, token: bytes | None, address: str) -> None:
    """Run the client side; raise :class:`AuthenticationError` with a one-line reason."""
    try:
        hello = await _recv_one(comm)
    except CommClosedError:
        raise AuthenticationError(
            f"handshake with {address} failed: the server closed the connection"
        ) from None
    if hello.get("op") != "hello" or not isinstance(hello.get("nonce"), bytes):
        raise AuthenticationError(f"handshake with {address} failed: not a sluice server")
    if hello.get("version") != HANDSHAKE_VERSION:
        raise AuthenticationError(
            f"handshake with {address} failed: the server speaks handshake version "
            f"{_one_line(hello.get('version'))}, this client speaks {HANDSHAKE_VERSION}"
        )
    if not hello.get("auth"):
        await comm.send({"op": "hello-ok", "version": HANDSHAKE_VERSION})
        return
    client_nonce = secrets.token_bytes(NONCE_BYTES)
    if token is None:
        await comm.send(
            {"op": "auth", "version": HANDSHAKE_VERSION, "nonce": client_nonce, "hmac": None}
        )
        raise AuthenticationError(
            f"the server at {address} requires an auth token (--auth-token-file)"
        )
    server_nonce: bytes = hello["nonce"]
    await comm.send(
        {
            "op": "auth",
            "version": HANDSHAKE_VERSION,
            "nonce": client_nonce,
            "hmac": _mac(token, server_nonce, client_nonce, b"client"),
        }
    )
    try:
        reply = await _recv_one(comm)
    except CommClosedError:
        raise AuthenticationError(
            f"authentication failed at {address}: the server closed the connection"
        ) from None
    op = reply.get("op")
    if op == "auth-failed":
        reason = _one_line(reply.get("reason"))
        raise AuthenticationError(f"authentication failed at {address}: {reason}")
    mac = reply.get("hmac")
    if (
        op != "auth-ok"
        or not isinstance(mac, bytes)
        or not hmac.compare_digest(mac, _mac(token, server_nonce, client_nonce, b"server"))
    ):
        raise AuthenticationError(
            f"authentication failed at {address}: the server did not prove it knows the token"
        )
