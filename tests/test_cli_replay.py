"""`sluice replay LOG`: summary, --at, --key, --json, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from sluice import SchedulerState
from sluice._core.commands import AddClient, AddWorker, UpdateGraph
from sluice._core.messages import TaskErredMsg, TaskFinishedMsg
from sluice.cli import main
from sluice.events import Event
from sluice.sinks.eventlog import EventLog


@pytest.fixture
def log(tmp_path: Path) -> Path:
    """A run: x -> y and a failing ("bad", 1) on one worker."""
    state = SchedulerState()
    events: list[Event] = []
    for cmd in (
        AddWorker(worker="tcp://w:1"),
        AddClient(client="c"),
        UpdateGraph(
            client="c",
            keys=("y", ("bad", 1)),
            dependencies={"x": (), "y": ("x",), ("bad", 1): ()},
        ),
        TaskFinishedMsg(worker="tcp://w:1", key="x", nbytes=8),
        TaskErredMsg(worker="tcp://w:1", key=("bad", 1), exception="ZeroDivisionError()"),
        TaskFinishedMsg(worker="tcp://w:1", key="y", nbytes=8),
    ):
        produced, _ = state.handle(cmd, now=float(len(events) + 1))
        events += produced
    path = tmp_path / "events.jsonl"
    writer = EventLog(path, run_id="run-1", address="tcp://s:1")
    writer.write(events)
    writer.close()
    return path


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["replay", *args])
    return result.exit_code, result.output


def test_summary_as_json(log: Path) -> None:
    code, out = run(str(log), "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary["run_id"] == "run-1"
    assert summary["task_states"] == {"erred": 1, "memory": 1, "released": 1}
    assert summary["workers"] == ["tcp://w:1"]
    assert summary["errors"] == [{"key": ["bad", 1], "exception": "ZeroDivisionError()"}]


def test_summary_table_and_state_at_a_seq(log: Path) -> None:
    code, out = run(str(log))
    assert code == 0 and "run-1" in out and "erred" in out
    code, out = run(str(log), "--at", "4", "--json")
    assert code == 0
    assert json.loads(out)["last_seq"] == 4
    assert json.loads(out)["errors"] == []


def test_a_key_story_with_a_tuple_key(log: Path) -> None:
    code, out = run(str(log), "--key", '["bad", 1]', "--json")
    assert code == 0
    story = json.loads(out)
    transitions = [(d["start"], d["finish"]) for d in story if d["kind"] == "task-transition"]
    assert transitions == [
        ("released", "waiting"),
        ("waiting", "processing"),
        ("processing", "erred"),
    ]
    code, out = run(str(log), "--key", "y")
    assert code == 0 and "processing -> memory" in out


def test_bad_invocations_are_one_line(log: Path, tmp_path: Path) -> None:
    code, out = run(str(tmp_path / "missing.jsonl"))
    assert code == 1 and out.strip().splitlines() == [
        f"Error: no such event log: {tmp_path / 'missing.jsonl'}"
    ]
    code, out = run(str(log), "--key", "nope")
    assert code == 1 and out.strip() == f"Error: key 'nope' does not appear in {log}"
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("this is not a log\n")
    code, out = run(str(garbage))
    assert code == 1 and len(out.strip().splitlines()) == 1 and out.startswith("Error: ")
