"""Plugins registered through the Client: scheduler, worker (current and later
workers) and nanny plugins, end to end against an in-process LocalCluster."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from sluice import NannyPlugin, SchedulerPlugin, WorkerPlugin, get_worker
from sluice.client import Client
from sluice.deploy import LocalCluster


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class SetupFailed(Exception):
    pass


def _log(worker: Any) -> list[tuple[str, str]]:
    """A per-worker record of plugin calls (the plugins are copies, unpickled there)."""
    log: list[tuple[str, str]] | None = getattr(worker, "_plugin_test_log", None)
    if log is None:
        log = []
        worker._plugin_test_log = log
    return log


class Recorder(WorkerPlugin):
    def __init__(self, tag: str = "a") -> None:
        self.tag = tag
        self.transitions: list[tuple[Any, str, str]] = []

    def setup(self, worker: Any) -> None:
        _log(worker).append(("setup", self.tag))

    def teardown(self, worker: Any) -> None:
        _log(worker).append(("teardown", self.tag))

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        self.transitions.append((key, start, finish))


class AsyncRecorder(Recorder):
    async def setup(self, worker: Any) -> None:  # type: ignore[override]
        await anyio.lowlevel.checkpoint()
        _log(worker).append(("async-setup", self.tag))


class Failing(WorkerPlugin):
    name = "failing"

    def setup(self, worker: Any) -> None:
        raise SetupFailed(f"no setup on {worker.name}")


class Watcher(SchedulerPlugin):
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.finished: list[Any] = []

    async def start(self, scheduler: Any) -> None:
        self.calls.append("start")

    async def close(self) -> None:
        self.calls.append("close")

    def transition(
        self, key: Any, start: str, finish: str, *args: Any, stimulus_id: str, **kwargs: Any
    ) -> None:
        if finish == "memory":
            self.finished.append(key)


class BadStart(SchedulerPlugin):
    async def start(self, scheduler: Any) -> None:
        raise SetupFailed("cannot start")


def plugin_names(sluice_worker: Any) -> list[str]:
    return sorted(sluice_worker.plugins)


def tag_in_task(name: str) -> str:
    return str(get_worker().plugins[name].tag)


@pytest.fixture
async def cluster() -> AsyncIterator[tuple[LocalCluster, Client]]:
    with anyio.fail_after(30):
        async with (
            LocalCluster(n_workers=2, processes=False, asynchronous=True) as lc,
            Client(lc, asynchronous=True) as c,
        ):
            yield lc, c


@pytest.mark.anyio
async def test_worker_plugin_current_and_later_workers(
    cluster: tuple[LocalCluster, Client],
) -> None:
    lc, c = cluster
    with anyio.fail_after(20):
        name = await c.register_plugin(Recorder("x"), name="rec")
        assert name == "rec"
        for w in lc.workers:
            assert _log(w) == [("setup", "x")]
            assert isinstance(w.plugins["rec"], Recorder)
        assert await c.submit(tag_in_task, "rec", key="t1") == "x"
        assert any(
            (key, finish) == ("t1", "memory")
            for w in lc.workers
            for key, _, finish in w.plugins["rec"].transitions
        )
        await lc.scale(3)
        new = lc.workers[-1]
        # A run request is sent after plugin-add, so the setup has happened by then.
        ran = await c.run(plugin_names, workers=[new.address])
        assert ran == {new.address: ["rec"]}
        assert _log(new) == [("setup", "x")]


@pytest.mark.anyio
async def test_default_names(cluster: tuple[LocalCluster, Client]) -> None:
    _, c = cluster
    with anyio.fail_after(20):
        first = await c.register_plugin(Recorder())
        assert first.startswith("Recorder-") and len(first) == len("Recorder-") + 8
        named = Recorder()
        named.name = "by-attribute"
        assert await c.register_plugin(named) == "by-attribute"
        assert named.name == "by-attribute"
        anonymous = Recorder()
        await c.register_plugin(anonymous)
        assert anonymous.name is None


@pytest.mark.anyio
async def test_replace_idempotent_unregister(cluster: tuple[LocalCluster, Client]) -> None:
    lc, c = cluster
    with anyio.fail_after(20):
        await c.register_plugin(Recorder("old"), name="p")
        await c.register_plugin(AsyncRecorder("new"), name="p")
        for w in lc.workers:
            assert _log(w) == [("setup", "old"), ("teardown", "old"), ("async-setup", "new")]
            assert w.plugins["p"].tag == "new"
        await c.register_plugin(Recorder("ignored"), name="p", idempotent=True)
        idem = Recorder("ignored-too")
        idem.idempotent = True
        await c.register_plugin(idem, name="p")
        for w in lc.workers:
            assert len(_log(w)) == 3
            assert w.plugins["p"].tag == "new"
        await c.unregister_worker_plugin("p")
        for w in lc.workers:
            assert _log(w)[-1] == ("teardown", "new")
            assert "p" not in w.plugins
        with pytest.raises(ValueError, match="'p'"):
            await c.unregister_worker_plugin("p")
        with pytest.raises(ValueError, match="'nope'"):
            await c.unregister_scheduler_plugin("nope")
        # A later worker does not get an unregistered plugin.
        await lc.scale(3)
        new = lc.workers[-1]
        assert await c.run(plugin_names, workers=[new.address]) == {new.address: []}


@pytest.mark.anyio
async def test_setup_error(
    cluster: tuple[LocalCluster, Client], caplog: pytest.LogCaptureFixture
) -> None:
    lc, c = cluster
    with anyio.fail_after(20):
        with pytest.raises(SetupFailed, match="no setup on"):
            await c.register_plugin(Failing())
        for w in lc.workers:
            assert "failing" not in w.plugins
        with caplog.at_level(logging.ERROR, logger="sluice.worker"):
            await lc.scale(3)
            new = lc.workers[-1]
            assert await c.run(plugin_names, workers=[new.address]) == {new.address: []}
        assert any("'failing'" in r.getMessage() for r in caplog.records)
        assert await c.submit(len, "abc") == 3  # the cluster works on


@pytest.mark.anyio
async def test_scheduler_plugin(cluster: tuple[LocalCluster, Client]) -> None:
    lc, c = cluster
    with anyio.fail_after(20):
        assert await c.register_plugin(Watcher(), name="watch") == "watch"
        plugin = lc.scheduler.plugins["watch"]
        assert plugin.calls == ["start"]
        assert await c.submit(len, "ab", key="watched") == 2
        assert "watched" in plugin.finished
        await c.register_plugin(Watcher(), name="watch")
        assert plugin.calls == ["start", "close"]
        replacement = lc.scheduler.plugins["watch"]
        assert replacement is not plugin and replacement.calls == ["start"]
        await c.register_plugin(Watcher(), name="watch", idempotent=True)
        assert lc.scheduler.plugins["watch"] is replacement
        await c.unregister_scheduler_plugin("watch")
        assert replacement.calls == ["start", "close"]
        assert "watch" not in lc.scheduler.plugins
        with pytest.raises(SetupFailed, match="cannot start"):
            await c.register_plugin(BadStart())


@pytest.mark.anyio
async def test_deprecated_alias_and_type_check(cluster: tuple[LocalCluster, Client]) -> None:
    lc, c = cluster
    with anyio.fail_after(20):
        with pytest.warns(DeprecationWarning, match="register_plugin"):
            pending = c.register_worker_plugin(Recorder("old-api"), name="legacy")
        assert await pending == "legacy"
        for w in lc.workers:
            assert w.plugins["legacy"].tag == "old-api"
        with pytest.raises(TypeError):
            await c.register_plugin(object())


class SetEnv(NannyPlugin):
    restart = True
    name = "set-env"

    def setup(self, nanny: Any) -> None:
        os.environ["SLUICE_TEST_PLUGIN_ENV"] = "applied"


@pytest.mark.anyio
async def test_nanny_plugin_restarts_workers() -> None:
    os.environ.pop("SLUICE_TEST_PLUGIN_ENV", None)
    try:
        with anyio.fail_after(60):
            async with (
                LocalCluster(n_workers=1, processes=True, asynchronous=True) as lc,
                Client(lc, asynchronous=True) as c,
            ):
                before = await c.run(os.environ.get, "SLUICE_TEST_PLUGIN_ENV")
                assert list(before.values()) == [None]
                assert await c.register_plugin(SetEnv()) == "set-env"
                (nanny,) = lc.workers
                assert isinstance(nanny.plugins["set-env"], SetEnv)
                after = await c.run(os.environ.get, "SLUICE_TEST_PLUGIN_ENV")
                assert set(after) == {nanny.worker_address} != set(before)
                assert list(after.values()) == ["applied"]
                await c.unregister_worker_plugin("set-env", nanny=True)
                assert "set-env" not in nanny.plugins
                with pytest.raises(ValueError, match="set-env"):
                    await c.unregister_worker_plugin("set-env", nanny=True)
    finally:
        os.environ.pop("SLUICE_TEST_PLUGIN_ENV", None)


class PlainNannySetup:
    """A duck-typed plugin (no sluice base class), as Dask's register_worker_plugin took."""

    def setup(self, nanny: Any) -> None:
        nanny.plain_setup_ran = True


