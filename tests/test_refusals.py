"""Bad peers are refused one connection at a time, while real work runs on."""

from __future__ import annotations

import threading

import anyio
import pytest

from sluice.client import Client
from sluice.comm import AuthenticationError, connect
from sluice.comm.frames import HEADER
from sluice.scheduler import Scheduler
from sluice.security import Security
from sluice.worker import Worker

pytestmark = pytest.mark.anyio

TOKEN = Security(auth_token=b"correct horse battery staple")
GATE = threading.Event()  # holds the tasks until the bad peers have been refused


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def held_inc(x: int) -> int:
    if not GATE.wait(timeout=60):
        raise TimeoutError("the test never opened the gate")
    return x + 1


async def read_frame(stream: anyio.abc.ByteStream) -> bytes:
    """One whole frame from a raw stream, or b"" once the peer closed it."""
    data = b""
    try:
        while (
            len(data) < HEADER.size
            or len(data) < HEADER.size + HEADER.unpack(data[: HEADER.size])[0]
        ):
            data += await stream.receive()
    except (anyio.EndOfStream, anyio.BrokenResourceError):
        return b""
    return data


async def closed_by_peer(stream: anyio.abc.ByteStream) -> bool:
    try:
        with anyio.fail_after(10):
            while await stream.receive():
                pass
    except (anyio.EndOfStream, anyio.BrokenResourceError):
        return True
    return False


async def test_bad_peers_are_refused_and_running_work_is_untouched(
    caplog: pytest.LogCaptureFixture,
) -> None:
    GATE.clear()
    async with (
        Scheduler(port=0, security=TOKEN) as s,
        Worker(s.address, security=TOKEN, name="a"),
        Worker(s.address, security=TOKEN, name="b"),
        Client(s.address, asynchronous=True, security=TOKEN) as client,
    ):
        futures = client.map(held_inc, range(20))
        host, port = s.address.removeprefix("tcp://").rsplit(":", 1)

        # 1. No token: refused at the handshake, by the comm layer and by a Client.
        with pytest.raises(AuthenticationError, match="requires an auth token"):
            await connect(s.address, timeout=5)
        with pytest.raises(AuthenticationError, match="requires an auth token"):
            await Client(s.address, asynchronous=True, timeout=5)

        # 2. Garbage instead of the handshake reply: that connection is closed.
        async with await anyio.connect_tcp(host, int(port)) as raw:
            assert await read_frame(raw)  # the server's hello
            await raw.send(HEADER.pack(12) + b"\xc1not msgpack")
            assert await closed_by_peer(raw)

        # 3. Authenticated, then a frame declared bigger than the limit: closed unread.
        comm = await connect(s.address, security=TOKEN, timeout=5)
        async with comm:
            await comm._stream.send(HEADER.pack(2**40))
            assert await closed_by_peer(comm._stream)

        # 4. Authenticated, then a well-formed frame that is not a list of messages.
        comm = await connect(s.address, security=TOKEN, timeout=5)
        async with comm:
            await comm._stream.send(HEADER.pack(3) + b"\x93\x01\x02")  # [1, 2, <missing>]
            assert await closed_by_peer(comm._stream)

        # The cluster noticed none of it: the held work finishes with the right results.
        assert len(s.workers) == 2 and len(s.clients) == 1
        assert not any(ts.state == "erred" for ts in s.tasks.values())
        GATE.set()
        assert await client.gather(futures) == list(range(1, 21))
    # Each refusal is logged once, naming the peer and the reason.
    assert caplog.text.count("client sent no auth token") == 2
    assert "sent a malformed frame: not valid msgpack" in caplog.text
    assert "refusing a frame of 1099511627776 bytes" in caplog.text
    assert caplog.text.count("malformed frame from") == 2
