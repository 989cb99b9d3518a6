"""Tests of the pure scheduler state machine (no sockets, no loop, no clock)."""

from __future__ import annotations

import math
from typing import Any

import attrs
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from scheduler_strategies import Harness, check_invariants
from sluice._core.commands import (
    AddClient,
    AddWorker,
    ReleaseKeys,
    RemoveClient,
    RemoveWorker,
    Restart,
    UpdateGraph,
)
from sluice._core.messages import (
    ComputeTaskMsg,
    FreeKeysMsg,
    KeyUpdatedMsg,
    Message,
    MissingDataMsg,
    TaskErredMsg,
    TaskFinishedMsg,
)
from sluice._core.scheduler_state import GraphError, SchedulerState
from sluice._core.transitions import LEGAL_EDGES, to_mermaid
from sluice.events import Event, TaskTransition, UserEvent, WorkerAdded


def transitions(events: list[Event]) -> list[tuple[Any, str, str]]:
    return [(e.key, e.start, e.finish) for e in events if isinstance(e, TaskTransition)]


def computes(messages: list[Message]) -> dict[Any, str]:
    return {m.key: m.worker for m in messages if isinstance(m, ComputeTaskMsg)}


def updates(messages: list[Message]) -> list[KeyUpdatedMsg]:
    return [m for m in messages if isinstance(m, KeyUpdatedMsg)]


@pytest.fixture
def h() -> Harness:
    harness = Harness()
    harness.run(AddWorker(worker="tcp://w1", nthreads=1))
    harness.run(AddWorker(worker="tcp://w2", nthreads=1))
    harness.run(AddClient(client="c"))
    return harness


def test_chain_runs_to_completion_and_intermediates_are_dropped(h: Harness) -> None:
    """a -> b -> c, only c wanted: each runs once deps are done, a and b go away after."""
    events, msgs = h.run(
        UpdateGraph(client="c", keys=("c",), dependencies={"a": (), "b": ("a",), "c": ("b",)})
    )
    assert transitions(events) == [
        ("a", "released", "waiting"),
        ("b", "released", "waiting"),
        ("c", "released", "waiting"),
        ("a", "waiting", "processing"),
    ]
    assert computes(msgs) == {"a": "tcp://w1"}
    out = h.finish_all(msgs)
    s = h.state
    assert s.tasks["c"].state == "memory"
    assert [(m.key, m.state) for m in updates(out)] == [("c", "memory")]
    assert s.tasks["a"].state == "released" and s.tasks["b"].state == "released"
    # The ComputeTaskMsg for b named where a lives.
    b_compute = next(m for m in out if isinstance(m, ComputeTaskMsg) and m.key == "b")
    assert dict(b_compute.who_has) == {"a": ("tcp://w1",)}
    # Releasing c forgets everything, walking down the chain.
    events, msgs = h.run(ReleaseKeys(client="c", keys=("c",)))
    assert transitions(events) == [
        ("c", "memory", "released"),
        ("c", "released", "forgotten"),
        ("b", "released", "forgotten"),
        ("a", "released", "forgotten"),
    ]
    assert any(isinstance(m, FreeKeysMsg) and m.keys == ("c",) for m in msgs)
    h.run(AddClient(client="other"))  # the next event purges the forgotten tasks
    assert h.state.tasks == {}


def test_compute_message_names_dependency_locations(h: Harness) -> None:
    _, msgs = h.run(
        UpdateGraph(client="c", keys=("z",), dependencies={"x": (), "y": (), "z": ("x", "y")})
    )
    assert computes(msgs) == {"x": "tcp://w1", "y": "tcp://w2"}
    h.run(TaskFinishedMsg(worker="tcp://w1", key="x"))
    _, msgs = h.run(TaskFinishedMsg(worker="tcp://w2", key="y"))
    (compute,) = [m for m in msgs if isinstance(m, ComputeTaskMsg)]
    assert compute.key == "z"
    assert dict(compute.who_has) == {"x": ("tcp://w1",), "y": ("tcp://w2",)}
    # Equal load: the tie goes to the lowest address holding as much data.
    assert compute.worker == "tcp://w1"


