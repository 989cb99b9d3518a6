"""Each event is encoded to JSON once, and the sinks that write JSON share the bytes."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import orjson
import pytest
import structlog

from sluice.events import TaskTransition, UserEvent, from_dict
from sluice.replay import read_events
from sluice.sinks._json import event_json
from sluice.sinks.eventlog import _encode
from sluice.sinks.jsonlog import JsonLog
from sluice.sinks.rabbitmq import RabbitMQ

SMALL_RUN = Path(__file__).parent.parent / "examples" / "logs" / "small-run.jsonl"


def test_to_json_is_computed_once_and_is_not_part_of_the_value() -> None:
    event = TaskTransition(seq=3, time=1.5, key=("x", 1), start="waiting", finish="processing")
    data = event.to_json()
    assert event.to_json() is data
    assert orjson.loads(data) == orjson.loads(orjson.dumps(event.to_dict()))
    # A copy with another seq is another event: its own encoding, not the cached one.
    moved = attrs.evolve(event, seq=4)
    assert orjson.loads(moved.to_json())["seq"] == 4
    # The cache is invisible: equality, hashing, repr and the dict ignore it.
    fresh = TaskTransition(seq=3, time=1.5, key=("x", 1), start="waiting", finish="processing")
    assert fresh == event and hash(fresh) == hash(event)
    assert repr(fresh) == repr(event) and "_json" not in event.to_dict()
    assert from_dict(orjson.loads(data)) == event


def test_unencodable_values_warn_once_for_all_sinks(caplog: pytest.LogCaptureFixture) -> None:
    event = UserEvent(seq=7, time=1.0, topic="t", msg={"obj": object})
    with pytest.raises(TypeError):
        event.to_json()
    caplog.set_level(logging.WARNING, logger="sluice.sinks")
    first = event_json(event)
    line = _encode([event])  # the event log, after another sink encoded it
    assert line == first + b"\n"
    assert orjson.loads(first)["msg"] == {"obj": repr(object)}
    warnings = [r for r in caplog.records if "not JSON-safe" in r.getMessage()]
    assert len(warnings) == 1


def test_event_log_lines_are_the_shared_encoding() -> None:
    events = list(read_events(SMALL_RUN))
    data = _encode(events)
    assert data.splitlines() == [e.to_json() for e in events]
    assert _encode([]) == b""


def _structlog_line(sink: JsonLog, event: Any) -> bytes:
    level = "error" if getattr(event, "finish", None) in ("erred", "error") else "info"
    return sink._render_with_structlog(event, level)


def test_json_log_fast_lines_equal_structlog_rendering() -> None:
    """Without extra processors the line is spliced from the shared encoding; it must be
    byte for byte what structlog's add_log_level + JSONRenderer make of the event."""
    sink = JsonLog(io.BytesIO(), logger='odd "name"')
    events = [*read_events(SMALL_RUN)]
    erred = TaskTransition(
        seq=len(events) + 1,
        time=1764000000.999999,
        key=("k", 2),
        start="processing",
        finish="erred",
        exception="ValueError('x')",
        traceback="Traceback...",
    )
    events.append(erred)
    # Across whole seconds, back to an earlier one, and a fraction that rounds up to
    # the next second: the line's cached start must follow each.
    for i, t in enumerate((1764000000.9999996, 1764000001.5, 1764000000.25, 1764000002.0)):
        events.append(
            TaskTransition(seq=len(events) + 1, time=t, key=("t", i), start="a", finish="b")
        )
    kinds = {e.kind for e in events}
    assert {"task-transition", "graph-updated", "worker-added"} <= kinds
    for event in events:
        assert sink.render(event) == _structlog_line(sink, event), event
    assert b'"2025-11-24T16:00:01.000000Z"' in sink.render(events[-4])
    assert json.loads(sink.render(erred))["level"] == "error"


def _transitions(first: int, last: int) -> list[TaskTransition]:
    return [
        TaskTransition(seq=i, time=1764000000.0 + i, key=("t", i), start="a", finish="b")
        for i in range(first, last + 1)
    ]


