"""The RabbitMQ sink (``sluice.sinks.rabbitmq``): delivery, outages, the spool, options.

Tests marked ``rabbitmq`` need a broker: the shared one at 127.0.0.1:5672
(never stopped or reconfigured here), or a node of the test's own
(``tests/rabbitmq_node.py``) on spare ports, which the test stops and starts.
Without them a test is skipped, except on CI (``CI=true``), where it fails.
Queue names are unique per test and the queues are deleted afterwards.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import attrs
import orjson
import pytest

from rabbitmq_node import RabbitNode, free_port
from sluice import Client, Scheduler, Worker
from sluice._amqp_spool import Spool, SpoolInUseError, decode_line, encode_line
from sluice._amqp_url import RoutingKey, default_spool_dir
from sluice.bus import EventBus
from sluice.events import Event, TaskTransition, WorkerAdded
from sluice.replay import read_events
from sluice.sinks.rabbitmq import DEFAULT_QUEUE, RabbitMQ
from sluice_processes import thread_niceness

SHARED_URL = "amqp://guest:guest@127.0.0.1:5672/"
WAIT = 60  # seconds; a generous bound for any single wait below


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def inc(x: int) -> int:
    return x + 1


def add(x: int, y: int) -> int:
    return x + y


def slow_inc(x: int) -> int:
    time.sleep(0.003)  # the work a task does: makes the run last a few seconds
    return x + 1


# -- broker fixtures ---------------------------------------------------------------------


def drain(url: str, queue: str, *, delete: bool = True) -> list[tuple[str, dict[str, Any], Any]]:
    """Every message in ``queue`` now: ``(message_id, body, properties)``, in queue order."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        count = channel.queue_declare(queue, passive=True).method.message_count
        channel.basic_qos(prefetch_count=2000)
        out: list[tuple[str, dict[str, Any], Any]] = []
        if count:
            deadline = time.monotonic() + WAIT
            for method, props, body in channel.consume(queue, auto_ack=True, inactivity_timeout=5):
                if method is not None:
                    out.append((props.message_id, orjson.loads(body), props))
                if len(out) >= count or time.monotonic() > deadline:
                    break
            channel.cancel()
        if delete:
            channel.queue_delete(queue)
        return out
    finally:
        connection.close()


async def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll a condition the sink's thread changes (it offers no awaitable)."""
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.02)


def transitions(log: Path, *, forwarded: bool = True) -> list[Event]:
    """The task transitions of ``log``; the scheduler's own only, unless ``forwarded``."""
    return [
        e
        for e in read_events(log)
        if isinstance(e, TaskTransition) and (forwarded or e.source == "scheduler")
    ]


def check_delivery(
    messages: list[tuple[str, dict[str, Any], Any]],
    expected: list[Event],
    run_id: str,
    *,
    duplicates_ok: bool,
) -> list[str]:
    """Every expected event arrived, per-key order of first deliveries kept; first ids."""
    first: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    for mid, body, props in messages:
        assert props.delivery_mode == 2
        assert props.content_type == "application/json"
        if mid in first:
            assert duplicates_ok, f"duplicate message {mid}"
            assert body == first[mid], f"message {mid} sent twice with different bodies"
            continue
        first[mid] = body
        order.append(mid)
    want = {f"{run_id}:{e.seq}": e for e in expected}
    missing = sorted(set(want) - set(first), key=lambda m: int(m.rpartition(":")[2]))
    assert not missing, f"{len(missing)} events never arrived, e.g. {missing[:5]}"
    for mid, event in want.items():
        body = first[mid]
        assert body == orjson.loads(orjson.dumps(event.to_dict()))
        assert body["seq"] == event.seq and body["kind"] == "task-transition"
    seqs_by_key: dict[str, list[int]] = defaultdict(list)
    for mid in order:
        if mid in want:
            seqs_by_key[orjson.dumps(first[mid]["key"]).decode()].append(first[mid]["seq"])
    for key, seqs in seqs_by_key.items():
        assert seqs == sorted(seqs), f"events of key {key} arrived out of order: {seqs}"
    return order


# -- 1. a real cluster against the shared broker ------------------------------------------


@pytest.mark.rabbitmq
@pytest.mark.anyio
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("process", "forwarded"),
    [(False, False), (True, True)],
    ids=["thread-scheduler-events", "process-forwarded-too"],
)
async def test_every_transition_arrives_in_order(
    tmp_path: Path, shared_queue: str, process: bool, forwarded: bool
) -> None:
    sink = RabbitMQ(
        SHARED_URL,
        queue=shared_queue,
        spool=tmp_path / "spool",
        close_timeout=30,
        process=process,
        forwarded=forwarded,
    )
    log = tmp_path / "log.jsonl"
    async with Scheduler(port=0, event_log=log, sinks=[sink]) as s:
        run_id = s.run_id
        async with Worker(s.address, nthreads=1), Client(s.address, asynchronous=True) as c:
            xs = c.map(inc, range(1000), key=[f"x-{i}" for i in range(1000)])
            ys = c.map(add, xs, range(1000), key=[f"y-{i}" for i in range(1000)])
            assert await c.gather(ys) == [2 * i + 1 for i in range(1000)]
    stats = sink.stats()
    assert stats["spooled"] == 0 and stats["resent"] == 0 and stats["pending"] == 0
    assert stats["confirmed"] == stats["published"]

    expected = transitions(log, forwarded=forwarded)
    # 2,000 tasks: the scheduler's 5 transitions each, and the worker's 6 if forwarded.
    assert len(expected) == 2000 * (11 if forwarded else 5)
    assert forwarded or len(transitions(log)) == 2000 * 11
    messages = await anyio.to_thread.run_sync(drain, SHARED_URL, shared_queue)
    assert len(messages) == len(expected) == stats["confirmed"]
    order = check_delivery(messages, expected, run_id, duplicates_ok=False)
    # One sink, one channel, no fault: the queue holds the events in seq order.
    assert [int(m.rpartition(":")[2]) for m in order] == [e.seq for e in expected]
    assert not list((tmp_path / "spool").glob("seg*"))


