"""One background event loop per process, for the synchronous Client and LocalCluster.

Synchronous code (a script, a notebook) has no event loop, but a client must keep a
connection open and react to pushes while the user's thread does something else. So
the sync objects run their async implementation on a loop in a daemon thread, reached
through an anyio :class:`~anyio.from_thread.BlockingPortal`; all sync objects of the
process share it, as Dask's do, so that a sync Client of a sync LocalCluster talks to it
without crossing loops.

The thread is a daemon so that a forgotten client never keeps the interpreter alive;
objects that own resources outside the process (child processes of a nanny) register
a closer with :func:`at_exit`, which runs them on the loop before it goes away.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from functools import partial
from types import TracebackType
from typing import Any, ClassVar, Self

import anyio
from anyio.from_thread import BlockingPortal

__all__ = ("SyncOrAsync", "at_exit", "get_portal", "in_loop_thread", "loop_thread_id")

logger = logging.getLogger("sluice.loop")

_lock = threading.Lock()
_portal: BlockingPortal | None = None
_thread: threading.Thread | None = None
_pid: int | None = None
_closers: dict[int, Callable[[], Awaitable[Any]]] = {}
_EXIT_TIMEOUT = 10.0


def _run(ready: threading.Event, box: list[BlockingPortal]) -> None:
    async def main() -> None:
        async with BlockingPortal() as portal:
            box.append(portal)
            ready.set()
            await portal.sleep_until_stopped()

    try:
        anyio.run(main, backend="asyncio")
    except BaseException:  # pragma: no cover - the loop thread dying is a bug
        logger.exception("the sluice background event loop crashed")
        ready.set()


def get_portal() -> BlockingPortal:
    """The process's background loop, started on first use (again after a fork)."""
    global _portal, _thread, _pid
    with _lock:
        alive = _thread is not None and _thread.is_alive()
        if _portal is not None and _pid == os.getpid() and alive:
            return _portal
        ready = threading.Event()
        box: list[BlockingPortal] = []
        thread = threading.Thread(target=_run, args=(ready, box), name="sluice-loop", daemon=True)
        thread.start()
        ready.wait()
        if not box:  # pragma: no cover
            raise RuntimeError("could not start the sluice background event loop")
        _portal, _thread, _pid = box[0], thread, os.getpid()
        _closers.clear()
        return _portal


def loop_thread_id() -> int | None:
    """Ident of the background loop's thread, or None if it is not running."""
    thread = _thread
    return thread.ident if thread is not None and _pid == os.getpid() else None


def in_loop_thread() -> bool:
    return threading.get_ident() == loop_thread_id()


def at_exit(owner: object, closer: Callable[[], Awaitable[Any]] | None) -> None:
    """Run ``closer()`` on the loop at interpreter exit (None unregisters ``owner``)."""
    with _lock:
        if closer is None:
            _closers.pop(id(owner), None)
        else:
            _closers[id(owner)] = closer


@atexit.register
def _close_all() -> None:
    with _lock:
        closers = list(_closers.values())
        _closers.clear()
        portal = _portal if _pid == os.getpid() else None
    if portal is None or not closers:
        return

    async def close_them() -> None:
        with anyio.move_on_after(_EXIT_TIMEOUT):
            for closer in reversed(closers):
                try:
                    await closer()
                except Exception:
                    logger.debug("error closing at exit", exc_info=True)

    try:
        portal.call(close_them)
    except Exception:  # the loop may already be gone
        logger.debug("could not close sluice objects at exit", exc_info=True)


class SyncOrAsync:
    """The two faces of the Client and LocalCluster: blocking calls, or coroutines.

    A subclass sets ``asynchronous``, ``status`` and ``_portal`` (the shared
    portal when sync) and implements ``_start`` and ``_close``. Then ``with``,
    ``async with``, ``await obj`` and ``close()`` work the same way for both.
    """

    _noun: ClassVar[str] = "object"
    asynchronous: bool
    status: str
    _portal: BlockingPortal | None

    _start: Callable[[], Awaitable[None]]
    _close: Callable[[], Awaitable[None]]

    def _sync(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run the async ``fn`` now (sync mode) or hand back its coroutine (async)."""
        if self.asynchronous:
            return fn(*args, **kwargs)
        assert self._portal is not None
        return self._portal.call(partial(fn, *args, **kwargs))

    async def _started(self) -> Self:
        await self._start()
        return self

    def close(self) -> Any:
        """Close it (a coroutine in async mode); closing twice does nothing."""
        if not self.asynchronous and self.status == "closed":
            return None
        return self._sync(self._close)

    def __await__(self) -> Any:
        return self._started().__await__()

    def __enter__(self) -> Self:
        if self.asynchronous:
            raise RuntimeError(f"use `async with` for an asynchronous {self._noun}")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return await self._started()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close()
