"""Reading recorded runs back: the event log reader, and replay into consumers.

``read_events(path)`` yields the events of a log written by the ``eventlog``
sink (:class:`sluice.sinks.eventlog.EventLog`), across its rotated segments,
upcasting events written with an older schema version. ``read_header(path)``
gives its header (``format``, ``version``, ``run_id``, ``started``,
``address``). The reader itself lives in :mod:`sluice._core.logfile`, next to
the format it reads; this module is its public face.

``replay(events, *consumers)`` drives SchedulerPlugin objects and sinks with a
recorded run as the live run did, with a read-only ``scheduler`` rebuilt from
the log (:mod:`sluice._replay_driver`).
"""

from __future__ import annotations

from sluice._core.logfile import EventLogError, EventLogReader, read_events, read_header
from sluice._replay_driver import ReplayedScheduler, replay

__all__ = (
    "EventLogError",
    "EventLogReader",
    "ReplayedScheduler",
    "read_events",
    "read_header",
    "replay",
)
