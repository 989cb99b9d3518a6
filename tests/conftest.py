"""Fixtures shared by the RabbitMQ tests and the chaos suite.

Broker tests skip where no broker (or no RabbitMQ installation) is found, except
with ``CI=true``: CI must run them, so there a missing broker fails the test.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from rabbitmq_node import RabbitNode, delete_queue, rabbitmq_available

#: The shared broker of the machine (never stopped or reconfigured by a test).
SHARED_URL = "amqp://guest:guest@127.0.0.1:5672/"


def _missing(what: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} (CI must run this test)")
    pytest.skip(what)


def _broker_up(port: int = 5672) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture
def shared_queue() -> Iterator[str]:
    """A unique queue name on the shared broker, deleted afterwards."""
    if not _broker_up():
        _missing("RabbitMQ is not running at 127.0.0.1:5672")
    queue = f"sluice-test-{uuid.uuid4().hex[:12]}"
    yield queue
    delete_queue(SHARED_URL, queue)


@pytest.fixture
def rabbit_node(tmp_path: Path) -> Iterator[RabbitNode]:
    """A RabbitMQ node of the test's own on spare ports (not started); always killed afterwards."""
    if not rabbitmq_available():
        _missing("rabbitmq-server / rabbitmqctl are not installed")
    node = RabbitNode(tmp_path / "node")
    try:
        yield node
    finally:
        node.kill()
