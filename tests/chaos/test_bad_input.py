"""Bad input at every boundary: the wire, the handshake, graphs, configuration, event logs.

Each test feeds one kind of bad input to one boundary and checks the outcome is
clear (a specific error, a closed connection, a one-line message and exit 1) and
that nothing else is hurt: the scheduler keeps serving the other clients, who
still get their results.

- the frame decoder and :class:`~sluice.comm.Comm`, with hypothesis, against a
  reference model of the framing;
- a running scheduler over a raw socket, with hypothesis-generated payloads;
- unauthenticated peers of a scheduler with a token;
- frames announcing more than the limit;
- bad graphs (cycle, missing dependency, unpicklable functions and arguments);
- bad configuration values and environment overrides;
- malformed event logs given to ``sluice replay``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgpack  # type: ignore[import-untyped]
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sluice.config as config
from sluice import SchedulerState
from sluice._core.commands import AddClient, AddWorker, UpdateGraph
from sluice._core.messages import TaskFinishedMsg
from sluice.cli import main
from sluice.client import Client
from sluice.comm import AuthenticationError, Comm, CommClosedError, connect
from sluice.comm.frames import (
    DEFAULT_MAX_FRAME_BYTES,
    HEADER,
    FrameError,
    decode_body,
    encode_body,
    encode_frame,
)
from sluice.deploy import LocalCluster
from sluice.events import Event, GraphUpdated, TaskTransition
from sluice.scheduler import Scheduler
from sluice.security import Security
from sluice.sinks.eventlog import EventLog
from sluice.taskspec import TaskSpec, dumps_spec
from sluice.worker import Worker

pytestmark = pytest.mark.timeout(120)

BIN = Path(sys.executable).parent
#: More examples for a longer local hunt: SLUICE_CHAOS_EXAMPLES=500.
EXAMPLES = int(os.environ.get("SLUICE_CHAOS_EXAMPLES", "0"))


def examples(ci: int) -> int:
    return EXAMPLES or ci


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def inc(x: int) -> int:
    return x + 1


# ---------------------------------------------------------------------- strategies

#: Any msgpack value (maps keyed by str or int, arrays, bytes, big ints, floats).
MSGPACK = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=4) | st.integers(0, 3), inner, max_size=3)
    ),
    max_leaves=10,
)

#: Well-formed message maps (str keys) with arbitrary values.
MESSAGE = st.dictionaries(st.text(max_size=6), MSGPACK, max_size=4)

CLIENT_OPS = (
    "update-graph",
    "release-keys",
    "who-has",
    "run",
    "run-on-scheduler",
    "subscribe-events",
    "unsubscribe-events",
    "register-scheduler-plugin",
    "unregister-scheduler-plugin",
    "register-worker-plugin",
    "unregister-worker-plugin",
    "log-event",
    "close-client",
    "no-such-op",
)
WORKER_OPS = (
    "task-finished",
    "task-erred",
    "missing-data",
    "worker-events",
    "heartbeat",
    "reply",
    "no-such-op",
)
FIELDS = (
    "rid",
    "key",
    "keys",
    "tasks",
    "dependencies",
    "priority",
    "retries",
    "function",
    "plugin",
    "name",
    "nanny",
    "idempotent",
    "since",
    "kinds",
    "topic",
    "msg",
    "events",
    "workers",
    "exception",
    "nbytes",
    "duration",
    "errant_workers",
)


def op_message(ops: tuple[str, ...]) -> st.SearchStrategy[dict[str, Any]]:
    """A message with a real ``op`` and a few real field names holding arbitrary values."""
    return st.fixed_dictionaries(
        {"op": st.sampled_from(ops)},
        optional={name: MSGPACK for name in FIELDS},
    )


def is_message_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and all(type(k) is str for k in m) for m in value
    )


def tuples(value: Any) -> Any:
    """``value`` as the decoder returns it: every array a tuple."""
    if isinstance(value, list | tuple):
        return tuple(tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: tuples(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------- 1. the decoder


@given(value=MSGPACK)
@settings(max_examples=examples(100), deadline=None)
def test_decoder_takes_only_a_list_of_maps_with_str_keys(value: Any) -> None:
    body = msgpack.packb(value, use_bin_type=True)
    if is_message_list(value):
        assert decode_body(body) == list(tuples(value))
    else:
        with pytest.raises(FrameError):
            decode_body(body)


@given(msgs=st.lists(MESSAGE, max_size=4), data=st.data())
@settings(max_examples=examples(60), deadline=None)
def test_decoder_refuses_truncated_or_padded_bodies(msgs: list[dict[str, Any]], data: Any) -> None:
    body = encode_body(msgs)
    cut = data.draw(st.integers(0, len(body) - 1), label="cut")
    with pytest.raises(FrameError, match="not valid msgpack"):
        decode_body(body[:cut])  # a strict prefix of an array is never complete
    extra = data.draw(st.binary(min_size=1, max_size=8), label="extra")
    with pytest.raises(FrameError, match="not valid msgpack"):
        decode_body(body + extra)


class ScriptedStream(anyio.abc.ByteStream):
    """A byte stream that yields ``data`` in chunks of ``chunk`` bytes, then EOF."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self._data = data
        self._chunk = chunk
        self.read = 0  # bytes handed to the reader so far
        self.closed = False

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self.closed:
            raise anyio.ClosedResourceError
        if self.read >= len(self._data):
            raise anyio.EndOfStream
        n = min(self._chunk, max_bytes)
        out = self._data[self.read : self.read + n]
        self.read += len(out)
        return out

    async def send(self, item: bytes) -> None:
        if self.closed:
            raise anyio.ClosedResourceError

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        self.closed = True


