"""Each event's JSON, encoded once and shared by every sink that writes JSON.

The event log, the JSON log and the RabbitMQ sink all start from
the event's dict as JSON; :meth:`Event.to_json` caches those bytes on
the event, so the second and third sink get them for free.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import msgspec
import orjson

if TYPE_CHECKING:
    from sluice.events import Event

__all__ = ("event_json",)

logger = logging.getLogger("sluice.sinks")


def event_json(event: Event) -> bytes:
    """``event`` as compact JSON; what JSON cannot hold is written as its ``repr``.

    A user event may carry any object; rather than lose a batch for it, the bad
    values become strings, with one warning per event (not one per sink: the
    substitute is cached like a good encoding).
    """
    try:
        return event.to_json()
    except (TypeError, ValueError, msgspec.EncodeError) as exc:
        logger.warning(
            "event seq=%s (%s) is not JSON-safe (%s); writing repr() of the bad values",
            event.seq,
            event.kind,
            exc,
        )
        data = orjson.dumps(event.to_dict(), default=repr, option=orjson.OPT_NON_STR_KEYS)
        event._set_json(data)
        return data
