"""`sluice events ADDRESS`: the live tail, run as a real process against a real cluster.

A `sluice scheduler` and one `sluice worker` run as processes (the worker does
not forward its own transitions, so each task makes exactly three: released ->
waiting -> processing -> memory). The test submits tasks with a Client while
`sluice events` runs as a subprocess, and compares what it printed with the
scheduler's own bus history.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from sluice.client import Client
from sluice.events import Key
from sluice_processes import SLUICE, SluiceProcesses, wait_until

pytestmark = pytest.mark.timeout(120)

# The scheduler process cannot import this module: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

TRANSITIONS = [("released", "waiting"), ("waiting", "processing"), ("processing", "memory")]


# Run on the scheduler, through Client.run_on_scheduler.
def _n_workers(dask_scheduler: Any) -> int:
    return len(dask_scheduler.workers)


def _event_streams(dask_scheduler: Any) -> list[str]:
    return sorted(n for n in dask_scheduler.bus.subscriptions if n.startswith("client-events-"))


def _history(dask_scheduler: Any) -> list[dict[str, Any]]:
    return [e.to_dict() for e in dask_scheduler.bus.history]


def inc(x: int) -> int:
    return x + 1


def fail(x: int) -> int:
    raise ZeroDivisionError(f"bad input {x}")


class Cluster(SluiceProcesses):
    def start(self) -> None:
        self.scheduler = self.spawn(
            "scheduler", "--port", "0", "--scheduler-file", str(self.scheduler_file)
        )
        wait_until(self.scheduler_file.exists, 30, "the scheduler file")
        self.spawn(
            "worker",
            "--scheduler-file",
            str(self.scheduler_file),
            "--no-nanny",
            "--no-forward-events",
        )


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def client(cluster: Cluster) -> Iterator[Client]:
    with Client(cluster.address) as c:
        wait_until(lambda: c.run_on_scheduler(_n_workers) == 1, 60, "the worker to register")
        yield c


class Tails:
    """`sluice events` subprocesses; whatever is still running at the end is killed."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [*SLUICE, "events", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        return proc

    def start_subscribed(self, client: Client, *args: str) -> subprocess.Popen[str]:
        """Start a tail and wait until the scheduler streams events to it."""
        before = set(client.run_on_scheduler(_event_streams))
        proc = self.start(*args)

        def subscribed() -> bool:
            if proc.poll() is not None:
                out, err = proc.communicate()
                raise AssertionError(f"sluice events exited early: {out}{err}")
            return bool(set(client.run_on_scheduler(_event_streams)) - before)

        wait_until(subscribed, 60, "sluice events to subscribe")
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


@pytest.fixture
def tails() -> Iterator[Tails]:
    t = Tails()
    try:
        yield t
    finally:
        t.close()


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


def history(client: Client, kind: str | None = None, after: int = 0) -> list[dict[str, Any]]:
    """The scheduler's events as JSON would carry them (tuples become lists)."""
    events = json.loads(json.dumps(client.run_on_scheduler(_history)))
    return [d for d in events if d["seq"] > after and (kind is None or d["kind"] == kind)]


def last_seq(client: Client) -> int:
    return int(history(client)[-1]["seq"])


def by_key(lines: list[dict[str, Any]]) -> dict[Any, list[tuple[str, str]]]:
    stories: dict[Any, list[tuple[str, str]]] = {}
    for d in lines:
        key = tuple(d["key"]) if isinstance(d["key"], list) else d["key"]
        stories.setdefault(key, []).append((d["start"], d["finish"]))
    return stories


def test_json_lines_are_the_transitions_in_seq_order(
    cluster: Cluster, client: Client, tails: Tails
) -> None:
    tail = tails.start_subscribed(
        client, cluster.address, "--json", "--count", "9", "--kind", "task-transition"
    )
    futures = client.map(inc, range(3))
    assert client.gather(futures) == [1, 2, 3]
    code, out, err = finish(tail)
    assert (code, err) == (0, "")
    lines = [json.loads(line) for line in out.splitlines()]
    # Exactly the scheduler's own transitions (event.to_dict(), every field), in order.
    assert lines == history(client, "task-transition")[:9]
    seqs = [d["seq"] for d in lines]
    assert seqs == sorted(seqs) and len(set(seqs)) == 9
    assert by_key(lines) == {f.key: TRANSITIONS for f in futures}