# -- 2. the broker restarts under load ---------------------------------------------------


@pytest.mark.rabbitmq
@pytest.mark.anyio
@pytest.mark.timeout(240)
@pytest.mark.parametrize("process", [False, True], ids=["thread", "process"])
async def test_broker_restart_under_load(
    tmp_path: Path, rabbit_node: RabbitNode, caplog: pytest.LogCaptureFixture, process: bool
) -> None:
    caplog.set_level(logging.INFO, logger="sluice.sinks.rabbitmq")
    await anyio.to_thread.run_sync(rabbit_node.start)
    queue = f"sluice-test-{uuid.uuid4().hex[:12]}"
    # A small memory bound, so the outage also goes through the disk spool.
    sink = RabbitMQ(
        rabbit_node.url,
        queue=queue,
        spool=tmp_path / "spool",
        max_memory=500,
        segment_messages=1000,
        max_backoff=0.5,
        close_timeout=30,
        process=process,
        forwarded=True,  # the workers' transitions too: more load through the outage
    )
    log = tmp_path / "log.jsonl"
    n = 2000
    async with Scheduler(port=0, event_log=log, sinks=[sink]) as s:
        run_id = s.run_id
        sub = s.bus.subscriptions[sink.name]
        probe = {"pressure": False, "max_lag": 0}

        def watch(_event: Event) -> None:  # inline: sees the bus as each event is published
            probe["pressure"] = probe["pressure"] or s.bus.under_pressure
            probe["max_lag"] = max(probe["max_lag"], sub.lag)

        s.bus.subscribe(watch, name="pressure-probe")
        async with Worker(s.address, nthreads=1), Client(s.address, asynchronous=True) as c:
            await wait_until(lambda: sink.connected)
            futures = c.map(slow_inc, range(n), key=[f"s-{i}" for i in range(n)])
            # Mid-run: some events are confirmed, most tasks still to run.
            await wait_until(lambda: sink.stats()["confirmed"] >= 200)
            assert sum(f.done() for f in futures) < n // 2
            await anyio.to_thread.run_sync(rabbit_node.stop)
            stopped = time.monotonic()
            confirmed_before_stop = sink.stats()["confirmed"]
            assert not sink.connected or await _disconnects(sink)
            assert await c.gather(futures) == [i + 1 for i in range(n)]
            # The run finished while the broker was down: nothing waited on it.
            assert not rabbit_node.running and not sink.connected
            assert sink.stats()["pending"] > 0
            outage = time.monotonic() - stopped
            if outage < 10:
                await anyio.sleep(10 - outage)  # the outage itself, not a synchronisation
            assert not sink.connected
            assert sink.stats()["spooled"] > 0  # memory filled up, the rest went to disk
            await anyio.to_thread.run_sync(rabbit_node.start)
            assert await anyio.to_thread.run_sync(sink.wait_confirmed, WAIT)
        assert not probe["pressure"]
        assert probe["max_lag"] < 10_000
    stats = sink.stats()
    print("sink stats after the outage:", stats)  # shown with -s
    assert stats["pending"] == 0 and stats["confirmed"] >= stats["published"] - stats["resent"]
    warnings = [
        r for r in caplog.records if r.levelno == logging.WARNING and "unreachable" in r.message
    ]
    assert len(warnings) == 1  # once per outage, not per retry
    [back] = [r.message for r in caplog.records if "is back after" in r.message]
    # No consumer: the restarted broker still holds everything it confirmed before.
    held = re.search(r"the queue holds (\d+) messages", back)
    assert held is not None and int(held.group(1)) >= confirmed_before_stop, back

    expected = transitions(log)
    messages = await anyio.to_thread.run_sync(drain, rabbit_node.url, queue)
    check_delivery(messages, expected, run_id, duplicates_ok=True)
    assert len(messages) <= len(expected) + stats["resent"]
    assert not list((tmp_path / "spool").glob("seg*"))  # confirmed segments are removed


async def _disconnects(sink: RabbitMQ) -> bool:
    await wait_until(lambda: not sink.connected)
    return True


# -- 3. a scheduler restart with events in the spool -------------------------------------


