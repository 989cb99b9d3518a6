"""Tests for sluice.comm: framing, listen/connect, garbage peers, auth, TLS, BatchedSend."""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import msgpack  # type: ignore[import-untyped]
import pytest
from anyio.abc import SocketStream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sluice.comm.tcp as tcp_mod
from sluice.comm import (
    DEFAULT_MAX_FRAME_BYTES,
    AuthenticationError,
    BatchedSend,
    Comm,
    CommClosedError,
    Listener,
    connect,
    is_loopback,
    listen,
    parse_address,
)
from sluice.comm.auth import HANDSHAKE_MAX_FRAME_BYTES
from sluice.comm.frames import HEADER, FrameError, decode_body, encode_body, encode_frame
from sluice.security import Security

pytestmark = pytest.mark.anyio

Handler = Callable[[Comm], Awaitable[None]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def echo(comm: Comm) -> None:
    """Send every frame back as it came."""
    while True:
        msgs = await comm.recv()
        await comm.send(*msgs)


@pytest.fixture
async def echo_listener() -> AsyncIterator[Listener]:
    async with await listen("tcp://127.0.0.1:0", echo) as listener:
        yield listener


async def wait_closed_by_peer(stream: SocketStream) -> bytes:
    """Read until the server closes the connection; return what was received."""
    data = b""
    with anyio.fail_after(5):
        while True:
            try:
                data += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return data
            except OSError:  # connection reset
                return data


async def round_trip(comm: Comm, msg: dict[str, Any]) -> None:
    with anyio.fail_after(5):
        await comm.send(msg)
        assert await comm.recv() == [msg]


# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("tcp://127.0.0.1:8786", ("tcp", "127.0.0.1", 8786)),
        ("tls://0.0.0.0:0", ("tls", "0.0.0.0", 0)),
        ("127.0.0.1:0", ("tcp", "127.0.0.1", 0)),
        ("tcp://[::1]:9", ("tcp", "::1", 9)),
        ("tcp://scheduler.example:65535", ("tcp", "scheduler.example", 65535)),
    ],
)
async def test_parse_address(address: str, expected: tuple[str, str, int]) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize(
    "address",
    ["x", "", "tcp://host", "udp://h:1", "tcp://:80", "tcp://h:65536", "tcp://h:-1", "h:80/x"],
)
async def test_parse_address_errors(address: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_address(address)
    assert str(info.value) == f"bad address {address!r}: expected tcp://host:port"


async def test_is_loopback() -> None:
    for host in ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "::ffff:127.0.0.1"]:
        assert is_loopback(host), host
    for host in ["0.0.0.0", "::", "10.0.0.1", "example.com", "192.168.1.1"]:
        assert not is_loopback(host), host


# --------------------------------------------------------------------------- framing


async def test_codec_keeps_tuples_bytes_and_nested_maps() -> None:
    msg = {
        "op": "task-finished",
        "key": ("x", 1),
        "who_has": {("x", 1): ("tcp://a:1",), "y": ()},
        "data": b"\x00\x01pickled",
        "nested": {"a": {"b": [1, 2.5, None, True]}},
    }
    out = decode_body(encode_body([msg, {"op": "two"}]))
    assert out[0]["nested"]["a"]["b"] == (1, 2.5, None, True)  # lists become tuples
    assert out == [msg | {"nested": {"a": {"b": (1, 2.5, None, True)}}}, {"op": "two"}]


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xc1\xc1\xc1",
        msgpack.packb({"op": "not a list"}),
        msgpack.packb([1, 2]),
        msgpack.packb([{1: "int key"}]),
        msgpack.packb([{"op": 1}]) + b"trailing",
    ],
)
async def test_decode_body_rejects(body: bytes) -> None:
    with pytest.raises(FrameError):
        decode_body(body)