def test_key_filter_with_tuple_keys_and_a_scheduler_file(
    cluster: Cluster, client: Client, tails: Tails
) -> None:
    tail = tails.start_subscribed(
        client,
        "--scheduler-file",
        str(cluster.scheduler_file),
        "--json",
        "--kind",
        "task-transition",
        "--key",
        '["x", 1]',
        "--key",
        "y",
        "--count",
        "6",
    )
    keys: list[Key] = [("x", 1), "z", "y", ("x", 2)]
    futures = [client.submit(inc, i, key=k) for i, k in enumerate(keys)]
    assert client.gather(futures) == [1, 2, 3, 4]
    code, out, err = finish(tail)
    assert (code, err) == (0, "")
    lines = [json.loads(line) for line in out.splitlines()]
    assert by_key(lines) == {("x", 1): TRANSITIONS, "y": TRANSITIONS}
    wanted = [d for d in history(client, "task-transition") if d["key"] in (["x", 1], "y")]
    assert lines == wanted[:6]


def test_since_catches_up_without_gap_or_duplicate(
    cluster: Cluster, client: Client, tails: Tails
) -> None:
    start = last_seq(client)
    early = client.map(inc, range(2))  # before the tail starts
    assert client.gather(early) == [1, 2]
    n_early = len(history(client, after=start))
    # Every event after `start`: the early ones, the tail's own client-added,
    # then at least the graph-updated and three transitions of the late task.
    count = n_early + 5
    tail = tails.start_subscribed(
        client, cluster.address, "--json", "--since", str(start), "--count", str(count)
    )
    late = client.submit(inc, 10)
    assert late.result() == 11
    code, out, err = finish(tail)
    assert (code, err) == (0, "")  # nothing on stderr: no gap was seen
    lines = [json.loads(line) for line in out.splitlines()]
    assert [d["seq"] for d in lines] == list(range(start + 1, start + 1 + count))
    assert lines == history(client, after=start)[:count]
    stories = by_key([d for d in lines if d["kind"] == "task-transition"])
    assert stories == {**{f.key: TRANSITIONS for f in early}, late.key: TRANSITIONS}


def test_human_lines_show_key_states_and_errors(
    cluster: Cluster, client: Client, tails: Tails
) -> None:
    tail = tails.start_subscribed(
        client,
        cluster.address,
        "--kind",
        "task-transition",
        "--key",
        "bad",
        "--key",
        '["good", 7]',
        "--count",
        "6",
    )
    good = client.submit(inc, 1, key=("good", 7))
    bad = client.submit(fail, 1, key="bad")
    assert good.result() == 2
    assert isinstance(bad.exception(), ZeroDivisionError)
    code, out, err = finish(tail)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert len(lines) == 6, out
    # Each line starts with its seq: the six transitions of the two keys, in order.
    expected = [
        d["seq"] for d in history(client, "task-transition") if d["key"] in ("bad", ["good", 7])
    ]
    assert [int(line.split()[0]) for line in lines] == expected
    joined = "\n".join(lines)
    for key in ("bad", '["good", 7]'):
        for start, end in [("released", "waiting"), ("waiting", "processing")]:
            assert f"task-transition {key} {start} -> {end}" in joined
    assert 'task-transition ["good", 7] processing -> memory worker=tcp://' in joined
    (erred,) = [line for line in lines if "processing -> erred" in line]
    assert "task-transition bad processing -> erred" in erred
    assert "ZeroDivisionError('bad input 1')" in erred


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_ends_the_tail_cleanly(
    cluster: Cluster, client: Client, tails: Tails, signum: signal.Signals
) -> None:
    tail = tails.start_subscribed(client, cluster.address)
    tail.send_signal(signum)
    code, out, err = finish(tail)
    assert (code, out, err) == (0, "", "")


def test_the_scheduler_going_away_ends_the_tail_with_one_line(
    cluster: Cluster, client: Client, tails: Tails
) -> None:
    address = cluster.address
    tail = tails.start_subscribed(client, address, "--kind", "worker-removed")
    cluster.scheduler.send_signal(signal.SIGTERM)
    code, _, err = finish(tail)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0] in (
        f"Error: the scheduler at {address} closed",
        f"Error: the scheduler at {address} went away",
    )