@pytest.mark.rabbitmq
@pytest.mark.anyio
@pytest.mark.timeout(180)
@pytest.mark.parametrize("process", [False, True], ids=["thread", "process"])
async def test_spool_survives_a_scheduler_restart(
    tmp_path: Path, rabbit_node: RabbitNode, process: bool
) -> None:
    queue = f"sluice-test-{uuid.uuid4().hex[:12]}"
    spool = tmp_path / "spool"
    runs: list[tuple[str, list[Event]]] = []
    for i, broker_up in enumerate((False, True)):
        if broker_up:
            await anyio.to_thread.run_sync(rabbit_node.start)
        sink = RabbitMQ(
            rabbit_node.url,
            queue=queue,
            spool=spool,
            close_timeout=2,
            max_backoff=0.5,
            process=process,
            forwarded=True,
        )
        log = tmp_path / f"log{i}.jsonl"
        async with (
            Scheduler(port=0, event_log=log, sinks=[sink]) as s,
            Worker(s.address, nthreads=1),
            Client(s.address, asynchronous=True) as c,
        ):
            futures = c.map(inc, range(50), key=[f"run{i}-{k}" for k in range(50)])
            assert await c.gather(futures) == list(range(1, 51))
        runs.append((s.run_id, transitions(log)))
        if not broker_up:
            # Everything of the first run waits on disk for the next sink.
            assert sink.stats()["spooled"] == len(runs[0][1]) and sink.stats()["confirmed"] == 0
            assert list(spool.glob("seg*"))
    assert sink.stats()["pending"] == 0
    assert not list(spool.glob("seg*"))

    messages = await anyio.to_thread.run_sync(drain, rabbit_node.url, queue)
    order = []
    for (run_id, expected), start in zip(runs, (0, len(runs[0][1])), strict=True):
        got = [m for m in messages if m[0].startswith(f"{run_id}:")]
        check_delivery(got, expected, run_id, duplicates_ok=False)
        order.append(messages.index(got[0]))
        assert messages.index(got[0]) == start
    assert len(messages) == len(runs[0][1]) + len(runs[1][1])
    # The first run's events all come before the second's.
    first_ids = {m[0] for m in messages if m[0].startswith(runs[0][0])}
    assert all(m[0] in first_ids for m in messages[: len(first_ids)])


# -- 4. units: options, routing keys, the spool, the lock, the preload --------------------


@pytest.mark.parametrize(
    ("url", "kwargs", "match"),
    [
        ("http://localhost/", {}, "must start with amqp:// or amqps://"),
        ("amqp://localhost/?queue=a&exchange=b&routing_key=k", {}, "not both"),
        ("amqp://localhost/?routing_key=task.{finish}", {}, "routing_key needs an exchange"),
        ("amqp://localhost/?exchange=x", {}, "needs a routing_key"),
        ("amqp://localhost/?queue=", {}, "queue= is empty"),
        ("amqp://localhost/?queue=a&queue=b", {}, "more than once"),
        ("amqp://localhost/?queue=a", {"queue": "b"}, "both in the URL and as an argument"),
        ("amqp://localhost/?kinds=task-transition,nonsense", {}, "unknown event kind"),
        ("amqp://localhost/?close_timeout=soon", {}, "close_timeout must be a number"),
        ("amqp://localhost:notaport/", {}, "bad port"),
        ("amqp://localhost/?heartbeat=often", {}, "is invalid"),
        ("amqp://localhost/", {"exchange": "x", "routing_key": "{finish!z}"}, "is invalid"),
        ("amqp://localhost/", {"exchange": "x", "routing_key": "task.{}"}, "named fields"),
        ("", {}, "non-empty string"),
        ("amqp://localhost/?process=maybe", {}, "process must be true or false"),
        ("amqp://localhost/?x-queue-mode=", {}, "x-queue-mode= is empty"),
        (
            "amqp://localhost/?x-queue-mode=lazy",
            {"queue_args": {"x-queue-mode": "default"}},
            "x-queue-mode is given both",
        ),
        (
            "amqp://localhost/?exchange=x&routing_key=k&x-queue-mode=lazy",
            {},
            "queue arguments \\(x-queue-mode\\) need a queue",
        ),
    ],
)
def test_bad_options_raise_one_line_value_errors(
    tmp_path: Path, url: str, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match) as info:
        RabbitMQ.from_url(url, spool=tmp_path, **kwargs)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "lock").exists() or not list(tmp_path.glob("seg*"))


def test_url_options_and_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sink = RabbitMQ.from_url(f"amqp://u:secret@h:5673/v%2Fh?spool={tmp_path / 'a'}")
    try:
        assert sink.queue == DEFAULT_QUEUE and sink.exchange is None
        assert sink.kinds == frozenset({"task-transition"})
        assert sink.process and not sink.forwarded
        assert sink.spool_dir == tmp_path / "a"
        assert sink.parameters.host == "h" and sink.parameters.port == 5673
        assert sink.parameters.virtual_host == "v/h"
        assert "secret" not in repr(sink)
    finally:
        sink.close()
    url = "amqps://h/?exchange=ev&routing_key=task.{finish}&kinds=task-transition,worker-added"
    sink = RabbitMQ.from_url(url + f"&spool={tmp_path / 'b'}&close_timeout=0.5&process=true")
    try:
        assert sink.process
        assert sink.exchange == "ev" and sink.queue is None
        assert sink.kinds == frozenset({"task-transition", "worker-added"})
        assert sink.close_timeout == 0.5
        assert sink.name != RabbitMQ.name  # two sinks can share a bus
    finally:
        sink.close()
    sink = RabbitMQ.from_url(f"amqp://h/?kinds=all&spool={tmp_path / 'c'}")
    sink.close()
    assert sink.kinds is None

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = default_spool_dir("amqp://h:5673/v%2Fh", "q", None)
    assert path == tmp_path / "cache" / "sluice" / "rabbitmq-spool" / "h_5673_v%2Fh_queue-q"
    assert default_spool_dir("amqp://h", None, "ev").name == "h_5672_%2F_exchange-ev"


