"""The in-process cluster behind the ``sluice_cluster`` fixture of :mod:`sluice.testing`.

Imported only when a test asks for the fixture: it pulls in the servers.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import attrs

from sluice._testing_recorder import Recorder
from sluice.events import UserEvent

if TYPE_CHECKING:
    from sluice.client import Client
    from sluice.scheduler import Scheduler
    from sluice.worker import Worker

__all__ = ("InProcessCluster", "consumer_failures", "in_process_cluster")


@attrs.define
class InProcessCluster:
    """What ``sluice_cluster`` yields: the servers, an async client and the recorder.

    ``recorder`` was attached to the scheduler's bus before it started, so it
    holds the whole run from seq 1, the workers' forwarded transitions
    included: ``cluster.recorder.save(path)`` writes it as an event log.
    """

    scheduler: Scheduler
    workers: list[Worker]
    client: Client
    recorder: Recorder

    @property
    def address(self) -> str:
        return self.scheduler.address


def consumer_failures(events: list[Any]) -> list[str]:
    """The ``consumer-failed`` reports among ``events``, one ``"consumer: error"`` line each.

    A worker's reports reach the scheduler's bus with its forwarded events
    (the failures of worker plugins among them), so one recorder sees all.
    """
    failures = []
    for e in events:
        if isinstance(e, UserEvent) and e.topic == "consumer-failed":
            msg = e.msg if isinstance(e.msg, dict) else {}
            where = "" if e.source == "scheduler" else f" (on {e.source})"
            failures.append(f"{msg.get('consumer', '?')}{where}: {msg.get('error', e.msg)}")
    return failures


@contextlib.asynccontextmanager
async def in_process_cluster(
    *, n_workers: int = 2, nthreads: int = 1, recorder: Recorder | None = None
) -> AsyncIterator[InProcessCluster]:
    """A scheduler, ``n_workers`` workers and an asynchronous client, in this process."""
    from sluice.client import Client
    from sluice.scheduler import Scheduler
    from sluice.worker import Worker

    recorder = recorder if recorder is not None else Recorder()
    scheduler = Scheduler(port=0)
    recorder.attach(scheduler)
    async with scheduler, contextlib.AsyncExitStack() as stack:
        workers = [
            await stack.enter_async_context(
                Worker(scheduler.address, nthreads=nthreads, name=f"worker-{i}")
            )
            for i in range(n_workers)
        ]
        client = await stack.enter_async_context(Client(scheduler.address, asynchronous=True))
        yield InProcessCluster(scheduler, workers, client, recorder)
