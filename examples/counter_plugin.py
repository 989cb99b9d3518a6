"""The Counter scheduler plugin from Dask's SchedulerPlugin docs, on sluice.

Only the import changed. Run: ``python examples/counter_plugin.py``.
"""

from sluice import Client, LocalCluster, SchedulerPlugin


class Counter(SchedulerPlugin):
    def __init__(self):
        self.counter = 0

    def transition(self, key, start, finish, *args, **kwargs):
        if start == "processing" and finish == "memory":
            self.counter += 1

    def restart(self, scheduler):
        self.counter = 0


def inc(x):
    return x + 1


def count(dask_scheduler):
    return dask_scheduler.plugins["counter"].counter


def main():
    with LocalCluster(n_workers=2) as cluster, Client(cluster) as client:
        client.register_plugin(Counter(), name="counter")  # a copy lives on the scheduler
        client.gather(client.map(inc, range(10)))
        finished = client.run_on_scheduler(count)
        print("tasks finished:", finished)
        return finished


if __name__ == "__main__":
    main()
