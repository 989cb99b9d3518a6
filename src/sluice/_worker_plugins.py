"""The worker's side of plugins: setup, replace, teardown, and transition hooks.

Kept apart from :mod:`sluice.worker` so that module stays about running tasks
and moving data. ``plugin-add`` / ``plugin-remove`` come from the scheduler
(see docs/protocol.md); a plain ``setup`` runs before the next message is read,
so a worker that joins later has its plugins before its first task.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio.abc
import cloudpickle

from sluice._worker_exec import error_reply, ok_reply
from sluice.events import Event, TaskTransition

__all__ = ("WorkerPlugins", "teardown_plugin")

logger = logging.getLogger("sluice.worker")


async def teardown_plugin(plugins: dict[str, Any], name: str, owner: Any, kind: str) -> None:
    """Forget plugin ``name`` and call its ``teardown(owner)``; a failure is logged, then raised.

    Shared by workers and nannies, whose plugins are torn down the same way.
    """
    plugin = plugins.pop(name, None)
    if plugin is None:
        return
    try:
        result = plugin.teardown(owner)
        if inspect.isawaitable(result):
            await result
    except Exception:
        logger.exception("teardown of %s plugin %r failed", kind, name)
        raise


class WorkerPlugins:
    """The plugin half of :class:`sluice.Worker`."""

    plugins: dict[str, Any]
    address: str
    _tg: anyio.abc.TaskGroup | None

    _to_scheduler: Callable[[dict[str, Any]], None]

    def _run_plugin_transitions(self, event: Event) -> None:
        """Call every plugin's ``transition``; one failing plugin does not skip the others."""
        if type(event) is not TaskTransition or not self.plugins:
            return
        kwargs: dict[str, Any] = {"stimulus_id": event.stimulus_id}
        for field in ("worker", "nbytes", "duration", "exception", "traceback"):
            value = getattr(event, field)
            if value is not None:
                kwargs[field] = value
        failure: Exception | None = None
        for plugin in list(self.plugins.values()):
            try:
                plugin.transition(event.key, event.start, event.finish, **kwargs)
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    def _plugin_add(self, msg: dict[str, Any]) -> None:
        """``plugin-add``: a plain ``setup`` runs at once, before the next message."""
        rid = msg.get("rid")
        name = str(msg["name"])
        try:
            plugin = cloudpickle.loads(msg["plugin"])
        except Exception as exc:
            self._plugin_answer(rid, name, exc)
            return
        assert self._tg is not None
        if name in self.plugins:
            self._tg.start_soon(self._plugin_replace, rid, name, plugin)
            return
        pending = self._plugin_setup(rid, name, plugin)
        if pending is not None:
            self._tg.start_soon(self._plugin_setup_done, rid, name, pending)

    def _plugin_setup(self, rid: Any, name: str, plugin: Any) -> Awaitable[Any] | None:
        """Store ``plugin`` and call its setup; an awaitable result is for the caller."""
        self.plugins[name] = plugin
        try:
            result = plugin.setup(self)
        except Exception as exc:
            self.plugins.pop(name, None)
            self._plugin_answer(rid, name, exc)
            return None
        if inspect.isawaitable(result):
            return result
        self._plugin_answer(rid, name, None)
        return None

    async def _plugin_setup_done(self, rid: Any, name: str, pending: Awaitable[Any]) -> None:
        try:
            await pending
        except Exception as exc:
            self.plugins.pop(name, None)
            self._plugin_answer(rid, name, exc)
        else:
            self._plugin_answer(rid, name, None)

    async def _plugin_replace(self, rid: Any, name: str, plugin: Any) -> None:
        """Teardown of the old plugin of that name, then setup of the new one."""
        with contextlib.suppress(Exception):  # already logged
            await self._plugin_teardown(name)
        pending = self._plugin_setup(rid, name, plugin)
        if pending is not None:
            await self._plugin_setup_done(rid, name, pending)

    async def _plugin_teardown(self, name: str) -> None:
        await teardown_plugin(self.plugins, name, self, "worker")

    async def _plugin_remove(self, rid: Any, name: str) -> None:
        """``plugin-remove``: teardown, then forget it."""
        try:
            await self._plugin_teardown(name)
        except Exception as exc:
            self._plugin_answer(rid, name, exc)
        else:
            self._plugin_answer(rid, name, None)

    def _plugin_answer(self, rid: Any, name: str, exc: BaseException | None) -> None:
        """Reply to the scheduler; without a rid (a late joiner) a failure is only logged."""
        if rid is not None:
            reply = error_reply(rid, exc) if exc is not None else ok_reply(rid)
            self._to_scheduler(reply)
        elif exc is not None:
            logger.error("setup of worker plugin %r failed on %s", name, self.address, exc_info=exc)
