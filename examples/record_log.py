"""Record ``examples/logs/small-run.jsonl``: a real run, for testing plugins from a log.

Run from the repository root::

    python examples/record_log.py            # writes examples/logs/small-run.jsonl
    python examples/record_log.py OUT.jsonl  # or anywhere else

An in-process scheduler, two workers of one thread each and a client (the same
servers ``sluice scheduler`` / ``sluice worker`` run, in one process) compute
20 tasks:

- ``("inc", 0)`` ... ``("inc", 15)``: ``i + 1``;
- ``("sum", 0)`` and ``("sum", 1)``: the sums of the first and second eight;
- ``"total"``: the sum of both, with ``retries=1``: it fails once
  (``ConnectionError``, like a flaky upstream) and succeeds when retried;
- ``"bad"``: raises ``ValueError`` and ends ``erred``.

A :class:`sluice.testing.Recorder` attached to the scheduler's bus before it
starts takes every event, the workers' forwarded transitions included, and
writes them with the event-log sink's own writer at the end. The run's
addresses, times and run id differ each time it is recorded; the stories of
the tasks do not (which worker runs what may).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import anyio

from sluice import Client, Scheduler, Worker
from sluice.testing import Recorder

DEFAULT_OUT = Path(__file__).resolve().parent / "logs" / "small-run.jsonl"


def inc(x: int) -> int:
    return x + 1


def add_all(*xs: int) -> int:
    return sum(xs)


def flaky_total(marker: str, *parts: int) -> int:
    """Fails on its first call and works on the retry; the marker file remembers."""
    flag = Path(marker)
    if not flag.exists():
        flag.touch()
        raise ConnectionError("upstream timed out (first try)")
    return sum(parts)


def fail() -> None:
    raise ValueError("bad input")


async def record(out: Path) -> Recorder:
    """Run the 20 tasks on an in-process cluster; return the recorder holding the run."""
    recorder = Recorder()
    with tempfile.TemporaryDirectory() as tmp:
        marker = str(Path(tmp) / "flaky.marker")
        scheduler = Scheduler(port=0)
        recorder.attach(scheduler)  # before start: the recording begins at seq 1
        async with (
            scheduler,
            Worker(scheduler.address, nthreads=1, name="w1"),
            Worker(scheduler.address, nthreads=1, name="w2"),
            Client(scheduler.address, asynchronous=True) as client,
        ):
            incs = client.map(inc, range(16), key=[("inc", i) for i in range(16)])
            sums = [
                client.submit(add_all, *incs[:8], key=("sum", 0)),
                client.submit(add_all, *incs[8:], key=("sum", 1)),
            ]
            total = client.submit(flaky_total, marker, *sums, key="total", retries=1)
            bad = client.submit(fail, key="bad")
            assert await total == sum(range(1, 17))
            assert isinstance(await bad.exception(), ValueError)
            # Let the futures go: the run ends with the tasks released and forgotten.
            del incs, sums, total, bad
    recorder.save(out)
    return recorder


def main(argv: list[str]) -> None:
    out = Path(argv[0]) if argv else DEFAULT_OUT
    out.unlink(missing_ok=True)  # the event-log writer never overwrites a log
    recorder = anyio.run(record, out)
    print(f"{len(recorder.events)} events written to {out}")
    print("story of 'total':", recorder.story("total"))


if __name__ == "__main__":
    main(sys.argv[1:])