@given(st.binary(max_size=512))
@settings(max_examples=500)
def test_decode_body_fuzz(body: bytes) -> None:
    try:
        msgs = decode_body(body)
    except FrameError:
        return
    assert isinstance(msgs, list)
    assert all(isinstance(m, dict) and all(type(k) is str for k in m) for m in msgs)


async def test_encode_frame_header() -> None:
    frame = encode_frame([{"op": "x"}])
    (length,) = HEADER.unpack(frame[:8])
    assert length == len(frame) - 8
    assert decode_body(frame[8:]) == [{"op": "x"}]


# --------------------------------------------------------------------------- round trips


async def test_round_trip(echo_listener: Listener) -> None:
    assert echo_listener.address.startswith("tcp://127.0.0.1:")
    assert not echo_listener.address.endswith(":0")
    msg = {"op": "x", "key": ("x", 1), "map": {("x", 1): b"bytes", "n": {"deep": (1, "a")}}}
    async with await connect(echo_listener.address) as comm:
        assert comm.peer == echo_listener.address
        assert comm.local.startswith("tcp://127.0.0.1:")
        await round_trip(comm, msg)
        with anyio.fail_after(5):
            await comm.send({"op": "a"}, {"op": "b"}, {"op": "c"})
            assert await comm.recv() == [{"op": "a"}, {"op": "b"}, {"op": "c"}]
    assert comm.closed
    await comm.aclose()  # idempotent
    with pytest.raises(CommClosedError):
        await comm.send({"op": "late"})
    with pytest.raises(CommClosedError):
        await comm.recv()


async def test_address_without_scheme_is_tcp() -> None:
    async with await listen("127.0.0.1:0", echo) as listener:
        assert listener.address.startswith("tcp://")
        async with await connect(listener.address.removeprefix("tcp://")) as comm:
            await round_trip(comm, {"op": "x"})


async def test_large_frame_under_limit_works() -> None:
    limit = 2**20
    overhead = len(encode_body([{"data": b""}]))
    payload = b"x" * (limit - overhead - 3)  # a bin32 header is 3 bytes longer than bin8
    msg = {"data": payload}
    assert len(encode_body([msg])) == limit
    async with (
        await listen("tcp://127.0.0.1:0", echo, max_frame_bytes=limit) as listener,
        await connect(listener.address, max_frame_bytes=limit) as comm,
    ):
        await round_trip(comm, msg)
        with pytest.raises(ValueError, match="exceeds the limit"):
            await comm.send({"data": payload + b"x"})
        await round_trip(comm, {"op": "still usable"})


async def test_concurrent_connections(echo_listener: Listener) -> None:
    results: dict[int, list[int]] = {}

    async def client(i: int) -> None:
        async with await connect(echo_listener.address) as comm:
            got = []
            for j in range(20):
                await comm.send({"client": i, "j": j})
                (msg,) = await comm.recv()
                assert msg["client"] == i
                got.append(msg["j"])
            results[i] = got

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for i in range(25):
                tg.start_soon(client, i)
    assert results == {i: list(range(20)) for i in range(25)}


async def test_concurrent_sends_do_not_interleave(echo_listener: Listener) -> None:
    async with await connect(echo_listener.address) as comm:
        big = b"y" * 300_000

        async def sender(i: int) -> None:
            for _ in range(5):
                await comm.send({"i": i, "data": big})

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for i in range(4):
                    tg.start_soon(sender, i)
                for _ in range(20):
                    (msg,) = await comm.recv()
                    assert msg["data"] == big


async def test_recv_is_cancel_safe(echo_listener: Listener) -> None:
    async with await connect(echo_listener.address) as comm:
        with anyio.move_on_after(0.05):
            await comm.recv()  # nothing to read: cancelled
        await round_trip(comm, {"op": "after cancel"})


async def test_peer_close_raises_comm_closed() -> None:
    closed = anyio.Event()

    async def close_at_once(comm: Comm) -> None:
        await comm.aclose()
        closed.set()

    async with await listen("tcp://127.0.0.1:0", close_at_once) as listener:
        comm = await connect(listener.address)
        with anyio.fail_after(5):
            await closed.wait()
            with pytest.raises(CommClosedError):
                await comm.recv()
        assert comm.closed


