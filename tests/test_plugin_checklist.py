"""Dask's plugin tests as a checklist for sluice.

Source: dask/distributed ``distributed/diagnostics/tests/`` (the stored versions of
the three files below). For each behaviour those tests check, the sluice test that
covers it; "new" means it is in this file.

test_scheduler_plugin.py
- test_simple: a plugin added to a running scheduler counts ``processing -> memory``
  over a chain of dependent tasks; it shows in ``scheduler.plugins`` and
  ``remove_plugin`` takes it out. -> new
  ``test_add_plugin_on_running_scheduler_counts_a_chain_until_removed``
  (also test_scheduler_server.py::test_scheduler_plugin_hooks_are_called_inline,
  against fake peers).
- test_add_remove_worker: sync ``add_worker`` / ``remove_worker`` get the scheduler
  and the worker's address, in order; none after the plugin is removed. -> new
  ``test_sync_add_and_remove_worker_hooks``.
- test_async_add_remove_worker: the same with ``async def`` hooks. -> new
  ``test_async_add_and_remove_worker_hooks``.
- test_lifecycle: a plugin given to the constructor has ``start(scheduler)`` awaited
  at startup and ``close()`` at shutdown. -> new
  ``test_constructor_plugin_starts_and_closes_with_the_scheduler``.
- test_register_scheduler_plugin: a client registers a scheduler plugin and its
  ``start`` runs. -> test_plugins.py::test_scheduler_plugin. (Dask passes a class to
  the private ``_register_scheduler_plugin``: not applicable, sluice registers
  instances through ``register_plugin``.)

test_worker_plugin.py
- test_create_with_client: a plugin registered while no worker exists is set up on a
  worker that joins later, and torn down when that worker closes. -> new
  ``test_plugin_registered_before_any_worker_is_set_up_on_join_and_torn_down_on_close``
  (joining alone: test_plugins.py::test_worker_plugin_current_and_later_workers).
- test_remove_with_client: with two named plugins, unregistering one tears down only
  it and the other stays; unregistering the second leaves none. -> new
  ``test_unregister_one_of_two_worker_plugins``. (Dask's ``scheduler.worker_plugins``
  list is an internal: not applicable; a later worker getting none is checked by
  test_plugins.py::test_replace_idempotent_unregister.)
- test_remove_with_client_raises: unregistering an unknown name raises, naming it.
  -> test_plugins.py::test_replace_idempotent_unregister (sluice raises ValueError
  where Dask raises KeyError, as the design says).
- test_create_with_client_and_plugin_from_class: not applicable: registering a
  plugin class plus constructor kwargs is a Dask legacy form; sluice registers
  instances (a non-plugin is a TypeError, test_plugins.py::
  test_deprecated_alias_and_type_check).
- test_create_on_construction: not applicable: ``Worker(plugins=[...])`` is not part
  of sluice's Worker (the design offers plugins by registration and preloads).
- test_normal_task_transitions_called: a worker plugin sees a task's worker
  transitions from arrival to memory and on to its release (sluice's worker states:
  a task arrives from ``released``, Dask's from ``new``, and ends with
  ``released -> forgotten``). -> new
  ``test_worker_plugin_sees_a_task_and_its_dependency_from_arrival_to_forgotten``.
- test_failing_task_transitions_called: ``executing -> error`` reaches the plugin.
  -> test_worker_server.py::test_worker_plugin_transition_sees_errors.
- test_superseding_task_transitions_called: not applicable: it checks the
  ``constrained`` state of tasks with worker resources; sluice has no resources.
- test_release_dep_called: a dependency's transitions, and its release, reach the
  plugin as well as the dependent's. -> new
  ``test_worker_plugin_sees_a_task_and_its_dependency_from_arrival_to_forgotten``.
- test_registering_with_name_arg: registering under a name already in use does not
  set the plugin up a second time, on old workers and on one that joined since. In
  sluice a repeat name replaces unless idempotent (test_plugins.py::
  test_replace_idempotent_unregister); the late-joiner case -> new
  ``test_idempotent_repeat_skips_a_worker_that_joined_later_too``. (Dask's
  ``{"status": "repeat"}`` replies are not applicable: sluice returns the name.)
- test_empty_plugin: a plugin that overrides no hook registers fine. -> new
  ``test_plugin_overriding_no_hook_registers_and_tasks_run`` (sluice requires a
  WorkerPlugin subclass; a bare object is a TypeError, covered in test_plugins.py).

test_nanny_plugin.py
- test_duck_typed_nanny_plugin_is_deprecated: ``register_worker_plugin(...,
  nanny=True)`` warns DeprecationWarning and adds the plugin to the nanny. -> new
  ``test_deprecated_alias_with_nanny_true_reaches_the_nanny`` (with a NannyPlugin
  subclass: duck-typed plugins are not in sluice's design, they are a TypeError).
  ``restart=True`` nanny plugins: test_plugins.py::test_nanny_plugin_restarts_workers.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from sluice import (
    Client,
    Nanny,
    NannyPlugin,
    Scheduler,
    SchedulerPlugin,
    Worker,
    WorkerPlugin,
)

WAIT = 30  # seconds: a generous bound for every wait below


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


pytestmark = pytest.mark.anyio


def inc(x: int) -> int:
    return x + 1


# ----------------------------------------------------------------- scheduler plugins


class Counter(SchedulerPlugin):
    def __init__(self) -> None:
        self.count = 0

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if (start, finish) == ("processing", "memory"):
            self.count += 1


class Finished(SchedulerPlugin):
    """Sets an event once the task ``key`` is in memory."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.done = anyio.Event()

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if key == self.key and finish == "memory":
            self.done.set()