LIMIT = 256


def framing_model(data: bytes) -> tuple[list[list[dict[str, Any]]], int]:
    """What a reader of ``data`` must return: the good frames before the first bad one,
    and the offset where it must stop reading (the end of the bad frame's header if that
    frame is over the limit, so its body is never read)."""
    frames: list[list[dict[str, Any]]] = []
    pos = 0
    while True:
        if len(data) - pos < HEADER.size:
            return frames, len(data)
        (length,) = HEADER.unpack_from(data, pos)
        pos += HEADER.size
        if length > LIMIT:
            return frames, pos
        if len(data) - pos < length:
            return frames, len(data)
        try:
            frames.append(decode_body(data[pos : pos + length]))
        except FrameError:
            return frames, pos + length
        pos += length


FRAME_PART = st.one_of(
    # a good frame
    st.lists(MESSAGE, max_size=3).map(lambda msgs: encode_frame(msgs)),
    # a header announcing a wrong length for the body that follows
    st.tuples(st.lists(MESSAGE, max_size=3), st.integers(-20, 40)).map(
        lambda t: HEADER.pack(max(len(encode_body(t[0])) + t[1], 0)) + encode_body(t[0])
    ),
    # valid msgpack of the wrong shape, correctly framed
    MSGPACK.map(lambda v: msgpack.packb(v, use_bin_type=True)).map(
        lambda b: HEADER.pack(len(b)) + b
    ),
    # a length over the limit, up to 2**64 - 1
    st.integers(LIMIT + 1, 2**64 - 1).map(HEADER.pack),
    # random bytes
    st.binary(min_size=1, max_size=40),
)


