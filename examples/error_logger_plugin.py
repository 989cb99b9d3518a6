"""The ErrorLogger worker plugin from Dask's WorkerPlugin docs, on sluice.

Dask's example reads ``self.worker.exceptions[key]``; sluice keeps that mapping
too, and also passes ``exception=`` to ``transition``. Registered with
``client.register_plugin`` (``register_worker_plugin`` still works, deprecated).
"""

import logging

from sluice import Client, LocalCluster, WorkerPlugin, get_worker


class ErrorLogger(WorkerPlugin):
    def __init__(self, logger):
        self.logger = logger

    def setup(self, worker):
        self.worker = worker

    def transition(self, key, start, finish, *args, **kwargs):
        if finish == "error":
            exc = self.worker.exceptions[key]
            self.logger.error("Task '%s' has failed with exception: %s" % (key, str(exc)))


def fail(x):
    raise ValueError(f"bad value {x}")


def plugin_names():
    return sorted(get_worker().plugins)


def main():
    logging.basicConfig()
    with LocalCluster(n_workers=1, processes=False) as cluster, Client(cluster) as client:
        client.register_plugin(ErrorLogger(logging.getLogger("errors")), name="error-logger")
        print("plugins on the worker:", client.submit(plugin_names).result())
        future = client.submit(fail, 3)
        print("the task raised:", repr(future.exception()))


if __name__ == "__main__":
    main()
