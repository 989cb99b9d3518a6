"""Real ``sluice`` processes for tests: spawned with their output in log files,
stopped with SIGTERM (killed if they hang), and a poll for conditions that another
process makes true (there is no event to await across processes)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

SLUICE = [sys.executable, "-m", "sluice"]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it holds; TimeoutError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class SluiceProcesses:
    """``sluice`` commands run in ``folder``, each logging to ``<command>-<n>.log``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.scheduler_file = folder / "scheduler.json"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.log_files: list[IO[bytes]] = []

    def spawn(self, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.folder / f"{args[0]}-{len(self.procs)}.log", "wb")  # noqa: SIM115
        self.log_files.append(log)
        proc = subprocess.Popen([*SLUICE, *args], stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    @property
    def address(self) -> str:
        """The scheduler's address, from its scheduler file."""
        return str(json.loads(self.scheduler_file.read_text())["address"])

    def stop(self) -> None:
        """SIGTERM to every process still running, newest first; kill what hangs."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self.log_files:
            log.close()

    def logs(self) -> str:
        """Everything the processes printed."""
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.folder.glob("*.log")))


def thread_niceness(pid: int) -> set[int]:
    """The nice values of every thread of process ``pid`` (Linux: priority is per thread)."""
    values = set()
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        # Fields after the command's closing parenthesis; nice is the 19th field.
        fields = stat.read_text().rsplit(")", 1)[1].split()
        values.add(int(fields[16]))
    return values
