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
from sluice.testing import Recorder


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


# -- --into ------------------------------------------------------------------------------


def test_into_an_event_log_copies_the_run_with_its_run_id(log: Path, tmp_path: Path) -> None:
    from sluice.replay import read_events, read_header

    copy = tmp_path / "copy.jsonl"
    code, out = run(str(log), "--into", f"eventlog://{copy}")
    assert code == 0, out
    assert out.strip() == (
        f"re-published 13 events of run run-1 into eventlog://{copy} in "
        + out.split(" in ")[-1].strip()
    )
    assert list(read_events(copy)) == list(read_events(log))
    assert read_header(copy)["run_id"] == "run-1"
    assert read_header(copy)["address"] == "tcp://s:1"


def test_into_with_key_and_at_selects_events(log: Path, tmp_path: Path) -> None:
    out_path = tmp_path / "story.json"
    code, out = run(str(log), "--key", '["bad", 1]', "--into", f"json-log://{out_path}", "--json")
    assert code == 0, out
    assert json.loads(out)[0]["events"] == 4
    lines = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert [d["event"] for d in lines] == ["graph-updated"] + ["task-transition"] * 3
    assert all(d["key"] == ["bad", 1] for d in lines[1:])
    from sluice.replay import read_events

    # Counter and ErrorLogger only take task transitions: the count says what they got.
    wanted = sum(1 for e in read_events(log) if e.seq <= 7 and e.kind == "task-transition")
    assert wanted > 0
    code, out = run(str(log), "--at", "7", "--into", "counter", "--into", "errors")
    assert code == 0
    assert out.count(f"re-published {wanted} events") == 2


def test_into_a_bad_spec_is_one_line(log: Path) -> None:
    code, out = run(str(log), "--into", "nope:x")
    assert code == 1
    assert out.strip().splitlines() == [
        "Error: unknown sink 'nope' in spec 'nope:x': expected one of "
        + out.split("expected one of ")[1].strip()
    ]


# -- a real run --------------------------------------------------------------------------


def _inc(x: int) -> int:
    return x + 1


def _fail(x: int) -> int:
    raise KeyError(x)


def _live_summary(state: SchedulerState) -> dict[str, object]:
    import collections

    return {
        "last_seq": state.seq,
        "task_states": dict(
            sorted(collections.Counter(ts.state for ts in state.tasks.values()).items())
        ),
        "workers": sorted(state.workers),
        "errors": sorted(str(ts.key) for ts in state.tasks.values() if ts.state == "erred"),
    }


def _replayed_summary(log: Path, *extra: str) -> dict[str, object]:
    code, out = run(str(log), "--json", *extra)
    assert code == 0, out
    summary = json.loads(out)
    return {
        "last_seq": summary["last_seq"],
        "task_states": summary["task_states"],
        "workers": summary["workers"],
        "errors": sorted(str(e["key"]) for e in summary["errors"]),
    }


@pytest.mark.anyio
async def test_summary_of_a_real_run_equals_the_live_schedulers(tmp_path: Path) -> None:
    """Mid-run (workers in) and at the end, the log's summary is the live scheduler's."""
    from sluice.client import Client
    from sluice.scheduler import Scheduler
    from sluice.worker import Worker

    path = tmp_path / "run.jsonl"
    async with Scheduler(port=0, event_log=path) as s:
        async with (
            Worker(s.address, nthreads=2),
            Worker(s.address, nthreads=1),
            Client(s.address, asynchronous=True) as c,
        ):
            firsts = c.map(_inc, range(50))
            seconds = c.map(_inc, firsts)
            assert sum(await c.gather(seconds)) == sum(range(2, 52))
            bad = [c.submit(_fail, i) for i in range(3)]
            for future in bad:
                with pytest.raises(KeyError):
                    await future
            # Releasing the firsts is asynchronous: wait until the scheduler has released
            # all 50 (their dependents hold them as "released"), then take the summary in
            # one synchronous step, since forwarded worker events keep advancing the seq.
            released = {f.key for f in firsts}
            recorder = Recorder(kinds=["task-transition"]).attach(s, since=None)
            done: set[object] = set()

            def all_released(e: Event) -> bool:
                if e.source == "scheduler" and getattr(e, "finish", None) == "released":
                    done.add(e.key)  # type: ignore[attr-defined]
                return released <= done

            del firsts
            await recorder.wait_for(all_released)
            recorder.detach()
            mid = _live_summary(s.state)
            states = mid["task_states"]
            assert states["erred"] == 3 and states["memory"] == 50  # type: ignore[index]
            assert len(mid["workers"]) == 2  # type: ignore[arg-type]
        end = _live_summary(s.state)
    assert _replayed_summary(path, "--at", str(mid["last_seq"])) == mid
    assert _replayed_summary(path) == {**end, "last_seq": s.state.seq}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_a_long_log_is_read_with_a_progress_line_on_a_terminal(log: Path) -> None:
    import io

    from rich.console import Console

    from sluice._cli_replay import _read_with_progress
    from sluice.replay import read_events

    out = io.StringIO()
    terminal = Console(file=out, force_terminal=True, width=80)
    events = _read_with_progress(log, None, console=terminal, threshold=0)
    assert events == list(read_events(log))
    assert "reading events.jsonl" in out.getvalue()
    assert _read_with_progress(log, 4, console=terminal, threshold=0) == events[:4]
    quiet = io.StringIO()
    assert _read_with_progress(log, None, console=Console(file=quiet)) == events
    assert quiet.getvalue() == ""  # not a terminal: nothing drawn
