"""Fetching results from workers, and the helpers that walk nested futures.

Split from :mod:`sluice.client` to keep modules small; these are the client's
data-plane: ``get-data`` straight to the workers, over a small pool of connections
per worker, so results never pass through the scheduler.
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING, Any

import anyio
import cloudpickle

from sluice._client_futures import Future, FutureState
from sluice.comm import CommClosedError, connect
from sluice.events import Key

if TYPE_CHECKING:
    from sluice.client import Client

logger = logging.getLogger("sluice.client")


def load_exception(msg: dict[str, Any]) -> BaseException:
    """The task's exception as raised on the worker, its traceback text in a note."""
    exc: BaseException | None = None
    data = msg.get("exception")
    if isinstance(data, bytes):
        try:
            loaded = cloudpickle.loads(data)
        except Exception as err:  # the class may not exist here
            logger.debug("cannot unpickle a task's exception: %r", err)
        else:
            if isinstance(loaded, BaseException):
                exc = loaded
    if exc is None:
        exc = RuntimeError(msg.get("exception_text") or msg.get("error") or "task failed")
    tb = msg.get("traceback")
    if tb:
        exc.add_note(f"Traceback from the worker:\n{str(tb).rstrip()}")
    return exc


def walk_futures(obj: Any, found: dict[Key, Future]) -> None:
    if isinstance(obj, Future):
        found.setdefault(obj.key, obj)
    elif type(obj) in (list, tuple, set, frozenset):
        for x in obj:
            walk_futures(x, found)
    elif type(obj) is dict:
        for x in obj.values():
            walk_futures(x, found)


def rebuild(obj: Any, results: dict[Key, Any]) -> Any:
    if isinstance(obj, Future):
        return results[obj.key]
    kind = type(obj)
    if kind in (list, tuple, set, frozenset):
        return kind(rebuild(x, results) for x in obj)
    if kind is dict:
        return {k: rebuild(v, results) for k, v in obj.items()}
    return obj


def flatten_keys(keys: Any, out: list[Key]) -> None:
    if type(keys) is list:
        for k in keys:
            flatten_keys(k, out)
    else:
        out.append(keys)


def pack_keys(keys: Any, results: dict[Key, Any]) -> Any:
    if type(keys) is list:
        return [pack_keys(k, results) for k in keys]
    return results[keys]


def drop_failed(obj: Any, ok: set[Key]) -> Any:
    kind = type(obj)
    if kind in (list, tuple, set, frozenset):
        return kind(drop_failed(x, ok) for x in obj if not isinstance(x, Future) or x.key in ok)
    if kind is dict:
        return {
            k: drop_failed(v, ok)
            for k, v in obj.items()
            if not isinstance(v, Future) or v.key in ok
        }
    return obj


async def gather_states(client: Client, states: list[FutureState]) -> dict[Key, Any]:
    """Fetch results from the workers holding them.

    A worker that is gone or no longer has a key: ask the scheduler ``who-has``;
    if nobody has it, wait for the scheduler's next update of the key (it
    recomputes what a lost worker held).
    """
    results: dict[Key, Any] = {}
    todo = list({id(s): s for s in states}.values())
    bad: set[str] = set()
    failed: list[FutureState] = []

    async def fetch(worker: str, group: list[FutureState]) -> None:
        try:
            data = await get_data(client, worker, [s.key for s in group])
        except (OSError, TimeoutError) as exc:
            logger.info("%s: get-data from %s failed: %r", client.id, worker, exc)
            bad.add(worker)
            data = {}
        for s in group:
            if s.key in data:
                results[s.key] = cloudpickle.loads(data[s.key])
            else:
                failed.append(s)

    while todo:
        generations = {s.key: s.generation for s in todo}
        by_worker: dict[str, list[FutureState]] = {}
        homeless: list[FutureState] = []
        for state in todo:
            await state.wait()
            state.raise_if_failed()
            if state.data is not None:
                results[state.key] = cloudpickle.loads(state.data)
                continue
            holders = [w for w in state.who_has if w not in bad]
            if holders:
                by_worker.setdefault(random.choice(holders), []).append(state)
            else:
                homeless.append(state)
        failed = list(homeless)

        async with anyio.create_task_group() as tg:
            for worker, group in by_worker.items():
                tg.start_soon(fetch, worker, group)
        if not failed:
            break
        where = await client._request("who-has", keys=tuple(s.key for s in failed))
        todo = []
        for s in failed:
            found = tuple(w for w in (where or {}).get(s.key, ()) if w not in bad)
            if found:
                s.who_has = found
            else:
                await s.wait_changed(generations[s.key])
                bad.clear()
            todo.append(s)
    return results


async def get_data(client: Client, worker: str, keys: list[Key]) -> dict[Key, bytes]:
    pool = client._pool.setdefault(worker, [])
    comm = pool.pop() if pool else None
    if comm is None or comm.closed:
        # A worker that refuses is gone: retry briefly only, then ask who-has.
        timeout = min(client.timeout, client.data_connect_timeout)
        comm = await connect(worker, security=client.security, timeout=timeout)
    reusable = False
    try:
        rid = next(client._rids)
        await comm.send({"op": "get-data", "rid": rid, "keys": tuple(keys)})
        while True:
            for msg in await comm.recv():
                if msg.get("op") == "reply" and msg.get("rid") == rid:
                    reusable = True
                    if not msg.get("ok"):
                        raise CommClosedError(f"get-data failed: {msg.get('error')}")
                    return dict(msg.get("result") or {})
    finally:
        if reusable and not comm.closed and client.status == "running":
            pool.append(comm)
        else:
            await comm.aclose()