@given(parts=st.lists(FRAME_PART, min_size=1, max_size=4), chunk=st.integers(1, 64))
@settings(max_examples=examples(100), deadline=None)
def test_comm_reads_exactly_what_the_framing_says_and_closes_on_a_bad_frame(
    parts: list[bytes], chunk: int
) -> None:
    data = b"".join(parts)
    expected, stop = framing_model(data)

    async def read_all() -> tuple[list[list[dict[str, Any]]], ScriptedStream, Comm]:
        stream = ScriptedStream(data, chunk)
        comm = Comm(stream, max_frame_bytes=LIMIT)
        got = []
        with anyio.fail_after(5):
            while True:
                try:
                    got.append(await comm.recv())
                except CommClosedError:
                    return got, stream, comm

    logging.getLogger("sluice.comm").disabled = True  # thousands of expected warnings
    try:
        got, stream, comm = anyio.run(read_all)
    finally:
        logging.getLogger("sluice.comm").disabled = False
    assert got == expected
    assert comm.closed and stream.closed
    # Nothing past a refused header was asked for, beyond one buffered chunk.
    assert stream.read <= stop + chunk


# ------------------------------------------------------- 2. a running scheduler, raw socket


class ErrorLog(logging.Handler):
    """Collects ERROR records of the ``sluice`` loggers (an unexpected exception)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[LocalCluster, Client, ErrorLog]]:
    """A scheduler and a worker in this process, a client, and the ERROR records."""
    errors = ErrorLog()
    logging.getLogger("sluice").addHandler(errors)
    try:
        with (
            LocalCluster(n_workers=1, processes=False) as cluster,
            Client(cluster.scheduler_address) as client,
        ):
            yield cluster, client, errors
    finally:
        logging.getLogger("sluice").removeHandler(errors)


def _recv_frame(sock: socket.socket) -> bytes:
    head = _recv_exactly(sock, HEADER.size)
    (length,) = HEADER.unpack(head)
    return _recv_exactly(sock, length)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def raw_session(address: str) -> socket.socket:
    """A plain socket past the handshake of a scheduler without a token."""
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    hello = decode_body(_recv_frame(sock))[0]
    assert hello["op"] == "hello" and hello["auth"] is False
    sock.sendall(encode_frame([{"op": "hello-ok", "version": 1}]))
    return sock


def read_until_closed(sock: socket.socket, idle: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes (True) or is silent for ``idle`` s."""
    sock.settimeout(idle)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data, False
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk


def parse_frames(data: bytes) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = []
    while data:
        (length,) = HEADER.unpack_from(data)
        msgs += decode_body(data[HEADER.size : HEADER.size + length])
        data = data[HEADER.size + length :]
    return msgs


def first_frame_is_bad(payload: bytes) -> bool:
    """Whether the payload's first frame is complete and refused by the decoder."""
    if len(payload) < HEADER.size:
        return False
    (length,) = HEADER.unpack_from(payload)
    if length > DEFAULT_MAX_FRAME_BYTES:
        return True
    if len(payload) - HEADER.size < length:
        return False  # incomplete: the server waits for the rest
    try:
        decode_body(payload[HEADER.size : HEADER.size + length])
    except FrameError:
        return True
    return False


_ids = itertools.count()

GARBAGE = st.one_of(
    st.binary(min_size=1, max_size=64),
    st.lists(MESSAGE, max_size=3).flatmap(
        lambda msgs: st.integers(0, len(encode_frame(msgs)) - 1).map(
            lambda cut: encode_frame(msgs)[:cut]
        )
    ),
    st.tuples(st.lists(MESSAGE, max_size=3), st.integers(-10, 30)).map(
        lambda t: HEADER.pack(max(len(encode_body(t[0])) + t[1], 0)) + encode_body(t[0])
    ),
    MSGPACK.filter(lambda v: not is_message_list(v)).map(
        lambda v: encode_frame(v)  # type: ignore[arg-type]
    ),
)


