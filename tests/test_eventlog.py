"""The event log: the eventlog sink writes it, sluice.replay reads it back.

The log is how a run is replayed, so these tests pin what must hold across
processes and crashes: exact round trip of every event kind, rotation that
never splits a line, a tolerated truncated tail, corruption reported with its
file and line, and a clear refusal to mix two runs in one file.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

import sluice._core.event_codec as event_codec
import sluice._core.logfile as logfile
from sluice import events as ev
from sluice.events import (
    EVENT_CLASSES,
    SCHEMA_VERSION,
    ClientAdded,
    ClientReleasedKeys,
    ClientRemoved,
    Event,
    GraphUpdated,
    PluginAdded,
    PluginRemoved,
    Restarted,
    SchedulerClosing,
    SchedulerStarted,
    TaskTransition,
    UserEvent,
    WorkerAdded,
    WorkerRemoved,
)
from sluice.replay import EventLogError, EventLogReader, read_events, read_header
from sluice.sinks import Sink
from sluice.sinks._json import event_json
from sluice.sinks.eventlog import EventLog

W1 = "tcp://127.0.0.1:40001"
W2 = "tcp://127.0.0.1:40002"
T0 = 1_700_000_000.25


def one_of_each() -> list[Event]:
    """A realistic instance of every event kind, stamped as a scheduler would."""
    x0, x1 = ("x", 0), ("x", 1)
    nested = ("sum", ("x", 1), 2)
    made: list[Event] = [
        SchedulerStarted(address="tcp://127.0.0.1:8786"),
        WorkerAdded(worker=W1, name="w-1", nthreads=4, memory_limit=8 << 30),
        ClientAdded(client="Client-abc"),
        PluginAdded(name="counter"),
        GraphUpdated(
            client="Client-abc",
            keys=(nested, "total"),
            dependencies={x0: (), x1: (), nested: (x0, x1), "total": (nested,)},
            priority={x0: -1, nested: 3},
            retries={nested: 2},
            stimulus_id="update-graph-1",
        ),
        TaskTransition(
            key=x1,
            start="released",
            finish="waiting",
            stimulus_id="update-graph-1",
        ),
        TaskTransition(
            source=W1,
            key=nested,
            start="executing",
            finish="memory",
            stimulus_id="compute-task-7",
            worker=W1,
            nbytes=28,
            duration=0.0125,
        ),
        TaskTransition(
            key="total",
            start="processing",
            finish="erred",
            stimulus_id="task-erred-9",
            worker=W1,
            exception="ZeroDivisionError('division by zero')",
            traceback='  File "x.py", line 1\n    1/0\n',
        ),
        UserEvent(topic="progress", msg={"done": [1, 2], "note": "ünïcode ✓", "ok": None}),
        UserEvent(topic="empty"),
        ClientReleasedKeys(client="Client-abc", keys=(nested, "total"), stimulus_id="rel-1"),
        WorkerRemoved(worker=W1, reason="worker-lost", stimulus_id="heartbeat-3"),
        Restarted(stimulus_id="restart-1"),
        ClientRemoved(client="Client-abc"),
        PluginRemoved(name="counter"),
        SchedulerClosing(address="tcp://127.0.0.1:8786"),
    ]
    # Kinds added to sluice.events later get a generic instance, so this test
    # keeps covering every kind without being edited each time.
    made.extend(_generic(cls) for cls in EVENT_CLASSES if cls not in {type(e) for e in made})
    return [type(e)(**{**_fields(e), "seq": i, "time": T0 + i / 8}) for i, e in enumerate(made, 1)]


def _generic(cls: type[Event]) -> Event:
    """An instance of ``cls`` with tuple keys wherever a field holds keys."""
    import attrs

    key = ("y", ("z", 2), 3)
    values: dict[str, Any] = {
        "key": key,
        "keys": (key, "other"),
        "who_has": {key: (W1, W2), "other": ()},
        "dependencies": {key: ("other",), "other": ()},
        "priority": 5,
        "stimulus_id": "stim-generic",
        "source": W2,
    }
    kwargs: dict[str, Any] = {}
    for f in attrs.fields(cls):
        if f.name in values:
            kwargs[f.name] = values[f.name]
        elif f.default is attrs.NOTHING:
            kwargs[f.name] = {"int": 7, "float": 0.5}.get(str(f.type), f"{f.name}-value")
    return cls(**kwargs)


def _fields(e: Event) -> dict[str, Any]:
    import attrs

    return attrs.asdict(e, recurse=False)


def transitions(n: int, start: int = 1) -> list[Event]:
    return [
        TaskTransition(
            seq=i,
            time=T0 + i,
            source=W2,
            key=("inc", i),
            start="processing",
            finish="memory",
            stimulus_id=f"task-finished-{i}",
            worker=W2,
            nbytes=i,
            duration=0.5,
        )
        for i in range(start, start + n)
    ]


def write_log(path: Path, batches: list[list[Event]], **kwargs: Any) -> EventLog:
    log = EventLog(path, **kwargs)
    for batch in batches:
        log.write(batch)
    log.close()
    return log


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


# -- round trip ---------------------------------------------------------------------


def test_every_kind_round_trips(tmp_path: Path) -> None:
    written = one_of_each()
    assert {type(e) for e in written} == set(EVENT_CLASSES)
    path = tmp_path / "run.jsonl"
    log = write_log(path, [written[:5], written[5:6], written[6:]], run_id="run-1")

    reader = EventLogReader(path)
    got = list(reader)
    assert got == written
    assert [type(e) for e in got] == [type(e) for e in written]
    assert reader.truncated is None
    graph = next(e for e in got if isinstance(e, GraphUpdated))
    assert ("sum", ("x", 1), 2) in graph.dependencies
    assert graph.retries == {("sum", ("x", 1), 2): 2}
    assert log.paths == [path]


def test_header_fields(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    write_log(path, [transitions(2)], run_id="run-1", address="tcp://10.0.0.1:8786")
    header = read_header(path)
    assert header["format"] == "sluice-event-log"
    assert header["version"] == SCHEMA_VERSION
    assert header["run_id"] == "run-1"
    assert header["address"] == "tcp://10.0.0.1:8786"
    assert isinstance(header["started"], float)
    assert "segment" not in header
    assert orjson.loads(lines_of(path)[0]) == header


def test_run_id_and_address_from_the_bus(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "a.jsonl")
    log.bus = types.SimpleNamespace(run_id="bus-run", address="tcp://h:1")  # type: ignore[assignment]
    log.start()
    log.close()
    assert read_header(tmp_path / "a.jsonl")["run_id"] == "bus-run"
    assert read_header(tmp_path / "a.jsonl")["address"] == "tcp://h:1"


def test_without_a_bus_run_id_is_fresh_and_address_none(tmp_path: Path) -> None:
    write_log(tmp_path / "a.jsonl", [transitions(1)])
    write_log(tmp_path / "b.jsonl", [transitions(1)])
    a, b = read_header(tmp_path / "a.jsonl"), read_header(tmp_path / "b.jsonl")
    assert len(a["run_id"]) == 32 and int(a["run_id"], 16) >= 0
    assert a["run_id"] != b["run_id"]
    assert a["address"] is None


def test_start_writes_the_header_and_creates_directories(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "run.jsonl"
    log = EventLog(path, run_id="r")
    assert not path.exists()  # nothing until started
    assert isinstance(log, Sink) and log.name == "eventlog"
    log.start()
    assert len(lines_of(path)) == 1
    log.close()
    assert list(read_events(path)) == []


def test_close_is_idempotent_and_final(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "a.jsonl")
    log.write(transitions(1))
    log.close()
    log.close()
    log.flush()
    with pytest.raises(ValueError, match="closed"):
        log.write(transitions(1, start=2))


def test_never_started_sink_leaves_no_file(tmp_path: Path) -> None:
    EventLog(tmp_path / "a.jsonl").close()
    assert not (tmp_path / "a.jsonl").exists()


def test_one_write_call_per_batch(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "a.jsonl", fsync="never")
    log.start()
    real = log._file
    assert real is not None
    calls: list[int] = []

    class Spy:
        def write(self, data: Any) -> int:
            calls.append(len(data))
            return real.write(data)

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    log._file = Spy()  # type: ignore[assignment]
    log.write(transitions(100))
    log._file = real
    log.close()
    assert len(calls) == 1
    assert len(list(read_events(tmp_path / "a.jsonl"))) == 100


def test_event_that_is_not_json_safe_does_not_lose_the_batch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    batch = [*transitions(2), UserEvent(seq=3, topic="bad", msg={"obj": object()})]
    batch.append(*transitions(1, start=4))
    with caplog.at_level(logging.WARNING, logger="sluice.sinks.eventlog"):
        write_log(tmp_path / "a.jsonl", [batch])
    got = list(read_events(tmp_path / "a.jsonl"))
    assert [e.seq for e in got] == [1, 2, 3, 4]
    bad = got[2]
    assert isinstance(bad, UserEvent) and bad.msg["obj"].startswith("<object object")
    assert "seq=3" in caplog.text


# -- rotation -----------------------------------------------------------------------


def test_rotation_by_size(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    written = transitions(200)
    batches = [written[i : i + 7] for i in range(0, 200, 7)]
    log = write_log(path, batches, rotate_bytes=4096, run_id="rot")

    segments = sorted(tmp_path.iterdir())
    assert len(segments) >= 4
    assert log.paths == [path, *(Path(f"{path}.{n}") for n in range(1, len(segments)))]
    assert set(segments) == set(log.paths)
    seen = 0
    for n, seg in enumerate(log.paths):
        lines = lines_of(seg)
        assert all(line.endswith(b"\n") for line in lines)  # no line split
        header = orjson.loads(lines[0])
        assert header["run_id"] == "rot" and header["format"] == "sluice-event-log"
        assert header.get("segment", 0) == n
        bodies = [orjson.loads(line) for line in lines[1:]]
        assert bodies and all(b["kind"] == "task-transition" for b in bodies)
        seen += len(bodies)
        # A segment is only left once it passed rotate_bytes, batch by batch.
        if seg != log.paths[-1]:
            assert seg.stat().st_size >= 4096
            assert seg.stat().st_size - 7 * max(map(len, lines[1:])) < 4096
    assert seen == 200
    assert list(read_events(path)) == written


def test_rotation_never_splits_a_batch_that_is_bigger_than_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    written = transitions(50)
    log = write_log(path, [written[:25], written[25:]], rotate_bytes=100)
    assert len(log.paths) == 2
    assert list(read_events(path)) == written


# -- damage -------------------------------------------------------------------------


def test_truncated_last_line_is_tolerated(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "run.jsonl"
    written = transitions(10)
    write_log(path, [written])
    data = path.read_bytes()
    path.write_bytes(data[:-40])  # a crash in the middle of the last line

    reader = EventLogReader(path)
    with caplog.at_level(logging.WARNING, logger="sluice.replay"):
        got = list(reader)
    assert got == written[:-1]
    assert reader.truncated == (str(path), 11)  # header + 10 events: line 11
    records = [r for r in caplog.records if r.name == "sluice.replay"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert f"{path}:11" in records[0].getMessage()


def test_truncated_tail_of_the_last_rotated_segment(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    written = transitions(40)
    log = write_log(path, [written[i : i + 5] for i in range(0, 40, 5)], rotate_bytes=1000)
    last = log.paths[-1]
    last.write_bytes(last.read_bytes()[:-3])
    reader = EventLogReader(path)
    assert list(reader) == written[:-1]
    assert reader.truncated is not None and reader.truncated[0] == str(last)
    assert reader.truncated[1] == len(lines_of(last))


def test_crash_while_starting_a_segment_is_a_truncation(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    written = transitions(20)
    log = write_log(path, [written[:10], written[10:]], rotate_bytes=500)
    assert len(log.paths) == 2
    last = log.paths[-1]
    last.write_bytes(lines_of(last)[0][:15])  # only part of the header got out
    reader = EventLogReader(path)
    assert list(reader) == written[:10]
    assert reader.truncated == (str(last), 1)


def test_complete_last_line_without_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    written = transitions(3)
    write_log(path, [written])
    path.write_bytes(path.read_bytes()[:-1])
    reader = EventLogReader(path)
    assert list(reader) == written
    assert reader.truncated is None


def test_truncated_line_in_a_middle_segment_is_corruption(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    log = write_log(path, [transitions(10), transitions(10, start=11)], rotate_bytes=500)
    first = log.paths[0]
    first.write_bytes(first.read_bytes()[:-10])
    with pytest.raises(EventLogError, match=rf"{first}:11: "):
        list(read_events(path))


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        (b"this is not json\n", "invalid JSON"),
        (b'{"kind": "no-such-kind", "seq": 5}\n', "unknown event kind 'no-such-kind'"),
        (b'{"kind": "task-transition", "seq": 5}\n', "bad 'task-transition' event"),
        (b"[1, 2, 3]\n", "not an event object"),
        (b'{"kind": ["x"]}\n', ""),
        (b"\n", "blank line"),
    ],
)
def test_corrupt_middle_line_names_file_and_line(
    tmp_path: Path, bad_line: bytes, reason: str
) -> None:
    path = tmp_path / "run.jsonl"
    written = transitions(8)
    write_log(path, [written])
    lines = lines_of(path)
    lines[5] = bad_line  # line 6 of the file: the 5th event
    path.write_bytes(b"".join(lines))

    got: list[Event] = []
    with pytest.raises(EventLogError) as info:
        got.extend(read_events(path))
    assert str(info.value).startswith(f"{path}:6: ")
    assert reason in str(info.value)
    assert got == written[:4]


def test_blank_line_at_the_end_is_corruption(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    write_log(path, [transitions(2)])
    with open(path, "ab") as f:
        f.write(b"\n")
    with pytest.raises(EventLogError, match=rf"{path}:4: blank line"):
        list(read_events(path))


# -- not a log, wrong version, wrong run -------------------------------------------


def test_not_an_event_log(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text('{"hello": "world"}\n')
    with pytest.raises(EventLogError, match=rf"{path}: not a sluice event log"):
        read_events(path)
    path.write_bytes(b"\x00\x01 binary junk\n")
    with pytest.raises(EventLogError, match="not a sluice event log"):
        EventLogReader(path)


def test_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.jsonl"
    header = {"format": "sluice-event-log", "version": SCHEMA_VERSION + 1, "run_id": "r"}
    path.write_bytes(orjson.dumps(header) + b"\n")
    with pytest.raises(EventLogError, match=rf"{path}: .*newer.*upgrade sluice"):
        read_header(path)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="no such event log") as info:
        read_events(missing)
    assert info.value.filename == str(missing)
    empty = tmp_path / "empty.jsonl"
    empty.touch()
    with pytest.raises(EventLogError, match=rf"{empty}: empty file"):
        read_header(empty)


def test_segments_of_another_run_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    log = write_log(path, [transitions(10), transitions(10, start=11)], rotate_bytes=500)
    seg = log.paths[1]
    lines = lines_of(seg)
    header = orjson.loads(lines[0])
    header["run_id"] = "someone-else"
    seg.write_bytes(orjson.dumps(header) + b"\n" + b"".join(lines[1:]))
    got: list[Event] = []
    with pytest.raises(EventLogError, match=rf"{seg}: segment of another run") as info:
        got.extend(read_events(path))
    assert "someone-else" in str(info.value)
    assert got == transitions(10)


def test_missing_middle_segment_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    log = write_log(path, [transitions(5, start=i) for i in range(1, 30, 5)], rotate_bytes=300)
    assert len(log.paths) >= 3
    log.paths[1].unlink()
    with pytest.raises(EventLogError, match=rf"{log.paths[1]}: missing segment"):
        list(read_events(path))


def test_reading_from_a_later_segment_points_to_the_first(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    log = write_log(path, [transitions(10), transitions(10, start=11)], rotate_bytes=500)
    with pytest.raises(EventLogError, match="segment 1 of a rotated log"):
        read_events(log.paths[1])


def test_older_versions_are_upcast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A log written with schema 1 is read by a (simulated) sluice on schema 2."""
    path = tmp_path / "old.jsonl"
    written = transitions(3)
    write_log(path, [written])

    def v1_to_v2(d: dict[str, Any]) -> dict[str, Any]:
        if d["kind"] == "task-transition":
            d = {**d, "stimulus_id": "upcast:" + d["stimulus_id"]}
        return d

    monkeypatch.setattr(ev, "SCHEMA_VERSION", 2)
    monkeypatch.setattr(logfile, "SCHEMA_VERSION", 2)
    monkeypatch.setattr(event_codec, "SCHEMA_VERSION", 2)
    monkeypatch.setitem(ev.UPCASTERS, 1, v1_to_v2)
    got = list(read_events(path))
    assert [e.stimulus_id for e in got] == [  # type: ignore[attr-defined]
        "upcast:" + e.stimulus_id  # type: ignore[attr-defined]
        for e in written
    ]


