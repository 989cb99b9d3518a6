"""Sink specs (``--sink``, config ``sluice.<service>.sinks``, entry points) and JsonLog."""

from __future__ import annotations

import io
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest
from click.testing import CliRunner

from sluice import config
from sluice.bus import EventBus
from sluice.cli import main
from sluice.client import Client
from sluice.events import TaskTransition, UserEvent
from sluice.nanny import Nanny
from sluice.replay import read_events
from sluice.scheduler import Scheduler
from sluice.sinks.counter import Counter
from sluice.sinks.errors import ErrorLogger
from sluice.sinks.eventlog import EventLog
from sluice.sinks.jsonlog import JsonLog
from sluice.sinks.registry import SinkSpecError, available, sink_from_spec
from sluice.worker import Worker


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def inc(x: int) -> int:
    return x + 1


def boom(x: int) -> int:
    raise ValueError(f"boom {x}")


# -- specs -------------------------------------------------------------------------------


def test_builtin_specs_build_their_sinks(tmp_path: Path) -> None:
    assert type(sink_from_spec("counter")) is Counter
    assert type(sink_from_spec(" errors ")) is ErrorLogger
    stderr = sink_from_spec("json-log:stderr")
    assert type(stderr) is JsonLog and stderr.target == "stderr"
    assert sink_from_spec("json-log").target == "stderr"
    assert sink_from_spec("json-log:stdout").target == "stdout"
    absolute = sink_from_spec(f"json-log://{tmp_path}/a%20b.json")
    assert absolute.target == f"{tmp_path}/a b.json"
    assert sink_from_spec("json-log:rel/x.json").target == "rel/x.json"
    log = sink_from_spec(f"eventlog://{tmp_path}/run.jsonl?fsync=close&rotate-bytes=4096")
    assert type(log) is EventLog
    assert (log.path, log.fsync, log.rotate_bytes) == (tmp_path / "run.jsonl", "close", 4096)
    assert available()[:4] == ["counter", "errors", "json-log", "eventlog"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "a sink spec must be a non-empty string"),
        ("nope", "unknown sink 'nope' in spec 'nope': expected one of counter, errors"),
        ("kafka://h/t", "unknown sink 'kafka'"),
        ("counter:5", "'counter' takes no argument"),
        ("errors:x", "'errors' takes no argument"),
        ("eventlog:", "missing the file path"),
        ("eventlog://host/x", "cannot name a host ('host')"),
        ("eventlog:///tmp/x?fsync=sometimes", "fsync must be batch, close or never"),
        ("eventlog:///tmp/x?rotate-bytes=lots", "rotate-bytes must be an integer"),
        ("eventlog:///tmp/x?colour=red", "unknown eventlog option 'colour'"),
        ("json-log:///tmp/x?level=debug", "json-log takes no options"),
    ],
)
def test_bad_specs_are_one_line_errors(spec: str, message: str) -> None:
    with pytest.raises(SinkSpecError) as info:
        sink_from_spec(spec)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_an_existing_event_log_is_refused_at_build_time(tmp_path: Path) -> None:
    path = tmp_path / "old.jsonl"
    path.write_text('{"format": "sluice-event-log"}\n')
    with pytest.raises(SinkSpecError, match=r"old\.jsonl"):
        sink_from_spec(f"eventlog://{path}")


