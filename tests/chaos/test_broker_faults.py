"""Broker faults: the RabbitMQ node killed (SIGKILL to its process group) and restarted
twice while a run publishes through the ``amqp://`` sink.

The node is a private one (``tests/rabbitmq_node.py``) on spare ports; the shared
broker is never touched. What must hold: every event of the scheduler's event log
reaches the queue at least once (deduplicated by message id, with the logged body)
and, for each task key, the first deliveries come in the order of the log.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from rabbitmq_node import RabbitNode
from sluice import Client, Scheduler, Worker
from sluice.replay import read_events
from sluice.sinks.rabbitmq import RabbitMQ

WAIT = 60  # seconds: a generous bound for any single wait below

#: ``(message_id, body, properties)`` of one message taken off a queue.
Message = tuple[str, dict[str, Any], Any]


def slow_inc(x: int) -> int:
    time.sleep(0.002)  # the work of a task: keeps events flowing through each outage
    return x + 1


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll a condition that the sink's publisher thread changes (it offers no awaitable)."""
    try:
        with anyio.fail_after(timeout):
            while not predicate():
                await anyio.sleep(0.02)
    except TimeoutError:
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}") from None


def first_deliveries(messages: list[Message]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Body of each message id as first delivered, and the ids in first-delivery order;
    a redelivery must carry the same body."""
    first: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    for message_id, body, props in messages:
        assert props.delivery_mode == 2  # persistent
        if message_id in first:
            assert body == first[message_id], f"{message_id} redelivered with another body"
            continue
        first[message_id] = body
        order.append(message_id)
    return first, order


@pytest.mark.rabbitmq
@pytest.mark.anyio
@pytest.mark.timeout(240)
async def test_broker_killed_and_restarted_twice(
    tmp_path: Path,
    rabbit_node: RabbitNode,
    drain: Callable[[str, str], list[Message]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sluice.sinks.rabbitmq")
    node = rabbit_node
    await anyio.to_thread.run_sync(node.start)
    queue = f"sluice-chaos-{uuid.uuid4().hex[:12]}"
    # Small memory bound and segments: each outage also goes through the disk spool.
    # Every kind, the workers' forwarded transitions too: the queue must match the log.
    options = f"queue={queue}&kinds=all&forwarded=true&spool={tmp_path / 'spool'}"
    sink = RabbitMQ(
        f"{node.url}?{options}&close_timeout=30",
        max_memory=300,
        segment_messages=500,
        max_backoff=0.5,
    )
    log = tmp_path / "events.jsonl"
    wave = 400
    outages = 2
    async with Scheduler(port=0, event_log=log, sinks=[sink]) as s:
        run_id = s.run_id
        async with Worker(s.address, nthreads=1), Client(s.address, asynchronous=True) as c:
            await wait_until(lambda: sink.connected, "the first connection")
            futures: list[Any] = []
            confirmed_at_kill: list[int] = []  # the sink's count just before each kill
            for outage in range(outages):
                # Up: a wave runs and some of it is confirmed.
                before = sink.stats()["confirmed"]
                futures += c.map(
                    slow_inc, range(wave), key=[f"up{outage}-{i}" for i in range(wave)]
                )
                await wait_until(lambda b=before: sink.stats()["confirmed"] >= b + 200, "confirms")
                # kill -9 mid-stream, with messages in flight; another wave runs meanwhile.
                confirmed_at_kill.append(sink.stats()["confirmed"])
                await anyio.to_thread.run_sync(node.kill)
                await wait_until(lambda: not sink.connected, "the sink to see the broker gone")
                futures += c.map(
                    slow_inc, range(wave), key=[f"down{outage}-{i}" for i in range(wave)]
                )
                await c.gather(futures)
                stats = sink.stats()
                assert stats["pending"] > 0, stats  # events wait for the broker; the run went on
                await anyio.to_thread.run_sync(node.start)
                await wait_until(lambda: sink.connected, "the sink to reconnect")
            futures += c.map(slow_inc, range(wave), key=[f"last-{i}" for i in range(wave)])
            results = await c.gather(futures)
            assert results == [i + 1 for _ in range(2 * outages + 1) for i in range(wave)]
            assert await anyio.to_thread.run_sync(sink.wait_confirmed, WAIT)
    stats = sink.stats()
    print("sink stats:", stats)  # shown with -s; "resent" > 0 when a kill caught messages
    # in flight, which is likely but not certain
    assert stats["pending"] == 0 and stats["spooled"] > 0, stats  # outages went via the spool

    # With no consumer, the queue a restarted node holds must hold at least what it
    # had confirmed before the kill; if not, the broker lost messages it confirmed.
    backs = [r.message for r in caplog.records if "is back after" in r.message]
    held = [int(m) for b in backs for m in re.findall(r"the queue holds (\d+) messages", b)]
    assert len(held) == outages, backs
    for n, (kept, confirmed) in enumerate(zip(held, confirmed_at_kill, strict=True), 1):
        assert kept >= confirmed, (
            f"after kill {n} the node's queue held {kept} messages, but the node had"
            f" confirmed {confirmed}: the broker lost messages it had confirmed"
        )
    events = list(read_events(log))
    messages = await anyio.to_thread.run_sync(drain, node.url, queue)
    first, order = first_deliveries(messages)
    want = {f"{run_id}:{e.seq}": e for e in events}
    missing = sorted(set(want) - set(first), key=lambda m: int(m.rpartition(":")[2]))
    assert not missing, f"{len(missing)} of {len(want)} events never arrived: {missing[:5]}"
    assert set(first) == set(want)  # nothing that was not logged
    for message_id, event in want.items():
        assert first[message_id] == json.loads(json.dumps(event.to_dict()))
    seqs_by_key: dict[str, list[int]] = defaultdict(list)
    for message_id in order:
        body = first[message_id]
        if "key" in body:
            seqs_by_key[json.dumps(body["key"])].append(body["seq"])
    assert len(seqs_by_key) == wave * (2 * outages + 1)
    for key, seqs in seqs_by_key.items():
        assert seqs == sorted(seqs), f"events of key {key} arrived out of order: {seqs}"