def test_assignment_prefers_idle_workers_then_data(h: Harness) -> None:
    h.run(UpdateGraph(client="c", keys=("a", "b"), dependencies={"a": (), "b": ()}))
    _, msgs = h.run(UpdateGraph(client="c", keys=("d",), dependencies={"d": ()}))
    assert computes(msgs) == {"d": "tcp://w1"}  # both busy (1 task/thread): lowest address
    h.run(AddWorker(worker="tcp://w3", nthreads=4))
    _, msgs = h.run(UpdateGraph(client="c", keys=("e",), dependencies={"e": ()}))
    assert computes(msgs) == {"e": "tcp://w3"}


def test_failure_reaches_dependents_and_clients(h: Harness) -> None:
    _, msgs = h.run(
        UpdateGraph(client="c", keys=("b", "a"), dependencies={"a": (), "b": ("a",), "c2": ("b",)})
    )
    events, msgs = h.run(
        TaskErredMsg(worker="tcp://w1", key="a", exception="ZeroDivisionError('x')", traceback="tb")
    )
    assert ("a", "processing", "erred") in transitions(events)
    assert ("b", "waiting", "erred") in transitions(events)
    b = h.state.tasks["b"]
    assert b.state == "erred"
    assert b.exception is not None and "'a'" in b.exception and "ZeroDivisionError" in b.exception
    assert b.traceback == "tb"
    got = {m.key: m for m in updates(msgs)}
    assert got["a"].state == "erred" and got["a"].exception == "ZeroDivisionError('x')"
    assert got["b"].state == "erred" and "'a'" in (got["b"].exception or "")
    # A new task on top of an erred one fails at once, naming the root cause.
    _, msgs = h.run(UpdateGraph(client="c", keys=("d",), dependencies={"d": ("b",)}))
    d = h.state.tasks["d"]
    assert d.state == "erred" and "'a'" in (d.exception or "")
    assert [m.key for m in updates(msgs)] == ["d"]


def test_retries_then_failure(h: Harness) -> None:
    h.run(UpdateGraph(client="c", keys=("a",), dependencies={"a": ()}, retries={"a": 1}))
    assert h.state.tasks["a"].retries == 1
    events, msgs = h.run(TaskErredMsg(worker="tcp://w1", key="a", exception="E1"))
    assert transitions(events) == [("a", "processing", "waiting"), ("a", "waiting", "processing")]
    assert isinstance(events[0], TaskTransition) and events[0].exception == "E1"
    assert h.state.tasks["a"].retries == 0
    assert not updates(msgs)
    worker = computes(msgs)["a"]
    events, msgs = h.run(TaskErredMsg(worker=worker, key="a", exception="E2"))
    assert transitions(events) == [("a", "processing", "erred")]
    assert [(m.state, m.exception) for m in updates(msgs)] == [("erred", "E2")]


def test_worker_loss_reschedules_and_recomputes(h: Harness) -> None:
    _, msgs = h.run(
        UpdateGraph(client="c", keys=("b", "x"), dependencies={"a": (), "b": ("a",), "x": ()})
    )
    assert computes(msgs) == {"a": "tcp://w1", "x": "tcp://w2"}
    _, msgs = h.run(TaskFinishedMsg(worker="tcp://w1", key="a"))
    assert computes(msgs) == {"b": "tcp://w1"}
    h.run(TaskFinishedMsg(worker="tcp://w2", key="x"))
    # w1 holds a and runs b: both must move to w2, a recomputed first.
    events, msgs = h.run(RemoveWorker(worker="tcp://w1", reason="lost"))
    assert transitions(events) == [
        ("b", "processing", "released"),
        ("a", "memory", "released"),
        ("a", "released", "waiting"),
        ("b", "released", "waiting"),
        ("a", "waiting", "processing"),
    ]
    assert computes(msgs) == {"a": "tcp://w2"}
    assert not [m for m in msgs if isinstance(m, FreeKeysMsg) and m.worker == "tcp://w1"]
    out = h.finish_all(msgs)
    assert h.state.tasks["b"].state == "memory"
    assert {m.key for m in updates(out)} == {"b"}
    # Losing the last worker: wanted results are recomputed when one comes back.
    events, _ = h.run(RemoveWorker(worker="tcp://w2"))
    assert h.state.tasks["b"].state == "waiting"
    # A root task waits in the scheduler's queue for a worker (no-worker is for
    # tasks whose dependencies are done).
    assert h.state.tasks["a"].state == "waiting"
    assert [t.key for t in h.state.queued] == ["a", "x"]
    _, msgs = h.run(AddWorker(worker="tcp://w3"))
    assert computes(msgs) == {"a": "tcp://w3", "x": "tcp://w3"}
    h.finish_all(msgs)
    assert h.state.tasks["b"].state == "memory" and h.state.tasks["x"].state == "memory"


