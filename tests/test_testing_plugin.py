"""sluice.testing: the pytest plugin users test their plugins and sinks with.

Unit tests of the recorder, the story helpers and replay_log; the fixtures
from a test's point of view; and, through ``pytester``, whole user test
files: the example file passes, and a broken user plugin fails the user's
test with a message that says what went wrong where.
"""

from __future__ import annotations

import ast
import json
import re
import runpy
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from sluice import EventBus, SchedulerPlugin, SchedulerState, WorkerPlugin
from sluice._core.commands import AddClient, AddWorker, UpdateGraph
from sluice._core.messages import ComputeTaskMsg, TaskErredMsg, TaskFinishedMsg
from sluice.events import Event, Restarted, TaskTransition, UserEvent, WorkerAdded
from sluice.replay import read_events, read_header
from sluice.sinks import Sink
from sluice.testing import (
    Recorder,
    as_events,
    assert_story,
    replay_log,
    story,
    transitions,
)

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
LOG = EXAMPLES / "logs" / "small-run.jsonl"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def inc(x: int) -> int:
    return x + 1


def small_run() -> list[Event]:
    """A run folded by the real state machine: x, y(x) finish, "bad" errs."""
    state = SchedulerState()
    events: list[Event] = []

    def handle(cmd: Any) -> list[ComputeTaskMsg]:
        _, messages = state.handle(cmd, now=float(len(events)), emit=events.append)
        return [m for m in messages if isinstance(m, ComputeTaskMsg)]

    handle(AddWorker(worker="tcp://a"))
    handle(AddClient(client="c"))
    todo = handle(
        UpdateGraph(client="c", keys=("y", "bad"), dependencies={"x": (), "y": ("x",), "bad": ()})
    )
    while todo:
        msg = todo.pop(0)
        if msg.key == "bad":
            todo += handle(TaskErredMsg(worker=msg.worker, key="bad", exception="ValueError(1)"))
        else:
            todo += handle(TaskFinishedMsg(worker=msg.worker, key=msg.key, nbytes=8))
    return events


def t(seq: int, key: Any, start: str, finish: str, source: str = "scheduler") -> TaskTransition:
    return TaskTransition(seq=seq, key=key, start=start, finish=finish, source=source)


# -- Recorder ----------------------------------------------------------------------------


def test_recorder_on_a_bus_keeps_every_event_in_order() -> None:
    bus = EventBus()
    recorder = Recorder()
    sub = bus.subscribe(recorder)
    assert sub.mode == "inline"  # a plain callable: it runs on the publisher
    events = small_run()
    bus.publish_many(events)
    assert recorder.events == events
    assert list(recorder) == events and len(recorder) == len(events)
    counts = recorder.kind_counts()
    assert counts["worker-added"] == 1
    assert counts["task-transition"] == sum(isinstance(e, TaskTransition) for e in events)
    assert recorder.story("y") == [
        ("released", "waiting"),
        ("waiting", "processing"),
        ("processing", "memory"),
    ]
    assert [e.finish for e in recorder.transitions("bad")] == ["waiting", "processing", "erred"]
    assert recorder.state().snapshot() == SchedulerState.from_events(events).snapshot()
    recorder.clear()
    assert recorder.events == []


def test_recorder_kinds_filter_what_it_keeps_and_what_the_bus_routes() -> None:
    bus = EventBus()
    recorder = Recorder(kinds=["worker-added"])
    sub = bus.subscribe(recorder)
    assert sub.kinds == frozenset({"worker-added"})
    bus.publish_many(small_run())
    assert [e.kind for e in recorder.events] == ["worker-added"]
    # Called directly (say, by replay), it filters too.
    recorder(t(99, "z", "released", "waiting"))
    assert len(recorder.events) == 1


def test_attach_catches_up_from_history_and_detach_stops() -> None:
    events = small_run()
    bus = EventBus()
    bus.publish_many(events[:3])

    class Server:  # anything with a .bus, like a Scheduler or a Worker
        def __init__(self, bus: EventBus) -> None:
            self.bus = bus

    recorder = Recorder().attach(Server(bus))
    assert recorder.events == events[:3]  # since=0: what the bus still holds
    bus.publish_many(events[3:5])
    assert recorder.events == events[:5]
    with pytest.raises(RuntimeError, match="already attached"):
        recorder.attach(bus)
    recorder.detach()
    assert "sluice-recorder" not in bus.subscriptions
    bus.publish(events[5])
    assert recorder.events == events[:5]
    recorder.detach()  # twice is fine

    live_only = Recorder().attach(bus, since=None, name="live")
    bus.publish_many(events[6:8])
    assert live_only.events == events[6:8]

    with pytest.raises(TypeError, match="no event bus"):
        Recorder().attach(object())

    # Several recorders on one bus each get a subscription name of their own.
    again = Recorder().attach(bus)
    third = Recorder().attach(bus)
    assert {"sluice-recorder", "sluice-recorder-2", "live"} <= set(bus.subscriptions)
    bus.publish(events[8])
    assert again.events[-1] == third.events[-1] == events[8]