async def test_add_plugin_on_running_scheduler_counts_a_chain_until_removed() -> None:
    with anyio.fail_after(WAIT):
        async with (
            Scheduler(port=0) as s,
            Worker(s.address),
            Client(s.address, asynchronous=True) as c,
        ):
            counter = Counter()
            s.add_plugin(counter, name="counter")
            assert s.plugins["counter"] is counter
            assert counter.count == 0
            x = c.submit(inc, 1, key="x")
            y = c.submit(inc, x, key="y")
            z = c.submit(inc, y, key="z")
            assert await z == 4
            assert counter.count == 3
            s.remove_plugin("counter")
            assert "counter" not in s.plugins
            # A plugin still registered shows when the next task is done; the
            # removed one saw nothing of it.
            marker = Finished("after")
            s.add_plugin(marker, name="marker")
            assert await c.submit(inc, 10, key="after") == 11
            await marker.done.wait()
            assert counter.count == 3


class WorkerEvents(SchedulerPlugin):
    """Dask's argument order (``worker, scheduler``): the hooks are called by keyword."""

    def __init__(self, expected_scheduler: Any) -> None:
        self.expected = expected_scheduler
        self.events: list[tuple[str, str]] = []
        self.changed = anyio.Event()

    def _note(self, what: str, worker: str, scheduler: Any) -> None:
        assert scheduler is self.expected
        self.events.append((what, worker))
        self.changed.set()
        self.changed = anyio.Event()

    def add_worker(self, worker: str, scheduler: Any) -> None:  # type: ignore[override]
        self._note("add_worker", worker, scheduler)

    def remove_worker(self, worker: str, scheduler: Any, **kwargs: Any) -> None:  # type: ignore[override]
        self._note("remove_worker", worker, scheduler)

    async def wait_for(self, n: int) -> None:
        while len(self.events) < n:
            await self.changed.wait()


class AsyncWorkerEvents(WorkerEvents):
    async def add_worker(self, worker: str, scheduler: Any) -> None:  # type: ignore[override]
        await anyio.lowlevel.checkpoint()
        self._note("add_worker", worker, scheduler)

    async def remove_worker(self, worker: str, scheduler: Any, **kwargs: Any) -> None:  # type: ignore[override]
        await anyio.lowlevel.checkpoint()
        self._note("remove_worker", worker, scheduler)