def test_roots_wait_in_the_queue_while_workers_are_saturated() -> None:
    h = Harness(worker_saturation=2)
    h.run(AddWorker(worker="tcp://w1", nthreads=1))
    h.run(AddWorker(worker="tcp://w2", nthreads=1))
    h.run(AddClient(client="c"))
    keys = tuple(f"r{i}" for i in range(10))
    events, msgs = h.run(UpdateGraph(client="c", keys=keys, dependencies={k: () for k in keys}))
    # Two per worker, in contiguous runs; the other six wait, in order.
    assert computes(msgs) == {
        "r0": "tcp://w1",
        "r1": "tcp://w1",
        "r2": "tcp://w2",
        "r3": "tcp://w2",
    }
    assert [t.key for t in h.state.queued] == ["r4", "r5", "r6", "r7", "r8", "r9"]
    assert all(h.state.tasks[k].state == "waiting" for k in keys[4:])
    # A finished task makes room: the next queued root goes to that worker.
    events, msgs = h.run(TaskFinishedMsg(worker="tcp://w2", key="r2", nbytes=1))
    assert transitions(events)[-1] == ("r4", "waiting", "processing")
    assert computes(msgs) == {"r4": "tcp://w2"}
    # A worker that joins late gets its share at once.
    _, msgs = h.run(AddWorker(worker="tcp://w3", nthreads=2))
    assert computes(msgs) == {k: "tcp://w3" for k in ("r5", "r6", "r7", "r8")}
    # Released while queued: it leaves the queue and is never sent.
    events, msgs = h.run(ReleaseKeys(client="c", keys=("r9",)))
    assert ("r9", "waiting", "released") in transitions(events) and not computes(msgs)
    assert h.state.queued == []
    # Everything else runs to the end.
    while processing := [t for t in h.state.tasks.values() if t.state == "processing"]:
        for ts in processing:
            assert ts.processing_on is not None
            h.run(TaskFinishedMsg(worker=ts.processing_on.address, key=ts.key, nbytes=1))
    assert all(h.state.tasks[k].state == "memory" for k in keys[:9])


def test_restart_empties_the_queue() -> None:
    h = Harness(worker_saturation=1)
    h.run(AddWorker(worker="tcp://w1", nthreads=1))
    h.run(AddClient(client="c"))
    h.run(UpdateGraph(client="c", keys=("a", "b"), dependencies={"a": (), "b": ()}))
    assert [t.key for t in h.state.queued] == ["b"]
    h.run(Restart())
    assert h.state.queued == []
    _, msgs = h.run(UpdateGraph(client="c", keys=("a",), dependencies={"a": ()}))
    assert computes(msgs) == {"a": "tcp://w1"}


def test_unknown_worker_removal_emits_nothing(h: Harness) -> None:
    assert h.run(RemoveWorker(worker="tcp://nope")) == ([], [])
    assert h.run(AddWorker(worker="tcp://w1")) == ([], [])


def test_missing_data_recomputes_dependency(h: Harness) -> None:
    _, msgs = h.run(UpdateGraph(client="c", keys=("b",), dependencies={"a": (), "b": ("a",)}))
    _, msgs = h.run(TaskFinishedMsg(worker="tcp://w1", key="a"))
    h.run(RemoveWorker(worker="tcp://w2"))
    h.run(AddWorker(worker="tcp://w2"))
    assert computes(msgs) == {"b": "tcp://w1"}
    # Pretend b was on another worker that could not fetch a from w1.
    events, msgs = h.run(MissingDataMsg(worker="tcp://w1", key="a", errant_workers=("tcp://w1",)))
    assert transitions(events) == [
        ("b", "processing", "released"),
        ("a", "memory", "released"),
        ("a", "released", "waiting"),
        ("b", "released", "waiting"),
        ("a", "waiting", "processing"),
    ]
    # A stale report (a is not in memory any more) changes nothing.
    assert h.run(MissingDataMsg(worker="tcp://w1", key="a", errant_workers=("tcp://w1",)))[0] == []
    h.finish_all(msgs)
    assert h.state.tasks["b"].state == "memory"


