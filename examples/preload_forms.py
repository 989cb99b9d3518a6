"""Every way to hand a preload to a sluice service, in one runnable script.

Run: ``python examples/preload_forms.py``. It starts an in-process scheduler and
worker with preloads given as a file path, a module name, script text and
configuration, and prints what each one did. (The fourth form, an ``https://``
URL pinned with ``#sha256=``, needs a web server: see docs/preloads.md.)
"""

import sys
import tempfile
from pathlib import Path

import anyio

import sluice.config
from sluice import Client, Scheduler, Worker

SETUP = """
def sluice_setup(service):
    service.greetings = getattr(service, "greetings", []) + [{name!r}]
"""


def who_greeted(dask_worker):
    return dask_worker.greetings


async def main():
    folder = Path(tempfile.mkdtemp())
    (folder / "by_path.py").write_text(SETUP.format(name="a .py path"))
    (folder / "by_module.py").write_text(SETUP.format(name="a module name"))
    sys.path.insert(0, str(folder))
    text = SETUP.format(name="script text")
    from_config = SETUP.format(name="configuration")

    # Workers made inside this block take their preloads from the configuration.
    with sluice.config.set({"sluice.worker.preload": [from_config]}):
        async with Scheduler(port=0, preload=[str(folder / "by_path.py"), "by_module", text]) as s:
            print("scheduler:", s.greetings)
            async with Worker(s.address), Client(s.address, asynchronous=True) as c:
                greeted = await c.run(who_greeted)
                print("worker:", next(iter(greeted.values())))
    sys.path.remove(str(folder))
    return s.greetings, next(iter(greeted.values()))


if __name__ == "__main__":
    anyio.run(main)
