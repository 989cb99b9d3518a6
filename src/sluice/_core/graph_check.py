"""Is a submitted graph acceptable? Known dependencies, known wanted keys, no cycle.

A pure function of the scheduler's tasks and the submission, so the state
machine can refuse a bad graph before it emits anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from sluice._core.scheduler_fold import GraphError, SchedulerTask
from sluice._core.transitions import FORGOTTEN
from sluice.events import Key

__all__ = ("check_graph",)


def check_graph(
    tasks: Mapping[Key, SchedulerTask],
    wanted: Iterable[Key],
    new: Mapping[Key, tuple[Key, ...]],
) -> None:
    """Raise :class:`GraphError` unless ``new`` (key -> dependencies) fits ``tasks``."""

    def known(key: Key) -> bool:
        if key in new:
            return True
        ts = tasks.get(key)
        return ts is not None and ts.state != FORGOTTEN

    for key, kdeps in new.items():
        for dep in kdeps:
            if not known(dep):
                raise GraphError(f"task {key!r} depends on unknown key {dep!r}")
    for key in wanted:
        if not known(key):
            raise GraphError(f"wanted key {key!r} is not in the graph")
    # Only new tasks can form a cycle: existing tasks keep their dependencies.
    done: set[Key] = set()
    for root, root_deps in new.items():
        if root in done:
            continue
        if not root_deps:
            done.add(root)
            continue
        on_path = {root}
        stack = [(root, iter(root_deps))]
        while stack:
            key, deps = stack[-1]
            for dep in deps:
                if dep in on_path:
                    raise GraphError(f"the graph has a cycle through {dep!r}")
                if dep in new and dep not in done:
                    on_path.add(dep)
                    stack.append((dep, iter(new[dep])))
                    break
            else:
                stack.pop()
                on_path.discard(key)
                done.add(key)
