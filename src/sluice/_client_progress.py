"""``Client.progress(futures)``: progress bars (rich) until a set of futures is done.

One bar per key prefix (``inc`` for ``inc-5f3e...``, ``load`` for
``("load", 3)``), as Dask groups its progress bars, plus a total when there is
more than one group. Failed and cancelled futures count as done and are shown
in red beside their bar.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import TYPE_CHECKING, Any

import anyio
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sluice._client_data import walk_futures

if TYPE_CHECKING:
    from sluice._client_futures import Future
    from sluice.events import Key

__all__ = ("key_prefix", "show_progress")

_TOKEN = re.compile(r"-[0-9a-f]{8,}$")


def key_prefix(key: Key) -> str:
    """The group a key is shown in: a tuple's first element, a string without its token."""
    if isinstance(key, tuple):
        return key_prefix(key[0]) if key else "()"
    return _TOKEN.sub("", key) or key


async def show_progress(
    futures: Any, *, console: Console | None = None, transient: bool = False
) -> dict[str, int]:
    """Show bars until every future in ``futures`` (a future, or a nested collection of
    them) is done; return the counts by final status (finished, error, cancelled...)."""
    found: dict[Key, Future] = {}
    walk_futures(futures, found)
    groups = Counter(key_prefix(k) for k in found)
    failed: Counter[str] = Counter()
    outcome: Counter[str] = Counter()
    arrived = anyio.Event()
    queue: list[Future] = []

    def done_callback(future: Future) -> Any:
        def callback() -> None:
            queue.append(future)
            arrived.set()

        return callback

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[failed]}"),
        TimeElapsedColumn(),
        console=console,
        transient=transient,
    ) as progress:
        bars = {
            name: progress.add_task(name, total=n, failed="") for name, n in groups.most_common()
        }
        total = progress.add_task("total", total=len(found), failed="") if len(groups) > 1 else None
        for future in found.values():
            future._state.add_callback(done_callback(future))
        remaining = len(found)
        while remaining:
            # Callbacks run on this loop, so nothing lands between the test and the wait.
            while not queue:
                arrived = anyio.Event()
                await arrived.wait()
            future = queue.pop(0)
            remaining -= 1
            status = future._state.status
            outcome[status] += 1
            name = key_prefix(future.key)
            if status != "finished":
                failed[name] += 1
                progress.update(bars[name], failed=f"[red]{failed[name]} {status}[/]")
            progress.advance(bars[name])
            if total is not None:
                progress.advance(total)
    return dict(outcome)
