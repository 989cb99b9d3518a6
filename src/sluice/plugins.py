"""Ready-made plugins, the counterparts of ``distributed.diagnostics.plugin``'s.

Register them with :meth:`sluice.Client.register_plugin` like any other:

- :class:`PipInstall` / :class:`CondaInstall` install packages on every worker;
- :class:`UploadFile` sends one file to every worker (importable if it is code);
- :class:`Environ` sets environment variables for the workers (through the nannies);
- :class:`UploadDirectory` sends a whole directory to every nanny;
- :class:`ForwardLogging` forwards a worker logger's records to the scheduler.

Each has a ``name`` derived from its class and arguments, so registering the
same thing twice replaces it (or, for the idempotent installers, is a no-op).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import hashlib
import importlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import weakref
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import anyio.to_thread

from sluice.plugin import NannyPlugin, WorkerPlugin

__all__ = (
    "CondaInstall",
    "Environ",
    "ForwardLogging",
    "PipInstall",
    "UploadDirectory",
    "UploadFile",
)

logger = logging.getLogger("sluice.plugins")

#: Directories made for workers or nannies that have no ``local_directory``.
_made_dirs: dict[int, str] = {}


def _digest(*parts: Any) -> str:
    """A short stable hash of JSON-able ``parts``, for plugin names."""
    blob = json.dumps(parts, sort_keys=True, default=repr).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def local_directory(owner: Any) -> str:
    """``owner.local_directory`` if it has one, else a temp dir made once per ``owner``.

    The temp dir is removed when ``owner`` is garbage collected (or at exit).
    """
    own = getattr(owner, "local_directory", None)
    if isinstance(own, str) and own:
        os.makedirs(own, exist_ok=True)
        return own
    key = id(owner)
    path = _made_dirs.get(key)
    if path is None or not os.path.isdir(path):
        path = tempfile.mkdtemp(prefix="sluice-local-")
        _made_dirs[key] = path

        def forget(key: int = key, path: str = path) -> None:
            if _made_dirs.get(key) == path:
                del _made_dirs[key]
            shutil.rmtree(path, ignore_errors=True)

        weakref.finalize(owner, forget)
    return path


def _run_command(command: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``command``, capturing its output (the one place the installers spawn)."""
    return subprocess.run(command, capture_output=True, text=True, check=False)


def _install(tool: str, command: list[str]) -> None:
    """Run an installer; log its output; a failure raises with its last stderr line."""
    logger.info("%s: running %s", tool, " ".join(command))
    proc = _run_command(command)
    for line in (proc.stdout or "").splitlines():
        logger.info("%s: %s", tool, line)
    err_lines = [line for line in (proc.stderr or "").splitlines() if line.strip()]
    for line in err_lines:
        logger.warning("%s: %s", tool, line)
    if proc.returncode != 0:
        last = err_lines[-1] if err_lines else f"exit code {proc.returncode}"
        raise RuntimeError(f"{tool} install failed: {last}")


class _InstallPlugin(WorkerPlugin, abc.ABC):
    """Shared by the installers: run a command in a thread, maybe restart the worker."""

    idempotent = True
    tool = ""

    packages: list[str]
    restart_workers: bool

    @abc.abstractmethod
    def command(self) -> list[str]:
        """The install command line."""

    def check(self) -> None:
        """Raise if the installer cannot run here."""

    async def setup(self, worker: Any) -> None:
        self.check()
        command = self.command()
        await anyio.to_thread.run_sync(_install, self.tool, command)
        if self.restart_workers:
            self._restart(worker)

    def _restart(self, worker: Any) -> None:
        """Ask the nanny for a fresh worker, once per nanny (the new worker re-installs)."""
        nanny = getattr(worker, "nanny", None)
        if not nanny:
            logger.warning("%s: worker %s has no nanny; not restarting it", self.name, worker)
            return
        marker = Path(tempfile.gettempdir(), "sluice-plugin-restarts")
        marker.mkdir(exist_ok=True)
        marker /= f"{self.name}-{_digest(str(nanny))}"
        if marker.exists():
            return
        marker.touch()
        close = getattr(worker, "_request_close", None)
        if close is not None:
            # Later, so the reply to this registration reaches the scheduler first.
            asyncio.get_running_loop().call_later(0.2, close, "scheduler-restart")


