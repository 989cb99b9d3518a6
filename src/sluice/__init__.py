"""sluice: a distributed task scheduler whose every task transition is an event.

The scheduler's state is the fold of its events (:class:`SchedulerState`);
plugins and sinks consume those events from an :class:`EventBus`, live or
replayed from a recorded log (:mod:`sluice.replay`). The servers
(:class:`Scheduler`, :class:`Worker`, :class:`Nanny`), the :class:`Client` and
:class:`LocalCluster` follow the model Dask distributed users know.
"""

from importlib.metadata import PackageNotFoundError, version

from sluice._client_futures import Future, FutureCancelledError, as_completed, wait
from sluice._core.scheduler_state import SchedulerState
from sluice._worker_exec import get_worker
from sluice.bus import EventBus
from sluice.client import Client
from sluice.deploy import LocalCluster
from sluice.nanny import Nanny
from sluice.plugin import NannyPlugin, SchedulerPlugin, WorkerPlugin
from sluice.scheduler import Scheduler
from sluice.security import Security
from sluice.worker import Worker

try:
    __version__ = version("sluice")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = (
    "Client",
    "EventBus",
    "Future",
    "FutureCancelledError",
    "LocalCluster",
    "Nanny",
    "NannyPlugin",
    "Scheduler",
    "SchedulerPlugin",
    "SchedulerState",
    "Security",
    "Worker",
    "WorkerPlugin",
    "__version__",
    "as_completed",
    "get_worker",
    "wait",
)