@pytest.fixture
def third_party(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An installed distribution declaring two ``sluice.sinks`` entry points."""
    site = tmp_path / "site"
    dist = site / "fancy_sinks-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fancy-sinks\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[sluice.sinks]\nfancy = fancy_sinks:from_spec\nbroken = fancy_sinks:broken\n"
        "counter = fancy_sinks:from_spec\npicky = fancy_sinks:picky\n"
    )
    (site / "fancy_sinks.py").write_text(
        textwrap.dedent(
            """
            class Fancy:
                def __init__(self, spec):
                    self.spec = spec
                    self.events = []
                def write(self, batch):
                    self.events.extend(batch)

            def from_spec(spec):
                return Fancy(spec)

            def broken(spec):
                raise RuntimeError("no fancy today")

            def picky(spec):
                raise ValueError("picky wants a colour")
            """
        )
    )
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("fancy_sinks", None)


def test_entry_points_add_sinks_but_cannot_replace_builtins(third_party: Path) -> None:
    sink = sink_from_spec("fancy://over/there?x=1")
    assert type(sink).__name__ == "Fancy" and sink.spec == "fancy://over/there?x=1"
    assert "fancy" in available()
    assert type(sink_from_spec("counter")) is Counter  # the built-in wins
    with pytest.raises(SinkSpecError, match="'fancy_sinks:broken' failed: RuntimeError: no fancy"):
        sink_from_spec("broken:x")
    with pytest.raises(SinkSpecError) as info:
        sink_from_spec("picky:")
    assert str(info.value) == "sink spec 'picky:': picky wants a colour"


# -- services ----------------------------------------------------------------------------


def test_scheduler_takes_specs_from_its_argument_or_from_config(tmp_path: Path) -> None:
    s = Scheduler(sinks=["counter", f"json-log://{tmp_path}/j.json"])
    assert {"counter", "json-log"} <= set(s.bus.stats())
    with config.set({"sluice.scheduler.sinks": ["errors"]}):
        assert "errors" in Scheduler().bus.stats()
        given = Scheduler(sinks="counter")  # the argument replaces the config, as for preloads
        assert "counter" in given.bus.stats() and "errors" not in given.bus.stats()
    with pytest.raises(SinkSpecError, match="unknown sink 'nope'"):
        Scheduler(sinks=["nope"])
    s.add_sink("errors")
    assert "errors" in s.bus.stats()


def test_cli_refuses_a_bad_sink_in_one_line_before_listening() -> None:
    runner = CliRunner()
    for args in (
        ["scheduler", "--port", "0", "--sink", "nope"],
        ["worker", "tcp://127.0.0.1:9", "--no-nanny", "--sink", "counter:x"],
        ["worker", "tcp://127.0.0.1:9", "--sink", "eventlog:"],
    ):
        result = runner.invoke(main, args)
        assert result.exit_code == 1, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), result.output


def test_nanny_checks_its_worker_sink_specs_and_hands_them_to_the_child() -> None:
    nanny = Nanny("tcp://127.0.0.1:9", sinks=["counter", "json-log:stderr"])
    command = nanny._command(3)
    assert command.count("--sink") == 2
    assert command[command.index("--sink") + 1] == "counter"
    with config.set({"sluice.worker.sinks": "errors"}):
        assert Nanny("tcp://127.0.0.1:9").worker_sinks == ["errors"]
    with pytest.raises(SinkSpecError, match="unknown sink 'nope'"):
        Nanny("tcp://127.0.0.1:9", sinks=["nope"])
    with pytest.raises(TypeError, match="spec strings"):
        Nanny("tcp://127.0.0.1:9", sinks=[Counter()])  # type: ignore[list-item]


@pytest.mark.anyio
async def test_json_log_and_event_log_from_specs_record_the_same_run(tmp_path: Path) -> None:
    """A whole run: one JSON line per event, matching the event log line for line."""
    json_path = tmp_path / "logs" / "events.json"
    log_path = tmp_path / "run.jsonl"
    sinks = [f"json-log://{json_path}", f"eventlog://{log_path}?fsync=close"]
    async with Scheduler(port=0, sinks=sinks) as s:
        async with (
            Worker(s.address, nthreads=1, sinks=["counter"]) as w,
            Client(s.address, asynchronous=True) as c,
        ):
            futures = c.map(inc, range(20))
            assert await c.gather(futures) == list(range(1, 21))
            bad = c.submit(boom, 7)
            with pytest.raises(ValueError, match="boom 7"):
                await bad
            worker_counter = w.bus._subs["counter"].consumer
        address = s.address
    lines = [json.loads(line) for line in json_path.read_text().splitlines()]
    logged = list(read_events(log_path))
    assert [(d["seq"], d["event"]) for d in lines] == [(e.seq, e.kind) for e in logged]
    assert len(lines) > 60
    erred = [d for d in lines if d.get("finish") in ("erred", "error")]
    # The scheduler's erred transition and the worker's own (forwarded) error transition.
    assert sorted(d["finish"] for d in erred) == ["erred", "error"]
    assert all(d["level"] == "error" and "boom 7" in d["exception"] for d in erred)
    assert {d["level"] for d in lines if d not in erred} == {"info"}
    assert all(d["timestamp"].endswith("Z") and d["logger"] == "sluice.events" for d in lines)
    assert lines[0]["event"] == "scheduler-started" and lines[0]["address"] == address
    # The worker's own bus had a counter of its own: it saw the worker's transitions.
    assert worker_counter.by_edge[("executing", "memory")] == 20


# -- JsonLog -----------------------------------------------------------------------------


def test_json_log_line_shape() -> None:
    out = io.BytesIO()
    sink = JsonLog(out, logger="my.events")
    sink.write(
        [
            TaskTransition(seq=3, time=0.25, key=("x", 1), start="processing", finish="memory"),
            UserEvent(seq=4, time=1.0, topic="t", msg={"obj": object}),
        ]
    )
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert list(first)[:5] == ["timestamp", "level", "logger", "event", "seq"]
    assert first["timestamp"] == "1970-01-01T00:00:00.250000Z"
    assert (first["key"], first["start"], first["finish"]) == (["x", 1], "processing", "memory")
    assert first["logger"] == "my.events" and "kind" not in first and "time" not in first
    # What JSON cannot hold is written as its repr instead of losing the batch.
    assert second["event"] == "user-event" and second["msg"] == {"obj": repr(object)}


@pytest.mark.anyio
async def test_json_log_appends_to_a_file_a_shipper_follows(tmp_path: Path) -> None:
    path = tmp_path / "events.json"
    path.write_text('{"event": "from before"}\n')
    async with EventBus() as bus:
        bus.subscribe(JsonLog(path))
        for i in range(1, 1001):
            bus.publish(TaskTransition(seq=i, key=f"k{i}", start="waiting", finish="processing"))
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"event": "from before"}
    assert [json.loads(line)["seq"] for line in lines[1:]] == list(range(1, 1001))


@pytest.mark.anyio
async def test_json_log_to_stdout(capfdbinary: Any) -> None:
    async with EventBus() as bus:
        bus.subscribe(sink_from_spec("json-log:stdout"))
        bus.publish(TaskTransition(seq=1, key="a", start="released", finish="waiting"))
    await anyio.lowlevel.checkpoint()
    out = capfdbinary.readouterr().out
    assert json.loads(out)["key"] == "a"


@pytest.mark.anyio
async def test_each_sink_module_is_a_preload_with_its_own_options(tmp_path: Path) -> None:
    json_path = tmp_path / "events.json"
    log_path = tmp_path / "run.jsonl"
    preload = [
        "sluice.sinks.counter",
        "sluice.sinks.errors",
        "sluice.sinks.jsonlog",
        "sluice.sinks.eventlog",
    ]
    argv = [[], [], ["--json-log-target", str(json_path)], ["--eventlog-path", str(log_path)]]
    async with Scheduler(port=0, preload=preload, preload_argv=argv) as s:
        assert {"counter", "errors", "json-log", "eventlog"} <= set(s.bus.stats())
        async with Worker(s.address), Client(s.address, asynchronous=True) as c:
            assert await c.submit(inc, 1) == 2
            counter = s.bus._subs["counter"].consumer
    assert counter.count == 1
    seqs = [e.seq for e in read_events(log_path)]
    assert [json.loads(line)["seq"] for line in json_path.read_text().splitlines()] == seqs