@pytest.mark.rabbitmq
@pytest.mark.parametrize("process", [False, True], ids=["thread", "process"])
def test_queue_arguments_reach_the_broker(tmp_path: Path, shared_queue: str, process: bool) -> None:
    """x-... URL options and queue_args declare the queue with those arguments, typed."""
    import pika

    url = f"{SHARED_URL}?queue={shared_queue}&x-queue-mode=lazy&x-queue-version=2"
    sink = RabbitMQ.from_url(
        url, spool=tmp_path, process=process, queue_args={"x-max-length": 1_000_000}
    )
    sink.write(_events(1, 11))
    assert sink.wait_confirmed(WAIT)
    sink.close()
    connection = pika.BlockingConnection(pika.URLParameters(SHARED_URL))
    try:
        # The broker refuses a declaration whose arguments differ from the queue's,
        # so one with exactly these passes and one without them fails.
        channel = connection.channel()
        arguments = {"x-queue-mode": "lazy", "x-queue-version": 2, "x-max-length": 1_000_000}
        declared = channel.queue_declare(shared_queue, durable=True, arguments=arguments)
        assert declared.method.message_count == 10
        with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="x-"):
            channel.queue_declare(shared_queue, durable=True)
    finally:
        connection.close()


@pytest.mark.rabbitmq
def test_a_queue_policy_leaves_the_declaration_plain(
    tmp_path: Path, rabbit_node: RabbitNode
) -> None:
    """docs/rabbitmq.md's advice: lazy, version 2 as a policy, not as arguments.

    The sink declares its queue without arguments; a consumer declaring it the
    tutorial's way (durable, nothing else) is accepted; the policy is in effect.
    """
    import pika

    rabbit_node.start()
    rabbit_node.rabbitmqctl(
        "set_policy",
        "--apply-to",
        "queues",
        "lazy-v2",
        "^task-status$",
        '{"queue-mode": "lazy", "queue-version": 2}',
    )
    sink = RabbitMQ.from_url(f"{rabbit_node.url}?queue=task-status", spool=tmp_path, process=False)
    sink.write(_events(1, 11))
    assert sink.wait_confirmed(WAIT)
    sink.close()
    connection = pika.BlockingConnection(pika.URLParameters(rabbit_node.url))
    try:
        declared = connection.channel().queue_declare("task-status", durable=True)
        assert declared.method.message_count == 10
    finally:
        connection.close()
    listing = rabbit_node.rabbitmqctl("-q", "list_queues", "--no-table-headers", "name", "policy")
    assert listing.split() == ["task-status", "lazy-v2"]


@pytest.mark.anyio
async def test_the_bus_spills_for_a_lagging_sink_instead_of_pushing_back(tmp_path: Path) -> None:
    """Past 20,000 events waiting for the sink, the bus writes them to a file: a slow
    broker costs disk, never the scheduler's reading of new work."""
    from sluice.bus import EventBus

    sink = RabbitMQ(f"amqp://guest:guest@127.0.0.1:{free_port()}/", spool=tmp_path / "spool")
    try:
        async with EventBus() as bus:
            sub = bus.subscribe(sink)
            assert (sub.maxsize, sub.overflow) == (20_000, "spill")
    finally:
        sink.close()


def test_routing_key_templates() -> None:
    t = TaskTransition(seq=3, key=("x", 1), start="processing", finish="memory")
    w = WorkerAdded(seq=4, worker="tcp://127.0.0.1:1")
    rk = RoutingKey("task.{finish}")
    assert rk(t.to_dict()) == "task.memory"
    assert rk(w.to_dict()) == "task.worker-added"  # no finish: the kind stands in
    assert RoutingKey("{kind}.{start}.{finish}")(t.to_dict()) == "task-transition.processing.memory"
    assert RoutingKey("{key[0]}")(t.to_dict()) == "x"
    assert RoutingKey("{key[5]}")(t.to_dict()) == "task-transition"  # cannot format: the kind
    assert RoutingKey("fixed").constant and RoutingKey("fixed")(w.to_dict()) == "fixed"
    assert len(RoutingKey("{key}")({"key": "k" * 300, "kind": "x"})) == 255
    with pytest.raises(ValueError, match="invalid"):
        RoutingKey("task.{finish")


def _messages(a: int, b: int) -> list[tuple[str, str, bytes]]:
    return [(f"run:{i}", "q", orjson.dumps({"seq": i})) for i in range(a, b)]