def test_the_security_options_reach_a_scheduler_that_needs_a_token(
    tmp_path: Path, tails: Tails
) -> None:
    token = tmp_path / "token"
    token.write_text("0123456789abcdef" * 4)
    wrong = tmp_path / "wrong"
    wrong.write_text("not the token")
    scheduler_file = tmp_path / "scheduler.json"
    with open(tmp_path / "scheduler.log", "wb") as log:
        scheduler = subprocess.Popen(
            [
                *SLUICE,
                "scheduler",
                "--port",
                "0",
                "--scheduler-file",
                str(scheduler_file),
                "--auth-token-file",
                str(token),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(scheduler_file.exists, 30, "the scheduler file")
        address = json.loads(scheduler_file.read_text())["address"]
        tail = tails.start(
            address, "--auth-token-file", str(token), "--since", "0", "--count", "1", "--json"
        )
        code, out, err = finish(tail)
        assert (code, err) == (0, "")
        (line,) = out.splitlines()
        assert json.loads(line) == {
            "kind": "scheduler-started",
            "seq": 1,
            "time": json.loads(line)["time"],
            "source": "scheduler",
            "address": address,
        }
        for args, message in [
            ([], f"Error: the server at {address} requires an auth token (--auth-token-file)"),
            (
                ["--auth-token-file", str(wrong)],
                f"Error: authentication failed at {address}: wrong token",
            ),
        ]:
            code, out, err = finish(tails.start(address, "--timeout", "5", *args))
            assert (code, out, err.strip().splitlines()) == (1, "", [message])
    finally:
        scheduler.send_signal(signal.SIGTERM)
        try:
            scheduler.wait(timeout=20)
        except subprocess.TimeoutExpired:
            scheduler.kill()
            scheduler.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["nonsense"], 2, "Error: bad address 'nonsense': expected tcp://host:port"),
        (["http://h:80"], 2, "Error: bad address 'http://h:80': expected tcp://host:port"),
        (
            ["tcp://h:abc"],
            2,
            "Error: bad port 'abc' in address 'tcp://h:abc': expected a number from 1 to 65535",
        ),
        (
            ["tcp://127.0.0.1:"],
            2,
            "Error: bad address 'tcp://127.0.0.1:': expected tcp://host:port",
        ),
        (
            ["tcp://127.0.0.1:70000"],
            2,
            "Error: bad port '70000' in address 'tcp://127.0.0.1:70000':"
            " expected a number from 1 to 65535",
        ),
        (
            ["tcp://127.0.0.1:0"],
            2,
            "Error: bad port 0 in address 'tcp://127.0.0.1:0': expected a number from 1 to 65535",
        ),
        (
            ["tcp://127.0.0.1:{free}", "--timeout", "0.5"],
            1,
            "Error: cannot connect to tcp://127.0.0.1:{free}: connection refused"
            " (retried for 0.5s)",
        ),
        (
            ["tcp://127.0.0.1:{free}", "--kind", "task-transition", "--kind", "nope"],
            2,
            "Error: unknown event kind 'nope' for --kind; valid kinds: client-added,",
        ),
        (
            ["tcp://127.0.0.1:8786", "--key", "[oops"],
            2,
            "Error: bad --key '[oops': not a JSON list",
        ),
        ([], 2, "Error: missing the scheduler ADDRESS (or --scheduler-file FILE)"),
        (
            ["tcp://127.0.0.1:8786", "--scheduler-file", "s.json"],
            2,
            "Error: give the scheduler ADDRESS or --scheduler-file, not both",
        ),
        (
            ["--scheduler-file", "{tmp}/missing.json", "--timeout", "0.2"],
            1,
            "Error: scheduler file '{tmp}/missing.json' does not exist (waited 0.2s)",
        ),
        (
            ["tcp://127.0.0.1:8786", "--count", "0"],
            2,
            "Error: Invalid value for '--count': 0 is not in the range x>=1.",
        ),
    ],
)
def test_bad_invocations_are_one_line(
    args: list[str], code: int, message: str, tmp_path: Path, tails: Tails
) -> None:
    subs = {"free": str(_free_port()), "tmp": str(tmp_path)}
    argv = [a.format(**subs) for a in args]
    done_code, out, err = finish(tails.start(*argv))
    assert (done_code, out) == (code, "")
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(message.format(**subs))
    if "unknown event kind" in message:
        assert "task-transition" in lines[0] and "worker-added" in lines[0]