# -- fsync policies -----------------------------------------------------------------


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    yield calls


@pytest.mark.parametrize("policy", ["batch", "close", "never"])
def test_fsync_policies(tmp_path: Path, fsyncs: list[int], policy: Any) -> None:
    path = tmp_path / "run.jsonl"
    written = transitions(30)
    log = EventLog(path, fsync=policy)
    for i in range(0, 30, 10):
        log.write(written[i : i + 10])
    before_close = len(fsyncs)
    log.close()
    after_close = len(fsyncs) - before_close
    if policy == "batch":
        assert before_close >= 3  # at least once per batch
    elif policy == "close":
        assert before_close == 0
        assert after_close >= 1
    else:
        assert before_close == after_close == 0
    assert list(read_events(path)) == written


def test_fsync_close_syncs_each_segment_it_leaves(tmp_path: Path, fsyncs: list[int]) -> None:
    path = tmp_path / "run.jsonl"
    log = EventLog(path, fsync="close", rotate_bytes=500)
    log.write(transitions(5))
    assert fsyncs == []
    log.write(transitions(5, start=6))  # goes to a new segment: the first is closed
    assert len(log.paths) == 2 and len(fsyncs) >= 1
    log.close()
    assert list(read_events(path)) == transitions(10)


def test_flush_fsyncs_unless_never(tmp_path: Path, fsyncs: list[int]) -> None:
    for policy, expected in (("close", 1), ("never", 0)):
        log = EventLog(tmp_path / f"{policy}.jsonl", fsync=policy)  # type: ignore[arg-type]
        log.write(transitions(1))
        fsyncs.clear()
        log.flush()
        assert len(fsyncs) == expected
        log.close()


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="fsync must be one of"):
        EventLog("x.jsonl", fsync="always")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rotate_bytes"):
        EventLog("x.jsonl", rotate_bytes=0)