class NannyTag(NannyPlugin):
    def setup(self, nanny: Any) -> None:
        nanny.tagged = True


@pytest.mark.anyio
async def test_deprecated_alias_routes_by_its_nanny_flag() -> None:
    with anyio.fail_after(60):
        async with (
            LocalCluster(n_workers=1, processes=True, asynchronous=True) as lc,
            Client(lc, asynchronous=True) as c,
        ):
            (nanny,) = lc.workers
            with pytest.warns(DeprecationWarning):
                assert await c.register_worker_plugin(PlainNannySetup(), "plain", nanny=True)
            assert isinstance(nanny.plugins["plain"], PlainNannySetup)
            assert nanny.plain_setup_ran is True
            # Not sent to the worker: its own plugins do not have it.
            on_worker = await c.run(lambda: sorted(get_worker().plugins))
            assert "plain" not in next(iter(on_worker.values()))
            with pytest.warns(DeprecationWarning):
                # nanny=None goes by the class: a NannyPlugin goes to the nannies.
                assert await c.register_worker_plugin(NannyTag(), "by-class") == "by-class"
            assert isinstance(nanny.plugins["by-class"], NannyTag)
            assert nanny.tagged is True
            with (
                pytest.warns(DeprecationWarning),
                pytest.raises(TypeError, match="SchedulerPlugin"),
            ):
                c.register_worker_plugin(SchedulerPlugin())


def test_sync_client_register_and_unregister() -> None:
    with LocalCluster(n_workers=1, processes=False) as lc, Client(lc) as c:
        assert c.register_plugin(Recorder("sync"), name="s") == "s"
        assert c.submit(tag_in_task, "s").result(timeout=20) == "sync"
        c.unregister_worker_plugin("s")
        assert _log(lc.workers[0]) == [("setup", "sync"), ("teardown", "sync")]
        with pytest.warns(DeprecationWarning):
            assert c.register_worker_plugin(Recorder("old"), name="o") == "o"
