"""What a worker does off the event loop, and the small helpers around it.

Kept apart from :mod:`sluice.worker` so that the server module reads as message
plumbing: running a task in a thread, sizing its result, shipping its exception,
knowing which worker a thread works for, and reusing connections to peers.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import os
import sys
import time
import traceback
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import cloudpickle

from sluice import taskspec
from sluice.comm import Comm, connect
from sluice.security import Security

if TYPE_CHECKING:
    from sluice.events import Key
    from sluice.worker import Worker

__all__ = (
    "ConnectionPool",
    "TaskOutcome",
    "dumps_exception",
    "error_reply",
    "format_traceback",
    "get_worker",
    "ok_reply",
    "run_task",
    "sizeof",
    "worker_context",
)

#: The worker whose task (or ``run`` function) this thread or task is running.
_current_worker: contextvars.ContextVar[Worker | None] = contextvars.ContextVar(
    "sluice_current_worker", default=None
)

#: Frames from these files are sluice's own plumbing; tracebacks start below them.
_OWN_FILES = frozenset(
    {
        os.path.abspath(__file__),
        os.path.abspath(taskspec.__file__),
    }
)


def get_worker() -> Worker:
    """The worker running the current task (or the function sent by ``Client.run``).

    Why a context variable: a task runs in a pool thread and a ``run`` coroutine
    in a task of its own, and both must find their worker without a global that
    two workers in one process (tests) would fight over.
    """
    worker = _current_worker.get()
    if worker is None:
        raise ValueError("get_worker() called outside a task")
    return worker


class worker_context:  # lower case: used like a function, `with worker_context(w):`
    """Sets :func:`get_worker` for the duration of a ``with`` block."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._token: contextvars.Token[Worker | None] | None = None

    def __enter__(self) -> None:
        self._token = _current_worker.set(self._worker)

    def __exit__(self, *exc_info: object) -> None:
        assert self._token is not None
        _current_worker.reset(self._token)


# -- running a task --------------------------------------------------------------------


class TaskOutcome:
    """What a task's thread hands back: a value or an exception, and how long it took."""

    __slots__ = ("duration", "error", "value")

    def __init__(self, value: Any, error: BaseException | None, duration: float) -> None:
        self.value = value
        self.error = error
        self.duration = duration


def run_task(
    worker: Worker,
    spec_bytes: bytes,
    deps: Mapping[Key, Any],
    loop: asyncio.AbstractEventLoop,
) -> TaskOutcome:
    """Unpickle and run one task; never raises (the outcome carries the exception).

    Unpickling happens here, in the pool thread, because a spec may be large and
    unpickling it imports modules: neither belongs on the event loop. An ``async
    def`` task function is awaited on the worker's loop.
    """
    start = time.perf_counter()
    with worker_context(worker):
        try:
            spec = taskspec.loads_spec(spec_bytes)
            value = taskspec.run(spec, deps)
            if inspect.iscoroutine(value):
                value = asyncio.run_coroutine_threadsafe(_in_context(worker, value), loop).result()
        except Exception as exc:
            return TaskOutcome(None, exc, time.perf_counter() - start)
    return TaskOutcome(value, None, time.perf_counter() - start)


async def _in_context(worker: Worker, coro: Any) -> Any:
    with worker_context(worker):
        return await coro


def sizeof(value: Any) -> int:
    """A cheap estimate of a value's size in bytes (the scheduler only compares them).

    Arrays and buffers say their size; a container counts its first few items and
    extrapolates, so a list of a million numbers costs as much as one of ten.
    """
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    if isinstance(value, bytes | bytearray | memoryview):
        return len(value)
    try:
        size = sys.getsizeof(value)
    except TypeError:
        return 64
    if isinstance(value, list | tuple | set | frozenset | dict):
        n = len(value)
        if n:
            items = value.values() if isinstance(value, dict) else value
            sample = []
            for i, item in enumerate(items):
                if i == 10:
                    break
                sample.append(item)
            size += int(sum(sys.getsizeof(x) for x in sample) * n / len(sample))
    return size


def format_traceback(exc: BaseException) -> str:
    """The task's traceback as text, starting at the task's own code."""
    tb = exc.__traceback__
    while tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename) in _OWN_FILES:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def dumps_exception(exc: BaseException) -> bytes:
    """The exception, pickled for the client; a stand-in if it does not pickle.

    The client re-raises it with its original type, so it must survive the trip;
    an exception holding (say) a lock cannot, and the client still gets its text.
    """
    try:
        return cloudpickle.dumps(exc, protocol=5)  # type: ignore[no-any-return]
    except Exception:
        return cloudpickle.dumps(RuntimeError(repr(exc)), protocol=5)  # type: ignore[no-any-return]


# -- connections to peers ---------------------------------------------------------------


class ConnectionPool:
    """Idle connections to peers, reused for later data requests.

    A peer serves one request of ours at a time (the state machine says so), so
    one idle connection per peer is what steady state needs; a few more are kept
    for bursts, the rest are closed.
    """

    def __init__(
        self, *, security: Security | None, timeout: float, max_idle_per_peer: int = 2
    ) -> None:
        self._security = security
        self._timeout = timeout
        self._max_idle = max_idle_per_peer
        self._idle: dict[str, list[Comm]] = {}
        self._closed = False

    async def acquire(self, address: str) -> Comm:
        idle = self._idle.get(address)
        while idle:
            comm = idle.pop()
            if not comm.closed:
                return comm
        return await connect(address, security=self._security, timeout=self._timeout)

    async def release(self, address: str, comm: Comm) -> None:
        """Give back a healthy connection (one whose last reply was read in full)."""
        idle = self._idle.setdefault(address, [])
        if self._closed or comm.closed or len(idle) >= self._max_idle:
            await comm.aclose()
        else:
            idle.append(comm)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, {}
        for comms in idle.values():
            for comm in comms:
                await comm.aclose()


def ok_reply(rid: Any, result: Any = None) -> dict[str, Any]:
    return {"op": "reply", "rid": rid, "ok": True, "result": result}


def error_reply(rid: Any, exc: BaseException) -> dict[str, Any]:
    return {
        "op": "reply",
        "rid": rid,
        "ok": False,
        "error": f"{type(exc).__name__}: {exc}",
        "exception": dumps_exception(exc),
    }