async def test_sync_add_and_remove_worker_hooks() -> None:
    with anyio.fail_after(WAIT):
        async with Scheduler(port=0) as s:
            plugin = WorkerEvents(s)
            s.add_plugin(plugin, name="events")
            assert plugin.events == []
            a = Worker(s.address)
            b = Worker(s.address)
            await a.start()
            await plugin.wait_for(1)
            await b.start()
            await plugin.wait_for(2)
            await a.close()
            await plugin.wait_for(3)
            await b.close()
            await plugin.wait_for(4)
            assert plugin.events == [
                ("add_worker", a.address),
                ("add_worker", b.address),
                ("remove_worker", a.address),
                ("remove_worker", b.address),
            ]

            s.remove_plugin("events")
            witness = WorkerEvents(s)
            s.add_plugin(witness, name="witness")
            async with Worker(s.address) as w:
                await witness.wait_for(1)
            await witness.wait_for(2)
            assert witness.events == [("add_worker", w.address), ("remove_worker", w.address)]
            assert len(plugin.events) == 4


async def test_async_add_and_remove_worker_hooks() -> None:
    with anyio.fail_after(WAIT):
        async with Scheduler(port=0) as s:
            plugin = AsyncWorkerEvents(s)
            s.add_plugin(plugin, name="events")
            async with Worker(s.address) as a, Worker(s.address) as b:
                await plugin.wait_for(2)
            await plugin.wait_for(4)
            assert set(plugin.events) == {
                ("add_worker", a.address),
                ("add_worker", b.address),
                ("remove_worker", a.address),
                ("remove_worker", b.address),
            }

            s.remove_plugin("events")
            witness = AsyncWorkerEvents(s)
            s.add_plugin(witness, name="witness")
            async with Worker(s.address):
                await witness.wait_for(1)
            await witness.wait_for(2)
            assert len(plugin.events) == 4


class LifeCycle(SchedulerPlugin):
    def __init__(self) -> None:
        self.history: list[str] = []
        self.scheduler: Any = None

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.history.append("started")

    async def close(self) -> None:
        self.history.append("closed")


async def test_constructor_plugin_starts_and_closes_with_the_scheduler() -> None:
    plugin = LifeCycle()
    with anyio.fail_after(WAIT):
        async with Scheduler(port=0, plugins=[plugin]) as s:
            assert plugin.history == ["started"]
            assert plugin in s.plugins.values()
    assert plugin.history == ["started", "closed"]
    assert plugin.scheduler is s


# -------------------------------------------------------------------- worker plugins


