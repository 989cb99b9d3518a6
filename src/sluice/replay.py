"""Reading recorded runs back: the event log reader (and, later, replay).

``read_events(path)`` yields the events of a log written by the ``eventlog``
sink (:class:`sluice.sinks.eventlog.EventLog`), across its rotated segments,
upcasting events written with an older schema version. ``read_header(path)``
gives its header (``format``, ``version``, ``run_id``, ``started``,
``address``). The reader itself lives in :mod:`sluice._core.logfile`, next to
the format it reads; this module is its public face.
"""

from __future__ import annotations

from sluice._core.logfile import EventLogError, EventLogReader, read_events, read_header

__all__ = ("EventLogError", "EventLogReader", "read_events", "read_header")