def test_save_writes_a_log_read_events_reads(tmp_path: Path) -> None:
    bus = EventBus(address="tcp://sched:1")
    recorder = Recorder().attach(bus)
    events = small_run()
    bus.publish_many(events)
    path = recorder.save(tmp_path / "run.jsonl")
    assert list(read_events(path)) == events
    header = read_header(path)
    assert header["run_id"] == bus.run_id
    assert header["address"] == "tcp://sched:1"
    with pytest.raises(FileExistsError):
        recorder.save(path)  # never overwrites a log, like the event-log sink
    # A detached recorder saves too, with a run id of its own or the one given.
    loose = Recorder()
    for e in events:
        loose(e)
    path2 = loose.save(tmp_path / "loose.jsonl", run_id="r1")
    assert read_header(path2)["run_id"] == "r1"
    assert SchedulerState.from_events(read_events(path2)).snapshot() == (
        SchedulerState.from_events(events).snapshot()
    )


@pytest.mark.anyio
async def test_wait_for_returns_the_matching_event_without_sleeping() -> None:
    recorder = Recorder()
    recorder(t(1, "x", "released", "waiting"))
    # Already recorded: returns at once.
    assert (await recorder.wait_for(lambda e: getattr(e, "key", None) == "x")).seq == 1

    found: list[Event] = []

    async def waiter() -> None:
        found.append(await recorder.wait_for(lambda e: getattr(e, "finish", None) == "memory"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        assert not found
        recorder(t(2, "x", "waiting", "processing"))
        recorder(t(3, "x", "processing", "memory"))
    assert [e.seq for e in found] == [3]

    # A bus publishing on another thread (say, a sync LocalCluster's) wakes it too.
    found.clear()
    key_z = Recorder()

    async def wait_z() -> None:
        found.append(await key_z.wait_for(lambda e: getattr(e, "key", None) == "z"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait_z)
        await anyio.wait_all_tasks_blocked()
        await anyio.to_thread.run_sync(key_z, t(5, "z", "processing", "memory"))
    assert [e.seq for e in found] == [5]

    with pytest.raises(TimeoutError):
        await recorder.wait_for(lambda e: False, timeout=0.01)


# -- story helpers -----------------------------------------------------------------------


def test_story_and_transitions_read_lists_recorders_and_paths(tmp_path: Path) -> None:
    events = [
        t(1, ("f", 0), "released", "waiting"),
        t(2, ("f", 0), "released", "waiting", source="tcp://w"),
        t(3, ("f", 0), "waiting", "processing"),
        t(4, "g", "released", "waiting"),
    ]
    recorder = Recorder()
    for e in events:
        recorder(e)
    path = recorder.save(tmp_path / "e.jsonl")
    for log in (events, recorder, path, str(path)):
        assert story(log, ("f", 0)) == [("released", "waiting"), ("waiting", "processing")]
        # A list key means the tuple key (as JSON would have it).
        assert story(log, ["f", 0], source="tcp://w") == [("released", "waiting")]
        assert [e.seq for e in transitions(log, ("f", 0), source=None)] == [1, 2, 3]
        assert [e.seq for e in transitions(log)] == [1, 3, 4]
    assert as_events(iter(events)) == events


def test_assert_story_passes_and_returns_the_transitions() -> None:
    events = small_run()
    steps = [("released", "waiting"), ("waiting", "processing"), ("processing", "erred")]
    got = assert_story(events, "bad", steps)
    assert [(e.start, e.finish) for e in got] == steps
    assert_story(events, "bad", [["waiting", "processing"]], partial=True)  # lists work too
    assert_story(events, "bad", [("released", "waiting"), ("processing", "erred")], partial=True)
    assert_story(events, "nothing", [])  # an empty story is a story


def test_assert_story_failure_shows_the_story_and_the_first_divergence() -> None:
    events = small_run()
    expected = [("released", "waiting"), ("waiting", "processing"), ("processing", "memory")]
    with pytest.raises(AssertionError) as info:
        assert_story(events, "bad", expected)
    text = str(info.value)
    assert "story of 'bad' (source 'scheduler') differs from the expected one at step 3" in text
    assert "expected: processing -> memory" in text
    assert "actual:   processing -> erred" in text
    assert "ValueError(1)" in text  # the exception of the diverging step
    assert "  >   3  processing -> erred" in text  # the marker in the actual story
    assert "  >   3  processing -> memory" in text  # ... and in the expected one

    # A story shorter or longer than expected points at where one ends.
    with pytest.raises(AssertionError, match=r"at step 3:\n  expected: \(the story ends\)"):
        assert_story(events, "bad", expected[:2])
    with pytest.raises(AssertionError, match=r"at step 4:\n.*\n  actual:   \(ends\)"):
        assert_story(events, "bad", [*expected[:2], ("processing", "erred"), ("erred", "x")])


def test_assert_story_partial_failure_says_which_step_is_missing() -> None:
    events = small_run()
    with pytest.raises(AssertionError) as info:
        assert_story(
            events, "bad", [("released", "waiting"), ("processing", "memory")], partial=True
        )
    text = str(info.value)
    assert "lacks expected step 2, processing -> memory, after step 1 (seq" in text
    assert "  *   1  released -> waiting" in text
    with pytest.raises(AssertionError, match="lacks expected step 1, a -> b, anywhere"):
        assert_story(events, "bad", [("a", "b")], partial=True)
    # Order matters in partial mode.
    with pytest.raises(AssertionError, match="lacks expected step 2"):
        assert_story(
            events, "bad", [("processing", "erred"), ("released", "waiting")], partial=True
        )


def test_assert_story_of_an_unknown_key_suggests_close_ones() -> None:
    events = [t(1, ("inc", 3), "released", "waiting"), t(2, "other", "released", "waiting")]
    with pytest.raises(AssertionError, match=r"did you mean \('inc', 3\)\?"):
        assert_story(events, ("inc", "3"), [("released", "waiting")])
    with pytest.raises(
        AssertionError, match=re.escape("keys with transitions: ('inc', 3), 'other'")
    ):
        assert_story(events, "zzzzzzzz", [("released", "waiting")])
    with pytest.raises(AssertionError, match="no task transitions at all"):
        assert_story([], "x", [("released", "waiting")])
    with pytest.raises(TypeError, match="pair"):
        assert_story(events, "other", ["released -> waiting"])


# -- replay_log ----------------------------------------------------------------------------


class Finished(SchedulerPlugin):
    def __init__(self) -> None:
        self.keys: list[Any] = []

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if finish == "memory":
            self.keys.append(key)


def test_replay_log_drives_plugins_sinks_and_callables_and_returns_the_state(
    tmp_path: Path,
) -> None:
    events = small_run()
    bus = EventBus()
    recording = Recorder().attach(bus)
    bus.publish_many(events)
    log = recording.save(tmp_path / "run.jsonl")

    class Batches(Sink):
        def __init__(self) -> None:
            self.events: list[Event] = []

        def write(self, batch: Sequence[Event]) -> None:
            self.events.extend(batch)

    plugin, sink, seen = Finished(), Batches(), Recorder()
    state = replay_log(log, plugin, sink, seen)
    assert plugin.keys == ["x", "y"]
    assert sink.events == events and seen.events == events
    assert state.snapshot() == SchedulerState.from_events(events).snapshot()

    # until= stops after that seq, inclusive.
    first_memory = next(e for e in events if getattr(e, "finish", None) == "memory")
    early = Finished()
    state = replay_log(events, early, until=first_memory.seq)
    assert early.keys == ["x"] and state.seq == first_memory.seq


def test_the_sluice_replay_fixture_is_replay_log(sluice_replay: Any) -> None:
    assert sluice_replay is replay_log


def test_replay_log_lets_a_plugin_error_through_with_a_note_on_where() -> None:
    events = small_run()

    class Broken(SchedulerPlugin):
        def transition(self, key: Any, start: str, finish: str, *a: Any, **kw: Any) -> None:
            if finish == "erred":
                raise LookupError(f"no handler for {kw['exception']}")

    with pytest.raises(LookupError, match=r"no handler for ValueError\(1\)") as info:
        replay_log(events, Broken())
    erred = next(e for e in events if getattr(e, "finish", None) == "erred")
    (note,) = info.value.__notes__
    assert f"raised while replaying event seq {erred.seq} of the events given" in note
    assert "task-transition 'bad' processing -> erred (source scheduler, ValueError(1))" in note
    assert "story of 'bad' on scheduler so far: released -> waiting," in note
    # The plugin's own frame is in the traceback.
    assert info.traceback[-1].name == "transition"


def test_replay_log_notes_a_sink_failing_at_the_end_and_at_the_start(tmp_path: Path) -> None:
    events = small_run()

    class FailsOnClose(Sink):
        def write(self, batch: Sequence[Event]) -> None:
            pass

        def close(self) -> None:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full") as info:
        replay_log(events, FailsOnClose())
    assert f"after the last event of the events given (seq {events[-1].seq})" in str(
        info.value.__notes__
    )

    class FailsOnStart(FailsOnClose):
        def start(self) -> None:
            raise OSError("no such queue")

    with pytest.raises(OSError, match="no such queue") as info:
        replay_log(Recorder(), FailsOnStart())
    assert "before the first event of the recorder's events" in str(info.value.__notes__)


def test_replay_log_refuses_what_replay_would_misuse() -> None:
    events = small_run()

    class Mine(WorkerPlugin):
        def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
            pass

    with pytest.raises(TypeError, match="got the class Finished, not an instance"):
        replay_log(events, Finished)
    with pytest.raises(TypeError, match="Mine is a WorkerPlugin"):
        replay_log(events, Mine())
    with pytest.raises(TypeError, match="not a consumer replay can drive"):
        replay_log(events, 42)


# -- the recorded example log and the script that makes it -------------------------------


def test_the_example_log_is_small_and_holds_the_run_its_docstring_describes() -> None:
    lines = LOG.read_text().splitlines()
    assert len(lines) < 400
    assert json.loads(lines[0])["format"] == "sluice-event-log"
    events = as_events(LOG)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))  # gap-free
    keys = {e.key for e in transitions(events)}
    assert keys == {("inc", i) for i in range(16)} | {("sum", 0), ("sum", 1), "total", "bad"}
    assert ("processing", "waiting") in story(events, "total")  # the retry
    assert_story(events, "bad", [("processing", "erred")], partial=True)
    assert len({e.source for e in events} - {"scheduler"}) == 2  # two workers forwarded
    assert SchedulerState.from_events(events).seq == events[-1].seq


def test_record_log_script_records_the_same_stories(tmp_path: Path) -> None:
    script = runpy.run_path(str(EXAMPLES / "record_log.py"))
    out = tmp_path / "fresh.jsonl"
    recorder = anyio.run(script["record"], out)
    fresh = as_events(out)
    assert fresh == recorder.events
    committed = as_events(LOG)
    keys = {e.key for e in transitions(committed)}
    assert keys == {e.key for e in transitions(fresh)}
    for key in keys:
        assert story(fresh, key) == story(committed, key), key


# -- sluice_cluster ------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.sluice_cluster(n_workers=1)
async def test_sluice_cluster_records_a_live_run(sluice_cluster: Any, tmp_path: Path) -> None:
    cluster = sluice_cluster
    assert len(cluster.workers) == 1
    assert cluster.address == cluster.scheduler.address
    assert await cluster.client.submit(inc, 1, key="x") == 2
    await cluster.recorder.wait_for(
        lambda e: isinstance(e, TaskTransition) and e.key == "x" and e.finish == "memory"
    )
    assert_story(
        cluster.recorder, "x", [("waiting", "processing"), ("processing", "memory")], partial=True
    )
    assert cluster.recorder.events[0].kind == "scheduler-started"
    replayed = Finished()
    replay_log(cluster.recorder, replayed)
    assert replayed.keys == ["x"]


# -- whole user test files, through pytester ---------------------------------------------


def test_the_example_test_file_passes(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_inprocess(
        str(EXAMPLES / "test_plugin_from_log.py"), "-p", "no:cacheprovider", "-W", "error"
    )
    result.assert_outcomes(passed=8)


USER_TESTS = """
    import pytest
    from sluice import SchedulerPlugin
    from sluice.testing import assert_story

    LOG = {log!r}

    class CountFailures(SchedulerPlugin):
        def __init__(self):
            self.failures = 0

        def transition(self, key, start, finish, *args, **kwargs):
            if finish == "erred":
                self.failures += kwargs["exc"]  # bug: the argument is called exception

    def test_count_failures(sluice_replay):
        plugin = CountFailures()
        sluice_replay(LOG, plugin)
        assert plugin.failures == 1

    def test_story_of_total():
        assert_story(LOG, "total", [("released", "waiting"), ("waiting", "processing"),
                                    ("processing", "memory")])
"""


def test_a_broken_user_plugin_fails_the_users_test_clearly(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=textwrap.dedent(USER_TESTS.format(log=str(LOG))))
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-W", "error")
    result.assert_outcomes(failed=2)
    out = result.stdout.str()
    # The plugin's own line and error, then where in the log it happened.
    result.stdout.fnmatch_lines(
        [
            '*self.failures += kwargs?"exc"?*',  # (fnmatch: [...] is a class)
            "E*KeyError: 'exc'",
            "E*sluice.testing: raised while replaying event seq * of *small-run.jsonl",
            "E*event: task-transition 'bad' processing -> erred (source scheduler, *",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "E       AssertionError: story of 'total' (source 'scheduler') differs from the"
            " expected one at step 3:",
            "E         expected: processing -> memory",
            "E         actual:   processing -> waiting  seq *ConnectionError*",
        ]
    )
    assert "consumer-failed" not in out  # raised, not swallowed into an event


LIVE_TEST = """
    import pytest
    from sluice import SchedulerPlugin, WorkerPlugin

    @pytest.fixture
    def anyio_backend():
        return "asyncio"

    def inc(x):
        return x + 1

    class Broken({base}):
        name = "broken"
        def transition(self, key, start, finish, *args, **kwargs):
            if finish == "memory":
                raise RuntimeError("cannot count " + repr(key))

    @pytest.mark.anyio
    async def test_live(sluice_cluster):
        await sluice_cluster.client.register_plugin(Broken())
        assert await sluice_cluster.client.submit(inc, 1, key="x") == 2
"""


@pytest.mark.parametrize(
    ("base", "consumer"),
    [("SchedulerPlugin", "plugin-broken: "), ("WorkerPlugin", "worker-plugins (on tcp://*): ")],
)
def test_a_plugin_that_raises_on_a_live_cluster_fails_the_test(
    pytester: pytest.Pytester, base: str, consumer: str
) -> None:
    pytester.makepyfile(test_live=textwrap.dedent(LIVE_TEST.format(base=base)))
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    # The test body passed: the cluster carried on, as it would in production...
    # ...but the fixture's teardown fails the test, naming the consumer and its error.
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_live*",
            "a plugin or sink raised during the test*",
            f"  {consumer}RuntimeError: cannot count 'x'",
        ]
    )