def _drain_spool(spool: Spool) -> list[str]:
    ids = []
    while (loaded := spool.load_next()) is not None:
        n, messages = loaded
        ids += [m[0] for m in messages]
        spool.remove(n)
    return ids


def test_spool_keeps_order_across_segments_and_restarts(tmp_path: Path) -> None:
    assert decode_line(encode_line(("a:1", "k\tx", b'{"a":"\\t"}'))) == (
        "a:1",
        "k\tx",
        b'{"a":"\\t"}',
    )
    spool = Spool(tmp_path, segment_messages=7)
    spool.append(_messages(0, 20))
    assert spool.has_unread() and spool.unread_messages == 20
    first = spool.load_next()
    assert first is not None and [m[0] for m in first[1]] == [f"run:{i}" for i in range(7)]
    spool.append(_messages(20, 30))
    spool.prepend(_messages(-3, 0))  # what was in memory at close goes before the rest
    spool.remove_loaded()
    spool.close()
    assert len(list(tmp_path.glob("seg*"))) == 5

    again = Spool(tmp_path, segment_messages=7)  # a new process: the same order
    assert again.unread_messages == 26
    again.append(_messages(30, 35))  # behind everything already there
    assert _drain_spool(again) == [f"run:{i}" for i in [-3, -2, -1, *range(7, 35)]]
    again.close()
    assert not list(tmp_path.glob("seg*"))


def test_spool_tolerates_a_truncated_last_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path)
    spool.append(_messages(0, 5))
    spool.close()
    (segment,) = tmp_path.glob("seg*")
    data = segment.read_bytes()
    lines = data.split(b"\n")
    lines[1] = b"garbage"  # a corrupt line in the middle is skipped and counted
    segment.write_bytes(b"\n".join(lines)[:-10])  # and the last one is cut short by a "crash"
    spool = Spool(tmp_path)
    with caplog.at_level(logging.WARNING, logger="sluice.sinks.rabbitmq"):
        assert _drain_spool(spool) == ["run:0", "run:2", "run:3"]
    assert spool.corrupt == 1
    assert any("partly written" in r.message for r in caplog.records)
    assert any("line 2 is corrupt" in r.message for r in caplog.records)
    spool.close()


def test_spool_directory_is_locked(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    with pytest.raises(SpoolInUseError, match=f"pid {os.getpid()}"):
        Spool(tmp_path)
    with pytest.raises(SpoolInUseError, match="in use"):
        RabbitMQ(SHARED_URL, spool=tmp_path)
    spool.close()
    Spool(tmp_path).close()  # free again

    # Another live process holds it.
    code = (
        "import sys, time; from sluice._amqp_spool import Spool;"
        f" s = Spool({str(tmp_path)!r}); print('locked', flush=True); sys.stdin.read()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"locked"
        with pytest.raises(SpoolInUseError, match=f"pid {proc.pid}"):
            Spool(tmp_path)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=WAIT)
        proc.stdout.close()  # type: ignore[union-attr]
    Spool(tmp_path).close()  # the lock died with the process


def _events(a: int, b: int, run: str = "") -> list[Event]:
    return [
        TaskTransition(seq=i, key=f"{run}k{i % 7}", start="waiting", finish="processing")
        for i in range(a, b)
    ]


@pytest.mark.parametrize("process", [False, True], ids=["thread", "process"])
def test_broker_away_memory_then_spool_then_close(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, process: bool
) -> None:
    """No broker at all: write() never blocks, events overflow to disk, close spools the rest."""
    url = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    sink = RabbitMQ(
        url, spool=tmp_path, max_memory=10, close_timeout=0.2, run_id="r1", process=process
    )
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="sluice.sinks.rabbitmq"):
        for i in range(1, 101, 10):
            sink.write(_events(i, i + 10))
        assert time.monotonic() - t0 < 10  # waiting on the broker would be forever
        deadline = time.monotonic() + WAIT
        while sink.stats()["spooled"] < 90 and time.monotonic() < deadline:
            time.sleep(0.01)  # polling the publisher thread's counter
        sink.close()
    assert sink.stats()["spooled"] == 100 and sink.stats()["published"] == 0
    unreachable = [r for r in caplog.records if "unreachable" in r.message]
    assert len(unreachable) == 1
    with pytest.raises(RuntimeError, match="closed"):
        sink.write(_events(101, 102))
    spool = Spool(tmp_path)
    assert _drain_spool(spool) == [f"r1:{i}" for i in range(1, 101)]
    spool.close()


@pytest.mark.rabbitmq
def test_spooled_events_go_first_to_the_shared_broker(tmp_path: Path, shared_queue: str) -> None:
    url = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    away = RabbitMQ(url, queue=shared_queue, spool=tmp_path, close_timeout=0.2, run_id="old")
    away.write(_events(1, 301, "old"))
    away.close()
    assert away.stats()["spooled"] == 300
    sink = RabbitMQ(SHARED_URL, queue=shared_queue, spool=tmp_path, run_id="new", close_timeout=30)
    sink.write(_events(1, 101, "new"))
    assert sink.wait_confirmed(WAIT)
    sink.close()
    assert sink.stats()["confirmed"] == 400 and not list(tmp_path.glob("seg*"))
    ids = [m[0] for m in drain(SHARED_URL, shared_queue)]
    assert ids == [f"old:{i}" for i in range(1, 301)] + [f"new:{i}" for i in range(1, 101)]


