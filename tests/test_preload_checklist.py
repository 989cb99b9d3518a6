"""Preload behaviours that Dask's own preload tests check, re-expressed for sluice.

Each test names the behaviour; where sluice differs from Dask on purpose, the
docstring says so (docs/preloads.md explains why).
"""

from __future__ import annotations

import importlib
import logging
import sys
import uuid
from textwrap import dedent
from typing import Any

import pytest

import sluice.config
from sluice import Client, Nanny, Scheduler, Worker
from sluice.preload import Preload

pytestmark = pytest.mark.anyio

SET_FOO = dedent(
    """\
    def dask_setup(service):
        service.foo = "setup"

    def dask_teardown(service):
        service.foo = "teardown"
    """
)

RAISES = dedent(
    """\
    def dask_setup(service):
        raise Exception(123)

    def dask_teardown(service):
        raise Exception(456)
    """
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_script_text_runs_on_scheduler_and_worker_with_teardown() -> None:
    async with Scheduler(port=0, preload=SET_FOO) as s:
        assert s.foo == "setup"  # type: ignore[attr-defined]
        assert len(s.preloads) == 1 and isinstance(s.preloads[0], Preload)
        async with Worker(s.address, preload=[SET_FOO]) as w:
            assert w.foo == "setup"  # type: ignore[attr-defined]
        assert w.foo == "teardown"  # type: ignore[attr-defined]
    assert s.foo == "teardown"  # type: ignore[attr-defined]


async def test_a_preload_file_is_importable_by_its_name(tmp_path: Any) -> None:
    name = f"worker_info_{uuid.uuid4().hex[:8]}"
    path = tmp_path / f"{name}.py"
    path.write_text(
        dedent(
            """\
            _info = {}

            def dask_setup(worker):
                _info["address"] = worker.address

            def address():
                return _info["address"]
            """
        )
    )

    def check() -> str:
        return str(importlib.import_module(name).address())

    try:
        async with (
            Scheduler(port=0) as s,
            Worker(s.address, preload=[str(path)]) as w,
            Client(s.address, asynchronous=True) as c,
        ):
            assert await c.run(check) == {w.address: w.address}
    finally:
        sys.modules.pop(name, None)


async def test_click_setup_sync_and_async() -> None:
    sync_text = dedent(
        """\
        import click

        @click.command()
        def dask_setup(worker):
            worker.foo = "sync"
        """
    )
    async_text = sync_text.replace("def dask_setup", "async def dask_setup").replace(
        '"sync"', '"async"'
    )
    async with Scheduler(port=0) as s:
        async with Worker(s.address, preload=sync_text) as w:
            assert w.foo == "sync"  # type: ignore[attr-defined]
        async with Worker(s.address, preload=async_text) as w:
            assert w.foo == "async"  # type: ignore[attr-defined]


async def test_config_preloads_reach_the_nanny_and_its_worker() -> None:
    def foo_of(dask_worker: Any) -> Any:
        return dask_worker.foo

    async with Scheduler(port=0) as s:
        with sluice.config.set(
            {"sluice.worker.preload": [SET_FOO], "sluice.nanny.preload": [SET_FOO]}
        ):
            nanny = Nanny(s.address)
        async with nanny:
            assert nanny.foo == "setup"  # type: ignore[attr-defined]
            async with Client(s.address, asynchronous=True) as c:
                assert await c.run(foo_of) == {nanny.worker_address: "setup"}
        assert nanny.foo == "teardown"  # type: ignore[attr-defined]


async def test_client_preload_text_click_and_config() -> None:
    click_text = dedent(
        """\
        import click

        @click.command()
        @click.argument("value")
        def dask_setup(client, value):
            client.foo = value
        """
    )
    async with Scheduler(port=0) as s:
        async with Client(s.address, asynchronous=True, preload=SET_FOO) as c:
            assert c.foo == "setup"  # type: ignore[attr-defined]
        assert c.foo == "teardown"  # type: ignore[attr-defined]
        async with Client(
            s.address, asynchronous=True, preload=click_text, preload_argv=[["given"]]
        ) as c:
            assert c.foo == "given"  # type: ignore[attr-defined]
        with sluice.config.set(
            {"sluice.client.preload": [click_text], "sluice.client.preload-argv": [["config"]]}
        ):
            async with Client(s.address, asynchronous=True) as c:
                assert c.foo == "config"  # type: ignore[attr-defined]


@pytest.mark.parametrize("service", ["scheduler", "worker", "nanny", "client"])
async def test_raising_setup_and_teardown_do_not_crash_the_service(
    service: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="sluice.preload")
    if service == "scheduler":
        async with Scheduler(port=0, preload=RAISES):
            pass
    else:
        async with Scheduler(port=0) as s:
            if service == "worker":
                async with Worker(s.address, preload=[RAISES]):
                    pass
            elif service == "nanny":
                async with Nanny(s.address, preload_nanny=[RAISES]):
                    pass
            else:
                with sluice.config.set({"sluice.client.preload": [RAISES]}):
                    async with Client(s.address, asynchronous=True):
                        pass
    assert "123" in caplog.text
    assert "456" in caplog.text
