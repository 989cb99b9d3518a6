"""Futures: what the client holds for a task, and ways to wait on many of them.

Every :class:`Future` for the same key (of one client) shares one :class:`FutureState`.
States are only changed on the client's event loop; sync callers reach it through the
background portal, so nothing here needs a lock except the reference count, which a
``Future`` changes from whatever thread creates or collects it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import anyio

from sluice.events import Key

if TYPE_CHECKING:
    from sluice.client import Client

__all__ = (
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "Future",
    "FutureCancelledError",
    "FutureState",
    "as_completed",
    "wait",
)

logger = logging.getLogger("sluice.client")

FIRST_COMPLETED = "FIRST_COMPLETED"
FIRST_EXCEPTION = "FIRST_EXCEPTION"
ALL_COMPLETED = "ALL_COMPLETED"

Status = Literal["pending", "finished", "error", "cancelled", "lost"]


class FutureCancelledError(concurrent.futures.CancelledError):
    """The future's key was cancelled, forgotten by the scheduler, or its client closed.

    A :class:`concurrent.futures.CancelledError` (an ``Exception``), not asyncio's
    (a ``BaseException``), so that it is never mistaken for the cancellation of the
    task that awaits the future.
    """

    def __init__(self, key: Key, reason: str = "cancelled") -> None:
        super().__init__(f"{key!r}: {reason}")
        self.key = key
        self.reason = reason


class FutureState:
    """Status of one key as this client knows it (loop thread only).

    ``generation`` counts updates from the scheduler, so that a gather that found the
    data gone can wait for the *next* update rather than one it already saw.
    """

    __slots__ = (
        "_callbacks",
        "_changed",
        "data",
        "exception",
        "generation",
        "key",
        "reason",
        "status",
        "traceback",
        "who_has",
    )

    def __init__(self, key: Key) -> None:
        self.key = key
        self.status: Status = "pending"
        self.who_has: tuple[str, ...] = ()
        # The pickled result when the scheduler sent it along (a small one): no fetch.
        self.data: bytes | None = None
        self.exception: BaseException | None = None
        self.traceback: str | None = None
        self.reason = ""
        self.generation = 0
        self._changed: anyio.Event | None = None
        self._callbacks: list[Callable[[], None]] = []

    def __repr__(self) -> str:
        return f"<FutureState {self.key!r} {self.status}>"

    def done(self) -> bool:
        return self.status != "pending"

    def _update(self, status: Status) -> None:
        was_done = self.done()
        self.status = status
        self.generation += 1
        if self._changed is not None:
            self._changed.set()
            self._changed = None
        if not was_done and self.done():
            callbacks, self._callbacks = self._callbacks, []
            for cb in callbacks:
                cb()

    def finish(self, who_has: tuple[str, ...], data: bytes | None = None) -> None:
        self.who_has = tuple(who_has)
        self.data = data
        self.exception = self.traceback = None
        self._update("finished")

    def set_error(self, exception: BaseException, traceback: str | None) -> None:
        self.exception = exception
        self.traceback = traceback
        self.who_has = ()
        self.data = None
        self._update("error")

    def cancel(self, reason: str = "cancelled", status: Status = "cancelled") -> None:
        self.reason = reason
        self.who_has = ()
        self.data = None
        self._update(status)

    def reset(self) -> None:
        """Back to pending: the key was submitted again after a cancel or a restart."""
        self.exception = self.traceback = None
        self.who_has = ()
        self.data = None
        self._update("pending")

    async def wait_changed(self, generation: int) -> None:
        """Until ``self.generation`` passes ``generation``."""
        while self.generation <= generation:
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()

    async def wait(self) -> None:
        while not self.done():
            await self.wait_changed(self.generation)

    def add_callback(self, cb: Callable[[], None]) -> None:
        if self.done():
            cb()
        else:
            self._callbacks.append(cb)

    def raise_if_failed(self) -> None:
        if self.status == "error":
            assert self.exception is not None
            raise self.exception.with_traceback(None)
        if self.status in ("cancelled", "lost"):
            raise FutureCancelledError(self.key, self.reason or self.status)


class Future:
    """A task's result, computed (or being computed) on the cluster.

    Holding a Future keeps the result on the cluster; when the last Future for a key is
    garbage collected the client tells the scheduler it no longer wants it. In an
    asynchronous client ``await future`` gives the result, and ``result()``,
    ``exception()`` and ``cancel()`` are coroutines.
    """

    __slots__ = ("__weakref__", "_client", "_released", "_state", "key")

    def __init__(self, key: Key, client: Client | None = None) -> None:
        if client is None:
            from sluice.client import default_client

            client = default_client()
        self.key = key
        self._client = client
        self._state = client._acquire(key)
        self._released = False

    @classmethod
    def _held(cls, key: Key, client: Client, state: FutureState) -> Future:
        """A Future whose reference the client already counted (batch creation)."""
        self = cls.__new__(cls)
        self.key = key
        self._client = client
        self._state = state
        self._released = False
        return self

    @property
    def client(self) -> Client:
        return self._client

    @property
    def status(self) -> str:
        return self._state.status

    def done(self) -> bool:
        return self._state.done()

    def cancelled(self) -> bool:
        return self._state.status == "cancelled"

    def __repr__(self) -> str:
        return f"<Future: {self.status}, key: {self.key!r}>"

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Future) and other.key == self.key and other._client is self._client

    # ----------------------------------------------------------------- results

    async def _result(self) -> Any:
        await self._state.wait()
        self._state.raise_if_failed()
        results = await self._client._gather_keys([self.key])
        return results[self.key]

    async def _exception(self) -> BaseException | None:
        await self._state.wait()
        if self._state.status == "error":
            return self._state.exception
        if self._state.status in ("cancelled", "lost"):
            raise FutureCancelledError(self.key, self._state.reason or self._state.status)
        return None

    @staticmethod
    async def _with_timeout(
        fn: Callable[[], Coroutine[Any, Any, Any]], timeout: float | None
    ) -> Any:
        if timeout is None:
            return await fn()
        with anyio.fail_after(timeout):
            return await fn()

    def result(self, timeout: float | None = None) -> Any:
        """The task's result; raises the task's own exception (its type, the worker's
        traceback in its notes), ``FutureCancelledError``, or ``TimeoutError``."""
        return self._client._sync(self._with_timeout, self._result, timeout)

    def exception(self, timeout: float | None = None) -> Any:
        """The exception the task raised, or None if it succeeded."""
        return self._client._sync(self._with_timeout, self._exception, timeout)

    def traceback(self) -> str | None:
        """The worker's traceback text of a failed task."""
        return self._state.traceback

    def __await__(self) -> Generator[Any, None, Any]:
        return self._result().__await__()

    def cancel(self) -> Any:
        """Stop wanting this key; every Future for it becomes cancelled."""
        return self._client._sync(self._client._cancel, [self.key])

    def add_done_callback(self, fn: Callable[[Future], Any]) -> None:
        """Call ``fn(future)`` in a thread once the future is done (at once if it is)."""

        def schedule() -> None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                _safe_call(fn, self)
            else:
                loop.run_in_executor(None, _safe_call, fn, self)

        self._client._call_soon(self._state.add_callback, schedule)

    # -------------------------------------------------------------- lifecycle

    def release(self) -> None:
        """Drop this Future's hold on the key (what garbage collection does)."""
        if not self._released:
            self._released = True
            self._client._release_later(self.key)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown, loop gone
            self.release()

    def __reduce__(self) -> Any:
        raise TypeError(
            "a sluice Future cannot be pickled; pass it as an argument of submit() "
            "and the task receives its result"
        )


