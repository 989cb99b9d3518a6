"""sluice: a distributed task scheduler whose every task transition is an event.

The scheduler's state is the fold of its events (:class:`SchedulerState`);
plugins and sinks consume those events from an :class:`EventBus`, live or
replayed from a recorded log (:mod:`sluice.replay`).
"""

from importlib.metadata import PackageNotFoundError, version

from sluice._core.scheduler_state import SchedulerState
from sluice.bus import EventBus
from sluice.plugin import NannyPlugin, SchedulerPlugin, WorkerPlugin

try:
    __version__ = version("sluice")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = (
    "EventBus",
    "NannyPlugin",
    "SchedulerPlugin",
    "SchedulerState",
    "WorkerPlugin",
    "__version__",
)