async def test_handler_error_is_logged_and_listener_runs_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def handler(comm: Comm) -> None:
        (msg,) = await comm.recv()
        if msg["op"] == "boom":
            raise RuntimeError("handler exploded")
        await comm.send(msg)
        await echo(comm)

    async with await listen("tcp://127.0.0.1:0", handler) as listener:
        with caplog.at_level(logging.ERROR, logger="sluice.comm"):
            async with await connect(listener.address) as bad:
                await bad.send({"op": "boom"})
                with anyio.fail_after(5), pytest.raises(CommClosedError):
                    await bad.recv()
        assert any("handler exploded" in (r.exc_text or "") for r in caplog.records)
        async with await connect(listener.address) as good:
            await round_trip(good, {"op": "fine"})


async def test_listener_aclose_cancels_handlers_and_closes_comms() -> None:
    started = anyio.Event()

    async def handler(comm: Comm) -> None:
        started.set()
        await anyio.sleep_forever()

    listener = await listen("tcp://127.0.0.1:0", handler)
    comm = await connect(listener.address)
    with anyio.fail_after(5):
        await started.wait()
        await listener.aclose()
        with pytest.raises(CommClosedError):
            await comm.recv()
    await listener.aclose()  # idempotent
    with pytest.raises(OSError, match="cannot connect to"):
        await connect(listener.address, timeout=0.2)


async def test_listener_aclose_from_another_task() -> None:
    listener = await listen("tcp://127.0.0.1:0", echo)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.aclose)


async def test_connect_refused_until_timeout() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    start = anyio.current_time()
    with pytest.raises(OSError, match=rf"cannot connect to {address}: connection refused"):
        await connect(address, timeout=0.3)
    assert 0.2 < anyio.current_time() - start < 3


async def test_connect_retries_until_the_server_starts() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    comms: list[Comm] = []

    async def client() -> None:
        comms.append(await connect(address, timeout=10))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(client)
            await anyio.sleep(0.1)  # let it be refused a few times (the test holds either way)
            async with await listen(address, echo):
                while not comms:
                    await anyio.sleep(0.01)
                await round_trip(comms[0], {"op": "late server"})
                await comms[0].aclose()


# --------------------------------------------------------------------------- garbage peers

LIMIT = 1024


def _garbage_cases() -> dict[str, bytes]:
    rnd = random.Random(1234)
    return {
        "random-bytes": bytes(rnd.getrandbits(8) for _ in range(64)),
        "non-msgpack-body": HEADER.pack(4) + b"\xc1\xc1\xc1\xc1",
        "msgpack-map-not-list": encode_frame_raw(msgpack.packb({"op": "x"})),
        "msgpack-list-of-ints": encode_frame_raw(msgpack.packb([1, 2, 3])),
        "non-str-keys": encode_frame_raw(msgpack.packb([{1: "x"}])),
        "empty-body": HEADER.pack(0),
        # over the listener's limit and over the handshake's (so refused in both phases)
        "over-limit": HEADER.pack(max(LIMIT, HANDSHAKE_MAX_FRAME_BYTES) + 1) + b"z" * 100,
        "huge-length": HEADER.pack(2**63),
    }


