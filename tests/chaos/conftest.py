"""Fixtures of the process- and broker-fault tests in ``tests/chaos``.

The helpers of ``tests/`` (``sluice_processes``, ``rabbitmq_node``) are imported
the way the tests one level up import them: ``tests/`` goes on ``sys.path`` here,
so ``pytest tests/chaos`` works on its own.

Broker fixtures skip a test when RabbitMQ is not there, except on CI
(``CI=true``), where a missing broker fails the test instead.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


SHARED_URL = "amqp://guest:guest@127.0.0.1:5672/"

#: ``(message_id, body, properties)`` of one message taken off a queue.
Message = tuple[str, dict[str, Any], Any]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def drain_queue(url: str, queue: str, *, timeout: float = 60) -> list[Message]:
    """Every message in ``queue`` now, in queue order; the queue is deleted afterwards."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        count = channel.queue_declare(queue, passive=True).method.message_count
        channel.basic_qos(prefetch_count=2000)
        out: list[Message] = []
        if count:
            deadline = time.monotonic() + timeout
            for method, props, body in channel.consume(queue, auto_ack=True, inactivity_timeout=5):
                if method is not None:
                    out.append((props.message_id, orjson.loads(body), props))
                if len(out) >= count or time.monotonic() > deadline:
                    break
            channel.cancel()
        channel.queue_delete(queue)
        return out
    finally:
        connection.close()


@pytest.fixture
def drain() -> Callable[[str, str], list[Message]]:
    """``drain(url, queue)``: every message of ``queue`` now (then deletes the queue)."""
    return drain_queue
