"""Client.register_plugin and friends: plugins routed to where their type says.

Kept apart from :mod:`sluice.client` so that module stays about connections,
graphs and futures. The mixin needs the client's ``_sync`` and ``_request``.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

import cloudpickle

from sluice.plugin import NannyPlugin, SchedulerPlugin, WorkerPlugin

__all__ = ("ClientPlugins",)


class ClientPlugins:
    """The plugin half of :class:`sluice.Client`."""

    _sync: Callable[..., Any]
    _request: Callable[..., Awaitable[Any]]

    def register_plugin(
        self, plugin: Any, name: str | None = None, idempotent: bool | None = None
    ) -> Any:
        """Register a plugin where its type says; returns its name.

        A :class:`~sluice.plugin.SchedulerPlugin` goes to the scheduler, a
        :class:`~sluice.plugin.WorkerPlugin` to every current and future worker, a
        :class:`~sluice.plugin.NannyPlugin` to every nanny. The name is ``name``,
        else the plugin's ``name`` attribute, else a unique one. A name already in
        use is replaced (teardown of the old, setup of the new) unless
        ``idempotent`` (the argument, else the plugin's attribute) is true. An
        exception raised by the plugin's ``start``/``setup`` is raised here.
        """
        return self._sync(self._register_plugin, plugin, name, idempotent)

    async def _register_plugin(
        self,
        plugin: Any,
        name: str | None,
        idempotent: bool | None,
        nanny: bool | None = None,
    ) -> str:
        """Send ``plugin`` where its type says or, with ``nanny`` given (the deprecated
        alias), to the nannies (True) or the workers (False) whatever its type."""
        if not name:
            own = getattr(plugin, "name", None)
            name = own if isinstance(own, str) and own else None
        if name is None:
            name = f"{type(plugin).__name__}-{uuid.uuid4().hex[:8]}"
        if idempotent is None:
            idempotent = bool(getattr(plugin, "idempotent", False))
        if nanny is not None:
            op, extra = "register-worker-plugin", {"nanny": nanny}
        elif isinstance(plugin, SchedulerPlugin):
            op, extra = "register-scheduler-plugin", {}
        elif isinstance(plugin, (WorkerPlugin, NannyPlugin)):
            op, extra = "register-worker-plugin", {"nanny": isinstance(plugin, NannyPlugin)}
        else:
            raise TypeError(f"{plugin!r} is not a SchedulerPlugin, WorkerPlugin or NannyPlugin")
        data = cloudpickle.dumps(plugin, protocol=5)
        await self._request(op, plugin=data, name=name, idempotent=idempotent, **extra)
        return name

    def register_worker_plugin(
        self, plugin: Any, name: str | None = None, nanny: bool | None = None
    ) -> Any:
        """Deprecated: use :meth:`register_plugin`.

        As in Dask, ``nanny=True`` sends the plugin to every nanny and ``nanny=False``
        to every worker, whatever its class (a plain object with ``setup`` and
        ``teardown`` will do); ``nanny=None`` goes by its class, a
        :class:`~sluice.plugin.NannyPlugin` to the nannies, anything else to the workers.
        """
        warnings.warn(
            "register_worker_plugin is deprecated; use register_plugin",
            DeprecationWarning,
            stacklevel=2,
        )
        if isinstance(plugin, SchedulerPlugin):
            raise TypeError(f"{plugin!r} is a SchedulerPlugin: register it with register_plugin")
        if nanny is None:
            nanny = isinstance(plugin, NannyPlugin)
        return self._sync(self._register_plugin, plugin, name, None, bool(nanny))

    def unregister_worker_plugin(self, name: str, nanny: bool = False) -> Any:
        """Tear down and forget the worker (or, with ``nanny=True``, nanny) plugin ``name``."""
        return self._sync(self._request, "unregister-worker-plugin", name=name, nanny=nanny)

    def unregister_scheduler_plugin(self, name: str) -> Any:
        """Close and forget the scheduler plugin ``name``."""
        return self._sync(self._request, "unregister-scheduler-plugin", name=name)
