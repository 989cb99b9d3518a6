"""Base classes for scheduler, worker and nanny plugins, with Dask's hooks.

A Dask plugin ports by changing its import: the hook names and signatures are
the ones ``distributed.diagnostics.plugin`` defines. Every hook may be a plain
or an ``async def`` method; the defaults do nothing, so a plugin overrides only
what it needs. On a scheduler a plugin is an inline consumer of the bus: its
``transition`` runs right after the transition was applied, so
``scheduler.tasks[key]`` shows the task as it now is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sluice.events import Key

__all__ = ("NannyPlugin", "SchedulerPlugin", "WorkerPlugin")


class SchedulerPlugin:
    """Runs custom code on the scheduler at each event of its life.

    ``scheduler`` is the live scheduler, or during :func:`sluice.replay.replay`
    a read-only view rebuilt from the log (``tasks``, ``workers``, ``clients``,
    ``address``).
    """

    name: str | None = None
    idempotent: bool = False

    async def start(self, scheduler: Any) -> None:
        """The scheduler started, or this plugin was added to a running one."""

    async def before_close(self) -> None:
        """The scheduler is about to close; the bus still delivers."""

    async def close(self) -> None:
        """The scheduler closed, or this plugin was removed or replaced."""

    def update_graph(
        self,
        scheduler: Any,
        *,
        client: str,
        keys: set[Key],
        tasks: list[Key],
        annotations: dict[str, Any],
        priority: dict[Key, int],
        dependencies: dict[Key, set[Key]],
        stimulus_id: str,
        **kwargs: Any,
    ) -> None:
        """A client submitted ``tasks``; it wants the results of ``keys``."""

    def restart(self, scheduler: Any) -> None:
        """The cluster was restarted: every task was forgotten."""

    def transition(
        self, key: Key, start: str, finish: str, *args: Any, stimulus_id: str, **kwargs: Any
    ) -> None:
        """Task ``key`` moved from ``start`` to ``finish`` on the scheduler.

        ``kwargs`` carry ``worker``, ``nbytes``, ``duration``, ``exception`` and
        ``traceback`` when the transition has them.
        """

    def add_worker(self, scheduler: Any, worker: str) -> None:
        """A worker joined (``worker`` is its address)."""

    def remove_worker(
        self, scheduler: Any, worker: str, *, stimulus_id: str, **kwargs: Any
    ) -> None:
        """A worker left or was lost."""

    def add_client(self, scheduler: Any, client: str) -> None:
        """A client connected."""

    def remove_client(self, scheduler: Any, client: str) -> None:
        """A client disconnected."""

    def log_event(self, topic: str, msg: Any) -> None:
        """A user event was logged on ``topic``."""


class WorkerPlugin:
    """Runs custom code on every worker: at setup, teardown and each transition."""

    name: str | None = None
    idempotent: bool = False

    def setup(self, worker: Any) -> Any:
        """The plugin was registered on ``worker`` (or the worker started)."""

    def teardown(self, worker: Any) -> Any:
        """The worker is closing, or the plugin was removed or replaced."""

    def transition(self, key: Key, start: str, finish: str, **kwargs: Any) -> None:
        """Task ``key`` moved from ``start`` to ``finish`` on this worker.

        A transition into ``error`` carries ``exception=`` and ``traceback=``.
        """


class NannyPlugin:
    """Runs custom code on every nanny; ``restart = True`` restarts its worker after setup."""

    name: str | None = None
    idempotent: bool = False
    restart: bool = False

    def setup(self, nanny: Any) -> Any:
        """The plugin was registered on ``nanny`` (or the nanny started)."""

    def teardown(self, nanny: Any) -> Any:
        """The nanny is closing, or the plugin was removed or replaced."""
