"""Built-in sinks, installed as ``sluice.sinks``.

A sink is any object with ``write(batch)``, sync or async, and optionally
``start()``, ``flush()`` and ``close()``. :class:`Sink` is a convenient base
class: subclass it and override what you need. On a bus a sink is a *queued*
consumer: it receives events in batches from a bounded queue of its own, so a
slow sink never slows the publisher. A plain ``def write`` runs in a thread of
its own, an ``async def write`` on the event loop.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    from sluice.bus import EventBus
    from sluice.events import Event

__all__ = ("Sink", "SinkLike")


@runtime_checkable
class SinkLike(Protocol):
    """What the bus needs of a sink: ``write(batch)``, sync or async."""

    def write(self, batch: Sequence[Event], /) -> Awaitable[None] | None: ...


class Sink(abc.ABC):
    """Base class for sinks.

    Class attributes a subclass may set:

    - ``name``: the subscription name (default: the class name, lower-cased).
    - ``kinds``: the event kinds this sink wants (``None``: all).
    - ``maxsize`` / ``overflow``: the bus queue's size and what happens past it
      (``"block"``, ``"drop"``, ``"spill"``; default: the bus's, 100,000 and
      ``"block"``); ``bus.subscribe`` arguments override them.
    - ``linger``: the least seconds between two writes while events keep coming
      (default: the bus's, 20 ms); 0 writes each batch as soon as it can.
    - ``accepts``: ``None``, or a cheap ``accepts(event) -> bool`` the bus calls on
      the publishing thread; an event it refuses is never queued for the sink (so
      a sink that lags does not hold, nor spill to disk, what it would discard).

    ``bus`` is set by the bus that runs the sink before ``start()`` is called,
    so a sink can read ``bus.run_id`` and ``bus.address``.
    """

    name: ClassVar[str | None] = None
    kinds: ClassVar[frozenset[str] | None] = None
    maxsize: ClassVar[int | None] = None
    overflow: ClassVar[str | None] = None
    linger: ClassVar[float | None] = None
    accepts: Callable[[Event], bool] | None = None
    bus: EventBus | None = None

    def start(self) -> Any:
        """Called once, before the first ``write``; optional."""
        return None

    @abc.abstractmethod
    def write(self, batch: Sequence[Event], /) -> Any:
        """Handle a batch of events, oldest first (``def`` or ``async def``)."""

    def flush(self) -> Any:
        """Push out anything buffered; called after the bus drained the queue; optional."""
        return None

    def close(self) -> Any:
        """Called once after the last ``write``; optional."""
        return None
