"""The Dask documentation's plugin examples, ported to sluice, run as users run them."""

from __future__ import annotations

import json
import logging
import os
import runpy
import socket
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest

from sluice import Client, Scheduler, Worker

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def inc(x: int) -> int:
    return x + 1


def test_counter_plugin() -> None:
    example = runpy.run_path(str(EXAMPLES / "counter_plugin.py"))
    assert example["main"]() == 10


@pytest.mark.anyio
async def test_task_state_plugin_sees_the_full_task_state() -> None:
    preload = str(EXAMPLES / "task_state_plugin.py")
    async with (
        Scheduler(port=0, preload=[preload]) as s,
        Worker(s.address),
        Client(s.address, asynchronous=True) as client,
    ):
        x = client.submit(inc, 1, key="x")
        y = client.submit(inc, x, key="y")
        assert await y == 3
        (plugin,) = [p for p in s.plugins.values() if type(p).__name__ == "MyPlugin"]
        assert ("y", "processing", ["x"]) in plugin.seen
        assert ("y", "memory", ["x"]) in plugin.seen


@pytest.mark.anyio
async def test_preload_forms() -> None:
    example = runpy.run_path(str(EXAMPLES / "preload_forms.py"))
    on_scheduler, on_worker = await example["main"]()
    assert on_scheduler == ["a .py path", "a module name", "script text"]
    assert on_worker == ["configuration"]


def test_error_logger_worker_plugin(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="errors")
    example = runpy.run_path(str(EXAMPLES / "error_logger_plugin.py"))
    example["main"]()
    messages = [r.getMessage() for r in caplog.records if r.name == "errors"]
    assert len(messages) == 1
    assert "has failed with exception: ValueError('bad value 3')" in messages[0]


def _broker_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=2):
            return True
    except OSError:
        return False


@pytest.mark.rabbitmq
@pytest.mark.anyio
async def test_rabbitmq_plugin_from_the_dask_docs() -> None:
    if not _broker_up():
        if os.environ.get("CI") == "true":
            pytest.fail("RabbitMQ is not running at 127.0.0.1:5672 (CI must run this test)")
        pytest.skip("RabbitMQ is not running at 127.0.0.1:5672")
    import pika

    queue = f"sluice-test-{uuid.uuid4().hex[:8]}"
    preload = str(EXAMPLES / "rabbitmq_plugin.py")
    async with (
        Scheduler(port=0, preload=[preload], preload_argv=[["--rabbitmq-queue", queue]]) as s,
        Worker(s.address),
        Client(s.address, asynchronous=True) as client,
    ):
        assert await client.gather(client.map(inc, range(5), key=[f"k{i}" for i in range(5)]))

    def drain() -> list[dict[str, Any]]:
        connection = pika.BlockingConnection(pika.ConnectionParameters(host="localhost"))
        try:
            channel = connection.channel()
            messages = []
            while True:
                method, _, body = channel.basic_get(queue=queue, auto_ack=True)
                if method is None:
                    break
                messages.append(json.loads(body))
            channel.queue_delete(queue=queue)
            return messages
        finally:
            connection.close()

    messages = await anyio.to_thread.run_sync(drain)
    finished = {m["key"] for m in messages if (m["start"], m["finish"]) == ("processing", "memory")}
    assert finished == {f"k{i}" for i in range(5)}
