"""Testing scheduler plugins and sinks from a recorded event log, with no cluster.

What a user's test file looks like: the fixtures come from ``sluice.testing``,
a pytest plugin that is active wherever sluice is installed. The log,
``logs/small-run.jsonl``, is a real run of 20 tasks (made by
``record_log.py``): sixteen ``("inc", i)``, two ``("sum", j)``, a ``"total"``
that fails once and succeeds on its retry, and a ``"bad"`` task that fails.

Run: ``pytest examples/test_plugin_from_log.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from counter_plugin import Counter  # examples/counter_plugin.py, the Dask docs' plugin

from sluice import SchedulerPlugin
from sluice.events import Event, Restarted, TaskTransition
from sluice.sinks import Sink
from sluice.sinks.errors import ErrorLogger
from sluice.testing import as_events, assert_story, story, transitions

LOG = Path(__file__).parent / "logs" / "small-run.jsonl"


# -- the plugins and sinks under test ----------------------------------------------------


class RetryTracker(SchedulerPlugin):
    """Counts, per task, how often it went back from processing to waiting (a retry),
    and which tasks finally failed, with their exception."""

    def __init__(self) -> None:
        self.retries: dict[Any, int] = {}
        self.failed: dict[Any, str] = {}
        self.graph_sizes: list[int] = []

    def update_graph(self, scheduler: Any, *, keys: Any, tasks: Any, **kwargs: Any) -> None:
        self.graph_sizes.append(len(tasks))

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if (start, finish) == ("processing", "waiting"):
            self.retries[key] = self.retries.get(key, 0) + 1
        if finish == "erred":
            self.failed[key] = kwargs["exception"]


class DependencyWidth(SchedulerPlugin):
    """Reads the full task state, as Dask's docs show: how many dependencies each
    task had when it finished. The scheduler comes from a hook argument."""

    def __init__(self) -> None:
        self.scheduler: Any = None
        self.width: dict[Any, int] = {}

    def add_worker(self, scheduler: Any, worker: str) -> None:
        self.scheduler = scheduler

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if finish == "memory":
            self.width[key] = len(self.scheduler.tasks[key].dependencies)


class SlowTasks(Sink):
    """A sink: the tasks whose execution on a worker took longer than ``limit`` seconds."""

    kinds = frozenset({"task-transition"})

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.executed: list[Any] = []
        self.slow: list[Any] = []
        self.closed = False

    def write(self, batch: Sequence[Event]) -> None:
        for e in batch:
            if isinstance(e, TaskTransition) and e.start == "executing" and e.finish == "memory":
                self.executed.append(e.key)
                if e.duration is not None and e.duration > self.limit:
                    self.slow.append(e.key)

    def close(self) -> None:
        self.closed = True


# -- the tests -----------------------------------------------------------------------------


def test_counter_counts_every_task_that_finished(sluice_replay: Any) -> None:
    counter = Counter()
    sluice_replay(LOG, counter)
    # 16 incs + 2 sums + the total (on its retry); "bad" never reached memory.
    assert counter.counter == 19


def test_counter_resets_on_restart(sluice_replay: Any) -> None:
    counter = Counter()
    sluice_replay(LOG, counter)
    assert counter.counter == 19
    # Events made by hand drive a plugin too; a piece of a run (not from seq 1)
    # cannot be folded into a scheduler state, so it is replayed without one.
    last = as_events(LOG)[-1]
    sluice_replay([Restarted(seq=last.seq + 1, time=last.time)], counter, scheduler_view=False)
    assert counter.counter == 0


def test_retry_tracker_sees_the_retry_and_the_failure(sluice_replay: Any) -> None:
    tracker = RetryTracker()
    sluice_replay(LOG, tracker)
    assert tracker.retries == {"total": 1}
    assert list(tracker.failed) == ["bad"]
    assert "ValueError" in tracker.failed["bad"]
    assert sum(tracker.graph_sizes) == 20


def test_a_plugin_reads_the_task_state_it_would_have_read_live(sluice_replay: Any) -> None:
    plugin = DependencyWidth()
    sluice_replay(LOG, plugin)
    assert plugin.width[("inc", 0)] == 0
    assert plugin.width[("sum", 0)] == 8
    assert plugin.width["total"] == 2


def test_the_state_at_the_moment_of_the_first_failure(sluice_replay: Any) -> None:
    (retry,) = [
        t for t in transitions(LOG, "total") if t.start == "processing" and t.finish == "waiting"
    ]
    state = sluice_replay(LOG, until=retry.seq)  # no consumer: just the state at that seq
    assert state.tasks["total"].state == "waiting"  # back to waiting, to be retried
    assert state.tasks[("sum", 1)].state == "memory"


def test_the_stories_of_the_retried_and_the_failed_task() -> None:
    assert_story(
        LOG,
        "total",
        [
            ("released", "waiting"),
            ("waiting", "processing"),
            ("processing", "waiting"),  # failed once: retried
            ("waiting", "processing"),
            ("processing", "memory"),
            ("memory", "released"),
            ("released", "forgotten"),
        ],
    )
    # partial=True: these steps in this order, anything around them.
    assert_story(LOG, "bad", [("processing", "erred")], partial=True)
    # A worker's side of the story: it ran "total" twice.
    assert [s for s in story(LOG, "total", source=None) if s[0] == "executing"] == [
        ("executing", "error"),
        ("executing", "memory"),
    ]


def test_the_errors_sink_logs_both_failures(
    sluice_replay: Any, caplog: pytest.LogCaptureFixture
) -> None:
    sink = ErrorLogger()
    with caplog.at_level(logging.ERROR, logger="sluice.errors"):
        sluice_replay(LOG, sink)
    failed = [(e.key, e.finish) for e in sink.errors]
    # On the scheduler "bad" erred; on the workers "bad" and the first try of "total" errored.
    assert failed.count(("bad", "erred")) == 1
    assert ("total", "error") in failed and ("total", "erred") not in failed
    assert "ConnectionError" in caplog.text and "ValueError" in caplog.text


def test_a_custom_sink_gets_its_batches_and_is_closed(sluice_replay: Any) -> None:
    sink = SlowTasks(limit=60.0)
    sluice_replay(LOG, sink)
    assert len(sink.executed) == 19 and sink.slow == []
    assert sink.closed
