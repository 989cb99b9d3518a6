"""File sinks in a child process (``?process=true``): the same bytes as in-process,
one child for a service's hosted sinks, and failures raised, not hung on."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import orjson
import pytest

from sluice import config
from sluice.bus import EventBus
from sluice.events import Event, GraphUpdated, TaskTransition, UserEvent
from sluice.replay import EventLogReader, read_events, read_header
from sluice.sinks._child import ChildSink, ChildSinkError
from sluice.sinks.registry import SinkSpecError, sink_from_spec, sinks_from_config
from sluice_processes import thread_niceness

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def run_events(n: int = 500) -> list[Event]:
    """Fresh events of the kinds a run has, with tuple keys and a failure among them."""
    events: list[Event] = [
        GraphUpdated(
            seq=1,
            time=1_700_000_000.25,
            client="c1",
            keys=(("inc", 0), "x"),
            dependencies={("inc", 0): (), "x": (("inc", 0),)},
        )
    ]
    for i in range(2, n + 1):
        finish = "erred" if i % 97 == 0 else "memory"
        events.append(
            TaskTransition(
                seq=i,
                time=1_700_000_000.0 + i / 7,
                key=("inc", i),
                start="processing",
                finish=finish,
                source="scheduler" if i % 2 else "tcp://127.0.0.1:4000",
            )
        )
    events.append(UserEvent(seq=n + 1, time=1_700_000_999.5, topic="t", msg={"a": [1, 2]}))
    return events


async def publish(sinks: list[object], events: list[Event]) -> str:
    async with EventBus() as bus:
        for i, sink in enumerate(sinks):
            bus.subscribe(sink, name=f"sink-{i}")
        for start in range(0, len(events), 150):  # several batches
            bus.publish_many(events[start : start + 150])
            await bus.drain()
        return bus.run_id


async def test_a_json_log_in_a_child_writes_the_bytes_the_in_process_one_writes(
    tmp_path: Path,
) -> None:
    hosted = sink_from_spec(f"json-log://{tmp_path}/child.json?process=true")
    assert isinstance(hosted, ChildSink)
    await publish([hosted, sink_from_spec(f"json-log://{tmp_path}/here.json")], run_events())
    child = (tmp_path / "child.json").read_bytes()
    assert child == (tmp_path / "here.json").read_bytes()
    assert child.count(b"\n") == len(run_events())
    assert hosted.pid is not None


async def test_an_event_log_in_a_child_is_the_run_with_the_buses_run_id(tmp_path: Path) -> None:
    events = run_events()
    run_id = await publish(
        [sink_from_spec(f"eventlog://{tmp_path}/run.jsonl?process=true")], events
    )
    assert [e.to_dict() for e in read_events(tmp_path / "run.jsonl")] == [
        e.to_dict() for e in events
    ]
    assert read_header(tmp_path / "run.jsonl")["run_id"] == run_id


async def test_a_services_hosted_sinks_share_one_child_in_the_first_ones_place(
    tmp_path: Path,
) -> None:
    sinks = sinks_from_config(
        "scheduler",
        [
            "counter",
            f"json-log://{tmp_path}/a.json?process=true",
            "errors",
            f"eventlog://{tmp_path}/b.jsonl?process=true&fsync=close",
        ],
    )
    assert [type(s).__name__ for s in sinks] == ["Counter", "ChildSink", "ErrorLogger"]
    shared = sinks[1]
    assert shared.name == "json-log+eventlog"
    assert shared.specs == [
        f"json-log:{tmp_path}/a.json",
        f"eventlog:{tmp_path}/b.jsonl?fsync=close",
    ]
    events = run_events()
    await publish(sinks, events)
    assert (tmp_path / "a.json").read_bytes().count(b"\n") == len(events)
    assert len(list(read_events(tmp_path / "b.jsonl"))) == len(events)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("json-log:///tmp/x.json?process=maybe", "process must be true or false, not 'maybe'"),
        ("json-log:stderr?colour=1", "json-log takes no options but process (['colour'])"),
        ("eventlog:///tmp/x.jsonl?process=yes&fsync=sometimes", "fsync must be batch"),
    ],
)
def test_a_bad_process_option_is_a_one_line_spec_error(spec: str, message: str) -> None:
    with pytest.raises(SinkSpecError, match=re.escape(message)) as err:
        sink_from_spec(spec)
    assert "\n" not in str(err.value)


def test_an_existing_event_log_fails_at_the_spec_not_in_the_child(tmp_path: Path) -> None:
    (tmp_path / "old.jsonl").write_text("something\n")
    with pytest.raises(SinkSpecError, match=r"old\.jsonl"):
        sink_from_spec(f"eventlog://{tmp_path}/old.jsonl?process=true")


def test_a_child_that_cannot_open_its_file_fails_to_start_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    sink = sink_from_spec(f"json-log://{tmp_path}/a-file/log.json?process=true")
    with pytest.raises(ChildSinkError) as err:
        sink.start()
    assert "json-log in a child process:" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(ChildSinkError, match=r"nothing is written|not written"):
        sink.write(run_events(3))
    sink.close()


async def test_a_drained_bus_means_the_childs_event_log_holds_every_event(
    tmp_path: Path,
) -> None:
    # As with the in-process sink: once drain() returns, the file is complete, with
    # no flush and the child still running (the scheduler's catch-up reads it then).
    path = tmp_path / "run.jsonl"
    events = run_events(400)
    async with EventBus() as bus:
        bus.subscribe(sink_from_spec(f"eventlog://{path}?process=true"), name="log")
        for start in range(0, len(events), 100):
            bus.publish_many(events[start : start + 100])
            await bus.drain()
            logged = [e.seq for e in read_events(path)]
            assert logged == [e.seq for e in events[: start + 100]]


def shared_child(tmp_path: Path, *specs: str) -> ChildSink:
    """The scheduler's file sinks' child for ``specs`` (default: a JSON log and an event log)."""
    specs = specs or (f"json-log://{tmp_path}/log.json", f"eventlog://{tmp_path}/run.jsonl")
    [sink] = sinks_from_config("scheduler", list(specs))
    assert isinstance(sink, ChildSink)
    sink.bus = types.SimpleNamespace(run_id="run-1", address=None)
    return sink


def json_log_seqs(path: Path) -> list[int]:
    return [orjson.loads(line)["seq"] for line in path.read_bytes().splitlines()]


def test_a_killed_child_is_replaced_and_its_files_read_as_if_it_had_not_died(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sink = shared_child(tmp_path)
    events = run_events(300)
    sink.start()
    sink.write(events[:100])
    first = sink.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    sink._proc.wait(10)  # type: ignore[union-attr]  # dead, not dying, before the write
    with caplog.at_level(logging.WARNING, logger="sluice.sinks"):
        sink.write(events[100:200])  # no error: a new child took it
    assert sink.restarts == 1 and sink.pid not in (None, first)
    assert "its child process died (the child process exited (code -9))" in caplog.text
    sink.write(events[200:])
    sink.close()
    reader = EventLogReader(tmp_path / "run.jsonl")
    assert [e.seq for e in reader] == [e.seq for e in events]
    assert reader.truncated is None and reader.run_id == "run-1"
    assert json_log_seqs(tmp_path / "log.json") == [e.seq for e in events]


def test_a_child_killed_with_a_batch_in_flight_is_replaced_and_sent_it_again(
    tmp_path: Path,
) -> None:
    sink = shared_child(tmp_path)
    events = run_events(300)
    sink.write(events[:100])
    pid = sink.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # the next batch waits in the pipe, unread
    failures: list[BaseException] = []

    def write() -> None:
        try:
            sink.write(events[100:])
        except BaseException as exc:
            failures.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    # The write is in flight once the pipe holds it (the child reads nothing now).
    deadline = time.monotonic() + 30
    while pipe_bytes(sink) == 0:
        assert time.monotonic() < deadline, "the batch never reached the pipe"
        time.sleep(0.01)  # polling the pipe: nothing to wait on
    os.kill(pid, signal.SIGKILL)
    writer.join(30)
    assert not writer.is_alive() and not failures
    assert sink.restarts == 1
    sink.close()
    assert [e.seq for e in read_events(tmp_path / "run.jsonl")] == [e.seq for e in events]
    assert json_log_seqs(tmp_path / "log.json") == [e.seq for e in events]


def pipe_bytes(sink: ChildSink) -> int:
    """Bytes waiting in the pipe down to the child (Linux FIONREAD on the write end)."""
    import fcntl
    import termios

    buf = bytearray(4)
    fcntl.ioctl(sink._down.fileno(), termios.FIONREAD, buf)  # type: ignore[union-attr]
    return int.from_bytes(buf, sys.byteorder)


def test_a_sink_that_failed_stays_out_of_the_replacement_child(tmp_path: Path) -> None:
    # /dev/full takes the open and fails every write that reaches it.
    sink = shared_child(tmp_path, "json-log:///dev/full", f"eventlog://{tmp_path}/run.jsonl")
    events = run_events(300)
    with pytest.raises(ChildSinkError, match=r"json-log: OSError"):
        sink.write(events[:100])
    assert sink.pid is not None
    os.kill(sink.pid, signal.SIGKILL)
    sink._proc.wait(10)  # type: ignore[union-attr]
    sink.write(events[100:])  # the replacement gives the JSON log nothing: no error
    sink.close()
    assert sink.restarts == 1
    assert [e.seq for e in read_events(tmp_path / "run.jsonl")] == [e.seq for e in events]


def test_a_child_that_dies_at_every_batch_is_given_up_after_three_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "dying_child.py").write_text(
        "import os, sys\n"
        "from sluice._child_process import child_pipes\n"
        "down, up = child_pipes(sys.argv[1:])\n"
        "down.recv()\n"
        "up.send(('ready',))\n"
        "down.recv_bytes()\n"
        "os._exit(3)\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    sink = shared_child(tmp_path)
    sink.module = "dying_child"
    with (
        caplog.at_level(logging.WARNING, logger="sluice.sinks"),
        pytest.raises(ChildSinkError, match=r"exited \(code 3\).*not written") as err,
    ):
        sink.write(run_events(3))
    assert "\n" not in str(err.value)
    assert sink.restarts == 3
    assert "died 4 times in a row" in caplog.text
    with pytest.raises(ChildSinkError, match=r"exited \(code 3\)"):
        sink.write(run_events(3))  # given up: no more children
    assert sink.restarts == 3
    sink.close()


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_the_child_runs_below_the_parents_cpu_priority(tmp_path: Path) -> None:
    # On busy cores the scheduler and its workers go first; the child's work waits.
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    for nice, spec in ((None, "run.jsonl"), (5, "other.jsonl")):
        with config.set({} if nice is None else {"sluice.sinks.child-nice": nice}):
            sink = sink_from_spec(f"eventlog://{tmp_path}/{spec}?process=true")
            sink.start()
        try:
            assert sink.pid is not None
            assert thread_niceness(sink.pid) == {min(19, mine + (nice or 19))}
        finally:
            sink.close()


def test_a_bad_child_niceness_is_refused_before_a_child_starts(tmp_path: Path) -> None:
    sink = sink_from_spec(f"eventlog://{tmp_path}/run.jsonl?process=true")
    with (
        config.set({"sluice.sinks.child-nice": 25}),
        pytest.raises(config.ConfigError, match=r"sluice\.sinks\.child-nice must be a whole"),
    ):
        sink.start()
    assert sink.pid is None
    assert not (tmp_path / "run.jsonl").exists()


def test_the_child_outlives_a_ctrl_c_to_its_process_group(tmp_path: Path) -> None:
    # Ctrl-C (or systemd's stop) signals every process of the group; the scheduler
    # then closes its sinks, and the child must still be there to write the rest.
    sink = sink_from_spec(f"eventlog://{tmp_path}/run.jsonl?process=true")
    sink.start()
    events = run_events(200)
    sink.write(events[:100])
    sink.flush()
    assert sink.pid is not None
    for signum in (signal.SIGINT, signal.SIGTERM):
        os.kill(sink.pid, signum)
    sink.write(events[100:])
    sink.flush()
    sink.close()
    assert sink._proc.returncode == 0  # type: ignore[union-attr]
    assert [e.seq for e in read_events(tmp_path / "run.jsonl")] == [e.seq for e in events]


def test_a_failing_sink_in_a_shared_child_is_reported_once_and_the_other_goes_on(
    tmp_path: Path,
) -> None:
    # /dev/full takes the open and fails every write that reaches it.
    [sink] = sinks_from_config(
        "scheduler",
        ["json-log:///dev/full?process=true", f"eventlog://{tmp_path}/run.jsonl?process=true"],
    )
    sink.start()
    events = run_events(600)
    with pytest.raises(ChildSinkError, match=r"json-log: OSError.*writes nothing more"):
        sink.write(events[:300])  # reported by the write that failed, not a later call
    sink.write(events[300:])  # the failure was reported: the event log goes on
    sink.flush()
    sink.close()
    assert [e.seq for e in read_events(tmp_path / "run.jsonl")] == [e.seq for e in events]


def inc(x: int) -> int:
    return x + 1


@pytest.mark.timeout(120)
def test_a_scheduler_with_hosted_sinks_logs_its_run_like_the_in_process_log(
    tmp_path: Path,
) -> None:
    from sluice.client import Client
    from sluice.deploy import LocalCluster

    sinks = [
        f"json-log://{tmp_path}/run.json?process=true",
        f"eventlog://{tmp_path}/hosted.jsonl?process=true",
    ]
    cluster = LocalCluster(
        n_workers=2, processes=False, sinks=sinks, event_log=tmp_path / "here.jsonl"
    )
    with cluster, Client(cluster) as client:
        assert client.gather(client.map(inc, range(50))) == list(range(1, 51))
    # Both logs were written from the same bus: the same events, run id and address.
    hosted = [e.to_dict() for e in read_events(tmp_path / "hosted.jsonl")]
    assert hosted == [e.to_dict() for e in read_events(tmp_path / "here.jsonl")]
    header, expected = (read_header(tmp_path / name) for name in ("hosted.jsonl", "here.jsonl"))
    del header["started"], expected["started"]  # when each log was opened
    assert header == expected
    finished = {
        e["key"] for e in hosted if e["kind"] == "task-transition" and e["finish"] == "memory"
    }
    assert len(finished) == 50
    lines = (tmp_path / "run.json").read_bytes().splitlines()
    assert len(lines) == len(hosted)


@pytest.mark.timeout(120)
def test_a_schedulers_run_outlives_its_file_sinks_child_and_logs_every_event(
    tmp_path: Path,
) -> None:
    from sluice.client import Client
    from sluice.deploy import LocalCluster

    cluster = LocalCluster(
        n_workers=2,
        processes=False,
        sinks=[f"json-log://{tmp_path}/run.json"],
        event_log=tmp_path / "run.jsonl",
    )
    with cluster, Client(cluster) as client:
        assert client.gather(client.map(inc, range(50))) == list(range(1, 51))
        [child] = [
            sub.consumer
            for sub in cluster.scheduler.bus.subscriptions.values()
            if isinstance(sub.consumer, ChildSink)
        ]
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        assert client.gather(client.map(inc, range(50, 100))) == list(range(51, 101))
        assert child.restarts == 1
    reader = EventLogReader(tmp_path / "run.jsonl")
    logged = list(reader)
    assert reader.truncated is None
    # Every event of the run, once: the bus stamps seqs 1, 2, 3... and the log takes all.
    assert [e.seq for e in logged] == list(range(1, len(logged) + 1))
    assert logged[-1].kind == "scheduler-closing"
    finished = {e.key for e in logged if e.kind == "task-transition" and e.finish == "memory"}
    assert len(finished) == 100
    assert json_log_seqs(tmp_path / "run.json") == [e.seq for e in logged]


def test_what_a_killed_parent_had_sent_is_still_written(tmp_path: Path) -> None:
    # The scheduler's process dies at once (SIGKILL) right after handing a batch
    # over: the child reads what is in the pipe, then EOF, and closes the log.
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_sink_child import run_events
from sluice.sinks.registry import sink_from_spec
sink = sink_from_spec("eventlog://{tmp_path}/run.jsonl?process=true&fsync=close")
sink.start()
print(sink.pid, flush=True)
sink.write(run_events(2000))
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # Not our child (init adopts it, and may leave it a zombie): a pidfd becomes
    # readable when it has exited.
    with contextlib.suppress(ProcessLookupError):
        pidfd = os.pidfd_open(int(proc.stdout.split()[0]))
        try:
            assert select.select([pidfd], [], [], 30)[0], "the child did not exit"
        finally:
            os.close(pidfd)
    assert [e.seq for e in read_events(tmp_path / "run.jsonl")] == list(range(1, 2002))


# -- where a service's file sinks run by default ---------------------------------------------


def test_the_schedulers_file_sinks_and_event_log_share_one_child_by_default(
    tmp_path: Path,
) -> None:
    from sluice.scheduler import Scheduler

    s = Scheduler(
        event_log=tmp_path / "run.jsonl",
        sinks=["counter", f"json-log://{tmp_path}/a.json", "json-log:stderr"],
    )
    subs = list(s.bus.subscriptions.values())
    hosted = [sub.consumer for sub in subs if isinstance(sub.consumer, ChildSink)]
    # The event log is subscribed first of the sinks (it starts at seq 1), in the child.
    [child] = hosted
    assert subs[1].consumer is child and child.name == "eventlog+json-log"
    assert child.specs == [f"eventlog:{tmp_path}/run.jsonl", f"json-log:{tmp_path}/a.json"]
    assert {"counter", "json-log"} <= {sub.name for sub in subs}  # stderr stays here


def test_process_false_or_the_config_keeps_file_sinks_in_the_process(tmp_path: Path) -> None:
    from sluice.scheduler import Scheduler
    from sluice.sinks.eventlog import EventLog
    from sluice.sinks.jsonlog import JsonLog

    spec = f"json-log://{tmp_path}/a.json"
    assert type(sink_from_spec(spec, service="scheduler")) is ChildSink
    for built in (
        sink_from_spec(f"{spec}?process=false", service="scheduler"),
        sink_from_spec(spec, service="worker"),  # a worker's CPU is for its tasks
        sink_from_spec(spec),  # no service: as written
    ):
        assert type(built) is JsonLog
    with config.set({"sluice.scheduler.file-sinks-in-child": False}):
        s = Scheduler(event_log=tmp_path / "run.jsonl", sinks=[spec])
        kinds = [type(sub.consumer) for sub in s.bus.subscriptions.values()]
        assert kinds[1:] == [EventLog, JsonLog]
    with config.set({"sluice.worker.file-sinks-in-child": True}):
        assert type(sink_from_spec(spec, service="worker")) is ChildSink
    with (
        config.set({"sluice.scheduler.file-sinks-in-child": "yes"}),
        pytest.raises(config.ConfigError, match="file-sinks-in-child must be true or false"),
    ):
        Scheduler(sinks=[spec])
