"""``Client.events()``: the scheduler's bus, streamed live to the client."""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any, Self

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from sluice.comm import CommClosedError
from sluice.events import Event

if TYPE_CHECKING:
    from sluice.client import Client

__all__ = ("EventStream",)


class EventStream:
    """The scheduler's events, live: ``for ev in stream`` (sync client) or
    ``async for ev in stream`` (async client). ``close()`` unsubscribes."""

    def __init__(self, client: Client, kinds: tuple[str, ...] | None, since: int | None) -> None:
        self.client = client
        self.kinds = kinds
        self.since = since
        self.closed = False
        self._send: MemoryObjectSendStream[list[Event] | None] | None = None
        self._recv: MemoryObjectReceiveStream[list[Event] | None] | None = None
        self._buffer: deque[Event] = deque()

    def _subscribe(self) -> None:  # on the loop
        self._send, self._recv = anyio.create_memory_object_stream[list[Event] | None](
            max_buffer_size=float("inf")
        )
        self.client._streams.append(self)
        self.client._send({"op": "subscribe-events", "since": self.since, "kinds": self.kinds})

    def _deliver(self, events: list[Event] | None) -> None:  # on the loop
        if self._send is None or self.closed:
            return
        if events is not None and self.kinds is not None:
            events = [e for e in events if e.kind in self.kinds]
            if not events:
                return
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._send.send_nowait(events)
        if events is None:
            self._shutdown()

    def _shutdown(self) -> None:
        self.closed = True
        if self in self.client._streams:
            self.client._streams.remove(self)
        if self._send is not None:
            self._send.close()

    async def _next(self) -> Event:
        while not self._buffer:
            if self._recv is None:
                raise StopAsyncIteration
            try:
                batch = await self._recv.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                raise StopAsyncIteration from None
            if batch is None:
                raise StopAsyncIteration
            self._buffer.extend(batch)
        return self._buffer.popleft()

    async def _close(self) -> None:
        if not self.closed:
            self._shutdown()
            if self.client.status == "running":
                with contextlib.suppress(CommClosedError):
                    self.client._send({"op": "unsubscribe-events"})
        if self._recv is not None:
            self._recv.close()

    def close(self) -> Any:
        return self.client._sync(self._close)

    async def aclose(self) -> None:
        await self._close()

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        if self._buffer:
            return self._buffer.popleft()
        try:
            return self.client._sync(self._next)  # type: ignore[no-any-return]
        except StopAsyncIteration:
            raise StopIteration from None

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        return await self._next()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._close()