def test_stale_finish_is_ignored(h: Harness) -> None:
    _, msgs = h.run(UpdateGraph(client="c", keys=("a",), dependencies={"a": ()}))
    assert computes(msgs) == {"a": "tcp://w1"}
    seq = h.state.seq
    events, msgs = h.run(TaskFinishedMsg(worker="tcp://w2", key="a"))
    assert events == [] and msgs == [FreeKeysMsg(worker="tcp://w2", keys=("a",))]
    assert h.run(TaskFinishedMsg(worker="tcp://ghost", key="a")) == ([], [])
    assert h.run(TaskErredMsg(worker="tcp://w2", key="a")) == ([], [])
    assert h.state.seq == seq
    h.run(TaskFinishedMsg(worker="tcp://w1", key="a"))
    assert h.run(TaskFinishedMsg(worker="tcp://w1", key="a")) == ([], [])  # duplicate


def test_release_of_running_task_cancels_it(h: Harness) -> None:
    h.run(UpdateGraph(client="c", keys=("b",), dependencies={"a": (), "b": ("a",)}))
    events, msgs = h.run(ReleaseKeys(client="c", keys=("b",)))
    assert transitions(events) == [
        ("b", "waiting", "released"),
        ("b", "released", "forgotten"),
        ("a", "processing", "released"),
        ("a", "released", "forgotten"),
    ]
    assert msgs == [FreeKeysMsg(worker="tcp://w1", keys=("a",))]
    # Its late result is stale.
    events, msgs = h.run(TaskFinishedMsg(worker="tcp://w1", key="a"))
    assert events == [] and msgs == [FreeKeysMsg(worker="tcp://w1", keys=("a",))]


def test_shared_key_survives_one_client_leaving(h: Harness) -> None:
    h.run(UpdateGraph(client="c", keys=("a",), dependencies={"a": ()}))
    h.run(UpdateGraph(client="d", keys=("a",), dependencies={"a": ()}))
    _, msgs = h.run(TaskFinishedMsg(worker="tcp://w1", key="a"))
    assert sorted(m.client for m in updates(msgs)) == ["c", "d"]
    assert transitions(h.run(RemoveClient(client="c"))[0]) == []
    assert h.state.tasks["a"].who_wants == {"d"}
    events, _ = h.run(RemoveClient(client="d"))
    assert transitions(events) == [("a", "memory", "released"), ("a", "released", "forgotten")]
    # A wanted key already in memory is reported at once on resubmission.
    h.run(UpdateGraph(client="c", keys=("k",), dependencies={"k": ()}))
    h.run(TaskFinishedMsg(worker="tcp://w1", key="k"))
    _, msgs = h.run(UpdateGraph(client="e", keys=("k",), dependencies={}))
    assert [(m.client, m.key, m.state, m.who_has) for m in updates(msgs)] == [
        ("e", "k", "memory", ("tcp://w1",))
    ]


def test_restart_forgets_everything(h: Harness) -> None:
    h.run(UpdateGraph(client="c", keys=("a", "b"), dependencies={"a": (), "b": ()}))
    h.run(TaskFinishedMsg(worker="tcp://w1", key="a"))
    events, msgs = h.run(Restart(stimulus_id="r1"))
    assert [e.kind for e in events] == ["restarted"]
    assert h.state.tasks == {}
    assert sorted((m.key, m.state) for m in updates(msgs)) == [
        ("a", "forgotten"),
        ("b", "forgotten"),
    ]
    frees = {m.worker: m.keys for m in msgs if isinstance(m, FreeKeysMsg)}
    assert frees == {"tcp://w1": ("a",), "tcp://w2": ("b",)}
    assert set(h.state.workers) == {"tcp://w1", "tcp://w2"} and "c" in h.state.clients
    assert not h.state.workers["tcp://w1"].has_what
    # Workers are free again afterwards.
    _, msgs = h.run(UpdateGraph(client="c", keys=("a",), dependencies={"a": ()}))
    assert computes(msgs) == {"a": "tcp://w1"}


