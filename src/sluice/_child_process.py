"""Start a helper child process that talks to this one over two pipes.

Sinks whose work is CPU in Python (the RabbitMQ publisher, the file sinks with
``process=true``) can do it in a child, so it neither holds the GIL the
scheduler's loop needs nor shares its core when the machine has one to spare.
The child is a plain ``python -m MODULE DOWN_FD UP_FD NICE``, not
multiprocessing: spawn would re-import the user's ``__main__`` module, and fork
is unsafe in a process with threads.

The child runs at a lower CPU priority than its parent (config
``sluice.sinks.child-nice``, 19 by default: the lowest). On a machine whose cores
are all busy, the scheduler and its workers then run first and the sinks' work
waits for a free moment, in the pipe and in the sink's own memory and spool; with
a core to spare, the child has it and keeps up.
"""

from __future__ import annotations

import contextlib
import fcntl
import multiprocessing.connection
import os
import signal
import subprocess
import sys
from pathlib import Path

from sluice import config

__all__ = ("child_pipes", "grow_pipe", "spawn_child")


def grow_pipe(fd: int) -> None:
    """Make the pipe hold several batches (Linux), so a write rarely waits on the child."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    if set_size is None:
        return
    for size in (4 << 20, 1 << 20):
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, set_size, size)
            return


def spawn_child(
    module: str,
) -> tuple[
    subprocess.Popen[bytes],
    multiprocessing.connection.Connection,
    multiprocessing.connection.Connection,
]:
    """Run ``python -m module DOWN_FD UP_FD NICE``: the process, the pipe down to it
    (this process writes) and the pipe up from it (this process reads).

    A bad ``sluice.sinks.child-nice`` is a :class:`~sluice.config.ConfigError` here,
    in the parent, before any process starts."""
    nice = int(config.get("sluice.sinks.child-nice"))
    down_r, down_w = os.pipe()  # parent -> child: batches and commands
    up_r, up_w = os.pipe()  # child -> parent: replies, status, log records
    grow_pipe(down_w)
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parent.parent)  # the directory holding sluice/
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, str(down_r), str(up_w), str(nice)],
            pass_fds=(down_r, up_w),
            stdin=subprocess.DEVNULL,
            env=env,
        )
    except BaseException:
        for fd in (down_w, up_r):
            os.close(fd)
        raise
    finally:
        os.close(down_r)
        os.close(up_w)
    down = multiprocessing.connection.Connection(down_w, readable=False)
    up = multiprocessing.connection.Connection(up_r, writable=False)
    return proc, down, up


def child_pipes(
    argv: list[str],
) -> tuple[multiprocessing.connection.Connection, multiprocessing.connection.Connection]:
    """In the child: the pipe down from the parent (read) and up to it (write).

    The child then runs at the CPU priority its parent chose (see the module doc),
    and ignores SIGINT and SIGTERM. Ctrl-C in a terminal (or systemd
    stopping the unit) signals the whole process group; the parent closes its
    sinks on that signal and needs its children alive to hand them what is left.
    A child ends when the parent tells it to or when the pipe down ends (the
    parent is gone), and finishes its sinks' work either way.
    """
    with contextlib.suppress(OSError):  # a platform without nice keeps the priority
        os.nice(int(argv[2]))
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    down = multiprocessing.connection.Connection(int(argv[0]), writable=False)
    up = multiprocessing.connection.Connection(int(argv[1]), readable=False)
    return down, up
