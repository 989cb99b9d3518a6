"""Task specs: what travels from client to worker, and Dask-style graph conversion."""

from __future__ import annotations

import operator

import pytest

from sluice.taskspec import (
    KeyRef,
    TaskSpec,
    dependencies,
    dumps_spec,
    from_dask_graph,
    loads_spec,
    run,
)


def inc(x: int) -> int:
    return x + 1


def test_run_resolves_refs_nested_in_containers_and_kwargs() -> None:
    spec = TaskSpec(
        lambda a, b, c=0: a + sum(b) + c,
        (KeyRef("x"), [KeyRef(("y", 1)), 10]),
        {"c": KeyRef("x")},
    )
    assert dependencies(spec) == {"x", ("y", 1)}
    assert run(spec, {"x": 1, ("y", 1): 2}) == 1 + 12 + 1


def test_specs_survive_pickling_with_closures() -> None:
    offset = 5
    spec = TaskSpec(lambda x: x + offset, (KeyRef("a"),))
    back = loads_spec(dumps_spec(spec))
    assert run(back, {"a": 1}) == 6
    with pytest.raises(TypeError, match="not a task spec"):
        loads_spec(__import__("cloudpickle").dumps(42))


def test_dask_graph_tasks_keys_aliases_literals_and_nested_tasks() -> None:
    graph = {
        "x": 1,
        "y": (inc, "x"),
        ("z", 0): (operator.add, "y", (inc, "x")),
        "alias": "y",
        "total": (sum, ["x", "y", ("z", 0)]),
        "text": "not-a-key",
    }
    specs = from_dask_graph(graph)
    assert dependencies(specs["y"]) == {"x"}
    assert dependencies(specs[("z", 0)]) == {"y", "x"}
    assert dependencies(specs["alias"]) == {"y"}
    assert dependencies(specs["total"]) == {"x", "y", ("z", 0)}
    assert dependencies(specs["text"]) == set()
    data: dict[object, object] = {}
    for key in ["x", "text", "y", ("z", 0), "alias", "total"]:
        data[key] = run(specs[key], data)  # type: ignore[index]
    assert data == {"x": 1, "text": "not-a-key", "y": 2, ("z", 0): 4, "alias": 2, "total": 7}
