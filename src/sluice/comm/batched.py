"""BatchedSend: coalesce messages sent on a hot path into few frames."""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio

from sluice.comm.frames import CommClosedError
from sluice.comm.tcp import Comm

__all__ = ["BatchedSend"]

logger = logging.getLogger("sluice.comm")


class BatchedSend:
    """Coalesces messages sent on a hot path into few frames.

    :meth:`send` only appends to a buffer, so callers in tight synchronous loops (task
    transitions) neither block nor pay for a write each.  :meth:`run` writes everything
    pending as one frame, then waits ``interval`` seconds so that a burst arriving
    meanwhile goes out together in the next frame; except when the frame's first
    :meth:`send` came ``quiet`` seconds or more after the previous frame (sparse
    traffic, such as one result a client waits on, then the next): no burst to
    gather, so the next message is not held back.  Order is preserved.

    :meth:`send_later` is for messages nobody waits on (a worker's forwarded events):
    they share the buffer, and so the order, but do not start a frame of their own
    for up to ``later`` seconds.  Without it, the events a worker forwards when a task
    starts would take the frame, and the task's result, finishing a moment later,
    would wait out ``interval`` behind them: most of a one-task round trip.

    Closing the BatchedSend does not close the comm: the comm's owner does that.
    """

    def __init__(
        self,
        comm: Comm,
        *,
        interval: float = 0.002,
        later: float = 0.02,
        quiet: float = 0.001,
    ) -> None:
        self.comm = comm
        self.interval = interval
        self.later = later
        self.quiet = quiet
        self._last_flush = -float("inf")  # time.monotonic() after the last frame
        self._urgent_since = 0.0  # when the first send() since that frame came
        self._buffer: list[dict[str, Any]] = []
        self._urgent = False  # the buffer holds a message sent with send()
        self._wake: anyio.Event | None = None  # created in run(), inside the event loop
        self._hurry: anyio.Event | None = None  # set while run() holds back send_later()
        self._closing = False
        self._running = False
        self._stopped: anyio.Event | None = None
        self._close_requested: anyio.Event | None = None
        #: Frames and messages written so far (for tests and statistics).
        self.frames_sent = 0
        self.messages_sent = 0

    def __repr__(self) -> str:
        return f"<BatchedSend {self.comm.peer} pending={len(self._buffer)}>"

    def send(self, *msgs: dict[str, Any]) -> None:
        """Queue messages; never blocks.  Raises CommClosedError once closed."""
        if self._closing or self.comm.closed:
            raise CommClosedError(f"batched send to {self.comm.peer} is closed")
        self._buffer.extend(msgs)
        if not self._urgent:
            self._urgent_since = time.monotonic()
            self._urgent = True
        if self._wake is not None:
            self._wake.set()
        if self._hurry is not None:
            self._hurry.set()

    def send_later(self, *msgs: dict[str, Any]) -> None:
        """Queue messages that may wait up to ``later`` seconds for a frame; never blocks."""
        if self._closing or self.comm.closed:
            raise CommClosedError(f"batched send to {self.comm.peer} is closed")
        self._buffer.extend(msgs)
        if self._wake is not None:
            self._wake.set()

    async def run(self) -> None:
        """Flush in a loop until :meth:`aclose` (or the comm closes)."""
        if self._running:
            raise RuntimeError("BatchedSend.run() is already running")
        self._running = True
        self._stopped = anyio.Event()
        self._wake = anyio.Event()
        self._close_requested = anyio.Event()
        if self._closing:
            self._close_requested.set()
        try:
            while True:
                if not self._buffer:
                    if self._closing:
                        return
                    await self._wake.wait()
                    self._wake = anyio.Event()
                    continue
                if not self._urgent and not self._closing:
                    # Only send_later() messages: give an urgent one the chance to
                    # come along, but wait no longer than ``later``.
                    self._hurry = anyio.Event()
                    with anyio.move_on_after(self.later):
                        await self._hurry.wait()
                    self._hurry = None
                # The first urgent message of this frame came after a quiet spell.
                quiet = self._urgent and self._urgent_since - self._last_flush >= self.quiet
                await self._flush()
                self._last_flush = time.monotonic()
                if not quiet and not self._closing:
                    # A burst is under way: let the rest of it accumulate (aclose()
                    # cuts the wait short). A message after a quiet spell (a result
                    # a client waits on) went out at once and holds nothing back.
                    with anyio.move_on_after(self.interval):
                        await self._close_requested.wait()
        except CommClosedError:
            logger.debug("%r: comm closed, dropping %d messages", self, len(self._buffer))
            self._buffer.clear()
        finally:
            self._running = False
            self._stopped.set()

    async def _flush(self) -> None:
        batch, self._buffer = self._buffer, []
        self._urgent = False
        await self.comm.send(*batch)
        self.frames_sent += 1
        self.messages_sent += len(batch)

    async def aclose(self) -> None:
        """Flush what is pending and stop :meth:`run` (idempotent)."""
        self._closing = True
        if self._running:
            assert self._wake is not None and self._stopped is not None
            assert self._close_requested is not None
            self._close_requested.set()
            self._wake.set()
            if self._hurry is not None:
                self._hurry.set()
            await self._stopped.wait()
        elif self._buffer and not self.comm.closed:
            try:
                await self._flush()
            except CommClosedError:
                self._buffer.clear()
