"""TCP (and TLS) connections carrying msgpack frames: :func:`listen`, :func:`connect`.

Design notes:

* Every connection runs the handshake of :mod:`sluice.comm.auth` before the application
  sees it, so a listener's handler only ever gets authenticated peers.
* A peer that misbehaves (oversized frame, garbage body) loses its own connection and
  nothing else: :meth:`Comm.recv` logs a WARNING, closes the comm and raises
  :class:`CommClosedError`, which handlers already treat as "peer went away".
* TLS streams are created with ``standard_compatible=False`` (no close_notify exchange):
  our frames carry their length, so a truncated stream is detected anyway, and closing
  never waits on an unresponsive peer.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self

import anyio
from anyio.abc import AnyByteStream, SocketAttribute, SocketListener, SocketStream, TaskGroup
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.tls import TLSStream

from sluice.comm.auth import (
    HANDSHAKE_TIMEOUT,
    AuthenticationError,
    client_handshake,
    server_handshake,
)
from sluice.comm.frames import (
    DEFAULT_MAX_FRAME_BYTES,
    HEADER,
    CommClosedError,
    FrameError,
    decode_body,
    encode_frame,
)
from sluice.security import Security

__all__ = ["Comm", "Listener", "connect", "is_loopback", "listen", "parse_address"]

logger = logging.getLogger("sluice.comm")

Handler = Callable[["Comm"], Awaitable[None]]

#: Errors from a byte stream that mean "this connection is gone".
_STREAM_ERRORS: tuple[type[BaseException], ...] = (
    anyio.EndOfStream,
    anyio.IncompleteRead,
    anyio.ClosedResourceError,
    anyio.BrokenResourceError,
    OSError,  # includes ssl.SSLError and ConnectionResetError
)

_ADDRESS_RE = re.compile(
    r"^(?:(?P<scheme>[a-z]+)://)?(?P<host>\[[^\]]*\]|[^:/\[\]]*):(?P<port>\d{1,5})$"
)


def parse_address(address: str) -> tuple[str, str, int]:
    """Split ``"tcp://host:port"``, ``"tls://host:port"`` or ``"host:port"`` (tcp).

    IPv6 hosts are written in brackets (``tcp://[::1]:8786``) and returned without them.
    """
    m = _ADDRESS_RE.match(address) if isinstance(address, str) else None
    scheme = (m.group("scheme") or "tcp") if m else ""
    host = m.group("host").strip("[]") if m else ""
    port = int(m.group("port")) if m else -1
    if scheme not in ("tcp", "tls") or not host or not 0 <= port <= 65535:
        raise ValueError(f"bad address {address!r}: expected tcp://host:port")
    return scheme, host, port


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (no DNS lookup is made).

    Used to decide whether binding needs TLS or a token: only loopback binds are safe
    without either.
    """
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def _format_address(scheme: str, sockaddr: Any) -> str:
    host, port = str(sockaddr[0]), int(sockaddr[1])
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def _stream_addresses(scheme: str, stream: AnyByteStream) -> tuple[str, str]:
    """(peer, local) addresses of a socket stream, TLS-wrapped or not."""
    try:
        peer = _format_address(scheme, stream.extra(SocketAttribute.remote_address))
        local = _format_address(scheme, stream.extra(SocketAttribute.local_address))
    except Exception:  # not a socket (tests may use memory streams)
        return f"{scheme}://<unknown>", f"{scheme}://<unknown>"
    return peer, local


class Comm:
    """One message connection: :meth:`send` and :meth:`recv` lists of dict messages.

    ``send`` may be called from several tasks at once (frames never interleave);
    ``recv`` is cancel-safe (a cancelled ``recv`` loses no data).
    """

    def __init__(
        self,
        stream: AnyByteStream,
        *,
        scheme: str = "tcp",
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        self._stream = stream
        self._reader = BufferedByteReceiveStream(stream)
        self._max_frame_bytes = max_frame_bytes
        self._send_lock = anyio.Lock(fast_acquire=True)
        self._recv_lock = anyio.Lock(fast_acquire=True)
        self._pending_length: int | None = None  # header read, body not yet (cancel-safety)
        self.peer, self.local = _stream_addresses(scheme, stream)
        self.closed = False

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Comm {self.local} -> {self.peer} {state}>"

    async def send(self, *msgs: dict[str, Any]) -> None:
        """Send all ``msgs`` in one frame (a msgpack array of maps).

        Raises :class:`CommClosedError` if the connection is (or gets) closed, and
        ``ValueError`` (leaving the comm usable) for a frame over ``max_frame_bytes``,
        which the peer would refuse anyway.
        """
        if self.closed:
            raise CommClosedError(f"connection to {self.peer} is closed")
        frame = encode_frame(msgs)
        if len(frame) - HEADER.size > self._max_frame_bytes:
            raise ValueError(
                f"frame of {len(frame) - HEADER.size} bytes exceeds the limit of "
                f"{self._max_frame_bytes} bytes"
            )
        try:
            async with self._send_lock:
                # One write per frame: header and body go out together.
                await self._stream.send(frame)
        except _STREAM_ERRORS as exc:
            await self.aclose()
            raise CommClosedError(f"connection to {self.peer} lost: {exc!r}") from exc

    async def recv(self) -> list[dict[str, Any]]:
        """Receive the messages of one frame.

        Arrays arrive as tuples (see :mod:`sluice.comm.frames`).  Raises
        :class:`CommClosedError` on EOF, reset, close, or a bad/oversized frame (which
        is logged and closes this connection).
        """
        return await self._recv_frame(self._max_frame_bytes)

    async def _recv_frame(self, limit: int) -> list[dict[str, Any]]:
        async with self._recv_lock:
            if self.closed:
                raise CommClosedError(f"connection to {self.peer} is closed")
            failure: BaseException | None = None
            body = b""
            try:
                if self._pending_length is None:
                    (length,) = HEADER.unpack(await self._reader.receive_exactly(HEADER.size))
                    self._pending_length = length
                length = self._pending_length
                if length <= limit and length:
                    body = await self._reader.receive_exactly(length)
            except _STREAM_ERRORS as exc:
                failure = exc
            if failure is not None:
                await self.aclose()
                raise CommClosedError(f"connection to {self.peer} closed") from failure
            if length > limit:
                logger.warning(
                    "refusing a frame of %d bytes from %s (limit %d bytes); closing the connection",
                    length,
                    self.peer,
                    limit,
                )
                await self.aclose()
                raise CommClosedError(f"{self.peer} sent a frame of {length} bytes (too big)")
            self._pending_length = None
            try:
                return decode_body(body)
            except FrameError as exc:
                logger.warning(
                    "malformed frame from %s (%s); closing the connection", self.peer, exc
                )
                await self.aclose()
                raise CommClosedError(f"{self.peer} sent a malformed frame: {exc}") from None

    async def aclose(self) -> None:
        """Close the connection (idempotent; shielded so it completes when cancelled)."""
        if self.closed:
            return
        self.closed = True
        with anyio.CancelScope(shield=True):
            try:
                await self._stream.aclose()
            except Exception:  # already broken: nothing left to release
                logger.debug("error closing %r", self, exc_info=True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _ssl_context(scheme: str, address: str, security: Security | None, server: bool) -> Any:
    if scheme != "tls":
        return None
    if security is None or not security.tls:
        raise ValueError(f"cannot use {address!r}: TLS is not configured (--tls-cert, --tls-key)")
    return security.server_ssl_context() if server else security.client_ssl_context()


class Listener:
    """Accepts connections in the background until :meth:`aclose`.

    The accept loops and the handler tasks live in a task group that the listener owns,
    run by a background asyncio task: this lets ``aclose`` be called from any task (a
    server's ``close()`` often runs in another task than its ``start()``), which a task
    group entered by the caller would not allow.
    """

    def __init__(
        self,
        listeners: list[SocketListener],
        address: str,
        handler: Handler,
        *,
        scheme: str,
        ssl_context: ssl.SSLContext | None,
        token: bytes | None,
        max_frame_bytes: int,
    ) -> None:
        self.address = address
        self._listeners = listeners
        self._handler = handler
        self._scheme = scheme
        self._ssl_context = ssl_context
        self._token = token
        self._max_frame_bytes = max_frame_bytes
        self._streams: set[SocketStream] = set()
        self._started = anyio.Event()
        self._done = anyio.Event()
        self._cancel_scope: anyio.CancelScope | None = None
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<Listener {self.address}>"

    async def _start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())
        await self._started.wait()

    async def _run(self) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._cancel_scope = tg.cancel_scope
                for sub in self._listeners:
                    tg.start_soon(self._accept_loop, sub, tg)
                self._started.set()
        finally:
            with anyio.CancelScope(shield=True):
                for sub in self._listeners:
                    await anyio.aclose_forcefully(sub)
                for stream in list(self._streams):
                    await anyio.aclose_forcefully(stream)
                self._streams.clear()
            self._started.set()
            self._done.set()

    async def _accept_loop(self, sub: SocketListener, tg: TaskGroup) -> None:
        while True:
            try:
                stream = await sub.accept()
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                return
            except Exception as exc:  # e.g. EMFILE: keep listening, don't spin
                logger.warning("accept on %s failed: %s", self.address, exc)
                await anyio.sleep(0.1)
                continue
            self._streams.add(stream)
            tg.start_soon(self._serve_one, stream)

    async def _serve_one(self, raw: SocketStream) -> None:
        peer, _ = _stream_addresses(self._scheme, raw)
        comm: Comm | None = None
        try:
            try:
                with anyio.fail_after(HANDSHAKE_TIMEOUT):
                    stream: AnyByteStream = raw
                    if self._ssl_context is not None:
                        stream = await TLSStream.wrap(
                            raw,
                            server_side=True,
                            ssl_context=self._ssl_context,
                            standard_compatible=False,
                        )
                    comm = Comm(stream, scheme=self._scheme, max_frame_bytes=self._max_frame_bytes)
                    await server_handshake(comm, self._token)
            except TimeoutError:
                logger.warning(
                    "handshake with %s timed out after %ss; closing", peer, HANDSHAKE_TIMEOUT
                )
                return
            except AuthenticationError as exc:
                logger.warning("rejected connection from %s: %s", peer, exc)
                return
            except _STREAM_ERRORS as exc:
                logger.warning("handshake with %s failed: %s", peer, str(exc) or type(exc).__name__)
                return
            except Exception:  # a bug, but it must not take the listener down
                logger.exception("unexpected error in the handshake with %s", peer)
                return
            try:
                await self._handler(comm)
            except CommClosedError:
                logger.debug("connection from %s closed during its handler", peer)
            except Exception:
                logger.exception("handler for the connection from %s failed", peer)
        finally:
            if comm is not None:
                await comm.aclose()
            await anyio.aclose_forcefully(raw)
            self._streams.discard(raw)

    async def aclose(self) -> None:
        """Stop accepting, cancel the handlers, close every connection (idempotent)."""
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()
        elif self._task is not None:
            self._task.cancel()
        if self._task is not None:
            await self._done.wait()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


async def listen(
    address: str,
    handler: Handler,
    *,
    security: Security | None = None,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
) -> Listener:
    """Listen on ``address`` and call ``await handler(comm)`` for each authenticated peer.

    The handshake runs first; the handler is only called after it succeeded.  When the
    handler returns or raises, the connection is closed (the handler owns the comm for
    its lifetime); an exception is logged on ``sluice.comm`` (a ``CommClosedError`` only
    at DEBUG, since a peer leaving is normal) and the listener keeps running.
    """
    scheme, host, port = parse_address(address)
    ssl_context = _ssl_context(scheme, address, security, server=True)
    multi = await anyio.create_tcp_listener(local_host=host, local_port=port)
    listeners = [sub for sub in multi.listeners if isinstance(sub, SocketListener)]
    bound = _format_address(scheme, listeners[0].extra(SocketAttribute.local_address))
    listener = Listener(
        listeners,
        bound,
        handler,
        scheme=scheme,
        ssl_context=ssl_context,
        token=security.auth_token if security is not None else None,
        max_frame_bytes=max_frame_bytes,
    )
    await listener._start()
    return listener


def _refused(exc: BaseException) -> bool:
    """Whether a connect error means nobody listens (yet): worth retrying."""
    if isinstance(exc, ConnectionRefusedError):
        return True
    cause = exc.__cause__
    if isinstance(cause, ConnectionRefusedError):
        return True
    if isinstance(cause, BaseExceptionGroup):
        return all(isinstance(e, ConnectionRefusedError) for e in cause.exceptions)
    return False


async def connect(
    address: str,
    *,
    security: Security | None = None,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    timeout: float = 10.0,
) -> Comm:
    """Connect to ``address`` and run the client side of the handshake.

    "Connection refused" is retried until ``timeout`` (the server may still be starting),
    then ``OSError`` naming the address is raised.  A failed handshake (or TLS
    handshake) raises :class:`AuthenticationError` with a one-line reason.
    """
    scheme, host, port = parse_address(address)
    ssl_context = _ssl_context(scheme, address, security, server=False)
    deadline = anyio.current_time() + timeout
    delay = 0.01
    refused = False  # was the last attempt refused (vs. no answer at all)?
    while True:
        try:
            with anyio.fail_after(max(deadline - anyio.current_time(), 0)):
                stream: AnyByteStream = await anyio.connect_tcp(
                    host, port, ssl_context=ssl_context, tls_standard_compatible=False
                )
            break
        except TimeoutError:
            why = "connection refused" if refused else "timed out"
            raise OSError(f"cannot connect to {address}: {why} (retried for {timeout}s)") from None
        except ssl.SSLError as exc:
            raise AuthenticationError(
                f"TLS handshake with {address} failed: {exc.reason or exc}"
            ) from None
        except (anyio.BrokenResourceError, anyio.EndOfStream):
            raise AuthenticationError(
                f"TLS handshake with {address} failed: the server closed the connection"
            ) from None
        except OSError as exc:
            refused = _refused(exc)
            if not refused:
                raise OSError(f"cannot connect to {address}: {exc}") from exc
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                raise OSError(
                    f"cannot connect to {address}: connection refused (retried for {timeout}s)"
                ) from exc
            await anyio.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.5)
    comm = Comm(stream, scheme=scheme, max_frame_bytes=max_frame_bytes)
    try:
        with anyio.fail_after(HANDSHAKE_TIMEOUT):
            await client_handshake(
                comm, security.auth_token if security is not None else None, address
            )
    except TimeoutError:
        await comm.aclose()
        raise AuthenticationError(
            f"handshake with {address} failed: no reply within {HANDSHAKE_TIMEOUT}s"
        ) from None
    except CommClosedError:
        await comm.aclose()
        raise AuthenticationError(
            f"handshake with {address} failed: the server closed the connection"
        ) from None
    except BaseException:
        await comm.aclose()
        raise
    return comm