class PipInstall(_InstallPlugin):
    """Run ``python -m pip install [pip_options] packages`` on every worker.

    It runs with the worker's own interpreter, in a thread, so the worker keeps
    answering; pip's output goes to the ``sluice.plugins`` logger and a failure
    raises ``RuntimeError`` with pip's last stderr line. Like Dask's it is
    idempotent by name (``pip-<hash of the arguments>``): registering the same
    install again does nothing, and a worker joining later installs it too.
    Unlike Dask's (an environment plugin run through the scheduler) it is a
    plain worker plugin; ``restart_workers=True`` asks each worker's nanny for a
    fresh process once after the install (a worker without a nanny is left as is).
    """

    tool = "pip"

    def __init__(
        self,
        packages: list[str],
        pip_options: list[str] | None = None,
        restart_workers: bool = False,
    ) -> None:
        self.packages = list(packages)
        self.pip_options = list(pip_options or [])
        self.restart_workers = restart_workers
        self.name = f"pip-{_digest(self.packages, self.pip_options, restart_workers)}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "pip", "install", *self.pip_options, *self.packages]


class CondaInstall(_InstallPlugin):
    """Run ``conda install -y [conda_options] packages`` on every worker.

    ``conda`` must be on the worker's ``PATH``, else setup raises
    ``RuntimeError("conda is not installed on this worker")``. Dask's calls
    conda's Python API in-process; this one runs the ``conda`` command. Naming,
    idempotence and ``restart_workers`` are as for :class:`PipInstall`.
    """

    tool = "conda"

    def __init__(
        self,
        packages: list[str],
        conda_options: list[str] | None = None,
        restart_workers: bool = False,
    ) -> None:
        self.packages = list(packages)
        self.conda_options = list(conda_options or [])
        self.restart_workers = restart_workers
        self.name = f"conda-{_digest(self.packages, self.conda_options, restart_workers)}"
        self._conda: str | None = None

    def check(self) -> None:
        self._conda = shutil.which("conda")
        if self._conda is None:
            raise RuntimeError("conda is not installed on this worker")

    def command(self) -> list[str]:
        return [self._conda or "conda", "install", "-y", *self.conda_options, *self.packages]


_IMPORTABLE = (".py", ".egg", ".zip")


class UploadFile(WorkerPlugin):
    """Copy a file to every worker's local directory.

    The bytes are read when the plugin is made, on the client. A worker with a
    ``local_directory`` gets the file there; one without gets it in a temp dir
    made for it. A ``.py``, ``.egg`` or ``.zip`` file's directory is put first on
    ``sys.path`` so tasks can import it (a module already imported is reloaded
    by the next import only after ``importlib.reload``, as in Dask).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.filename = os.path.basename(os.fspath(path))
        with open(path, "rb") as f:
            self.data = f.read()
        self.name = f"upload-file-{self.filename}"

    def setup(self, worker: Any) -> None:
        directory = local_directory(worker)
        target = os.path.join(directory, self.filename)
        with open(target, "wb") as f:
            f.write(self.data)
        if self.filename.endswith(_IMPORTABLE):
            # A zip or egg is itself the path entry; a .py needs its directory.
            entry = directory if self.filename.endswith(".py") else target
            if entry in sys.path:
                sys.path.remove(entry)
            sys.path.insert(0, entry)
            importlib.invalidate_caches()


class _EnvironChange:
    """Set variables in ``os.environ`` and put back what was there before."""

    def __init__(self) -> None:
        self.saved: dict[str, str | None] = {}

    def set(self, name: str, value: str) -> None:
        if name not in self.saved:
            self.saved[name] = os.environ.get(name)
        os.environ[name] = value

    def restore(self) -> None:
        for name, old in self.saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
        self.saved.clear()


class Environ(NannyPlugin):
    """Set environment variables in each nanny, then restart its worker to inherit them.

    Values are turned into strings. Unlike Dask's, teardown (unregistering the
    plugin, or the nanny closing) puts the nanny's previous values back; the
    running worker keeps the variables until its next restart.
    """

    restart = True

    def __init__(self, environ: dict[str, Any] | None = None) -> None:
        self.environ = {str(k): str(v) for k, v in (environ or {}).items()}
        self.name = f"environ-{_digest(sorted(self.environ.items()))}"
        self._change = _EnvironChange()

    def setup(self, nanny: Any) -> None:
        for name, value in self.environ.items():
            self._change.set(name, value)

    def teardown(self, nanny: Any) -> None:
        self._change.restore()


_DEFAULT_SKIP_WORDS = (".git", ".github", ".pytest_cache", "tests", "docs")


def _skip_pyc(filename: str) -> bool:
    return os.path.splitext(filename)[1] == ".pyc"


class UploadDirectory(NannyPlugin):
    """Send a directory to every nanny, unpacked in its local (or a temp) directory.

    The directory is zipped when the plugin is made. A file is left out when a
    component of its path *relative to the directory* is one of ``skip_words``
    (Dask tests the whole path, so a directory under, say, ``tests/`` would be
    empty), or when a ``skip`` predicate is true for its path (default: ``.pyc``
    files). It unpacks as ``<local dir>/<directory name>``. With
    ``update_path=True`` that directory is put first on the worker's
    ``PYTHONPATH``, set in the nanny's environment, which needs a fresh worker:
    ``restart`` is then true whatever was asked. Teardown puts the old
    ``PYTHONPATH`` back; the files stay.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        restart: bool = False,
        update_path: bool = False,
        skip_words: Iterable[str] = _DEFAULT_SKIP_WORDS,
        skip: Sequence[Callable[[str], bool]] | None = None,
    ) -> None:
        root = os.path.abspath(os.fspath(path))
        if not os.path.isdir(root):
            raise NotADirectoryError(root)
        self.dirname = os.path.basename(root.rstrip(os.sep))
        self.restart = bool(restart or update_path)
        self.update_path = update_path
        words = set(skip_words)
        predicates = tuple(skip) if skip is not None else (_skip_pyc,)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
            for here, dirs, files in os.walk(root):
                rel_dir = os.path.relpath(here, root)
                parts = [] if rel_dir == "." else rel_dir.split(os.sep)
                if words.intersection(parts):
                    dirs[:] = []
                    continue
                dirs.sort()
                for file in sorted(files):
                    full = os.path.join(here, file)
                    if file in words or any(pred(full) for pred in predicates):
                        continue
                    zf.write(full, os.path.join(self.dirname, *parts, file))
        self.data = buffer.getvalue()
        self.name = f"upload-directory-{self.dirname}"
        self._change = _EnvironChange()

    def setup(self, nanny: Any) -> None:
        base = local_directory(nanny)
        with zipfile.ZipFile(io.BytesIO(self.data)) as zf:
            zf.extractall(base)
        target = os.path.join(base, self.dirname)
        if self.update_path:
            old = os.environ.get("PYTHONPATH")
            entries = [target, *(p for p in (old or "").split(os.pathsep) if p and p != target)]
            self._change.set("PYTHONPATH", os.pathsep.join(entries))

    def teardown(self, nanny: Any) -> None:
        self._change.restore()