@pytest.mark.parametrize("cut", [0, 30, -1], ids=["whole-lines", "mid-line", "all"])
def test_a_resumed_json_log_has_each_line_once_and_none_broken(tmp_path: Path, cut: int) -> None:
    # Yesterday's run, then this run's first batch; its writer died in the second,
    # with three lines and ``cut`` bytes of the fourth written.
    path = tmp_path / "run.json"
    old = JsonLog(path)
    old.write(_transitions(1, 50))  # an earlier run's seqs: never taken for this one's
    old.close()
    first = JsonLog(path)
    first.write(_transitions(1, 10))
    first.close()
    partial = b"".join(first.render(e) for e in _transitions(11, 14))
    end = len(partial) if cut < 0 else len(partial) - len(first.render(_transitions(14, 14)[0]))
    with open(path, "ab") as f:
        f.write(partial[: end + max(cut, 0)])
    resumed = JsonLog(path, resume=True)
    resumed.write(_transitions(11, 20))
    resumed.write(_transitions(21, 22))
    resumed.close()
    seqs = [json.loads(line)["seq"] for line in path.read_bytes().splitlines()]
    assert seqs == [*range(1, 51), *range(1, 23)]


def test_a_resumed_json_log_whose_last_line_is_an_earlier_batch_skips_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "run.json"
    first = JsonLog(path)
    first.write(_transitions(1, 10))  # written and acknowledged; died before the next
    first.close()
    resumed = JsonLog(path, resume=True)
    resumed.write(_transitions(11, 20))
    resumed.close()
    seqs = [json.loads(line)["seq"] for line in path.read_bytes().splitlines()]
    assert seqs == list(range(1, 21))


def test_json_log_runs_structlog_processors_given() -> None:
    def add_service(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        event_dict["service"] = "billing"
        return event_dict

    out = io.BytesIO()
    sink = JsonLog(out, processors=[add_service, structlog.processors.add_log_level])
    sink.write([TaskTransition(seq=1, time=0.5, key="a", start="released", finish="waiting")])
    line = json.loads(out.getvalue())
    assert line["service"] == "billing" and line["event"] == "task-transition"
    assert line["key"] == "a" and line["timestamp"] == "1970-01-01T00:00:00.500000Z"


def test_rabbitmq_publishes_the_schedulers_own_events_unless_forwarded(tmp_path: Path) -> None:
    own = TaskTransition(seq=1, key="a", start="released", finish="waiting")
    forwarded = TaskTransition(
        seq=2, key="a", start="ready", finish="executing", source="tcp://10.0.0.2:4000"
    )
    on_worker = TaskTransition(
        seq=3, key="a", start="ready", finish="executing", source="tcp://10.0.0.9:4000"
    )
    sink = RabbitMQ(spool=tmp_path / "a")
    everything = RabbitMQ(spool=tmp_path / "b", forwarded=True)
    try:
        assert not sink.forwarded and everything.forwarded
        # A sink that no bus runs (written to directly) publishes what it is given.
        assert sink._own([own, forwarded]) == [own, forwarded]
        sink.bus = everything.bus = SimpleNamespace(address="tcp://10.0.0.1:8786")  # type: ignore[assignment]
        assert sink._own([own, forwarded]) == [own]
        assert everything._own([own, forwarded]) == [own, forwarded]
        # On a worker's bus the worker's own events carry its address.
        sink.bus = SimpleNamespace(address="tcp://10.0.0.9:4000")  # type: ignore[assignment]
        assert sink._own([on_worker]) == [on_worker]
        # The message: the shared encoding as body, the queue's name as routing key.
        mid, key, body = sink._encode(own)
        assert body is own.to_json() and key == "sluice-events"
        assert mid == f"{sink.run_id}:1"
    finally:
        sink.close()
        everything.close()
    from_url = RabbitMQ.from_url(f"amqp://h/?forwarded=true&spool={tmp_path / 'c'}")
    from_url.close()
    assert from_url.forwarded
