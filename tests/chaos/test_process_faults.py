"""Process faults: workers and nannies killed, a worker frozen, the scheduler stopped.

Each test runs a real graph on real worker processes, injects the fault while the
graph runs, and checks that the results are right, the graph completes, and the
scheduler's event log tells the same story as the live scheduler.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import cloudpickle
import pytest

from sluice import Client, Scheduler, SchedulerState, Worker
from sluice._core.logfile import EventLogReader
from sluice.events import Event, SchedulerClosing, TaskTransition, WorkerAdded, WorkerRemoved
from sluice.nanny import Nanny
from sluice.replay import read_events
from sluice.testing import Recorder
from sluice_processes import SLUICE, SluiceProcesses, wait_until

# Worker processes cannot import this module: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

SEED = int(os.environ.get("SLUICE_CHAOS_SEED", random.randrange(1 << 32)))
SHARED_URL = "amqp://guest:guest@127.0.0.1:5672/"


def inc(x: int) -> int:
    return x + 1


def slow_add(x: int, y: int) -> int:
    time.sleep(0.001)  # the work a task does, so a kill finds tasks running
    return x + y


async def wait_for_state(
    s: Scheduler, holds: Callable[[], bool], kinds: tuple[str, ...], timeout: float = 60
) -> None:
    """Wait until ``holds()`` is true of the scheduler, checking it after each event of
    ``kinds`` the scheduler publishes (an inline consumer: no polling)."""
    changed = anyio.Event()
    name = f"chaos-wait-{id(changed)}"
    s.bus.subscribe(lambda _e: changed.set(), name=name, kinds=kinds, mode="inline")
    try:
        with anyio.fail_after(timeout):
            while not holds():
                await changed.wait()
                changed = anyio.Event()
    finally:
        s.bus.unsubscribe(name)


WORKER_KINDS = ("worker-added", "worker-removed")


# -- 1. workers killed with SIGKILL at random moments --------------------------------------


@pytest.mark.anyio
@pytest.mark.timeout(240)
async def test_workers_killed_at_random_moments(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    print(f"SLUICE_CHAOS_SEED={SEED}")
    n_kills = 20
    # 5,000 tasks in three layers: x (leaves), y and z each depend on two tasks of
    # the layer below, neighbours far apart so dependencies cross workers.
    nx, ny, nz = 1700, 1700, 1600
    total = nx + ny + nz
    # The moments: after so many completions (processing -> memory on the scheduler).
    # All are below the 5,000 completions the graph needs, so every kill happens
    # before the graph can complete, whatever was lost and recomputed before.
    kill_at = sorted(rng.sample(range(100, total - 400), n_kills))
    log = tmp_path / "events.jsonl"
    completions = 0
    reached = anyio.Event()
    next_kill = 0

    def count(event: Event) -> None:  # inline: runs as each event is published
        nonlocal completions
        if (
            isinstance(event, TaskTransition)
            and event.source == "scheduler"
            and event.finish == "memory"
        ):
            completions += 1
            if next_kill < n_kills and completions >= kill_at[next_kill]:
                reached.set()

    async with Scheduler(port=0, event_log=log) as s:
        s.bus.subscribe(count, name="chaos-counter", kinds=("task-transition",))
        nannies = [
            Nanny(s.address, nthreads=1, name=f"n{i}", log_level="warning") for i in range(3)
        ]
        async with anyio.create_task_group() as tg:
            for nanny in nannies:
                tg.start_soon(nanny.start)
        killed: list[tuple[str, int]] = []
        dead: set[int] = set()  # pids killed here (asyncio may not have reaped them yet)

        def alive() -> list[Nanny]:
            """Nannies whose current worker process runs and is registered: a nanny sets
            ``process`` before its new worker registers, so a registered worker of that
            name whose process was not killed is that process. A killed worker stays
            registered until the scheduler sees its connection close, and by then its
            nanny may have started the next process, so killed addresses do not count."""
            gone = {address for address, _ in killed}
            names = {w.name for address, w in s.workers.items() if address not in gone}
            return [
                nn
                for nn in nannies
                if nn.name in names and nn.process is not None and nn.process.pid not in dead
            ]

        try:
            async with Client(s.address, asynchronous=True) as c:
                xs = c.map(inc, range(nx), key=[f"x-{i}" for i in range(nx)])
                ys = [c.submit(slow_add, xs[i], xs[(i + 97) % nx], key=f"y-{i}") for i in range(ny)]
                zs = [
                    c.submit(slow_add, ys[i], ys[(i + 389) % ny], key=f"z-{i}") for i in range(nz)
                ]
                for _ in range(n_kills):
                    await reached.wait()
                    # A worker that is registered now (others may be restarting).
                    await wait_for_state(s, lambda: bool(alive()), WORKER_KINDS)
                    victim = rng.choice(alive())
                    assert victim.process is not None
                    address = next(a for a, w in s.workers.items() if w.name == victim.name)
                    killed.append((address, victim.process.pid))
                    dead.add(victim.process.pid)
                    os.kill(victim.process.pid, signal.SIGKILL)
                    next_kill += 1
                    reached = anyio.Event()
                    if next_kill < n_kills and completions >= kill_at[next_kill]:
                        reached.set()
                results = await c.gather(zs)
                xv = [i + 1 for i in range(nx)]
                yv = [xv[i] + xv[(i + 97) % nx] for i in range(ny)]
                assert results == [yv[i] + yv[(i + 389) % ny] for i in range(nz)]
                assert completions >= total
                # The last victim's replacement may still be starting when the work
                # ends: every nanny's worker registered again before they are closed.
                await wait_for_state(s, lambda: len(alive()) == len(nannies), WORKER_KINDS)
                live = s.state.snapshot()
        finally:
            with anyio.CancelScope(shield=True):
                async with anyio.create_task_group() as tg:
                    for nanny in nannies:
                        tg.start_soon(nanny.close)
    final = s.state.snapshot()
    assert len(killed) == n_kills
    events = list(read_events(log))
    removed = {e.worker for e in events if isinstance(e, WorkerRemoved)}
    assert {address for address, _ in killed} <= removed
    added = [e for e in events if isinstance(e, WorkerAdded)]
    assert len(added) >= 3 + n_kills  # every killed worker was replaced by its nanny
    assert SchedulerState.from_events(events, until=live["seq"]).snapshot() == live
    assert SchedulerState.from_events(events).snapshot() == final


# -- 2. a nanny (and its worker) killed; a frozen nanny and worker ---------------------------

HEARTBEAT_TIMEOUT = 3.0
#: The scheduler checks for silent workers every heartbeat_timeout / 4 (at most 1 s); the
#: rest is slack for a loaded machine.
NOTICE_WITHIN = HEARTBEAT_TIMEOUT + 2.0


def sleepy_inc(x: int) -> int:
    time.sleep(0.02)
    return x + 1


def _is_removed(address: str) -> Any:
    return lambda e: isinstance(e, WorkerRemoved) and e.worker == address


def _is_added(name: str) -> Any:
    return lambda e: isinstance(e, WorkerAdded) and e.name == name


async def _victim_cluster(
    s: Scheduler, procs: SluiceProcesses, c: Client, recorder: Recorder
) -> tuple[str, int, int]:
    """A nanny process ``victim`` next to the in-process worker; its worker's address and
    the pids of the nanny and of its worker."""
    nanny = procs.spawn(
        "worker", s.address, "--nanny", "--name", "victim", "--log-level", "warning"
    )
    added = await recorder.wait_for(_is_added("victim"), timeout=60)
    assert isinstance(added, WorkerAdded)
    pids = await c.run(os.getpid)
    return added.worker, nanny.pid, pids[added.worker]


async def _run_until_victim_busy(s: Scheduler, c: Client, victim: str, n: int) -> list[Any]:
    futures = c.map(sleepy_inc, range(n), key=[f"t-{i}" for i in range(n)])
    # Some results held there, and tasks running there: both will have to move.
    await wait_for_state(
        s,
        lambda: bool(s.workers[victim].processing and s.workers[victim].has_what),
        ("task-transition",),
    )
    return futures


def _wait_gone(pid: int) -> None:
    """Wait until process ``pid`` (not our child: the nanny's) has exited."""

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A zombie whose parent died is reaped by init soon; it no longer runs.
        with contextlib.suppress(OSError):
            return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
        return True

    wait_until(gone, 30, f"worker process {pid} to exit")


def _moved(events: list[Event], removed: WorkerRemoved, victim: str, survivor: str) -> set[Any]:
    """Keys processing on ``victim`` when it was removed that ``survivor`` then computed."""
    lost = {
        e.key
        for e in events
        if isinstance(e, TaskTransition)
        and e.source == "scheduler"
        and e.seq < removed.seq
        and e.stimulus_id == removed.stimulus_id
        and e.start == "processing"
    }
    redone = {
        e.key
        for e in events
        if isinstance(e, TaskTransition)
        and e.source == "scheduler"
        and e.seq > removed.seq
        and e.finish == "memory"
        and e.worker == survivor
    }
    return lost & redone


@pytest.mark.anyio
@pytest.mark.timeout(120)
@pytest.mark.parametrize("worker_too", [True, False], ids=["nanny-and-worker", "nanny-only"])
async def test_killed_nanny_is_noticed_and_work_moves(tmp_path: Path, worker_too: bool) -> None:
    """SIGKILL to the nanny and its worker at once; or to the nanny alone, when the
    worker must notice (its lifeline socket to the nanny closes) and exit by itself."""
    log = tmp_path / "events.jsonl"
    procs = SluiceProcesses(tmp_path)
    recorder = Recorder(kinds=("worker-added", "worker-removed"))
    try:
        async with (
            Scheduler(port=0, event_log=log, heartbeat_timeout=HEARTBEAT_TIMEOUT) as s,
            Worker(s.address, nthreads=1, name="survivor") as survivor,
            Client(s.address, asynchronous=True) as c,
        ):
            recorder.attach(s)
            victim, nanny_pid, worker_pid = await _victim_cluster(s, procs, c, recorder)
            futures = await _run_until_victim_busy(s, c, victim, 300)
            killed = time.monotonic()
            os.kill(nanny_pid, signal.SIGKILL)
            if worker_too:
                os.kill(worker_pid, signal.SIGKILL)
            removed = await recorder.wait_for(_is_removed(victim), timeout=NOTICE_WITHIN)
            print(f"killed nanny noticed after {time.monotonic() - killed:.2f}s")
            if not worker_too:  # the orphan exits by itself: no worker outlives its nanny
                await anyio.to_thread.run_sync(_wait_gone, worker_pid)
            assert await c.gather(futures) == [i + 1 for i in range(300)]
            # Nothing restarts it: the nanny is gone too.
            assert [w.name for w in s.workers.values()] == ["survivor"]
            live = s.state.snapshot()
    finally:
        procs.stop()
    assert isinstance(removed, WorkerRemoved)
    events = list(read_events(log))
    assert _moved(events, removed, victim, survivor.address)
    assert SchedulerState.from_events(events, until=live["seq"]).snapshot() == live


@pytest.mark.anyio
@pytest.mark.timeout(120)
async def test_frozen_worker_is_removed_after_the_heartbeat_timeout(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    procs = SluiceProcesses(tmp_path)
    recorder = Recorder(kinds=("worker-added", "worker-removed"))
    try:
        async with (
            Scheduler(port=0, event_log=log, heartbeat_timeout=HEARTBEAT_TIMEOUT) as s,
            Worker(s.address, nthreads=1, name="survivor") as survivor,
            Client(s.address, asynchronous=True) as c,
        ):
            recorder.attach(s)
            victim, nanny_pid, worker_pid = await _victim_cluster(s, procs, c, recorder)
            futures = await _run_until_victim_busy(s, c, victim, 300)
            # A hung host: both processes stop, their connections stay open and silent.
            frozen = time.monotonic()
            os.kill(worker_pid, signal.SIGSTOP)
            os.kill(nanny_pid, signal.SIGSTOP)
            try:
                removed = await recorder.wait_for(_is_removed(victim), timeout=NOTICE_WITHIN)
                noticed = time.monotonic() - frozen
                print(f"frozen worker removed after {noticed:.2f}s")
                assert isinstance(removed, WorkerRemoved)
                assert removed.reason == f"no heartbeat for {HEARTBEAT_TIMEOUT:g}s"
                assert noticed >= HEARTBEAT_TIMEOUT  # not before its time
                assert await c.gather(futures) == [i + 1 for i in range(300)]
            finally:
                os.kill(nanny_pid, signal.SIGCONT)
                os.kill(worker_pid, signal.SIGCONT)
            # Thawed, the stale worker finds its connection closed and exits; its nanny
            # starts a fresh one, which registers under a new address.
            back = await recorder.wait_for(
                lambda e: isinstance(e, WorkerAdded) and e.name == "victim" and e.seq > removed.seq,
                timeout=60,
            )
            assert isinstance(back, WorkerAdded) and back.worker != victim
            assert sorted(w.name for w in s.workers.values()) == ["survivor", "victim"]
            assert await c.submit(inc, 1, workers=[back.worker]) == 2
            live = s.state.snapshot()
    finally:
        procs.stop()
    events = list(read_events(log))
    assert _moved(events, removed, victim, survivor.address)
    assert SchedulerState.from_events(events, until=live["seq"]).snapshot() == live


# -- 3. the scheduler stopped with SIGTERM mid-run -------------------------------------------


@pytest.mark.rabbitmq
@pytest.mark.timeout(180)
def test_sigterm_mid_run_flushes_every_sink(
    tmp_path: Path, shared_queue: str, drain: Callable[[str, str], list[Any]]
) -> None:
    log = tmp_path / "events.jsonl"
    json_log = tmp_path / "json.log"
    # Every kind, the workers' forwarded transitions too: the queue must match the log.
    options = f"queue={shared_queue}&kinds=all&forwarded=true&spool={tmp_path / 'spool'}"
    amqp = f"{SHARED_URL}?{options}"
    procs = SluiceProcesses(tmp_path)
    try:
        scheduler = procs.spawn(
            "scheduler",
            "--port",
            "0",
            "--scheduler-file",
            str(procs.scheduler_file),
            "--event-log",
            str(log),
            "--sink",
            f"json-log://{json_log}",
            "--sink",
            amqp,
        )
        wait_until(procs.scheduler_file.exists, 30, "the scheduler file")
        procs.spawn("worker", "--scheduler-file", str(procs.scheduler_file), "--nthreads", "2")
        client = Client(procs.address)
        try:
            wait_until(lambda: len(client.run(os.getpid)) == 1, 60, "the worker")
            futures = client.map(sleepy_inc, range(2000), key=[f"t-{i}" for i in range(2000)])
            wait_until(lambda: sum(f.done() for f in futures) >= 100, 60, "some results")
            scheduler.send_signal(signal.SIGTERM)
            assert scheduler.wait(timeout=60) == 0
        finally:
            with contextlib.suppress(Exception):
                client.close()
    finally:
        procs.stop()

    # The event log: complete, gap-free, ends with scheduler-closing and a newline.
    reader = EventLogReader(log)
    events = list(reader)
    assert reader.truncated is None  # a graceful stop leaves no torn last line
    assert log.read_bytes().endswith(b"\n")
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert isinstance(events[-1], SchedulerClosing)
    done = {
        e.key
        for e in events
        if isinstance(e, TaskTransition) and e.source == "scheduler" and e.finish == "memory"
    }
    assert 100 <= len(done) < 2000  # it really stopped mid-run
    run_id = reader.run_id

    # `sluice replay --json` reads it back to the same last event.
    out = subprocess.run(
        [*SLUICE, "replay", "--json", str(log)], capture_output=True, check=True, timeout=60
    )
    summary = json.loads(out.stdout)
    assert summary["run_id"] == run_id
    assert summary["events"] == len(events) and summary["last_seq"] == events[-1].seq
    assert summary["by_kind"]["scheduler-closing"] == 1
    final = SchedulerState.from_events(events)
    assert summary["task_states"] == dict(
        sorted(collections.Counter(ts.state for ts in final.tasks.values()).items())
    )

    # The JSON log: one line per event of the log, with the event's fields.
    lines = [json.loads(line) for line in json_log.read_text().splitlines()]
    assert json_log.read_bytes().endswith(b"\n")
    assert [line["seq"] for line in lines] == [e.seq for e in events]
    for line, event in zip(lines, events, strict=True):
        assert line["event"] == event.kind and line.get("key") == event.to_dict().get("key")

    # The queue: every event, at least once (deduplicated by message id), same body.
    messages = drain(SHARED_URL, shared_queue)
    first: dict[str, dict[str, Any]] = {}
    for message_id, body, _props in messages:
        first.setdefault(message_id, body)
    assert set(first) == {f"{run_id}:{e.seq}" for e in events}
    for e in events:
        assert first[f"{run_id}:{e.seq}"] == json.loads(json.dumps(e.to_dict()))


# -- 4. the scheduler killed with SIGKILL mid-run ---------------------------------------------


@pytest.mark.timeout(120)
def test_sigkill_mid_run_leaves_readable_logs(tmp_path: Path) -> None:
    """No graceful close: what the sinks had not written is lost, but what is on disk is
    a gap-free prefix of the run, with at most a torn last line (the documented case)."""
    log = tmp_path / "events.jsonl"
    json_log = tmp_path / "json.log"
    procs = SluiceProcesses(tmp_path)
    try:
        scheduler = procs.spawn(
            "scheduler",
            "--port",
            "0",
            "--scheduler-file",
            str(procs.scheduler_file),
            "--event-log",
            str(log),
            "--sink",
            f"json-log://{json_log}",
        )
        wait_until(procs.scheduler_file.exists, 30, "the scheduler file")
        procs.spawn("worker", "--scheduler-file", str(procs.scheduler_file), "--nthreads", "2")
        client = Client(procs.address)
        try:
            wait_until(lambda: len(client.run(os.getpid)) == 1, 60, "the worker")
            futures = client.map(sleepy_inc, range(2000), key=[f"t-{i}" for i in range(2000)])
            wait_until(lambda: sum(f.done() for f in futures) >= 100, 60, "some results")
            scheduler.kill()
            assert scheduler.wait(timeout=30) == -signal.SIGKILL
        finally:
            with contextlib.suppress(Exception):
                client.close()
    finally:
        procs.stop()

    raw = log.read_bytes().split(b"\n")
    torn = raw.pop()  # b"" if the file ends with a newline
    reader = EventLogReader(log)
    events = list(reader)
    if torn:
        assert reader.truncated == (str(log), len(raw) + 1)
    else:
        assert reader.truncated is None
    assert len(events) == len(raw) - 1  # every complete line but the header is an event
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert sum(isinstance(e, TaskTransition) and e.finish == "memory" for e in events) >= 100
    out = subprocess.run(
        [*SLUICE, "replay", "--json", str(log)], capture_output=True, check=True, timeout=60
    )
    assert json.loads(out.stdout)["last_seq"] == events[-1].seq

    # The JSON log, drained independently, is a gap-free prefix of the same run too.
    text = json_log.read_text()
    complete = text[: text.rfind("\n") + 1]
    seqs = [json.loads(line)["seq"] for line in complete.splitlines()]
    assert seqs == list(range(1, len(seqs) + 1)) and seqs