def test_an_unrelated_test_suite_runs_as_before(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_plain="""
        import warnings
        def test_ok(tmp_path):
            (tmp_path / "x.txt").write_text("y")
            assert (tmp_path / "x.txt").read_text() == "y"
        """
    )
    with_plugin = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-W", "error")
    with_plugin.assert_outcomes(passed=1)
    fixtures = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--fixtures")
    fixtures.stdout.fnmatch_lines(["*sluice_recorder*", "*sluice_replay*", "*sluice_cluster*"])


def test_importing_the_plugin_is_cheap() -> None:
    """pytest loads the plugin in every suite: it must not pull in the servers."""
    code = textwrap.dedent(
        """
        import sys
        import pytest
        import sluice.testing
        print(sorted(m for m in sys.modules if m.startswith("sluice") or m in HEAVY))
        """
    ).replace("HEAVY", repr(("cloudpickle", "yaml", "click", "anyio", "msgpack", "rich")))
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    loaded = set(ast.literal_eval(done.stdout))
    assert {"sluice", "sluice.testing", "sluice._testing_recorder"} <= loaded
    heavy = {"cloudpickle", "yaml", "click", "anyio", "msgpack", "rich"}
    servers = {"sluice.scheduler", "sluice.worker", "sluice.client", "sluice.nanny"}
    assert not loaded & (heavy | servers), loaded


def test_the_plugin_is_registered_under_its_entry_point(pytestconfig: pytest.Config) -> None:
    import sluice.testing

    assert pytestconfig.pluginmanager.get_plugin("sluice") is sluice.testing


def test_scheduler_plugins_skip_worker_transitions_callables_see_everything() -> None:
    events: list[Event] = [
        WorkerAdded(seq=1, worker="tcp://w"),
        t(2, "x", "released", "waiting", source="tcp://w"),
        UserEvent(seq=3, topic="t", msg=1),
        Restarted(seq=4),
    ]
    plugin, everything = Finished(), Recorder()
    replay_log(events, plugin, everything, scheduler_view=False)
    assert plugin.keys == [] and everything.events == events
