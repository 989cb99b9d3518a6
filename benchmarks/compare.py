"""sluice against Dask distributed, side by side, in one run on this machine.

Both run the same two workloads on a local cluster of 2 worker processes with 1
thread each:

- ``flat``: 10,000 independent ``inc`` tasks (``client.map`` then ``gather``);
- ``tree``: a pairwise tree reduction over 10,000 leaves, submitted as one
  Dask-style graph with ``client.get`` (19,999 tasks).

Rates are tasks per second from submission to the last result; each figure is the
median of ``--repeats`` runs after one warm-up run on a fresh cluster. Dask
comes from the ``bench`` extra: ``make bench`` or
``.venv/bin/pip install -e '.[bench]'``.

Run: ``.venv/bin/python benchmarks/compare.py [--quick] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()


def inc(x: int) -> int:
    return x + 1


def add(x: int, y: int) -> int:
    return x + y


def tree_graph(n_leaves: int) -> tuple[dict[Any, Any], Any, int]:
    """A Dask-style graph summing ``inc(i)`` for i < n by pairwise additions."""
    graph: dict[Any, Any] = {("leaf", i): (inc, i) for i in range(n_leaves)}
    level = [("leaf", i) for i in range(n_leaves)]
    depth = 0
    while len(level) > 1:
        depth += 1
        nxt = []
        for j in range(0, len(level) - 1, 2):
            key = ("add", depth, j // 2)
            graph[key] = (add, level[j], level[j + 1])
            nxt.append(key)
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return graph, level[0], len(graph)


def run_flat(client: Any, n: int) -> float:
    start = time.perf_counter()
    futures = client.map(inc, range(n), pure=False)
    results = client.gather(futures)
    elapsed = time.perf_counter() - start
    if results != list(range(1, n + 1)):
        raise SystemExit("flat: wrong results")
    del futures
    return n / elapsed


def run_tree(client: Any, n_leaves: int) -> float:
    graph, root, n_tasks = tree_graph(n_leaves)
    start = time.perf_counter()
    total = client.get(graph, root)
    elapsed = time.perf_counter() - start
    if total != sum(range(1, n_leaves + 1)):
        raise SystemExit(f"tree: wrong result {total}")
    return n_tasks / elapsed


def measure(client: Any, fn: Callable[[Any, int], float], n: int, repeats: int) -> float:
    fn(client, max(n // 10, 10))  # warm-up: imports, connections, first pickles
    return statistics.median(fn(client, n) for _ in range(repeats))


def bench_sluice(n: int, repeats: int) -> dict[str, float]:
    from sluice._tuning import tune_process
    from sluice.client import Client
    from sluice.deploy import LocalCluster

    tune_process()
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True)
    with cluster, Client(cluster) as client:
        return {
            "flat": measure(client, run_flat, n, repeats),
            "tree": measure(client, run_tree, n, repeats),
        }


def bench_dask(n: int, repeats: int) -> dict[str, float]:
    import dask
    from distributed import Client, LocalCluster

    dask.config.set({"distributed.worker.daemon": False})
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        return {
            "flat": measure(client, run_flat, n, repeats),
            "tree": measure(client, run_tree, n, repeats),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 tasks, 1 repeat (CI smoke)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n = 2_000 if args.quick else 10_000
    repeats = 1 if args.quick else args.repeats
    try:
        import distributed  # noqa: F401
    except ImportError:
        sys.exit("Dask distributed is not installed: pip install -e '.[bench]'")
    with console.status("sluice..."):
        ours = bench_sluice(n, repeats)
    with console.status("Dask distributed..."):
        theirs = bench_dask(n, repeats)
    table = Table(title=f"sluice vs Dask distributed, 2 worker processes x 1 thread, n={n:,}")
    table.add_column("workload")
    table.add_column("sluice tasks/s", justify="right")
    table.add_column("Dask tasks/s", justify="right")
    table.add_column("ratio", justify="right")
    for name, label in (("flat", f"{n:,} independent inc"), ("tree", f"tree over {n:,}")):
        ratio = ours[name] / theirs[name]
        table.add_row(label, f"{ours[name]:,.0f}", f"{theirs[name]:,.0f}", f"{ratio:.2f}x")
    console.print(table)


if __name__ == "__main__":
    main()