# -- existing path ------------------------------------------------------------------


def test_existing_log_is_never_clobbered(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    write_log(path, [transitions(3)], run_id="first")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match=rf"^event log {path} already exists"):
        EventLog(path)
    assert path.read_bytes() == before


def test_stale_segments_of_an_older_log_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    Path(f"{path}.2").write_bytes(b"old\n")
    with pytest.raises(FileExistsError, match=rf"event log {path}\.2 already exists"):
        EventLog(path)


def test_existing_empty_file_is_reused(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    path.touch()
    write_log(path, [transitions(2)])
    assert list(read_events(path)) == transitions(2)


# -- resume: a writer that died, replaced -------------------------------------------


def resume_with(path: Path, batches: list[list[Event]], **kwargs: Any) -> list[Event]:
    """Resume the log at ``path`` as a restarted file sinks' child does, write
    ``batches``, close; the log's events (it must have no torn line)."""
    resumed = EventLog(path, resume=True, **kwargs)
    for batch in batches:
        resumed.write(batch)
    resumed.close()
    reader = EventLogReader(path)
    events = list(reader)
    assert reader.truncated is None
    return events


@pytest.mark.parametrize("cut", [0, 1, 25, -1], ids=["whole-lines", "one-byte", "mid-line", "all"])
def test_a_resumed_log_reads_as_if_its_writer_never_died(tmp_path: Path, cut: int) -> None:
    # The writer died during its second batch: that batch's first three lines,
    # and ``cut`` bytes of the fourth, are in the file. The replacement is given
    # the whole batch again.
    path = tmp_path / "run.jsonl"
    written = transitions(20)
    write_log(path, [written[:10]], run_id="r1")
    partial = b"".join(event_json(e) + b"\n" for e in written[10:14])
    end = len(partial) - len(event_json(written[13])) - 1 + cut if cut >= 0 else len(partial)
    with open(path, "ab") as f:
        f.write(partial[:end])
    assert resume_with(path, [written[10:]], run_id="r1") == written


def test_a_resumed_log_skips_a_batch_it_holds_and_writes_the_next(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    written = transitions(30)
    write_log(path, [written[:20]], run_id="r1")
    # The writer died after writing written[5:20], before saying so: it comes again.
    assert resume_with(path, [written[5:20], written[20:]], run_id="r1") == written


def test_a_resumed_log_continues_its_last_segment_and_rotation(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    written = transitions(60)
    log = write_log(path, [written[i : i + 5] for i in range(0, 30, 5)], rotate_bytes=1500)
    segments = len(log.paths)
    assert segments >= 2
    resumed = EventLog(path, rotate_bytes=1500, run_id=log.run_id, resume=True)
    for i in range(30, 60, 5):
        resumed.write(written[i : i + 5])
    resumed.close()
    assert list(read_events(path)) == written
    assert len(resumed.paths) > segments
    for seg in resumed.paths:
        header = orjson.loads(lines_of(seg)[0])
        assert header["run_id"] == log.run_id and header["started"] == log._started


def test_a_resumed_log_redoes_a_segment_whose_header_was_cut(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    written = transitions(20)
    log = write_log(path, [written[:10], written[10:15]], rotate_bytes=500)
    last = log.paths[-1]
    last.write_bytes(lines_of(last)[0][:15])  # died while starting that segment
    assert resume_with(path, [written[10:]], rotate_bytes=500, run_id=log.run_id) == written


def test_a_resumed_log_that_was_never_started_starts_afresh(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    path.write_bytes(b'{"format": "sluice-ev')  # died writing the first header
    resumed = EventLog(path, run_id="r1", resume=True)
    resumed.write(transitions(3))
    resumed.close()
    assert list(read_events(path)) == transitions(3)
    assert read_header(path)["run_id"] == "r1"


@pytest.mark.parametrize("cut", [False, True], ids=["whole", "last-segment-cut"])
def test_only_the_same_run_can_resume_a_log(tmp_path: Path, cut: bool) -> None:
    path = tmp_path / "run.jsonl"
    log = write_log(path, [transitions(10), transitions(10, start=11)], rotate_bytes=500)
    assert len(log.paths) == 2
    if cut:  # another run's writer died mid-line: its file is not this run's to mend
        log.paths[-1].write_bytes(log.paths[-1].read_bytes()[:-7])
    before = [p.read_bytes() for p in log.paths]
    resumed = EventLog(path, run_id="second", resume=True)
    with pytest.raises(ValueError, match=rf"records run '{log.run_id}', not 'second'"):
        resumed.write(transitions(2, start=21))
    assert [p.read_bytes() for p in log.paths] == before


# -- across processes ---------------------------------------------------------------

_CHILD_WRITES = textwrap.dedent(
    """
    import sys
    from sluice.events import TaskTransition, GraphUpdated
    from sluice.sinks.eventlog import EventLog
    log = EventLog(sys.argv[1], run_id="child-run", rotate_bytes=3000)
    log.write([GraphUpdated(seq=1, time=1.5, client="c", keys=(("a", 1),),
                            dependencies={("a", 1): ("b",), "b": ()}, priority={"b": 1})])
    for i in range(2, 60, 6):
        log.write([TaskTransition(seq=j, time=j / 2, key=("a", j), start="waiting",
                                  finish="processing", worker="tcp://w:1")
                   for j in range(i, i + 6)])
    log.close()
    """
)

_CHILD_READS = textwrap.dedent(
    """
    import sys, orjson
    from sluice.replay import EventLogReader
    reader = EventLogReader(sys.argv[1])
    events = [e.to_dict() for e in reader]
    sys.stdout.buffer.write(orjson.dumps(
        {"header": reader.header, "events": events, "truncated": reader.truncated}))
    """
)


def test_read_a_log_another_process_wrote(tmp_path: Path) -> None:
    path = tmp_path / "child.jsonl"
    subprocess.run([sys.executable, "-c", _CHILD_WRITES, str(path)], check=True, timeout=60)
    reader = EventLogReader(path)
    got = list(reader)
    assert reader.header["run_id"] == "child-run"
    assert len(got) == 61 and [e.seq for e in got] == list(range(1, 62))
    assert isinstance(got[0], GraphUpdated)
    assert got[0].dependencies == {("a", 1): ("b",), "b": ()}
    assert got[-1] == TaskTransition(
        seq=61, time=30.5, key=("a", 61), start="waiting", finish="processing", worker="tcp://w:1"
    )
    assert Path(f"{path}.1").exists()


def test_another_process_reads_a_log_this_one_wrote(tmp_path: Path) -> None:
    path = tmp_path / "parent.jsonl"
    written = one_of_each()
    write_log(path, [written[:3], written[3:]], run_id="parent-run", rotate_bytes=1500)
    path_last = EventLogReader(path).segments()[-1]
    path_last.write_bytes(path_last.read_bytes()[:-5])  # and a crash at the very end

    proc = subprocess.run(
        [sys.executable, "-c", _CHILD_READS, str(path)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    out = json.loads(proc.stdout)
    assert out["header"]["run_id"] == "parent-run"
    assert [ev.from_dict(d) for d in out["events"]] == written[:-1]
    assert out["truncated"] == [str(path_last), len(lines_of(path_last))]


# -- on a bus -----------------------------------------------------------------------


def test_on_a_bus_every_event_reaches_the_log(tmp_path: Path) -> None:
    """The bus sets ``bus``, calls start/write/flush/close from its threads."""
    import anyio

    from sluice.bus import EventBus

    path = tmp_path / "bus.jsonl"
    written = one_of_each() + transitions(500, start=100)

    async def main() -> None:
        async with EventBus(run_id="bus-run", address="tcp://s:8786", strict=True) as bus:
            bus.subscribe(EventLog(path, rotate_bytes=20_000))
            for e in written:
                bus.publish(e)

    anyio.run(main)
    assert read_header(path)["run_id"] == "bus-run"
    assert read_header(path)["address"] == "tcp://s:8786"
    assert list(read_events(path)) == written


def test_a_failed_write_leaves_no_partial_line(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    log = EventLog(path, fsync="never")
    log.write(transitions(3))
    real = log._file
    assert real is not None

    class DiskFull:
        def write(self, data: Any) -> int:
            real.write(bytes(data)[:50])  # part of the batch got out, then ENOSPC
            raise OSError(28, "No space left on device")

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    log._file = DiskFull()  # type: ignore[assignment]
    with pytest.raises(OSError, match="No space"):
        log.write(transitions(3, start=4))
    log._file = real
    # The log stays a prefix of the run: a later batch, even one that would fit,
    # is refused rather than written after a hole.
    with pytest.raises(OSError, match=r"stopped after a failed write.*from seq 7 on"):
        log.write(transitions(3, start=7))
    log.close()
    assert [e.seq for e in read_events(path)] == [1, 2, 3]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_header_that_cannot_be_written_leaves_no_open_file() -> None:
    log = EventLog("/dev/full", fsync="never")
    with pytest.raises(OSError, match="No space"):
        log.write(transitions(1))
    assert log._file is None
    with pytest.raises(OSError, match="stopped after a failed write"):
        log.write(transitions(1, start=2))
    log.close()
    # filterwarnings=error: a file object left open would fail this test with a
    # ResourceWarning when collected.
    import gc

    gc.collect()
