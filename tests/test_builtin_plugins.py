"""The built-in plugins of :mod:`sluice.plugins`, end to end against a LocalCluster."""

from __future__ import annotations

import importlib
import io
import logging
import os
import subprocess
import sys
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import sluice.plugins
from sluice.client import Client
from sluice.deploy import LocalCluster
from sluice.events import Event, UserEvent
from sluice.plugins import (
    CondaInstall,
    Environ,
    ForwardLogging,
    PipInstall,
    UploadDirectory,
    UploadFile,
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def cluster() -> AsyncIterator[tuple[LocalCluster, Client]]:
    with anyio.fail_after(30):
        async with (
            LocalCluster(n_workers=2, processes=False, asynchronous=True) as lc,
            Client(lc, asynchronous=True) as c,
        ):
            yield lc, c


class Recorder:
    """Stands in for ``subprocess.run`` in the installers."""

    def __init__(self, returncode: int = 0, stderr: str = "") -> None:
        self.commands: list[list[str]] = []
        self.returncode = returncode
        self.stderr = stderr

    def __call__(self, command: list[str]) -> subprocess.CompletedProcess[str]:
        self.commands.append(list(command))
        return subprocess.CompletedProcess(command, self.returncode, "done\n", self.stderr)


def test_names_are_stable_per_arguments(tmp_path: Path) -> None:
    assert PipInstall(["a"]).name == PipInstall(["a"]).name
    assert PipInstall(["a"]).name != PipInstall(["b"]).name
    assert PipInstall(["a"]).name != PipInstall(["a"], ["--upgrade"]).name
    assert str(PipInstall(["a"]).name).startswith("pip-")
    assert PipInstall.idempotent and CondaInstall.idempotent
    assert str(CondaInstall(["a"]).name).startswith("conda-")
    assert Environ({"A": "1"}).name == Environ({"A": "1"}).name != Environ({"A": "2"}).name
    assert ForwardLogging("x").name != ForwardLogging("y").name
    (tmp_path / "f.txt").write_text("x")
    assert UploadFile(tmp_path / "f.txt").name == "upload-file-f.txt"
    assert UploadDirectory(tmp_path).name == f"upload-directory-{tmp_path.name}"


@pytest.mark.anyio
async def test_pip_install_command_and_idempotence(
    cluster: tuple[LocalCluster, Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, c = cluster
    runner = Recorder()
    monkeypatch.setattr(sluice.plugins, "_run_command", runner)
    plugin = PipInstall(["pkg-one", "pkg-two==1.0"], pip_options=["--upgrade", "--no-deps"])
    with anyio.fail_after(20):
        name = await c.register_plugin(plugin)
        assert name == plugin.name
        expected = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--upgrade",
            "--no-deps",
            "pkg-one",
            "pkg-two==1.0",
        ]
        assert runner.commands == [expected, expected]  # once per worker
        # The same install again: same name, idempotent, nothing runs.
        await c.register_plugin(PipInstall(["pkg-one", "pkg-two==1.0"], ["--upgrade", "--no-deps"]))
        assert len(runner.commands) == 2


@pytest.mark.anyio
async def test_pip_install_failure_raises_last_stderr_line(
    cluster: tuple[LocalCluster, Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    lc, c = cluster
    runner = Recorder(1, "Looking in indexes\nERROR: No matching distribution found for nope\n")
    monkeypatch.setattr(sluice.plugins, "_run_command", runner)
    plugin = PipInstall(["nope"])
    with anyio.fail_after(20):
        with pytest.raises(RuntimeError, match="No matching distribution found for nope"):
            await c.register_plugin(plugin)
        for w in lc.workers:
            assert plugin.name not in w.plugins


@pytest.mark.anyio
async def test_conda_install_without_conda(
    cluster: tuple[LocalCluster, Client],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    _, c = cluster
    runner = Recorder()
    monkeypatch.setattr(sluice.plugins, "_run_command", runner)
    monkeypatch.setenv("PATH", str(tmp_path))  # the in-process workers see no conda
    with (
        anyio.fail_after(20),
        pytest.raises(RuntimeError, match="conda is not installed on this worker"),
    ):
        await c.register_plugin(CondaInstall(["numpy"]))
    assert runner.commands == []


@pytest.mark.anyio
async def test_conda_install_command(
    cluster: tuple[LocalCluster, Client],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    _, c = cluster
    conda = tmp_path / "conda"
    conda.write_text("#!/bin/sh\nexit 0\n")
    conda.chmod(0o755)
    runner = Recorder()
    monkeypatch.setattr(sluice.plugins, "_run_command", runner)
    monkeypatch.setenv("PATH", str(tmp_path))
    with anyio.fail_after(20):
        await c.register_plugin(CondaInstall(["numpy"], conda_options=["-c", "conda-forge"]))
    expected = [str(conda), "install", "-y", "-c", "conda-forge", "numpy"]
    assert runner.commands == [expected, expected]


def call_uploaded(module: str) -> Any:
    return importlib.import_module(module).answer()


@pytest.mark.anyio
async def test_upload_file_is_importable(
    cluster: tuple[LocalCluster, Client], tmp_path: Path
) -> None:
    lc, c = cluster
    module = "sluice_uploaded_file_mod"
    source = tmp_path / f"{module}.py"
    source.write_text("def answer():\n    return 'from the upload'\n")
    before = list(sys.path)
    try:
        with anyio.fail_after(20):
            plugin = UploadFile(source)
            source.unlink()  # the bytes travel with the plugin
            await c.register_plugin(plugin)
            for w in lc.workers:
                target = Path(sluice.plugins.local_directory(w)) / f"{module}.py"
                assert target.read_text().startswith("def answer")
            assert await c.submit(call_uploaded, module) == "from the upload"
    finally:
        sys.path[:] = before
        sys.modules.pop(module, None)
        importlib.invalidate_caches()


def read_env(name: str) -> str | None:
    return os.environ.get(name)


@pytest.mark.anyio
async def test_environ_reaches_restarted_workers() -> None:
    var = "SLUICE_TEST_BUILTIN_ENVIRON"
    os.environ.pop(var, None)
    try:
        with anyio.fail_after(60):
            async with (
                LocalCluster(n_workers=1, processes=True, asynchronous=True) as lc,
                Client(lc, asynchronous=True) as c,
            ):
                assert list((await c.run(os.environ.get, var)).values()) == [None]
                plugin = Environ({var: "set-by-plugin"})
                assert await c.register_plugin(plugin) == plugin.name
                (nanny,) = lc.workers
                after = await c.run(os.environ.get, var)
                assert after == {nanny.worker_address: "set-by-plugin"}
                await c.unregister_worker_plugin(str(plugin.name), nanny=True)
                assert var not in os.environ  # teardown put the nanny's environment back
    finally:
        os.environ.pop(var, None)


def test_upload_directory_skips(tmp_path: Path) -> None:
    root = tmp_path / "project"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "mod.py").write_text("x = 1\n")
    (root / "pkg" / "mod.pyc").write_bytes(b"\0")
    (root / "tests").mkdir()
    (root / "tests" / "test_x.py").write_text("")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref")
    (root / "top.txt").write_text("t")
    plugin = UploadDirectory(root)
    names = sorted(zipfile.ZipFile(io.BytesIO(plugin.data)).namelist())
    assert names == ["project/pkg/mod.py", "project/top.txt"]
    assert plugin.restart is False
    assert UploadDirectory(root, update_path=True).restart is True
    only_txt = UploadDirectory(root, skip_words=(), skip=[lambda f: not f.endswith(".txt")])
    names = sorted(zipfile.ZipFile(io.BytesIO(only_txt.data)).namelist())
    assert names == ["project/top.txt"]
    with_git = UploadDirectory(root, skip_words=("tests",))
    assert "project/.git/HEAD" in zipfile.ZipFile(io.BytesIO(with_git.data)).namelist()


# This test module cannot be imported in a worker process: a builtin does the call.
CALL_DIRECTORY_MODULE = "__import__('sluice_uploaded_dir_mod').answer()"


@pytest.mark.anyio
async def test_upload_directory_update_path(tmp_path: Path) -> None:
    root = tmp_path / "shipped"
    root.mkdir()
    (root / "sluice_uploaded_dir_mod.py").write_text("def answer():\n    return 'shipped'\n")
    old_path = os.environ.get("PYTHONPATH")
    try:
        with anyio.fail_after(60):
            async with (
                LocalCluster(n_workers=1, processes=True, asynchronous=True) as lc,
                Client(lc, asynchronous=True) as c,
            ):
                plugin = UploadDirectory(root, restart=True, update_path=True)
                assert await c.register_plugin(plugin) == "upload-directory-shipped"
                (nanny,) = lc.workers
                unpacked = Path(sluice.plugins.local_directory(nanny)) / "shipped"
                assert (unpacked / "sluice_uploaded_dir_mod.py").exists()
                assert await c.submit(eval, CALL_DIRECTORY_MODULE, pure=False) == "shipped"
                await c.unregister_worker_plugin(str(plugin.name), nanny=True)
                assert os.environ.get("PYTHONPATH") == old_path
    finally:
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path


def log_warning(logger_name: str, text: str) -> None:
    logging.getLogger(logger_name).warning("forwarded: %s", text)


@pytest.mark.anyio
async def test_forward_logging(cluster: tuple[LocalCluster, Client]) -> None:
    lc, c = cluster
    seen = anyio.Event()
    got: list[dict[str, Any]] = []

    def consumer(event: Event) -> None:
        if isinstance(event, UserEvent) and event.topic == "forward-logging":
            got.append(event.msg)
            if "forwarded: hello" in event.msg["message"]:
                seen.set()

    lc.scheduler.bus.subscribe(consumer, name="test-forward", kinds=["user-event"])
    name = "sluice.test.forwarded"
    with anyio.fail_after(20):
        plugin_name = await c.register_plugin(ForwardLogging(name, level=logging.INFO))
        await c.submit(log_warning, name, "hello", pure=False)
        await seen.wait()
    (msg,) = [m for m in got if "hello" in m["message"]]
    assert msg["name"] == name
    assert msg["levelno"] == logging.WARNING and msg["levelname"] == "WARNING"
    assert msg["worker"] in {w.address for w in lc.workers}
    assert any(
        isinstance(e, UserEvent) and e.topic == "forward-logging" for e in lc.scheduler.bus.history
    )
    with anyio.fail_after(20):
        await c.unregister_worker_plugin(plugin_name)
    assert not logging.getLogger(name).handlers