def test_the_publish_frames_are_the_ones_pika_writes() -> None:
    import pika.frame
    import pika.spec

    from sluice._amqp_frames import FrameWriter

    def pika_frames(message_id: str, routing_key: str, body: bytes) -> bytes:
        frames = [
            pika.frame.Method(
                7, pika.spec.Basic.Publish(exchange="x", routing_key=routing_key)
            ).marshal(),
            pika.frame.Header(
                7,
                len(body),
                pika.BasicProperties(
                    content_type="application/json", delivery_mode=2, message_id=message_id
                ),
            ).marshal(),
        ]
        frames += [pika.frame.Body(7, body[i : i + 50]).marshal() for i in range(0, len(body), 50)]
        return b"".join(frames)

    # One body frame, a body split over three (frame_max), one exactly a frame, a
    # non-ASCII routing key, and a routing key seen before (its cached frame).
    messages = [
        ("run:1", "task.memory", b'{"seq":1}'),
        ("run:22", "t\u00e2che.erred", b"x" * 120),
        ("run:333", "task.memory", b"y" * 50),
    ]
    data, frames = FrameWriter(None, 7, "x", 50).encode(messages)
    assert data == b"".join(pika_frames(*m) for m in messages)
    assert frames == 3 + 5 + 3  # method, header and body frames of each
    with pytest.raises(ValueError, match="routing key is longer than 255 bytes"):
        FrameWriter(None, 7, "x", 50).encode([("run:1", "k" * 256, b"{}")])