class _ForwardHandler(logging.Handler):
    """Sends each record to the scheduler as a ``forward-logging`` user event."""

    def __init__(self, worker: Any, loop: asyncio.AbstractEventLoop, level: int) -> None:
        super().__init__(level)
        self.worker = worker
        self.loop = loop

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = {
                "name": record.name,
                "levelno": record.levelno,
                "levelname": record.levelname,
                "message": record.getMessage(),
                "worker": str(getattr(self.worker, "address", "")),
            }
            # Records come from task threads; the bus belongs to the worker's loop.
            self.loop.call_soon_threadsafe(self.worker.log_event, "forward-logging", msg)
        except RuntimeError:  # the worker's loop has closed
            pass
        except Exception:
            self.handleError(record)


class ForwardLogging(WorkerPlugin):
    """Forward the records of a worker logger to the scheduler as user events.

    Setup attaches a handler to ``logger_name`` (the root logger if ``None``) on
    each worker; every record at ``level`` or above becomes a ``UserEvent`` on
    topic ``forward-logging`` with ``name``, ``levelno``, ``levelname``,
    ``message`` and ``worker``. Teardown removes the handler. Dask's re-emits
    the record on the client's logger; here the event lands on the scheduler's
    bus, where any sink or consumer of ``user-event`` sees it.
    The worker must forward events (``sluice.worker.forward-events``, the default).
    """

    def __init__(self, logger_name: str | None = None, level: int = logging.NOTSET) -> None:
        self.logger_name = logger_name
        self.level = level
        self.name = f"forward-logging-{logger_name or 'root'}-{level}"
        self._handler: _ForwardHandler | None = None

    def setup(self, worker: Any) -> None:
        self._handler = _ForwardHandler(worker, asyncio.get_running_loop(), self.level)
        logging.getLogger(self.logger_name).addHandler(self._handler)

    def teardown(self, worker: Any) -> None:
        if self._handler is not None:
            logging.getLogger(self.logger_name).removeHandler(self._handler)
            with contextlib.suppress(Exception):
                self._handler.close()
            self._handler = None