def encode_frame_raw(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


GARBAGE = _garbage_cases()


@pytest.mark.parametrize("case", sorted(GARBAGE))
async def test_garbage_after_handshake_closes_only_that_connection(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    outcomes: list[str] = []

    async def handler(comm: Comm) -> None:
        try:
            await echo(comm)
        except CommClosedError:
            outcomes.append("closed")
            raise

    async with await listen("tcp://127.0.0.1:0", handler, max_frame_bytes=LIMIT) as listener:
        healthy = await connect(listener.address)
        await round_trip(healthy, {"op": "before"})
        bad = await connect(listener.address)
        await round_trip(bad, {"op": "authenticated"})
        with caplog.at_level(logging.WARNING, logger="sluice.comm"):
            await bad._stream.send(GARBAGE[case])  # bypass the encoder
            with anyio.fail_after(5), pytest.raises(CommClosedError):
                await bad.recv()
        assert outcomes == ["closed"]
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings, "the bad frame must be logged"
        assert bad.local in warnings[-1].getMessage()  # names the peer
        if case in ("over-limit", "huge-length"):
            assert "refusing a frame of" in warnings[-1].getMessage()
        await round_trip(healthy, {"op": "after", "key": ("x", 1)})
        await healthy.aclose()
        await bad.aclose()


@pytest.mark.parametrize("case", sorted(GARBAGE))
async def test_garbage_during_handshake(case: str, caplog: pytest.LogCaptureFixture) -> None:
    called = []

    async def handler(comm: Comm) -> None:
        called.append(comm)
        await echo(comm)

    async with await listen("tcp://127.0.0.1:0", handler) as listener:
        healthy = await connect(listener.address)
        _, host, port = parse_address(listener.address)
        with caplog.at_level(logging.WARNING, logger="sluice.comm"):
            async with await anyio.connect_tcp(host, port) as raw:
                await raw.send(GARBAGE[case])
                data = await wait_closed_by_peer(raw)
        assert data.startswith(HEADER.pack(len(data) - 8))  # only the server's hello
        hello = decode_body(data[8:])[0]
        assert hello["op"] == "hello" and len(hello["nonce"]) == 32
        assert any(r.levelno == logging.WARNING for r in caplog.records)
        assert len(called) == 1  # only the healthy connection reached the handler
        await round_trip(healthy, {"op": "still fine"})
        await healthy.aclose()


async def test_oversized_handshake_frame_refused(caplog: pytest.LogCaptureFixture) -> None:
    async with await listen("tcp://127.0.0.1:0", echo) as listener:
        _, host, port = parse_address(listener.address)
        body = msgpack.packb([{"op": "hello-ok", "version": 1, "pad": b"p" * 5000}])
        assert len(body) > HANDSHAKE_MAX_FRAME_BYTES
        with caplog.at_level(logging.WARNING, logger="sluice.comm"):
            async with await anyio.connect_tcp(host, port) as raw:
                await raw.send(encode_frame_raw(body))
                await wait_closed_by_peer(raw)
        assert any("refusing a frame of" in r.getMessage() for r in caplog.records)


async def test_silent_peer_times_out(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(tcp_mod, "HANDSHAKE_TIMEOUT", 0.2)
    async with await listen("tcp://127.0.0.1:0", echo) as listener:
        _, host, port = parse_address(listener.address)
        with caplog.at_level(logging.WARNING, logger="sluice.comm"):
            async with await anyio.connect_tcp(host, port) as raw:
                await wait_closed_by_peer(raw)
        assert any("timed out" in r.getMessage() for r in caplog.records)


@given(data=st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=4))
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
async def test_fuzz_live_listener(data: list[bytes]) -> None:
    """Random bytes after the handshake never hurt the listener or other connections."""
    async with await listen("tcp://127.0.0.1:0", echo, max_frame_bytes=LIMIT) as listener:
        healthy = await connect(listener.address)
        bad = await connect(listener.address, max_frame_bytes=LIMIT)
        with anyio.fail_after(5):
            try:
                for chunk in data:
                    await bad._stream.send(chunk)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass
            with anyio.move_on_after(0.05), contextlib.suppress(CommClosedError):
                # may echo a valid frame, or get closed; either way nothing crashes
                while True:
                    await bad.recv()
        await bad.aclose()
        await round_trip(healthy, {"op": "alive"})
        await healthy.aclose()


# --------------------------------------------------------------------------- auth


@pytest.fixture
async def counting_listener() -> AsyncIterator[Callable[..., Awaitable[Listener]]]:
    """Factory for a listener whose handler records calls (in ``listener.calls``)."""
    listeners: list[Listener] = []

    async def make(security: Security | None = None) -> Listener:
        calls: list[Comm] = []

        async def handler(comm: Comm) -> None:
            calls.append(comm)
            await echo(comm)

        listener = await listen("tcp://127.0.0.1:0", handler, security=security)
        listener.calls = calls  # type: ignore[attr-defined]
        listeners.append(listener)
        return listener

    yield make
    for listener in listeners:
        await listener.aclose()


async def test_auth_right_token(counting_listener: Callable[..., Awaitable[Listener]]) -> None:
    listener = await counting_listener(Security(auth_token=b"s3cret"))
    async with await connect(listener.address, security=Security(auth_token=b"s3cret")) as c:
        await round_trip(c, {"op": "authenticated"})
    assert len(listener.calls) == 1  # type: ignore[attr-defined]


async def test_auth_missing_token(
    counting_listener: Callable[..., Awaitable[Listener]], caplog: pytest.LogCaptureFixture
) -> None:
    listener = await counting_listener(Security(auth_token=b"s3cret"))
    with caplog.at_level(logging.WARNING, logger="sluice.comm"):
        for security in (None, Security()):
            with pytest.raises(AuthenticationError) as info:
                await connect(listener.address, security=security)
            assert str(info.value) == (
                f"the server at {listener.address} requires an auth token (--auth-token-file)"
            )
        # the server logs once it has read the client's reply; a good client then
        # proves the listener still works, and by then both rejections are logged
        async with await connect(listener.address, security=Security(auth_token=b"s3cret")):
            pass
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert all("rejected connection from tcp://127.0.0.1:" in w for w in warnings)
    assert len(listener.calls) == 1  # type: ignore[attr-defined]


async def test_auth_wrong_token(
    counting_listener: Callable[..., Awaitable[Listener]], caplog: pytest.LogCaptureFixture
) -> None:
    listener = await counting_listener(Security(auth_token=b"s3cret"))
    with caplog.at_level(logging.WARNING, logger="sluice.comm"):
        with pytest.raises(AuthenticationError) as info:
            await connect(listener.address, security=Security(auth_token=b"guess"))
        assert str(info.value) == f"authentication failed at {listener.address}: wrong token"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("wrong token" in w and "tcp://127.0.0.1:" in w for w in warnings)
    assert listener.calls == []  # type: ignore[attr-defined]


async def test_client_token_server_without(
    counting_listener: Callable[..., Awaitable[Listener]],
) -> None:
    """Works: the server does not require a token, so the client's is not used."""
    listener = await counting_listener(None)
    async with await connect(listener.address, security=Security(auth_token=b"tok")) as c:
        await round_trip(c, {"op": "x"})


async def test_server_must_prove_the_token() -> None:
    """A fake server that does not know the token is rejected by the client."""

    async def fake_server(stream: SocketStream) -> None:
        async with stream:
            await stream.send(
                encode_frame([{"op": "hello", "version": 1, "auth": True, "nonce": b"n" * 32}])
            )
            await stream.receive()
            await stream.send(encode_frame([{"op": "auth-ok", "hmac": b"\x00" * 32}]))
            await wait_closed_by_peer(stream)

    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as raw_listener:
        port = raw_listener.extra(anyio.abc.SocketAttribute.local_port)
        address = f"tcp://127.0.0.1:{port}"
        async with anyio.create_task_group() as tg:
            tg.start_soon(raw_listener.serve, fake_server)
            with pytest.raises(AuthenticationError) as info:
                await connect(address, security=Security(auth_token=b"tok"))
            assert str(info.value) == (
                f"authentication failed at {address}: the server did not prove it knows the token"
            )
            tg.cancel_scope.cancel()


async def test_connect_to_non_sluice_server() -> None:
    async def http_server(stream: SocketStream) -> None:
        async with stream:
            await stream.send(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as raw_listener:
        port = raw_listener.extra(anyio.abc.SocketAttribute.local_port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(raw_listener.serve, http_server)
            with pytest.raises(AuthenticationError, match="handshake with tcp://"):
                await connect(f"tcp://127.0.0.1:{port}")
            tg.cancel_scope.cancel()


# --------------------------------------------------------------------------- TLS


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A throwaway CA with a server and a client certificate (made by the openssl CLI)."""
    d = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=sluice test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip
    (d / "leaf.ext").write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "authorityKeyIdentifier=keyid\n"
        "subjectKeyIdentifier=hash\n"
    )
    for name in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=sluice {name}", cwd=d)  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", "leaf.ext",
            cwd=d,
        )  # fmt: skip
    # an unrelated CA, to check that its certificates are refused
    _openssl("req", "-x509", *ec, "-keyout", "other.key", "-out", "other.pem", "-days", "2",
             "-subj", "/CN=other", cwd=d)  # fmt: skip
    return {k: str(d / k) for k in ("ca.pem", "server.pem", "server.key", "client.pem",
                                    "client.key", "other.pem", "other.key")}  # fmt: skip


def _server_sec(f: dict[str, str], **kw: Any) -> Security:
    return Security(
        tls_ca_file=f["ca.pem"], tls_cert=f["server.pem"], tls_key=f["server.key"], **kw
    )


def _client_sec(f: dict[str, str], **kw: Any) -> Security:
    return Security(
        tls_ca_file=f["ca.pem"], tls_cert=f["client.pem"], tls_key=f["client.key"], **kw
    )


async def test_tls_round_trip(tls_files: dict[str, str]) -> None:
    async with await listen("tls://127.0.0.1:0", echo, security=_server_sec(tls_files)) as lst:
        assert lst.address.startswith("tls://127.0.0.1:")
        async with await connect(lst.address, security=_client_sec(tls_files)) as comm:
            assert comm.peer == lst.address
            await round_trip(comm, {"op": "secret", "data": b"\x00" * 100_000, "k": ("x", 1)})


async def test_tls_with_token(tls_files: dict[str, str]) -> None:
    server = _server_sec(tls_files, auth_token=b"tok")
    async with await listen("tls://127.0.0.1:0", echo, security=server) as lst:
        async with await connect(
            lst.address, security=_client_sec(tls_files, auth_token=b"tok")
        ) as c:
            await round_trip(c, {"op": "x"})
        with pytest.raises(AuthenticationError, match="wrong token"):
            await connect(lst.address, security=_client_sec(tls_files, auth_token=b"bad"))


async def test_plain_client_to_tls_listener_fails(
    tls_files: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # a plain client waits for the hello, the TLS server for a ClientHello: the
    # handshake timeout breaks the tie; shorten it for the test
    monkeypatch.setattr(tcp_mod, "HANDSHAKE_TIMEOUT", 0.3)
    async with await listen("tls://127.0.0.1:0", echo, security=_server_sec(tls_files)) as lst:
        plain = lst.address.replace("tls://", "tcp://")
        with pytest.raises(AuthenticationError, match=f"handshake with {plain} failed"):
            await connect(plain)
        _, host, port = parse_address(lst.address)
        async with await anyio.connect_tcp(host, port) as raw:  # garbage instead of TLS
            await raw.send(encode_frame([{"op": "hello-ok", "version": 1}]))
            await wait_closed_by_peer(raw)
        async with await connect(lst.address, security=_client_sec(tls_files)) as comm:
            await round_trip(comm, {"op": "listener unaffected"})


async def test_tls_client_to_plain_listener_fails(
    tls_files: dict[str, str], echo_listener: Listener
) -> None:
    tls_address = echo_listener.address.replace("tcp://", "tls://")
    with pytest.raises(AuthenticationError, match=f"TLS handshake with {tls_address} failed"):
        await connect(tls_address, security=_client_sec(tls_files))
    async with await connect(echo_listener.address) as comm:
        await round_trip(comm, {"op": "fine"})


async def test_mutual_tls_refuses_foreign_or_missing_client_cert(
    tls_files: dict[str, str],
) -> None:
    async with await listen("tls://127.0.0.1:0", echo, security=_server_sec(tls_files)) as lst:
        no_cert = Security(tls_ca_file=tls_files["ca.pem"])
        foreign = Security(
            tls_ca_file=tls_files["ca.pem"],
            tls_cert=tls_files["other.pem"],
            tls_key=tls_files["other.key"],
        )
        for security in (no_cert, foreign):
            # TLS 1.3 reports a refused client certificate only once data flows
            with pytest.raises(AuthenticationError, match=f"handshake with {lst.address}"):
                await connect(lst.address, security=security)
        wrong_ca = Security(tls_ca_file=tls_files["other.pem"])
        with pytest.raises(AuthenticationError, match="TLS handshake with"):
            await connect(lst.address, security=wrong_ca)
        async with await connect(lst.address, security=_client_sec(tls_files)) as comm:
            await round_trip(comm, {"op": "fine"})


async def test_tls_address_without_tls_configured() -> None:
    for security in (None, Security(auth_token=b"t")):
        with pytest.raises(ValueError, match="TLS is not configured"):
            await listen("tls://127.0.0.1:0", echo, security=security)
        with pytest.raises(ValueError, match="TLS is not configured"):
            await connect("tls://127.0.0.1:1", security=security)


# --------------------------------------------------------------------------- BatchedSend


async def test_batched_send_coalesces_and_keeps_order() -> None:
    frames: list[int] = []
    received: list[int] = []
    done = anyio.Event()
    n = 2000

    async def handler(comm: Comm) -> None:
        while True:
            msgs = await comm.recv()
            frames.append(len(msgs))
            received.extend(m["i"] for m in msgs)
            if len(received) >= n:
                done.set()

    async with await listen("tcp://127.0.0.1:0", handler) as listener:
        comm = await connect(listener.address)
        batched = BatchedSend(comm, interval=0.01)
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(batched.run)
                for i in range(n // 2):  # a burst: no awaits in between
                    batched.send({"op": "x", "i": i})
                await anyio.sleep(0)
                for i in range(n // 2, n):  # a second burst while the first is in flight
                    batched.send({"op": "x", "i": i})
                await done.wait()
                await batched.aclose()
        assert received == list(range(n))
        assert len(frames) <= 4, frames
        assert batched.messages_sent == n and batched.frames_sent == len(frames)
        with pytest.raises(CommClosedError):
            batched.send({"op": "after close"})
        await comm.aclose()


async def test_batched_send_aclose_flushes_without_run(echo_listener: Listener) -> None:
    async with await connect(echo_listener.address) as comm:
        batched = BatchedSend(comm)
        batched.send({"op": "a"}, {"op": "b"})
        await batched.aclose()
        with anyio.fail_after(5):
            assert await comm.recv() == [{"op": "a"}, {"op": "b"}]


async def test_batched_send_aclose_flushes_pending(echo_listener: Listener) -> None:
    async with await connect(echo_listener.address) as comm:
        batched = BatchedSend(comm, interval=10)  # only aclose can cut the wait short
        got: list[dict[str, Any]] = []
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(batched.run)
                batched.send({"i": 0})
                got += await comm.recv()  # first frame goes out at once
                batched.send({"i": 1})
                batched.send({"i": 2})
                await batched.aclose()  # does not wait 10 s
            got += await comm.recv()
        assert got == [{"i": 0}, {"i": 1}, {"i": 2}]


async def test_batched_send_no_interval_after_a_quiet_spell(echo_listener: Listener) -> None:
    """Sparse traffic (one result a client waits on, then the next) is not held back by
    the interval; a frame that follows another closely (a burst) is."""
    async with await connect(echo_listener.address) as comm:
        # quiet=0: every frame started after a previous one's end counts as sparse,
        # except one whose first message was queued before that end.
        batched = BatchedSend(comm, interval=30, quiet=0)
        with anyio.fail_after(5):  # far less than the 30 s interval
            async with anyio.create_task_group() as tg:
                tg.start_soon(batched.run)
                batched.send({"i": 0})
                assert await comm.recv() == [{"i": 0}]
                batched.send({"i": 1})
                assert await comm.recv() == [{"i": 1}]
                await batched.aclose()
        burst = BatchedSend(comm, interval=30, quiet=3600)  # every frame is a burst
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(burst.run)
                burst.send({"i": 2})  # the first frame ever follows a quiet spell
                assert await comm.recv() == [{"i": 2}]
                burst.send({"i": 3})  # goes out at once, then the interval starts
                assert await comm.recv() == [{"i": 3}]
                burst.send({"i": 4})  # waits out the interval: only aclose ends it
                with anyio.move_on_after(0.2) as waited:
                    await comm.recv()
                assert waited.cancelled_caught
                await burst.aclose()
            assert await comm.recv() == [{"i": 4}]


async def test_send_later_rides_with_the_next_send(echo_listener: Listener) -> None:
    async with await connect(echo_listener.address) as comm:
        batched = BatchedSend(comm, interval=0, later=30)  # only send() or aclose() cut it
        got: list[dict[str, Any]] = []
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(batched.run)
                batched.send_later({"i": 0})
                await anyio.sleep(0)  # run() sees only the later message and holds it
                batched.send({"i": 1})
                got.append(await comm.recv())  # both in one frame, in order
                batched.send_later({"i": 2})
                await batched.aclose()  # flushes it without waiting 30 s
            got.append(await comm.recv())
        assert got == [[{"i": 0}, {"i": 1}], [{"i": 2}]]


async def test_send_later_alone_goes_out_after_later(echo_listener: Listener) -> None:
    async with await connect(echo_listener.address) as comm:
        batched = BatchedSend(comm, interval=0, later=0.01)
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(batched.run)
                batched.send_later({"i": 0})
                assert await comm.recv() == [{"i": 0}]
                await batched.aclose()


async def test_batched_send_on_closed_comm(echo_listener: Listener) -> None:
    comm = await connect(echo_listener.address)
    batched = BatchedSend(comm)
    await comm.aclose()
    with pytest.raises(CommClosedError):
        batched.send({"op": "x"})


async def test_batched_send_run_returns_when_comm_closes(echo_listener: Listener) -> None:
    comm = await connect(echo_listener.address)
    batched = BatchedSend(comm)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(batched.run)
            await comm.aclose()
            batched._buffer.append({"op": "lost"})  # as if queued just before the close
            assert batched._wake is not None
            batched._wake.set()
    await batched.aclose()


async def test_default_limit() -> None:
    assert DEFAULT_MAX_FRAME_BYTES == 256 * 2**20


async def test_local_close_wakes_a_pending_recv(echo_listener: Listener) -> None:
    comm = await connect(echo_listener.address)
    errors: list[BaseException] = []

    async def reader() -> None:
        try:
            await comm.recv()
        except CommClosedError as exc:
            errors.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            await anyio.wait_all_tasks_blocked()
            await comm.aclose()
    assert len(errors) == 1


async def test_handler_sees_server_side_peer() -> None:
    seen: list[tuple[str, str]] = []

    async def handler(comm: Comm) -> None:
        seen.append((comm.peer, comm.local))
        await echo(comm)

    async with (
        await listen("tcp://127.0.0.1:0", handler) as listener,
        await connect(listener.address) as comm,
    ):
        await round_trip(comm, {"op": "x"})
        assert seen == [(comm.local, listener.address)]