@given(payload=GARBAGE)
@settings(
    max_examples=examples(12),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],
)
def test_garbage_frames_close_that_connection_and_the_scheduler_serves_on(
    served: tuple[LocalCluster, Client, ErrorLog], payload: bytes
) -> None:
    cluster, client, errors = served
    i = next(_ids)
    sock = raw_session(cluster.scheduler_address or "")
    with sock:
        sock.sendall(payload)
        if first_frame_is_bad(payload):
            # Refused by the decoder: closed at once, nothing said, no EOF needed.
            data, closed = read_until_closed(sock, 20)
            assert closed and data == b""
        else:
            # Incomplete, or a frame of messages that opens no conversation: at the
            # latest our EOF ends it, and what the server said is well-formed frames.
            data, closed = read_until_closed(sock, 0.2)
            if not closed:
                sock.shutdown(socket.SHUT_WR)
                more, closed = read_until_closed(sock, 20)
                data += more
            assert closed
            parse_frames(data)
    assert client.submit(inc, i, pure=False).result(timeout=30) == i + 1
    assert not errors.records, errors.records[0].getMessage()


@given(
    role=st.sampled_from(["client", "worker"]),
    data=st.data(),
)
@settings(
    max_examples=examples(15),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
def test_well_formed_messages_of_nonsense_get_error_replies_or_a_close(
    served: tuple[LocalCluster, Client, ErrorLog], role: str, data: Any
) -> None:
    """After registering, frames of real ops with arbitrary fields: every request gets a
    reply or the connection is closed; no handler fails with an unexpected exception, and
    the scheduler forgets the peer and serves on."""
    cluster, client, errors = served
    i = next(_ids)
    ops = CLIENT_OPS if role == "client" else WORKER_OPS
    frames = data.draw(st.lists(st.lists(op_message(ops), min_size=1, max_size=3), max_size=3))
    if role == "client":
        first = {"op": "register-client", "rid": -1, "client": f"fuzz-{i}"}
    else:
        first = {"op": "register-worker", "rid": -1, "address": f"tcp://127.0.0.1:{i + 1}"}
        first |= {"name": f"fuzz-{i}", "nthreads": 1}
    sock = raw_session(cluster.scheduler_address or "")
    with sock:
        sock.sendall(encode_frame([first]))
        # A close-client (or a refused registration) may close the connection first.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for frame in frames:
                sock.sendall(encode_frame(frame))
        replies, closed = read_until_closed(sock, 0.3)
        msgs = parse_frames(replies) if closed else []
        if not closed:
            sock.shutdown(socket.SHUT_WR)
            more, closed = read_until_closed(sock, 20)
            msgs = parse_frames(replies + more)
        assert closed
    assert msgs and msgs[0]["rid"] == -1 and msgs[0]["ok"]  # registered first
    # A refused request is an error reply with a reason, never a silent failure.
    refusals = [m["error"] for m in msgs if m.get("op") == "reply" and not m["ok"]]
    assert all(isinstance(text, str) and text for text in refusals)
    assert client.submit(inc, i, pure=False).result(timeout=30) == i + 1
    assert not errors.records, errors.records[0].getMessage()
    wait_until(lambda: f"fuzz-{i}" not in client.run_on_scheduler(_peer_names), 10)


def wait_until(predicate: Any, timeout: float) -> None:
    """Poll ``predicate`` (a question to another thread's scheduler) until it holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout}s: {predicate}")
        time.sleep(0.02)


def _peer_names(dask_scheduler: Any) -> set[str]:
    names = set(dask_scheduler.clients)
    names |= {w.name for w in dask_scheduler.workers.values()}
    return names


# ------------------------------------------------------------ 3. unauthenticated peers

TOKEN = Security(auth_token=b"the right token")


def touch(path: str) -> str:
    Path(path).touch()
    return path


async def _send_raw(host: str, port: int, data: bytes, *, answer_hello: bool) -> bytes:
    """Connect, optionally answer the hello as a tokenless client would, send ``data``,
    and return what the server sent until it closed the connection."""
    got = b""
    async with await anyio.connect_tcp(host, port) as raw:
        with anyio.fail_after(10):
            if answer_hello:
                while (
                    len(got) < HEADER.size
                    or len(got) < HEADER.size + HEADER.unpack(got[: HEADER.size])[0]
                ):
                    got += await raw.receive()
                await raw.send(encode_frame([{"op": "hello-ok", "version": 1}]))
            with contextlib.suppress(anyio.BrokenResourceError):
                await raw.send(data)
            try:
                while True:
                    got += await raw.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
                return got


@pytest.mark.anyio
async def test_unauthenticated_peers_are_refused_and_nothing_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "executed"
    spec = dumps_spec(TaskSpec(touch, (str(marker),)))
    graph = {
        "op": "update-graph",
        "rid": 2,
        "tasks": {"evil": spec},
        "dependencies": {"evil": ()},
        "keys": ("evil",),
    }
    attack = encode_frame([{"op": "register-client", "rid": 1, "client": "evil"}, graph])
    seen: list[Event] = []
    async with (
        Scheduler(port=0, security=TOKEN) as s,
        Worker(s.address, security=TOKEN, name="w"),
        Client(s.address, asynchronous=True, security=TOKEN) as client,
    ):
        s.bus.subscribe(seen.append, name="seen", mode="inline")
        host, port = s.address.removeprefix("tcp://").rsplit(":", 1)
        with caplog.at_level(logging.WARNING, logger="sluice.comm"):
            # The frames right away, as if there were no handshake.
            got = await _send_raw(host, int(port), attack, answer_hello=False)
            assert decode_body(got[HEADER.size :])[0]["op"] == "hello"  # and nothing else
            # A tokenless hello-ok, then the frames.
            got = await _send_raw(host, int(port), attack, answer_hello=True)
            assert parse_frames(got)[0]["op"] == "hello"
            assert len(parse_frames(got)) == 1
            # A wrong token, with the comm layer and with a Client.
            wrong = Security(auth_token=b"a wrong token")
            with pytest.raises(AuthenticationError, match="wrong token"):
                await connect(s.address, security=wrong, timeout=5)
            with pytest.raises(AuthenticationError, match="wrong token"):
                await Client(s.address, asynchronous=True, security=wrong, timeout=5)
        # Nothing was registered, submitted or run; the real client works.
        assert await client.submit(touch, str(tmp_path / "legit")) == str(tmp_path / "legit")
        assert not marker.exists()
        assert "evil" not in s.tasks and list(s.clients) == [client.id]
        graphs = [e for e in seen if isinstance(e, GraphUpdated)]
        assert len(graphs) == 1 and "evil" not in graphs[0].keys
    warnings = [r.getMessage() for r in caplog.records if r.name == "sluice.comm"]
    assert sum("rejected connection" in w for w in warnings) >= 2, warnings


# ------------------------------------------------------------------- 4. oversized frames


@pytest.mark.anyio
async def test_a_frame_over_the_limit_is_refused_without_allocating_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with (
        Scheduler(port=0) as s,
        Worker(s.address, name="w"),
        Client(s.address, asynchronous=True) as client,
    ):
        for declared in (DEFAULT_MAX_FRAME_BYTES + 1, 2**64 - 1):
            comm = await connect(s.address, timeout=5)
            async with comm:
                tracemalloc.start()
                try:
                    tracemalloc.reset_peak()
                    with caplog.at_level(logging.WARNING, logger="sluice.comm"):
                        # A header, then the first bytes of the promised body.
                        await comm._stream.send(HEADER.pack(declared) + b"x" * 4096)
                        with anyio.fail_after(10), pytest.raises(CommClosedError):
                            await comm.recv()
                    _, peak = tracemalloc.get_traced_memory()
                finally:
                    tracemalloc.stop()
            assert peak < 16 * 2**20, f"{peak} bytes allocated while refusing the frame"
            assert f"refusing a frame of {declared} bytes" in caplog.text
        # A frame that stops halfway, then the peer leaves: closed, nothing logged as ERROR.
        comm = await connect(s.address, timeout=5)
        await comm._stream.send(HEADER.pack(1000) + b"\x91")
        await comm.aclose()
        assert await client.submit(inc, 1) == 2
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --------------------------------------------------------------------- 5. bad graphs


def _rebuild_fails() -> None:
    raise RuntimeError("this object cannot be rebuilt here")


class RefusesPickling:
    def __reduce__(self) -> Any:
        raise RuntimeError("this object refuses to be pickled")


class RefusesUnpickling:
    def __reduce__(self) -> Any:
        return (_rebuild_fails, ())


LOCK = threading.Lock()


def slow_inc(x: int) -> int:
    import time

    time.sleep(0.002)
    return x + 1


@pytest.fixture
async def two_clients() -> AsyncIterator[tuple[Scheduler, Client, Client]]:
    async with (
        Scheduler(port=0) as s,
        Worker(s.address, name="a", nthreads=2),
        Worker(s.address, name="b", nthreads=2),
        Client(s.address, asynchronous=True) as bad,
        Client(s.address, asynchronous=True) as good,
    ):
        yield s, bad, good


@pytest.mark.anyio
async def test_a_bad_graph_is_an_error_to_that_client_only(
    two_clients: tuple[Scheduler, Client, Client],
) -> None:
    s, bad, good = two_clients
    seen: list[Event] = []
    s.bus.subscribe(seen.append, name="seen", mode="inline")
    holds_lock = lambda x: (LOCK, x)  # noqa: E731 - a lambda is the point
    work = good.map(slow_inc, range(200), pure=False)  # runs while the bad graphs come in

    with pytest.raises(ValueError, match=r"^the graph has a cycle through '[xy]'$"):
        await bad.get({"x": (inc, "y"), "y": (inc, "x")}, "x")
    with pytest.raises(TypeError, match=r"^cannot pickle the function .*_thread.lock"):
        bad.submit(holds_lock, 1)
    with pytest.raises(TypeError, match=r"^cannot pickle the task's arguments: .*refuses"):
        bad.submit(inc, RefusesPickling())
    # Pickles here, fails to unpickle on the worker: that task errs, for that client.
    with pytest.raises(RuntimeError, match="cannot be rebuilt here"):
        await bad.submit(inc, RefusesUnpickling())

    # A graph naming a dependency nobody has, on a raw connection of its own.
    async with await connect(s.address, timeout=5) as comm:
        await comm.send({"op": "register-client", "rid": 1, "client": "raw"})
        await comm.send(
            {
                "op": "update-graph",
                "rid": 2,
                "tasks": {"z": b"spec"},
                "dependencies": {"z": ("missing",)},
                "keys": ("z",),
            }
        )
        replies: list[dict[str, Any]] = []
        with anyio.fail_after(10):
            while len(replies) < 2:
                replies += await comm.recv()
        assert replies[1] == {
            "op": "reply",
            "rid": 2,
            "ok": False,
            "error": "task 'z' depends on unknown key 'missing'",
            "exception": None,
        }
        assert "z" not in s.tasks and "z" not in s._specs

    # The other client's work was not touched; the bad client still works too.
    assert await good.gather(work) == list(range(1, 201))
    assert await bad.submit(inc, 1) == 2
    erred = [e.key for e in seen if isinstance(e, TaskTransition) and e.finish == "erred"]
    assert len(erred) == 1 and str(erred[0]).startswith("inc-")  # RefusesUnpickling's task


# ------------------------------------------------------------- 6. configuration, CLI


@pytest.fixture
def clean_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in list(os.environ):
        if name.startswith("SLUICE_"):
            monkeypatch.delenv(name)
    config.refresh()
    yield
    monkeypatch.undo()
    config.refresh()


BAD_VALUES = [
    ("SLUICE_SCHEDULER__SINKS", "3", "sluice.scheduler.sinks must be a sink spec"),
    ("SLUICE_SCHEDULER__SINKS", "[counter, 3]", "sluice.scheduler.sinks must be a sink spec"),
    ("SLUICE_SCHEDULER__PRELOAD", "3", "sluice.scheduler.preload must be a string or a list"),
    ("SLUICE_SCHEDULER__PRELOAD", "[[a.py]]", "sluice.scheduler.preload must be a string"),
    ("SLUICE_SCHEDULER__PRELOAD_ARGV", "3", "sluice.scheduler.preload-argv must be a list"),
    ("SLUICE_SCHEDULER__PRELOAD_STRICT", "perhaps", "preload-strict must be true or false"),
    ("SLUICE_WORKER__FORWARD_EVENTS", "maybe", "forward-events must be true or false"),
    ("SLUICE_SCHEDULER", "[1]", "sluice.scheduler must be a mapping"),
]


@pytest.mark.parametrize(("name", "value", "message"), BAD_VALUES)
def test_a_config_value_of_the_wrong_type_is_a_config_error(
    clean_config: None, monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(config.ConfigError, match=message) as info:
        config.refresh()
        key = name.removeprefix("SLUICE_").lower().replace("__", ".").replace("_", "-")
        config.get(f"sluice.{key}", None)
    assert "\n" not in str(info.value)


def test_wrong_types_from_a_file_and_from_set(
    clean_config: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("sluice:\n  worker:\n    sinks: {counter: 1}\n")
    monkeypatch.setenv("SLUICE_CONFIG", str(path))
    config.refresh()
    with pytest.raises(config.ConfigError, match=r"^configuration value sluice.worker.sinks"):
        config.get("sluice.worker.sinks")
    path.write_text("sluice:\n  nanny: 3\n")
    with pytest.raises(config.ConfigError, match=r"^configuration value sluice.nanny must be"):
        config.refresh()
    path.write_text("sluice: 3\n")
    with pytest.raises(config.ConfigError, match=r"^configuration value sluice must be a mapping"):
        config.refresh()
    monkeypatch.delenv("SLUICE_CONFIG")
    config.refresh()
    with (
        config.set({"sluice.client.preload": 7}),
        pytest.raises(config.ConfigError, match=r"sluice\.client\.preload must be"),
    ):
        config.get("sluice.client.preload")
    # Unknown keys are not errors (as in Dask): a plugin may read keys of its own.
    with config.set({"sluice.my-plugin.anything": object()}):
        assert config.get("sluice.scheduler.preload") == []


CLI_CASES = [
    (["scheduler", "--port", "0"], {"SLUICE_SCHEDULER__SINKS": "3"}, "sinks must be"),
    (["scheduler", "--port", "0"], {"SLUICE_SCHEDULER__PRELOAD_STRICT": "perhaps"}, "strict"),
    (["scheduler", "--port", "0"], {"SLUICE_SCHEDULER": "oops"}, "must be a mapping"),
    (["worker", "tcp://127.0.0.1:9", "--no-nanny"], {"SLUICE_WORKER__PRELOAD": "3"}, "preload"),
    (["scheduler", "--port", "0", "--sink", ""], {}, "Error: "),
    (["scheduler", "--port", "0", "--event-log", "/proc/nope/e.jsonl"], {}, "Error: "),
]


@pytest.mark.parametrize(
    ("args", "env", "text"), CLI_CASES, ids=[" ".join([*c[0], *c[1]]) for c in CLI_CASES]
)
def test_a_bad_setting_stops_the_command_with_one_line(
    args: list[str], env: dict[str, str], text: str, tmp_path: Path
) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    environ |= {"HOME": str(tmp_path), **env}
    done = subprocess.run(
        [str(BIN / "sluice"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=environ,
    )
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode in (1, 2), lines
    assert len(lines) == 1 and lines[0].startswith("Error: ") and text in lines[0], lines


# ------------------------------------------------------------ 7. malformed event logs


@pytest.fixture
def log_lines(tmp_path: Path) -> list[bytes]:
    """The lines of a good log of a small run (header included)."""
    state = SchedulerState()
    events: list[Event] = []
    for cmd in (
        AddWorker(worker="tcp://w:1"),
        AddClient(client="c"),
        UpdateGraph(client="c", keys=("x",), dependencies={"x": ()}),
        TaskFinishedMsg(worker="tcp://w:1", key="x", nbytes=8),
    ):
        produced, _ = state.handle(cmd, now=1.0)
        events += produced
    path = tmp_path / "good.jsonl"
    writer = EventLog(path, run_id="run-1", address="tcp://s:1")
    writer.write(events)
    writer.close()
    lines = path.read_bytes().splitlines(keepends=True)
    assert len(lines) == 7
    return lines


def _bad_logs(lines: list[bytes]) -> dict[str, tuple[bytes, str]]:
    """name -> (content, the one-line error it must give), {file} standing for the path."""
    head, body = lines[0], lines[1:]
    middle = b"".join(lines[:3])
    rest = b"".join(lines[3:])
    return {
        "empty": (b"", "{file}: empty file, not a sluice event log (no header)"),
        "garbage": (b"\x00\x01 garbage\n", "{file}: not a sluice event log (line 1 is not its"),
        "header-not-utf8": (b"\xff\xfe" + head, "{file}: not a sluice event log"),
        "header-wrong-version": (
            b'{"format": "sluice-event-log", "version": "1", "run_id": "r"}\n',
            "{file}:1: bad event-log version '1'",
        ),
        "json-array": (middle + b"[1, 2, 3]\n" + rest, "{file}:4: not an event object"),
        "missing-fields": (
            middle + b'{"kind": "task-transition", "seq": 3}\n' + rest,
            "{file}:4: bad 'task-transition' event",
        ),
        "unknown-kind": (
            middle + b'{"kind": "alien", "seq": 3, "time": 1.0, "source": "s"}\n' + rest,
            "{file}:4: unknown event kind 'alien'",
        ),
        "not-utf8": (
            middle + b'{"kind": "user-event\xff", "seq": 3}\n' + rest,
            "{file}:4: invalid JSON",
        ),
        "nul-bytes": (b"".join(lines) + b"\x00" * 20 + b"\n", "{file}:8: invalid JSON"),
        "blank-line": (middle + b"\n" + rest, "{file}:4: blank line"),
        "torn-middle": (middle + lines[3][:15] + b"\n" + rest, "{file}:4: invalid JSON"),
        "swapped": (
            head + body[1] + body[0] + b"".join(body[2:]),
            "{file}:3: seq 1 is out of order (after seq 2)",
        ),
        "repeated": (middle + lines[2] + rest, "{file}:4: seq 2 is out of order (after seq 2)"),
        "gap": (head + b"".join(body[1:]), "{file}: event seq 2 does not follow 0"),
    }


def test_a_malformed_log_is_one_line_naming_file_and_line(
    log_lines: list[bytes], tmp_path: Path
) -> None:
    runner = CliRunner()
    for name, (content, message) in _bad_logs(log_lines).items():
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(content)
        result = runner.invoke(main, ["replay", str(path), "--json"])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1, (name, result.output)
        assert len(lines) == 1, (name, lines)
        assert lines[0].startswith("Error: " + message.format(file=path)), (name, lines[0])


@pytest.mark.parametrize("tail", [b'{"kind":"task-tr', b"\xff\xfe\x00["])
def test_a_torn_last_line_is_skipped_with_a_warning(
    log_lines: list[bytes], tmp_path: Path, tail: bytes
) -> None:
    """As documented (docs/concepts.md): a last line cut short by a crash is skipped,
    with a WARNING naming the file and line on stderr; stdout stays pure JSON."""
    path = tmp_path / "torn.jsonl"
    path.write_bytes(b"".join(log_lines) + tail)
    done = subprocess.run(
        [str(BIN / "sluice"), "replay", str(path), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["events"] == 6 and summary["task_states"] == {"memory": 1}
    assert done.stderr.strip().splitlines() == [
        f"{path}:8: truncated last line ignored (the writer stopped mid-write)"
    ]
