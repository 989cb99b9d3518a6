"""The client's reference counts: a key is released when its last Future goes away.

Kept apart from :mod:`sluice.client`, which is about connections, graphs and
futures. Futures die on any thread (maybe inside the garbage collector), so a dying
Future only queues its key; the client's loop does the counting and tells the
scheduler, in order with the graphs it sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from sluice._client_futures import Future, FutureState
from sluice.comm import CommClosedError

if TYPE_CHECKING:
    from sluice.client import Client
    from sluice.events import Key

__all__ = ("ReferenceCounts",)


class ReferenceCounts:
    """The reference-counting half of :class:`sluice.Client`."""

    status: str
    _aio_loop: asyncio.AbstractEventLoop | None
    _ref_lock: threading.Lock
    _refcount: dict[Key, int]
    _states: dict[Key, FutureState]
    _releases: deque[Key]
    _release_scheduled: bool
    _send: Callable[[dict[str, Any]], None]

    def _acquire(self, key: Key) -> FutureState:
        with self._ref_lock:
            self._refcount[key] = self._refcount.get(key, 0) + 1
            state = self._states.get(key)
            if state is None:
                state = self._states[key] = FutureState(key)
            return state

    def _acquire_futures(self, keys: list[Key]) -> list[Future]:
        """One Future per key, counted under a single lock (map makes thousands)."""
        refcount, states, held = self._refcount, self._states, Future._held
        out = []
        with self._ref_lock:
            for key in keys:
                refcount[key] = refcount.get(key, 0) + 1
                state = states.get(key)
                if state is None:
                    state = states[key] = FutureState(key)
                out.append(held(key, cast("Client", self), state))  # the mixin is a Client
        return out

    def _release_later(self, key: Key) -> None:
        """Called by a Future going away, on any thread, maybe inside the GC: it only
        queues, and the loop does the counting (:meth:`_process_releases`)."""
        self._releases.append(key)
        if not self._release_scheduled and self._aio_loop is not None:
            self._release_scheduled = True
            # RuntimeError: the loop is closed, nothing left to tell.
            with contextlib.suppress(RuntimeError):
                self._aio_loop.call_soon_threadsafe(self._process_releases)

    def _process_releases(self) -> None:
        self._release_scheduled = False
        gone: list[Key] = []
        releases = self._releases
        with self._ref_lock:
            while releases:
                key = releases.popleft()
                count = self._refcount.get(key, 0) - 1
                if count > 0:
                    self._refcount[key] = count
                else:
                    self._refcount.pop(key, None)
                    self._states.pop(key, None)
                    gone.append(key)
        if gone and self.status == "running":
            with contextlib.suppress(CommClosedError):
                self._send({"op": "release-keys", "keys": tuple(gone)})

    def _hold_dependencies(
        self, tasks: dict[Key, bytes], dep_map: dict[Key, tuple[Key, ...]]
    ) -> tuple[Key, ...]:
        """Count one more reference to each future this graph depends on, until the graph
        is sent: in ``submit(f, client.map(...))`` the futures die with the call, and
        their release must not reach the scheduler before the graph that needs them."""
        held: list[Key] = []
        with self._ref_lock:
            for deps in dep_map.values():
                for dep in deps:
                    if dep not in tasks and dep in self._refcount:
                        self._refcount[dep] += 1
                        held.append(dep)
        return tuple(held)
