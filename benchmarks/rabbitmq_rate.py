"""The RabbitMQ sink's sustained publish rate, with publisher confirms.

    python benchmarks/rabbitmq_rate.py [--url amqp://guest:guest@127.0.0.1:5672/] [-n 200000]

Writes ``n`` TaskTransition events in batches of 1,000 straight into a
:class:`sluice.sinks.rabbitmq.RabbitMQ` sink (as the bus's drain thread would),
and times until the broker confirmed every one; for the default publisher
thread and for the child-process publisher (``process=True``). Then it measures:

- the CPU time per event: of this process (for the thread: all of the
  publishing; for ``process=True``: the encoding and the pipe), and of the child;
- how much a publishing sink slows a CPU-bound loop in the main thread: the
  same loop is timed alone, beside the thread publisher and beside the process
  publisher. On a machine with few cores the broker and the child also take CPU
  from the loop; the difference between the thread and process runs is the GIL.

``measure_rate(url, n)`` is importable by other benchmark scripts. A fresh queue
is declared for each run and deleted afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import tempfile
import threading
import time
import urllib.parse
import uuid
from typing import Any

from sluice.events import TaskTransition
from sluice.sinks.rabbitmq import RabbitMQ

URL = "amqp://guest:guest@127.0.0.1:5672/"


def _events(n: int) -> list[TaskTransition]:
    now = time.time()
    states = ("released", "waiting", "processing", "memory")
    return [
        TaskTransition(
            seq=i + 1,
            time=now,
            key=("inc", i // 3),
            start=states[i % 3],
            finish=states[i % 3 + 1],
            stimulus_id=f"compute-task-{i}",
            worker="tcp://127.0.0.1:40000",
        )
        for i in range(n)
    ]


def _delete_queue(url: str, queue: str) -> None:
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        connection.channel().queue_delete(queue)
    finally:
        connection.close()


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _publish(
    url: str,
    n: int,
    *,
    process: bool = False,
    batch: int = 1_000,
    max_inflight: int = 10_000,
    queue_args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run one publish of ``n`` events; returns timings and the sink's stats."""
    events = _events(n)
    queue = f"sluice-bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as spool:
        # Room for the whole burst in memory: this measures publishing, not the spool.
        sink = RabbitMQ(
            url,
            queue=queue,
            spool=spool,
            close_timeout=60,
            max_memory=max(n, 100_000),
            max_inflight=max_inflight,
            process=process,
            queue_args=queue_args,
        )
        broker = _broker_process(url)
        broker0 = _cpu_of(broker)
        children0 = _children_cpu()
        try:
            sink.start()
            # Wait for the connection, so the rate is not the broker's connect time.
            deadline = time.monotonic() + 30
            while not sink.connected and time.monotonic() < deadline:
                time.sleep(0.01)  # polling the sink's status; it offers no event
            cpu0, t0 = time.process_time(), time.perf_counter()
            for i in range(0, n, batch):
                sink.write(events[i : i + batch])
            handed = time.perf_counter() - t0
            while sink.stats()["published"] < n:
                time.sleep(0.005)  # polling the sink's counter; it offers no event
            published = time.perf_counter() - t0
            if not sink.wait_confirmed(timeout=600):
                raise RuntimeError(f"not confirmed in time: {sink.stats()}")
            elapsed = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
            broker_cpu = _cpu_of(broker) - broker0
            stats = sink.stats()
        finally:
            sink.close()
            _delete_queue(url, queue)
        child_cpu = _children_cpu() - children0  # the child is reaped by close()
    return {
        "elapsed": elapsed,
        "handed": handed,
        "published": published,
        "cpu": cpu,
        "child_cpu": child_cpu,
        "broker_cpu": broker_cpu,
        "stats": stats,
    }


#: What RabbitMQ 3.13's classic queues do by default, asked for on an older broker.
LAZY_V2 = {"x-queue-mode": "lazy", "x-queue-version": 2}


def _broker_process(url: str) -> Any:
    """The broker's ``beam.smp`` listening on the URL's port (psutil), or None."""
    try:
        import psutil
    except ImportError:
        return None
    port = urllib.parse.urlsplit(url).port or 5672
    for proc in psutil.process_iter(["name"]):
        if "beam" not in (proc.info["name"] or ""):
            continue
        with contextlib.suppress(psutil.Error):
            if any(c.laddr.port == port and c.status == "LISTEN" for c in proc.net_connections()):
                return proc
    return None


def _cpu_of(proc: Any) -> float:
    if proc is None:
        return float("nan")
    times = proc.cpu_times()
    return float(times.user + times.system)


def measure_rate(
    url: str = URL,
    n: int = 200_000,
    *,
    process: bool = False,
    queue_args: dict[str, Any] | None = None,
) -> float:
    """Events per second written into the sink and confirmed by the broker."""
    result = _publish(url, n, process=process, queue_args=queue_args)
    return n / float(result["elapsed"])


def _spin(loops: int) -> float:
    """A CPU-bound loop; returns its wall time."""
    t0 = time.perf_counter()
    x = 0
    for i in range(loops):
        x += i * i % 7
    return time.perf_counter() - t0


def gil_effect(url: str = URL, n: int = 100_000, loops: int = 10_000_000) -> dict[str, float]:
    """Wall time of a CPU-bound loop: alone, beside a thread publisher, beside a process one."""
    times = {"alone": _spin(loops)}
    for name, process in (("thread", False), ("process", True)):
        publisher = threading.Thread(target=_publish, args=(url, n), kwargs={"process": process})
        publisher.start()
        time.sleep(1.0)  # let it start, connect and get going before timing the loop
        times[name] = _spin(loops)
        publisher.join()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--url", default=URL)
    parser.add_argument("-n", type=int, default=200_000)
    args = parser.parse_args()
    n = args.n

    runs = [(False, None, ""), (True, None, ""), (True, LAZY_V2, ", queue x-queue-mode=lazy, v2")]
    for process, queue_args, what in runs:
        r = _publish(args.url, n, process=process, queue_args=queue_args)
        print(f"-- publisher {'process' if process else 'thread'}{what}: {n:,} events")
        print(f"   handed over in:  {r['handed']:.3f} s")
        print(f"   all confirmed:   {r['elapsed']:.2f} s")
        print(f"   rate:            {n / r['elapsed']:,.0f} events/s (target >= 15,000)")
        print(f"   CPU per event:   {1e6 * r['cpu'] / n:.1f} us in this process", end="")
        if process:
            print(f", {1e6 * r['child_cpu'] / n:.1f} us in the child")
        else:
            print()
        print(f"   broker CPU:      {1e6 * r['broker_cpu'] / n:.1f} us per event")
        print(f"   sink stats:      {r['stats']}")
    # The sink alone: with a confirm window as large as the run it never waits for
    # the broker's acks, so "all published" is the client side's own rate.
    r = _publish(args.url, n, max_inflight=n)
    print(f"-- publisher thread, window {n:,} (never waits for acks)")
    print(f"   all published:   {r['published']:.2f} s = {n / r['published']:,.0f} events/s")
    print(f"   all confirmed:   {r['elapsed']:.2f} s = {n / r['elapsed']:,.0f} events/s")
    gil = gil_effect(args.url, min(n, 100_000))
    alone = gil["alone"]
    print(f"-- a CPU-bound loop in the main thread: {alone:.2f} s alone")
    for where in ("thread", "process"):
        t = gil[where]
        print(f"   beside a {where + ' publisher:':19} {t:.2f} s ({100 * (t / alone - 1):+.0f}%)")


if __name__ == "__main__":
    main()
