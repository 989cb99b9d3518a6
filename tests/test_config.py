"""Configuration sources, their order, and what reaches child processes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import sluice.config as config


@pytest.fixture(autouse=True)
def clean_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Each test starts from the defaults: no user files, no SLUICE_ variables."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in list(__import__("os").environ):
        if name.startswith("SLUICE_"):
            monkeypatch.delenv(name)
    config.refresh()
    yield
    config._overrides.clear()
    monkeypatch.undo()
    config.refresh()


def test_defaults() -> None:
    assert config.get("sluice.worker.forward-events") is True
    assert config.get("sluice.scheduler.preload") == []
    assert config.get("sluice.worker.forward_events") is True  # _ and - are the same
    with pytest.raises(KeyError, match=r"'sluice\.nope'"):
        config.get("sluice.nope")
    assert config.get("sluice.nope", 3) == 3


def test_files_then_environment_then_set(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    user = tmp_path / "home" / ".config" / "sluice"
    user.mkdir(parents=True)
    (user / "a.yaml").write_text("sluice:\n  worker:\n    forward-events: false\n    nthreads: 2\n")
    extra = tmp_path / "extra.yaml"
    extra.write_text("sluice:\n  worker:\n    nthreads: 3\n")
    monkeypatch.setenv("SLUICE_CONFIG", str(extra))
    config.refresh()
    assert config.get("sluice.worker.forward-events") is False
    assert config.get("sluice.worker.nthreads") == 3

    monkeypatch.setenv("SLUICE_WORKER__NTHREADS", "4")
    monkeypatch.setenv("SLUICE_SCHEDULER__PRELOAD", "[a.py, b.py]")
    config.refresh()
    assert config.get("sluice.worker.nthreads") == 4  # parsed as YAML: an int
    assert config.get("sluice.scheduler.preload") == ["a.py", "b.py"]

    with config.set({"sluice.worker.nthreads": 5}):
        assert config.get("sluice.worker.nthreads") == 5
        assert config.get("sluice.worker")["nthreads"] == 5
    assert config.get("sluice.worker.nthreads") == 4  # the block undid it
    config.set(sluice__worker__nthreads=6)  # a plain call lasts
    assert config.get("sluice.worker.nthreads") == 6


def test_bad_files_are_one_line_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("sluice:\n  worker: [unclosed\n")
    monkeypatch.setenv("SLUICE_CONFIG", str(bad))
    with pytest.raises(config.ConfigError, match=rf"^{bad}:\d+: not valid YAML$"):
        config.refresh()
    monkeypatch.setenv("SLUICE_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(config.ConfigError, match=r"cannot read configuration file .*missing"):
        config.refresh()
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    monkeypatch.setenv("SLUICE_CONFIG", str(scalar))
    with pytest.raises(config.ConfigError, match="expected a mapping"):
        config.refresh()


def test_set_reaches_a_child_process() -> None:
    with config.set({"sluice.worker.forward-events": False}):
        env = config.child_environment()
    code = (
        "import json, sluice.config as c;print(json.dumps(c.get('sluice.worker.forward-events')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**__import__("os").environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(done.stdout) is False
    assert config.child_environment() == {}  # the block ended: nothing to hand on
