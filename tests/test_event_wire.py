"""Events sent to a sink's child process come back with the JSON an in-process sink writes."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sluice._amqp_spool import message_encoder
from sluice._amqp_url import RoutingKey
from sluice._event_wire import EventView, decode_batch, encode_batch
from sluice.events import ComputeRequested, GraphUpdated, TaskTransition, UserEvent, from_dict
from sluice.replay import read_events
from sluice.sinks._json import event_json

SMALL_RUN = Path(__file__).parent.parent / "examples" / "logs" / "small-run.jsonl"

pytestmark = pytest.mark.timeout(60)


def fresh(events: list[Any]) -> list[Any]:
    """Copies with no JSON cached yet, as a scheduler's new events are."""
    return [from_dict(e.to_dict()) for e in events]


def test_a_runs_events_come_back_with_their_json_and_dicts() -> None:
    events = list(read_events(SMALL_RUN))
    assert {e.kind for e in events} >= {"task-transition", "graph-updated", "worker-added"}
    got = decode_batch(encode_batch(fresh(events)))
    assert [e.to_json() for e in got] == [e.to_json() for e in events]
    assert [e.to_dict() for e in got] == [e.to_dict() for e in events]
    assert [e.kind for e in got] == [e.kind for e in events]
    assert [e.seq for e in got] == [e.seq for e in events]
    views = [e for e in got if isinstance(e, EventView)]
    assert views and all(v.event() == e for v, e in zip(got, events, strict=True) if v in views)


def test_shaped_dicts_and_nested_keys_survive() -> None:
    events = [
        GraphUpdated(
            seq=1,
            client="c",
            keys=(("a", 1), "b"),
            dependencies={("a", 1): ("b",), "b": ()},
            priority={"b": 3},
        ),
        ComputeRequested(seq=2, key=("x", ("y", 2)), who_has={("d", 1): ("tcp://w:1",)}),
        TaskTransition(seq=3, key=("x", ("y", 2)), start="waiting", finish="processing"),
    ]
    got = decode_batch(encode_batch(fresh(events)))
    assert got[:2] == events[:2]  # real events for the kinds that shape their dicts
    assert got[2].to_dict() == events[2].to_dict()  # the tuple key is a tuple again
    assert [e.to_json() for e in got] == [e.to_json() for e in events]


def test_user_events_are_written_as_in_process_odd_values_warn_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="sluice.sinks")
    paris = datetime.timezone(datetime.timedelta(hours=1))

    def make() -> list[Any]:
        return [
            UserEvent(seq=1, topic="t", msg={"obj": object, "tuple": (1, 2)}),
            # msgpack would bring this back in UTC: user events go as their JSON.
            UserEvent(seq=2, topic="t", msg={"at": datetime.datetime(2026, 1, 1, tzinfo=paris)}),
            UserEvent(seq=3, topic="t", msg={"big": 10**30, "ok": [1, {"z": None}]}),
        ]

    expected = [event_json(e) for e in make()]
    caplog.clear()
    got = decode_batch(encode_batch(make()))
    assert [e.to_json() for e in got] == expected
    assert orjson.loads(got[0].to_json())["msg"]["obj"] == repr(object)
    assert b'"2026-01-01T00:00:00+01:00"' in got[1].to_json()
    warnings = [r for r in caplog.records if "not JSON-safe" in r.getMessage()]
    assert len(warnings) == 1


def test_a_key_msgpack_cannot_carry_goes_as_json() -> None:
    events = [
        GraphUpdated(seq=1, client="c", keys=(("big", 2**70),), dependencies={("big", 2**70): ()}),
        TaskTransition(seq=2, key="k", start="waiting", finish="processing"),
    ]
    got = decode_batch(encode_batch(fresh(events)))
    assert [e.to_json() for e in got] == [e.to_json() for e in events]
    assert isinstance(got[1], EventView)  # the rest of the batch still goes as fields


def test_messages_made_in_the_child_equal_the_in_process_ones() -> None:
    events = [
        TaskTransition(seq=5, key=("inc", 3), start="processing", finish="memory"),
        TaskTransition(seq=6, key="x", start="processing", finish="erred", exception="E"),
    ]
    for template in ("sluice-events", "task.{finish}.{key[0]}"):
        encode = message_encoder("run:", RoutingKey(template))
        here = [encode(e) for e in fresh(events)]
        there = [encode(e) for e in decode_batch(encode_batch(fresh(events)))]
        assert there == here
    assert here[0][:2] == ("run:5", "task.memory.inc")


keys = st.recursive(
    st.text(max_size=8) | st.integers(-(2**63), 2**63 - 1),
    lambda inner: st.tuples(inner, inner) | st.tuples(inner),
    max_leaves=6,
).filter(lambda k: isinstance(k, str | tuple))
optional_floats = st.none() | st.floats(allow_nan=False)


@given(
    key=keys,
    start=st.text(max_size=10),
    time=st.floats(allow_nan=False),
    nbytes=st.none() | st.integers(0, 2**63 - 1),
    duration=optional_floats,
    traceback=st.none() | st.text(max_size=30),
)
def test_any_transition_comes_back_as_it_would_be_written(
    key: Any, start: str, time: float, nbytes: int | None, duration: float | None, traceback: Any
) -> None:
    event = TaskTransition(
        seq=1,
        time=time,
        key=key,
        start=start,
        finish="memory",
        nbytes=nbytes,
        duration=duration,
        traceback=traceback,
    )
    (got,) = decode_batch(encode_batch(fresh([event])))
    assert got.to_json() == event.to_json()
    assert got.to_dict() == event.to_dict()
