"""The package's public face: exports, version, the command line entry points."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import sluice

BIN = Path(sys.executable).parent


def test_public_names_are_exported_and_listed() -> None:
    assert isinstance(sluice.__all__, tuple)
    for name in sluice.__all__:
        assert getattr(sluice, name) is not None, name
    expected = {
        "Client",
        "EventBus",
        "LocalCluster",
        "Nanny",
        "NannyPlugin",
        "Scheduler",
        "SchedulerPlugin",
        "SchedulerState",
        "Security",
        "Worker",
        "WorkerPlugin",
        "as_completed",
        "get_worker",
        "wait",
    }
    assert expected <= set(sluice.__all__)
    assert sluice.__version__ == "0.1.0"


def test_contract_submodules_work_right_after_import_sluice() -> None:
    """``import sluice`` then ``sluice.config.set(...)``, as the docs write it, in a
    fresh interpreter (here earlier imports would hide a missing one)."""
    code = (
        "import sluice\n"
        "sluice.config.set({'sluice.worker.forward-events': False})\n"
        "assert sluice.config.get('sluice.worker.forward-events') is False\n"
        "assert sluice.events.TaskTransition.kind == 'task-transition'\n"
        "assert callable(sluice.replay.read_events)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_sinks_package_is_importable_as_sluice_sinks() -> None:
    import sluice.sinks.counter
    import sluice.sinks.eventlog

    assert sluice.sinks.counter.Counter.name == "counter"
    assert sluice.sinks.eventlog.EventLog.__module__ == "sluice.sinks.eventlog"


def test_help_works_as_a_command_and_as_python_dash_m() -> None:
    for argv in ([str(BIN / "sluice"), "--help"], [sys.executable, "-m", "sluice", "--help"]):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert "demo" in done.stdout


def test_unknown_subcommand_is_one_clear_error() -> None:
    done = subprocess.run(
        [str(BIN / "sluice"), "frobnicate"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2
    assert "No such command 'frobnicate'" in done.stderr


def test_demo_runs_and_its_replay_matches(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(BIN / "sluice"), "demo", "--tasks", "40", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "replayed state == live state" in done.stdout
    assert "processing -> waiting" in done.stdout  # the flaky task was retried
    from sluice.replay import read_events

    events = list(read_events(tmp_path / "events.jsonl"))
    json_lines = (tmp_path / "events.json").read_text().splitlines()
    # The JSON log holds the same events as the event log, one line each.
    assert [json.loads(line)["seq"] for line in json_lines] == [e.seq for e in events]
    assert f"JSON log:  {tmp_path / 'events.json'} ({len(events)} lines" in done.stdout
    # The worker processes share the terminal: they print nothing at INFO.
    assert "[info" not in done.stderr, done.stderr


def test_demo_refuses_a_rabbitmq_option_that_is_not_an_amqp_url() -> None:
    done = subprocess.run(
        [str(BIN / "sluice"), "demo", "--rabbitmq", "localhost"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "expected an amqp:// or amqps:// URL" in done.stderr


def test_demo_streams_to_rabbitmq_with_the_option(tmp_path: Path) -> None:
    import os
    import socket
    import uuid

    import pika
    import pytest

    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=2).close()
    except OSError:
        if os.environ.get("CI") == "true":
            pytest.fail("RabbitMQ is not running at 127.0.0.1:5672 (CI must run this test)")
        pytest.skip("RabbitMQ is not running at 127.0.0.1:5672")
    queue = f"sluice-demo-test-{uuid.uuid4().hex[:8]}"
    url = f"amqp://guest:guest@127.0.0.1:5672/%2F?queue={queue}&spool={tmp_path / 'spool'}"
    done = subprocess.run(
        [str(BIN / "sluice"), "demo", "--tasks", "20", "--out", str(tmp_path), "--rabbitmq", url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "RabbitMQ:  task transitions published to amqp://guest:***@127.0.0.1" in done.stdout
    from sluice.replay import read_events

    transitions = [
        e
        for e in read_events(tmp_path / "events.jsonl")
        if e.kind == "task-transition" and e.source == "scheduler"
    ]
    connection = pika.BlockingConnection(pika.URLParameters("amqp://guest:guest@127.0.0.1:5672/"))
    try:
        channel = connection.channel()
        depth = channel.queue_declare(queue, passive=True).method.message_count
        channel.queue_delete(queue)
    finally:
        connection.close()
    # The sink's defaults: the scheduler's task transitions (not the workers' forwarded).
    assert depth == len(transitions) > 0