def _safe_call(fn: Callable[[Future], Any], future: Future) -> None:
    try:
        fn(future)
    except Exception:
        logger.exception("done callback %r of %r failed", fn, future)


def _futures_of(futures: Iterable[Future] | Future) -> list[Future]:
    if isinstance(futures, Future):
        return [futures]
    return list(futures)


def _client_of(futures: list[Future]) -> Client | None:
    return futures[0]._client if futures else None


# ------------------------------------------------------------------------ wait


async def _wait(
    futures: list[Future], timeout: float | None, return_when: str
) -> tuple[set[Future], set[Future]]:
    if return_when not in (ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION):
        raise ValueError(f"unknown return_when {return_when!r}")

    def finished() -> bool:
        if return_when == ALL_COMPLETED:
            return all(f.done() for f in futures)
        if return_when == FIRST_COMPLETED:
            return any(f.done() for f in futures) or not futures
        return all(f.done() for f in futures) or any(f._state.status == "error" for f in futures)

    async def watch(state: FutureState, changed: anyio.Event) -> None:
        await state.wait_changed(state.generation)
        changed.set()

    async def until_done() -> None:
        while not finished():
            async with anyio.create_task_group() as tg:
                changed = anyio.Event()
                for state in {f._state for f in futures if not f.done()}:
                    tg.start_soon(watch, state, changed)
                await changed.wait()
                tg.cancel_scope.cancel()

    with anyio.move_on_after(timeout):
        await until_done()
    done = {f for f in futures if f.done()}
    return done, {f for f in futures if not f.done()}


