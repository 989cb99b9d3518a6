"""sluice: a distributed task scheduler whose every task transition is an event.

The scheduler's state is the fold of its events (:class:`SchedulerState`);
plugins and sinks consume those events from an :class:`EventBus`, live or
replayed from a recorded log (:mod:`sluice.replay`). The servers
(:class:`Scheduler`, :class:`Worker`, :class:`Nanny`), the :class:`Client` and
:class:`LocalCluster` follow the model Dask distributed users know.
"""

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

# Imported on first use: ``import sluice`` (and the pytest plugin sluice.testing, which
# pytest loads in every suite where sluice is installed) stays cheap.
_LAZY = {
    "Future": "sluice._client_futures",
    "FutureCancelledError": "sluice._client_futures",
    "as_completed": "sluice._client_futures",
    "wait": "sluice._client_futures",
    "SchedulerState": "sluice._core.scheduler_state",
    "get_worker": "sluice._worker_exec",
    "EventBus": "sluice.bus",
    "Client": "sluice.client",
    "LocalCluster": "sluice.deploy",
    "Nanny": "sluice.nanny",
    "NannyPlugin": "sluice.plugin",
    "SchedulerPlugin": "sluice.plugin",
    "WorkerPlugin": "sluice.plugin",
    "Scheduler": "sluice.scheduler",
    "Security": "sluice.security",
    "Worker": "sluice.worker",
}


# Submodules that the contract names as ``sluice.X`` without an import of their own
# (``sluice.config.set(...)`` right after ``import sluice``).
_SUBMODULES = frozenset({"config", "events", "plugins", "preload", "replay", "sinks", "testing"})


def __getattr__(name: str) -> Any:
    import importlib

    if name in _SUBMODULES:
        return importlib.import_module(f"sluice.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sluice' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES})


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