@pytest.mark.parametrize(
    ("deps", "keys", "match"),
    [
        ({"a": ("nope",)}, ("a",), "unknown key 'nope'"),
        ({"a": ("b",), "b": ("a",)}, ("a",), "cycle"),
        ({"a": ("a",)}, ("a",), "cycle"),
        ({"a": ()}, ("zzz",), "wanted key 'zzz'"),
        ({("x", 1): (("x", 0),)}, (("x", 1),), r"unknown key \('x', 0\)"),
    ],
)
def test_bad_graphs_raise_and_emit_nothing(
    h: Harness, deps: dict[Any, Any], keys: tuple[Any, ...], match: str
) -> None:
    before = h.state.snapshot()
    seen: list[Event] = []
    with pytest.raises(GraphError, match=match):
        h.state.handle(
            UpdateGraph(client="c", keys=keys, dependencies=deps), now=1, emit=seen.append
        )
    assert seen == []
    assert h.state.snapshot() == before


def test_forgotten_task_readable_during_its_transition(h: Harness) -> None:
    h.run(UpdateGraph(client="c", keys=("a",), dependencies={"a": ()}))
    seen = []

    def plugin(event: Event) -> None:
        if isinstance(event, TaskTransition) and event.finish == "forgotten":
            ts = h.state.tasks[event.key]
            seen.append((ts.key, ts.state, ts.processing_on))

    h.state.handle(ReleaseKeys(client="c", keys=("a",)), now=5.0, emit=plugin)
    assert seen == [("a", "forgotten", None)]
    assert "a" in h.state.tasks  # until the next event is applied
    assert "a" not in h.state.snapshot()["tasks"]
    h.state.record(UserEvent(topic="t", msg=1), now=6.0)
    assert "a" not in h.state.tasks


def test_tuple_keys(h: Harness) -> None:
    x0, x1 = ("x", 0), ("x", 1)
    _, msgs = h.run(UpdateGraph(client="c", keys=(x1,), dependencies={x0: (), x1: (x0,)}))
    out = h.finish_all(msgs)
    assert [m.key for m in updates(out)] == [x1]


def test_apply_rejects_gaps_duplicates_and_illegal_edges(h: Harness) -> None:
    s = h.state
    seq = s.seq
    with pytest.raises(ValueError, match="does not follow"):
        s.apply(WorkerAdded(seq=seq + 2, worker="tcp://x"))
    with pytest.raises(ValueError, match="does not follow"):
        s.apply(WorkerAdded(seq=seq, worker="tcp://x"))
    h.run(UpdateGraph(client="c", keys=("a",), dependencies={"a": ()}))
    seq = s.seq
    bad_start = TaskTransition(seq=seq + 1, key="a", start="waiting", finish="memory")
    with pytest.raises(ValueError, match="which is processing"):
        s.apply(bad_start)
    illegal = TaskTransition(seq=seq + 1, key="a", start="processing", finish="no-worker")
    with pytest.raises(ValueError, match="illegal"):
        s.apply(illegal)
    assert s.seq == seq
    # A worker's transition, forwarded, only takes a seq.
    ev = s.record(
        TaskTransition(key="a", start="executing", finish="memory", source="tcp://w1"), now=9.0
    )
    assert (ev.seq, ev.time) == (seq + 1, 9.0)
    assert s.tasks["a"].state == "processing"
    kept = s.record(UserEvent(topic="x", time=3.0), now=9.0)
    assert (kept.seq, kept.time) == (seq + 2, 3.0)


def test_from_events_until(h: Harness) -> None:
    _, msgs = h.run(UpdateGraph(client="c", keys=("b",), dependencies={"a": (), "b": ("a",)}))
    middle = h.state.snapshot()
    h.finish_all(msgs)
    assert SchedulerState.from_events(h.log).snapshot() == h.state.snapshot()
    assert SchedulerState.from_events(h.log, until=middle["seq"]).snapshot() == middle
    # to_dict/from_dict round trip replays the same.
    from sluice.events import from_dict

    again = [from_dict(e.to_dict()) for e in h.log]
    assert SchedulerState.from_events(again).snapshot() == h.state.snapshot()


def test_legal_edges_diagram() -> None:
    text = to_mermaid()
    assert text.count("-->") == len(LEGAL_EDGES)


# --------------------------------------------------------------------------- stateful


WORKERS = ("tcp://w0", "tcp://w1", "tcp://w2", "tcp://w3")
CLIENTS = ("c0", "c1", "c2")