def wait(
    futures: Iterable[Future] | Future,
    timeout: float | None = None,
    return_when: str = ALL_COMPLETED,
) -> Any:
    """Wait for futures; returns ``(done, not_done)`` sets (a coroutine in async mode).

    Unlike ``concurrent.futures.wait`` (and like it, not like Dask's), a timeout does
    not raise: whatever is not done is in ``not_done``.
    """
    futs = _futures_of(futures)
    client = _client_of(futs)
    if client is None:
        if _in_async_context():

            async def nothing() -> tuple[set[Future], set[Future]]:
                return set(), set()

            return nothing()
        return set(), set()
    return client._sync(_wait, futs, timeout, return_when)


def _in_async_context() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


# ---------------------------------------------------------------- as_completed


class as_completed:
    """Iterate over futures in the order they finish.

    A plain ``for`` loop with a sync client, ``async for`` with an async one. With
    ``with_results=True`` it yields ``(future, result)`` pairs (a failed task raises
    its exception from the iteration). ``add(future)`` adds to a running iteration.
    """

    def __init__(self, futures: Iterable[Future] | None = None, with_results: bool = False) -> None:
        self.with_results = with_results
        self._pending: list[Future] = []
        self._seen: set[int] = set()
        self._client: Client | None = None
        self._queue: list[Future] = []
        self._arrived: anyio.Event | None = None
        for f in futures or ():
            self.add(f)

    def add(self, future: Future) -> None:
        if self._client is None:
            self._client = future._client
        self._pending.append(future)
        self._client._call_soon(self._watch, future)

    def _watch(self, future: Future) -> None:  # on the loop
        def arrived() -> None:
            self._queue.append(future)
            if self._arrived is not None:
                self._arrived.set()

        future._state.add_callback(arrived)

    def count(self) -> int:
        return len(self._pending)

    def is_empty(self) -> bool:
        return not self._pending

    async def _next(self) -> Any:
        if not self._pending:
            raise StopAsyncIteration
        while not self._queue:
            self._arrived = anyio.Event()
            await self._arrived.wait()
        future = self._queue.pop(0)
        self._pending.remove(future)
        if self.with_results:
            return future, await future._result()
        return future

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self._client is None or not self._pending:
            raise StopIteration
        try:
            return self._client._sync(self._next)
        except StopAsyncIteration:
            raise StopIteration from None

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        if self._client is None:
            raise StopAsyncIteration
        return await self._next()