class Marker(WorkerPlugin):
    """Leaves its status and data on the worker it runs in (a copy, unpickled there)."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def setup(self, worker: Any) -> None:
        assert isinstance(worker, Worker)
        statuses = worker.__dict__.setdefault("_marker_status", {})
        statuses[self.data] = "setup"

    def teardown(self, worker: Any) -> None:
        worker._marker_status[self.data] = "teardown"


def plugin_names(dask_worker: Any) -> list[str]:
    return sorted(dask_worker.plugins)


async def test_plugin_registered_before_any_worker_is_set_up_on_join_and_torn_down_on_close() -> (
    None
):
    with anyio.fail_after(WAIT):
        async with Scheduler(port=0) as s, Client(s.address, asynchronous=True) as c:
            assert await c.register_plugin(Marker(123), name="mark") == "mark"
            async with Worker(s.address) as w:
                # The run request follows plugin-add, so setup has happened by then.
                assert await c.run(plugin_names) == {w.address: ["mark"]}
                assert w._marker_status == {123: "setup"}
                assert w.plugins["mark"].data == 123
            assert w._marker_status == {123: "teardown"}


async def test_unregister_one_of_two_worker_plugins() -> None:
    with anyio.fail_after(WAIT):
        async with (
            Scheduler(port=0) as s,
            Worker(s.address) as w,
            Client(s.address, asynchronous=True) as c,
        ):
            await c.register_plugin(Marker("foo"), name="foo")
            await c.register_plugin(Marker("bar"), name="bar")
            assert w._marker_status == {"foo": "setup", "bar": "setup"}
            await c.unregister_worker_plugin("foo")
            assert w._marker_status == {"foo": "teardown", "bar": "setup"}
            assert sorted(w.plugins) == ["bar"]
            await c.unregister_worker_plugin("bar")
            assert w._marker_status == {"foo": "teardown", "bar": "teardown"}
            assert w.plugins == {}


class SetUpOnce(WorkerPlugin):
    """Refuses a second setup on the same worker."""

    idempotent = True

    def setup(self, worker: Any) -> None:
        if getattr(worker, "_set_up_once", False):
            raise RuntimeError(f"{worker.address} was already set up")
        worker._set_up_once = True


async def test_idempotent_repeat_skips_a_worker_that_joined_later_too() -> None:
    with anyio.fail_after(WAIT):
        async with (
            Scheduler(port=0) as s,
            Worker(s.address) as first,
            Client(s.address, asynchronous=True) as c,
        ):
            assert await c.register_plugin(SetUpOnce(), name="once") == "once"
            async with Worker(s.address) as second:
                assert await c.run(plugin_names) == {
                    first.address: ["once"],
                    second.address: ["once"],
                }
                # Would raise on either worker if setup ran again.
                assert await c.register_plugin(SetUpOnce(), name="once") == "once"
                assert first._set_up_once and second._set_up_once


class Empty(WorkerPlugin):
    pass


async def test_plugin_overriding_no_hook_registers_and_tasks_run() -> None:
    with anyio.fail_after(WAIT):
        async with (
            Scheduler(port=0) as s,
            Worker(s.address) as w,
            Client(s.address, asynchronous=True) as c,
        ):
            assert await c.register_plugin(Empty(), name="empty") == "empty"
            assert isinstance(w.plugins["empty"], Empty)
            assert await c.submit(inc, 1) == 2  # the base transition hook is harmless
            await c.unregister_worker_plugin("empty")
            assert w.plugins == {}


class TransitionLog(WorkerPlugin):
    """Records each key's worker transitions; ``gone`` is set once every watched key
    has reached ``forgotten``."""

    def __init__(self, watched: set[str]) -> None:
        self.watched = watched

    def setup(self, worker: Any) -> None:
        self.log: list[tuple[Any, str, str]] = []
        self.forgotten: set[Any] = set()
        self.gone = anyio.Event()

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        self.log.append((key, start, finish))
        if finish == "forgotten":
            self.forgotten.add(key)
            if self.watched <= self.forgotten:
                self.gone.set()


async def test_worker_plugin_sees_a_task_and_its_dependency_from_arrival_to_forgotten() -> None:
    with anyio.fail_after(WAIT):
        async with (
            Scheduler(port=0) as s,
            Worker(s.address) as w,
            Client(s.address, asynchronous=True) as c,
        ):
            await c.register_plugin(TransitionLog({"dep", "task"}), name="log")
            dep = c.submit(inc, 1, key="dep")
            task = c.submit(inc, dep, key="task")
            assert await task == 3
            del dep, task  # releasing the futures frees both keys on the worker
            plugin = w.plugins["log"]
            await plugin.gone.wait()
            expected = [
                ("released", "waiting"),
                ("waiting", "ready"),
                ("ready", "executing"),
                ("executing", "memory"),
                ("memory", "released"),
                ("released", "forgotten"),
            ]
            for key in ("dep", "task"):
                steps = [(a, b) for k, a, b in plugin.log if k == key]
                assert steps == expected, key
            # The dependency finished before its dependent started executing.
            order = [(k, b) for k, _, b in plugin.log]
            assert order.index(("dep", "memory")) < order.index(("task", "executing"))
            assert not w.data


# --------------------------------------------------------------------- nanny plugins


class NannyMarker(NannyPlugin):
    def setup(self, nanny: Any) -> None:
        nanny._nanny_marker = "setup"

    def teardown(self, nanny: Any) -> None:
        nanny._nanny_marker = "teardown"


async def test_deprecated_alias_with_nanny_true_reaches_the_nanny() -> None:
    with anyio.fail_after(60):
        async with (
            Scheduler(port=0) as s,
            Nanny(s.address) as n,
            Client(s.address, asynchronous=True) as c,
        ):
            existing = len(n.plugins)
            with pytest.warns(DeprecationWarning, match="register_plugin"):
                pending = c.register_worker_plugin(NannyMarker(), name="nm", nanny=True)
            assert await pending == "nm"
            assert len(n.plugins) == existing + 1
            assert isinstance(n.plugins["nm"], NannyMarker)
            assert n._nanny_marker == "setup"
            await c.unregister_worker_plugin("nm", nanny=True)
            assert "nm" not in n.plugins
            assert n._nanny_marker == "teardown"