class SchedulerMachine(RuleBasedStateMachine):
    """Random clusters: after every step the log replays to the live state."""

    #: Small, so that root tasks often wait in the scheduler's queue.
    worker_saturation = 1.0

    def __init__(self) -> None:
        super().__init__()
        self.h = Harness(self.worker_saturation)
        self.counter = 0
        self.saved: dict[int, dict[str, Any]] = {}

    @property
    def s(self) -> SchedulerState:
        state: SchedulerState = self.h.state
        return state

    def tasks_in(self, state: str) -> list[Any]:
        return sorted((t for t in self.s.tasks.values() if t.state == state), key=lambda t: t.uid)

    @initialize()
    def start(self) -> None:
        self.h.run(AddWorker(worker=WORKERS[0], nthreads=1))
        self.h.run(AddClient(client=CLIENTS[0]))

    @rule(worker=st.sampled_from(WORKERS), nthreads=st.integers(1, 3))
    def add_worker(self, worker: str, nthreads: int) -> None:
        self.h.run(AddWorker(worker=worker, nthreads=nthreads))

    @rule(data=st.data())
    def remove_worker(self, data: st.DataObject) -> None:
        known = sorted(self.s.workers)
        worker = data.draw(st.sampled_from([*known, "tcp://unknown", "tcp://unknown"]))
        self.h.run(RemoveWorker(worker=worker, reason="test"))

    @rule(client=st.sampled_from(CLIENTS), often=st.integers(0, 3))
    def add_or_remove_client(self, client: str, often: int) -> None:
        if often == 0:  # rarely: it drops most of the work
            self.h.run(RemoveClient(client=client))
        else:
            self.h.run(AddClient(client=client))

    @rule(data=st.data())
    def submit(self, data: st.DataObject) -> None:
        existing = sorted(
            (t for t in self.s.tasks.values() if t.state != "forgotten"), key=lambda t: t.uid
        )
        n = data.draw(st.integers(1, 6), label="n")
        keys: list[Any] = []
        deps: dict[Any, tuple[Any, ...]] = {}
        for _ in range(n):
            self.counter += 1
            key: Any = f"t{self.counter}" if self.counter % 3 else ("t", self.counter)
            pool = keys + [t.key for t in existing]
            chosen = (
                data.draw(st.lists(st.sampled_from(pool), max_size=3, unique=True)) if pool else []
            )
            deps[key] = tuple(chosen)
            keys.append(key)
        wanted = data.draw(st.lists(st.sampled_from(keys), min_size=1, max_size=n, unique=True))
        add_existing: bool = data.draw(st.booleans())
        if existing and add_existing:
            wanted.append(data.draw(st.sampled_from([t.key for t in existing])))
        retries = {k: data.draw(st.integers(0, 2)) for k in keys if data.draw(st.booleans())}
        client = data.draw(st.sampled_from(CLIENTS))
        self.h.run(
            UpdateGraph(client=client, keys=tuple(wanted), dependencies=deps, retries=retries)
        )

    @rule(data=st.data())
    def bad_submit(self, data: st.DataObject) -> None:
        before = self.s.snapshot()
        self.counter += 1
        key = f"bad{self.counter}"
        with pytest.raises(GraphError):
            self.s.handle(
                UpdateGraph(client="c0", keys=(key,), dependencies={key: ("missing-key",)}),
                now=self.h.now,
            )
        assert self.s.snapshot() == before

    @precondition(lambda self: any(t.state == "processing" for t in self.s.tasks.values()))
    @rule(data=st.data(), count=st.integers(1, 4))
    def finish(self, data: st.DataObject, count: int) -> None:
        for _ in range(count):
            processing = self.tasks_in("processing")
            if not processing:
                return
            ts = data.draw(st.sampled_from(processing))
            assert ts.processing_on is not None
            right = ts.processing_on.address
            worker = data.draw(st.sampled_from([right, right, right, *WORKERS]))
            seq = self.s.seq
            events, msgs = self.h.run(TaskFinishedMsg(worker=worker, key=ts.key, nbytes=3))
            if worker != right:  # stale: ignored
                assert events == [] and self.s.seq == seq
                assert all(isinstance(m, FreeKeysMsg) for m in msgs)
            else:
                assert transitions(events)[0] == (ts.key, "processing", "memory")

    @precondition(lambda self: any(t.state == "processing" for t in self.s.tasks.values()))
    @rule(data=st.data(), count=st.integers(2, 8))
    def finish_more(self, data: st.DataObject, count: int) -> None:
        """Successes are the common case: give them more weight."""
        self.finish(data, count)

    @precondition(lambda self: any(t.state == "processing" for t in self.s.tasks.values()))
    @rule(data=st.data())
    def fail(self, data: st.DataObject) -> None:
        ts = data.draw(st.sampled_from(self.tasks_in("processing")))
        assert ts.processing_on is not None
        self.h.run(
            TaskErredMsg(
                worker=ts.processing_on.address,
                key=ts.key,
                exception=f"Boom({ts.key!r})",
                traceback="tb",
            )
        )

    @precondition(lambda self: any(t.state == "memory" for t in self.s.tasks.values()))
    @rule(data=st.data())
    def missing(self, data: st.DataObject) -> None:
        ts = data.draw(st.sampled_from(self.tasks_in("memory")))
        holders = sorted(w.address for w in ts.who_has)
        asking = data.draw(st.sampled_from(sorted(self.s.workers)))
        self.h.run(MissingDataMsg(worker=asking, key=ts.key, errant_workers=tuple(holders)))

    @precondition(lambda self: any(c.wants_what for c in self.s.clients.values()))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        name = data.draw(
            st.sampled_from(sorted(c for c in self.s.clients if self.s.clients[c].wants_what))
        )
        wanted = sorted(self.s.clients[name].wants_what, key=lambda t: t.uid)
        chosen = data.draw(st.lists(st.sampled_from(wanted), min_size=1, unique=True))
        self.h.run(ReleaseKeys(client=name, keys=tuple(t.key for t in chosen)))

    @rule(data=st.data())
    def restart(self, data: st.DataObject) -> None:
        if data.draw(st.integers(0, 4)) == 0:  # rarely: it wipes out everything
            self.h.run(Restart())

    @precondition(lambda self: bool(self.saved))
    @rule(data=st.data())
    def replay_until(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(sorted(self.saved)))
        assert SchedulerState.from_events(self.h.log, until=seq).snapshot() == self.saved[seq]

    @invariant()
    def replay_matches_live(self) -> None:
        live = self.s.snapshot()
        assert live["seq"] == len(self.h.log)
        replayed = SchedulerState.from_events(self.h.log)
        assert replayed.snapshot() == live
        # The queue is not logged: replay rebuilds it, in the same order.
        assert [t.key for t in replayed.queued] == [t.key for t in self.s.queued]
        check_invariants(self.s)
        self.saved[live["seq"]] = live


SchedulerMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None
)
test_scheduler_machine = SchedulerMachine.TestCase


class EagerSchedulerMachine(SchedulerMachine):
    """The same rules with no queue: every ready task goes to a worker at once."""

    worker_saturation = math.inf


EagerSchedulerMachine.TestCase.settings = settings(
    max_examples=30, stateful_step_count=40, deadline=None
)
test_eager_scheduler_machine = EagerSchedulerMachine.TestCase


def test_events_are_frozen_values(h: Harness) -> None:
    events, _ = h.run(UpdateGraph(client="c", keys=("a",), dependencies={"a": ()}))
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        events[0].seq = 5  # type: ignore[misc,unused-ignore]


def test_released_dependency_is_recomputed_when_needed_again(h: Harness) -> None:
    """A released task kept for its dependents' sake goes back through waiting."""
    _, msgs = h.run(
        UpdateGraph(client="c", keys=("c",), dependencies={"a": (), "b": ("a",), "c": ("b",)})
    )
    h.finish_all(msgs)
    assert h.state.tasks["b"].state == "released"
    events, msgs = h.run(UpdateGraph(client="c", keys=("d",), dependencies={"d": ("b", "c")}))
    assert transitions(events) == [
        ("a", "released", "waiting"),
        ("b", "released", "waiting"),
        ("d", "released", "waiting"),
        ("a", "waiting", "processing"),
    ]
    out = h.finish_all(msgs)
    assert [(m.key, m.state) for m in updates(out)] == [("d", "memory")]
    d_compute = next(m for m in out if isinstance(m, ComputeTaskMsg) and m.key == "d")
    assert set(d_compute.who_has) == {"b", "c"}
