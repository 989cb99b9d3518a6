"""'Accessing full task state' from Dask's plugin docs: the plugin keeps the scheduler.

Only the import changed, and the preload is run as a script:
``sluice scheduler --preload examples/task_state_plugin.py``.
"""

from sluice import SchedulerPlugin


class MyPlugin(SchedulerPlugin):
    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.seen = []

    def transition(self, key, start, finish, *args, **kwargs):
        # Get full TaskState
        ts = self.scheduler.tasks[key]
        self.seen.append((key, ts.state, sorted(str(d.key) for d in ts.dependencies)))


def dask_setup(scheduler):
    plugin = MyPlugin(scheduler)
    scheduler.add_plugin(plugin)
