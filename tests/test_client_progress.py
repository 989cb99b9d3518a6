"""Client.progress: rich bars per key prefix until the futures are done."""

from __future__ import annotations

import io
import threading

import anyio
import pytest
from rich.console import Console

from sluice._client_progress import key_prefix
from sluice.client import Client
from sluice.deploy import LocalCluster

RELEASE = threading.Event()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def inc(x: int) -> int:
    return x + 1


def bad(x: int) -> int:
    raise ValueError(x)


def held(x: int) -> int:
    RELEASE.wait(30)
    return x


def test_key_prefix() -> None:
    assert key_prefix("inc-5f3e0a9b1c2d3e4f5a6b7c8d9e0f1a2b") == "inc"
    assert key_prefix(("load", 3)) == "load"
    assert key_prefix((("nested", 1), 2)) == "nested"
    assert key_prefix("total") == "total"
    assert key_prefix("my-task-name") == "my-task-name"  # no token: kept whole


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=100, force_terminal=False), out


def test_sync_progress_counts_outcomes_and_draws_a_bar_per_prefix() -> None:
    console, out = _console()
    with LocalCluster(2, processes=False) as cluster, Client(cluster) as client:
        futures = client.map(inc, range(200))
        failing = [client.submit(bad, i) for i in range(3)]
        assert client.progress({"ok": futures, "bad": failing}, console=console) == {
            "finished": 200,
            "error": 3,
        }
        assert all(f.done() for f in [*futures, *failing])
    text = out.getvalue()
    assert "inc" in text and "200/200" in text
    assert "3/3" in text and "3 error" in text
    assert "203/203" in text  # the total bar


@pytest.mark.anyio
async def test_async_progress_waits_for_pending_futures() -> None:
    RELEASE.clear()
    console, _ = _console()
    async with (
        LocalCluster(1, processes=False, asynchronous=True) as cluster,
        Client(cluster, asynchronous=True) as client,
    ):
        future = client.submit(held, 7)
        outcome: dict[str, int] = {}

        async def watch() -> None:
            outcome.update(await client.progress(future, console=console))

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            await anyio.wait_all_tasks_blocked()
            assert outcome == {}  # still waiting: the task is held
            RELEASE.set()
        assert outcome == {"finished": 1}
        assert await future == 7