@pytest.mark.rabbitmq
def test_without_the_frame_writer_pika_publishes_the_same_messages(
    tmp_path: Path, shared_queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pika whose internals the frame writer does not recognise: basic_publish it is.
    from sluice._amqp_frames import FrameWriter

    monkeypatch.setattr(FrameWriter, "for_channel", classmethod(lambda cls, *a: None))
    sink = RabbitMQ(SHARED_URL, queue=shared_queue, spool=tmp_path, run_id="r", process=False)
    sink.write(_events(1, 301))
    assert sink.wait_confirmed(WAIT)
    sink.close()
    messages = drain(SHARED_URL, shared_queue)
    assert [m[0] for m in messages] == [f"r:{i}" for i in range(1, 301)]
    assert all(m[2].content_type == "application/json" for m in messages)
    assert all(m[2].delivery_mode == 2 for m in messages)


@pytest.mark.rabbitmq
@pytest.mark.anyio
async def test_exchange_routing_and_kinds(tmp_path: Path, shared_queue: str) -> None:
    import pika

    exchange = f"sluice-test-x-{uuid.uuid4().hex[:8]}"
    url = f"{SHARED_URL}?exchange={exchange}&routing_key=task.{{finish}}"
    sink = RabbitMQ.from_url(
        url + f"&kinds=task-transition,worker-added&spool={tmp_path}&close_timeout=30"
    )

    def bind() -> None:
        connection = pika.BlockingConnection(pika.URLParameters(SHARED_URL))
        channel = connection.channel()
        channel.exchange_declare(exchange, exchange_type="topic", durable=True)
        channel.queue_declare(shared_queue, durable=True)
        channel.queue_bind(shared_queue, exchange, routing_key="task.memory")
        channel.queue_bind(shared_queue, exchange, routing_key="task.worker-added")
        connection.close()

    def unbind() -> None:
        connection = pika.BlockingConnection(pika.URLParameters(SHARED_URL))
        connection.channel().exchange_delete(exchange)
        connection.close()

    await anyio.to_thread.run_sync(bind)
    try:
        async with (
            Scheduler(port=0, sinks=[sink]) as s,
            Worker(s.address, nthreads=1),
            Client(s.address, asynchronous=True) as c,
        ):
            futures = c.map(inc, range(5), key=[f"e{i}" for i in range(5)])
            assert await c.gather(futures) == [1, 2, 3, 4, 5]
        messages = await anyio.to_thread.run_sync(drain, SHARED_URL, shared_queue)
    finally:
        await anyio.to_thread.run_sync(unbind)
    kinds = [body["kind"] for _, body, _ in messages]
    assert kinds.count("worker-added") == 1
    memory = [b for _, b, _ in messages if b["kind"] == "task-transition"]
    assert memory and all(b["finish"] == "memory" for b in memory)
    assert {b["key"] for b in memory if b["source"] == "scheduler"} == {f"e{i}" for i in range(5)}


@pytest.mark.rabbitmq
@pytest.mark.anyio
async def test_preload_adds_the_sink(tmp_path: Path, shared_queue: str) -> None:
    argv = ["--url", SHARED_URL, "--queue", shared_queue, "--spool", str(tmp_path)]
    async with Scheduler(
        port=0, preload=["sluice.sinks.rabbitmq"], preload_argv=[argv], preload_strict=True
    ) as s:
        (sink,) = [
            x.consumer for x in s.bus.subscriptions.values() if isinstance(x.consumer, RabbitMQ)
        ]
        assert sink.queue == shared_queue and sink.spool_dir == tmp_path
        async with Worker(s.address, nthreads=1), Client(s.address, asynchronous=True) as c:
            assert await c.submit(inc, 1, key="only") == 2
    messages = await anyio.to_thread.run_sync(drain, SHARED_URL, shared_queue)
    assert any(b["key"] == "only" and b["finish"] == "memory" for _, b, _ in messages)
    assert {m.partition(":")[0] for m, _, _ in messages} == {s.run_id}


def test_preload_with_a_bad_url_fails_before_any_port() -> None:
    with pytest.raises(ValueError, match="amqp://"):
        Scheduler(port=0, preload=["sluice.sinks.rabbitmq"], preload_argv=[["--url", "http://x"]])


def test_without_pika_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("sluice.sinks.rabbitmq", "sluice._amqp_publisher"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "pika", None)
    with pytest.raises(ImportError, match=r"pip install 'sluice\[rabbitmq\]'") as info:
        importlib.import_module("sluice.sinks.rabbitmq")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("process", [False, True], ids=["thread", "process"])
def test_write_never_waits_on_a_silent_broker(tmp_path: Path, process: bool) -> None:
    """A 'broker' that accepts TCP and never answers: write() still returns at once."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        sink = RabbitMQ(
            f"amqp://guest:guest@127.0.0.1:{port}/?socket_timeout=1",
            spool=tmp_path,
            close_timeout=0.5,
            process=process,
        )
        t0 = time.monotonic()
        for i in range(1, 10_001, 1000):
            sink.write(_events(i, i + 1000))
        assert time.monotonic() - t0 < 10  # waiting on the broker would be forever
        sink.close()
        assert time.monotonic() - t0 < 15
        assert sink.stats()["spooled"] == 10_000
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        server.close()


def test_confirms_out_of_order_and_multiple(tmp_path: Path) -> None:
    """Acks may come singly, out of order, or as 'everything up to N' (multiple)."""
    import pika.spec

    from sluice._amqp_publisher import Publisher

    spool = Spool(tmp_path)
    publisher = Publisher(
        None, exchange="", queue="q", encode=lambda e: ("", "", b""), spool=spool, label="t"
    )
    publisher._pump = lambda: None  # type: ignore[method-assign]  # no channel here
    publisher.unconfirmed.extend((f"r:{i}", "q", b"{}", None) for i in range(1, 11))

    def ack(tag: int, multiple: bool = False) -> list[str]:
        frame = pika.frame.Method(1, pika.spec.Basic.Ack(delivery_tag=tag, multiple=multiple))
        publisher._on_confirm(frame)
        return [m[0] for m in publisher.unconfirmed]

    assert ack(3) == [f"r:{i}" for i in range(1, 11)]  # 3 waits for 1 and 2
    assert ack(5) == [f"r:{i}" for i in range(1, 11)]
    assert ack(1) == [f"r:{i}" for i in range(2, 11)]
    assert ack(2) == ["r:4", *[f"r:{i}" for i in range(5, 11)]]  # 2 and the held 3
    assert ack(4) == [f"r:{i}" for i in range(6, 11)]  # 4 and the held 5
    assert ack(9) == [f"r:{i}" for i in range(6, 11)]
    assert ack(7, multiple=True) == ["r:8", "r:9", "r:10"]
    assert ack(8) == ["r:10"]  # 8 and the held 9
    assert ack(3) == ["r:10"]  # an old tag again changes nothing
    assert ack(10, multiple=True) == []
    assert publisher.confirmed == 10
    spool.close()


@pytest.mark.rabbitmq
@pytest.mark.timeout(120)
def test_publisher_process_that_dies_is_replaced(
    tmp_path: Path, shared_queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    sink = RabbitMQ(SHARED_URL, queue=shared_queue, spool=tmp_path, run_id="r", process=True)
    with pytest.raises(SpoolInUseError):  # the parent holds the spool's lock
        RabbitMQ(SHARED_URL, queue=shared_queue, spool=tmp_path)
    try:
        sink.write(_events(1, 101))
        assert sink.wait_confirmed(WAIT)
        child = sink._backend._proc  # type: ignore[attr-defined]
        child.kill()
        child.wait(WAIT)
        with caplog.at_level(logging.ERROR, logger="sluice.sinks.rabbitmq"):
            sink.write(_events(101, 201))
            assert sink.wait_confirmed(WAIT)
        assert any("died" in r.message for r in caplog.records)
        assert sink._backend._proc is not child  # type: ignore[attr-defined]
    finally:
        sink.close()
    stats = sink.stats()
    assert stats["confirmed"] == 200 and stats["lost"] == 0 and stats["pending"] == 0
    ids = [m[0] for m in drain(SHARED_URL, shared_queue)]
    assert ids == [f"r:{i}" for i in range(1, 201)]


@pytest.mark.rabbitmq
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_publisher_process_runs_below_the_parents_cpu_priority(
    tmp_path: Path, shared_queue: str
) -> None:
    # On busy cores the scheduler and its workers go first; publishing waits.
    sink = RabbitMQ(SHARED_URL, queue=shared_queue, spool=tmp_path, run_id="r", process=True)
    try:
        sink.write(_events(1, 11))
        assert sink.wait_confirmed(WAIT)  # the child's threads are all up by now
        child = sink._backend._proc  # type: ignore[attr-defined]
        assert thread_niceness(child.pid) == {min(19, os.getpriority(os.PRIO_PROCESS, 0) + 19)}
    finally:
        sink.close()


@pytest.mark.rabbitmq
@pytest.mark.timeout(120)
def test_publisher_process_outlives_a_ctrl_c_to_its_process_group(
    tmp_path: Path, shared_queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Ctrl-C (or systemd's stop) signals the whole process group; the scheduler then
    # closes its sinks, and the publisher child must still be there to send the rest.
    sink = RabbitMQ(SHARED_URL, queue=shared_queue, spool=tmp_path, run_id="r", process=True)
    try:
        sink.write(_events(1, 101))
        assert sink.wait_confirmed(WAIT)
        child = sink._backend._proc  # type: ignore[attr-defined]
        for signum in (signal.SIGINT, signal.SIGTERM):
            child.send_signal(signum)
        with caplog.at_level(logging.ERROR, logger="sluice.sinks.rabbitmq"):
            sink.write(_events(101, 201))
            assert sink.wait_confirmed(WAIT)
        assert not any("died" in r.message for r in caplog.records)
        assert sink._backend._proc is child  # type: ignore[attr-defined]
    finally:
        sink.close()
    assert child.returncode == 0
    ids = [m[0] for m in drain(SHARED_URL, shared_queue)]
    assert ids == [f"r:{i}" for i in range(1, 201)]


@pytest.mark.anyio
async def test_the_bus_never_queues_the_workers_events_for_a_sink_of_the_schedulers_own(
    tmp_path: Path,
) -> None:
    # A publisher that lags would otherwise have its queue spill them to disk, only
    # for write() to drop them. Nothing is started: no broker is needed.
    mine = RabbitMQ(SHARED_URL, queue="q", spool=tmp_path / "a", run_id="r", process=False)
    every = RabbitMQ(
        SHARED_URL, queue="q", spool=tmp_path / "b", run_id="r", process=False, forwarded=True
    )
    own = TaskTransition(seq=1, key="k", start="waiting", finish="processing")
    forwarded = attrs.evolve(own, seq=2, source="tcp://127.0.0.1:4000")
    held: dict[str, int] = {}
    async with EventBus(address="tcp://127.0.0.1:8786") as bus:
        for sink in (mine, every):
            sink.write = lambda batch: None  # type: ignore[method-assign]
            bus.subscribe(sink, name=f"forwarded={sink.forwarded}")
        bus.publish_many([own, forwarded, attrs.evolve(own, seq=3, source=bus.address)])
        held = {name: stats["lag"] for name, stats in bus.stats().items()}
        await bus.drain()
        delivered = {name: stats["delivered"] for name, stats in bus.stats().items()}
    assert held == {"forwarded=False": 2, "forwarded=True": 3}
    assert delivered == held
    assert every.accepts is None


def test_sinks_sharing_the_default_spool_each_get_a_slot_of_their_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers of one machine streaming to one queue: the second sink takes the
    next free spool directory instead of failing; an explicit spool= still fails."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = RabbitMQ(SHARED_URL)
    second = RabbitMQ(SHARED_URL)
    try:
        assert second.spool_dir == first.spool_dir.with_name(first.spool_dir.name + "-1")
        assert first.spool_dir.parent == tmp_path / "sluice" / "rabbitmq-spool"
        with pytest.raises(SpoolInUseError, match="in use"):
            RabbitMQ(SHARED_URL, spool=first.spool_dir)
    finally:
        first.close()
        second.close()
    third = RabbitMQ(SHARED_URL)  # the first slot is free again: taken up first
    try:
        assert third.spool_dir == first.spool_dir
    finally:
        third.close()


# -- backfill: sluice replay LOG --into amqp://... ------------------------------------------


@pytest.mark.rabbitmq
@pytest.mark.anyio
async def test_replay_into_backfills_a_queue_with_exactly_the_logged_events(
    shared_queue: str, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from sluice.cli import main
    from sluice.replay import read_header

    log = tmp_path / "run.jsonl"
    async with (
        Scheduler(port=0, event_log=log) as s,
        Worker(s.address, nthreads=2),
        Client(s.address, asynchronous=True) as c,
    ):
        assert sum(await c.gather(c.map(slow_inc, range(100)))) == sum(range(1, 101))
    events = list(read_events(log))
    run_id = read_header(log)["run_id"]
    url = f"{SHARED_URL}?queue={shared_queue}&kinds=all&forwarded=true&spool={tmp_path / 'spool'}"
    result = await anyio.to_thread.run_sync(
        lambda: CliRunner().invoke(main, ["replay", str(log), "--into", url])
    )
    assert result.exit_code == 0, result.output
    assert f"re-published {len(events)} events of run {run_id}" in result.output
    got = drain(SHARED_URL, shared_queue, delete=False)
    assert [mid for mid, _, _ in got] == [f"{run_id}:{e.seq}" for e in events]
    assert [body for _, body, _ in got] == [orjson.loads(orjson.dumps(e.to_dict())) for e in events]
