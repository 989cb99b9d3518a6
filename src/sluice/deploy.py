"""LocalCluster: a scheduler and some workers on this machine, in one call.

The scheduler always runs in this process, on the event loop of whoever started the
cluster (the background loop of :mod:`sluice._loop` for a sync cluster). Workers run
in child processes under a :class:`~sluice.nanny.Nanny` (``processes=True``, the
default, as with Dask: a task that crashes or hogs the GIL does not take the scheduler
with it) or as in-process :class:`~sluice.worker.Worker` objects on the same loop
(``processes=False``: fast to start, what tests use).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from typing import Any

import anyio
from anyio.from_thread import BlockingPortal

from sluice import _loop
from sluice.security import Security

__all__ = ("LocalCluster",)

logger = logging.getLogger("sluice.deploy")


class LocalCluster(_loop.SyncOrAsync):
    """A scheduler plus ``n_workers`` workers of ``threads_per_worker`` threads each.

    Sync by default (the constructor returns a running cluster); with
    ``asynchronous=True`` use ``async with LocalCluster(...)`` or
    ``await LocalCluster(...)``, and ``scale``/``close`` are coroutines.
    """

    _noun = "cluster"

    def __init__(
        self,
        n_workers: int = 2,
        threads_per_worker: int = 1,
        processes: bool = True,
        *,
        host: str = "127.0.0.1",
        scheduler_port: int = 0,
        asynchronous: bool = False,
        event_log: Any = None,
        sinks: Any = None,
        security: Security | None = None,
        timeout: float = 30.0,
    ) -> None:
        if n_workers < 0:
            raise ValueError(f"n_workers must be >= 0, not {n_workers}")
        self.n_workers = n_workers
        self.threads_per_worker = threads_per_worker
        self.processes = processes
        self.host = host
        self.scheduler_port = scheduler_port
        self.asynchronous = asynchronous
        self.event_log = event_log
        #: The scheduler's sinks (objects or specs, as ``Scheduler(sinks=...)`` takes).
        self.sinks = sinks
        self.security = security
        self.timeout = timeout
        self.scheduler: Any = None
        #: The running Worker (processes=False) or Nanny (processes=True) objects.
        self.workers: list[Any] = []
        self.status = "created"
        self._names = itertools.count()
        self._changed: anyio.Event | None = None
        self._lock: anyio.Lock | None = None
        self._portal: BlockingPortal | None = None
        if not asynchronous:
            self._portal = _loop.get_portal()
            self._portal.call(self._start)
            _loop.at_exit(self, self._close)

    def _make_sync(self) -> None:
        """Turn a cluster started on the background loop into a sync one (used by a sync
        Client that started its own cluster there)."""
        self.asynchronous = False
        self._portal = _loop.get_portal()

    def __repr__(self) -> str:
        kind = "processes" if self.processes else "in-process"
        return (
            f"<LocalCluster {self.scheduler_address!r} workers={len(self.workers)}"
            f" ({kind}) {self.status}>"
        )

    @property
    def scheduler_address(self) -> str | None:
        return self.scheduler.address if self.scheduler is not None else None

    # ------------------------------------------------------------------ lifecycle

    async def _start(self) -> None:
        if self.status == "running":
            return
        if self.status == "closed":
            raise RuntimeError("this cluster is closed")
        from sluice.scheduler import Scheduler

        self._lock = anyio.Lock()
        self.scheduler = Scheduler(
            host=self.host,
            port=self.scheduler_port,
            security=self.security,
            event_log=self.event_log,
            sinks=self.sinks,
        )
        await self.scheduler.start()
        self._watch_workers()
        self.status = "running"
        try:
            await self._scale(self.n_workers)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._close()
            raise
        logger.info(
            "local cluster at %s with %d workers", self.scheduler_address, len(self.workers)
        )

    def _watch_workers(self) -> None:
        """Wake :meth:`_wait_for_workers` on every worker added or removed."""
        bus = getattr(self.scheduler, "bus", None)
        if bus is None:
            return

        def on_event(event: Any) -> None:
            if self._changed is not None:
                self._changed.set()

        try:
            bus.subscribe(
                on_event,
                name=f"local-cluster-{id(self)}",
                kinds=("worker-added", "worker-removed"),
                mode="inline",
            )
        except Exception:  # an older bus: fall back to polling
            logger.debug("cannot watch worker events", exc_info=True)

    async def _wait_for_workers(self, n: int) -> None:
        with anyio.fail_after(self.timeout):
            while len(self.scheduler.workers) != n:
                self._changed = anyio.Event()
                with anyio.move_on_after(0.05):  # a safety net, not the mechanism
                    await self._changed.wait()

    def _new_worker(self) -> Any:
        name = str(next(self._names))
        address = self.scheduler.address
        if self.processes:
            from sluice.nanny import Nanny

            # The worker processes share the user's terminal: only warnings and errors.
            return Nanny(
                address,
                nthreads=self.threads_per_worker,
                name=name,
                security=self.security,
                log_level="warning",
            )
        from sluice.worker import Worker

        return Worker(address, nthreads=self.threads_per_worker, name=name, security=self.security)

    async def _scale(self, n: int) -> None:
        assert self._lock is not None
        if n < 0:
            raise ValueError(f"cannot scale to {n} workers")
        async with self._lock:
            if len(self.workers) < n:
                new = [self._new_worker() for _ in range(n - len(self.workers))]
                errors: list[BaseException] = []

                async def start(w: Any) -> None:
                    try:
                        await w.start()
                    except Exception as exc:
                        errors.append(exc)
                    else:
                        self.workers.append(w)

                async with anyio.create_task_group() as tg:
                    for w in new:
                        tg.start_soon(start, w)
                if errors:
                    raise errors[0]
            elif len(self.workers) > n:
                extra, self.workers = self.workers[n:], self.workers[:n]
                async with anyio.create_task_group() as tg:
                    for w in extra:
                        tg.start_soon(w.close)
            self.n_workers = n
            await self._wait_for_workers(n)

    def scale(self, n: int) -> Any:
        """Add or remove workers until there are ``n``; returns once the scheduler has
        them all (a coroutine in async mode)."""
        return self._sync(self._scale, n)

    async def _close(self) -> None:
        if self.status in ("closed", "closing"):
            return
        self.status = "closing"
        with anyio.CancelScope(shield=True):
            workers, self.workers = self.workers, []
            async with anyio.create_task_group() as tg:
                for w in workers:
                    tg.start_soon(_close_quietly, w)
            if self.scheduler is not None:
                bus = getattr(self.scheduler, "bus", None)
                if bus is not None:
                    with contextlib.suppress(Exception):
                        bus.unsubscribe(f"local-cluster-{id(self)}")
                await self.scheduler.close()
        self.status = "closed"
        _loop.at_exit(self, None)


async def _close_quietly(w: Any) -> None:
    try:
        await w.close()
    except Exception:
        logger.warning("error closing %r", w, exc_info=True)
