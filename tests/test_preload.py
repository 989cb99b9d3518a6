"""Preload scripts: the VALUE forms, click arguments, hooks, failure modes, and the CLI."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from sluice.events import UserEvent
from sluice.preload import PreloadError, load_preloads, setup_preloads, teardown_preloads
from sluice.scheduler import Scheduler
from sluice.worker import Worker

ROOT = Path(__file__).resolve().parent.parent
SLUICE = [sys.executable, "-m", "sluice"]
WAIT = 20


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Service:
    """A stand-in service that records what the hooks did to it."""

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.events: list[tuple[str, Any]] = []

    def log_event(self, topic: str, msg: Any) -> None:
        self.events.append((topic, msg))


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


RECORDER = """
    import click
    calls = []

    def sluice_setup(service):
        service.calls.append(("setup", __name__))

    def sluice_teardown(service):
        service.calls.append(("teardown", __name__))
"""

CLICK_A = """
    import click

    @click.command()
    @click.option("--print-count/--no-print-count", default=False)
    @click.option("--level", type=int, default=0)
    def dask_setup(service, print_count, level):
        service.calls.append(("a", print_count, level))
"""

CLICK_B = """
    import click

    @click.command()
    @click.option("--colour", default="red")
    def sluice_setup(service, colour):
        service.calls.append(("b", colour))
"""


# -- VALUE forms -------------------------------------------------------------------------


async def run_setup(preloads: Any, service: Any, strict: bool = False) -> None:
    await setup_preloads(preloads, service, strict=strict)


@pytest.mark.anyio
async def test_file_module_and_script_text(tmp_path: Path, monkeypatch: Any) -> None:
    path = write(tmp_path, "rec.py", RECORDER)
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    write(pkg, "setup_mod.py", RECORDER)
    monkeypatch.syspath_prepend(str(tmp_path))
    script = "def dask_setup(s):\n    s.calls.append('script')\n"
    preloads = load_preloads([str(path), "mypkg.setup_mod", script])
    service = Service()
    await run_setup(preloads, service)
    assert service.calls[0][0] == "setup"
    assert service.calls[1] == ("setup", "mypkg.setup_mod")
    assert service.calls[2] == "script"
    await teardown_preloads(preloads, service)
    # teardown in reverse order; the script has none
    assert [c[1] for c in service.calls[3:]] == ["mypkg.setup_mod", service.calls[0][1]]


@pytest.mark.anyio
async def test_async_hooks_and_single_string(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "a.py",
        """
        async def sluice_setup(s):
            s.calls.append("async-setup")

        async def dask_teardown(s):
            s.calls.append("async-teardown")
        """,
    )
    preloads = load_preloads(str(path))
    service = Service()
    await run_setup(preloads, service)
    await teardown_preloads(preloads, service)
    assert service.calls == ["async-setup", "async-teardown"]


@pytest.mark.anyio
async def test_https_url_needs_a_pinned_digest(monkeypatch: Any) -> None:
    source = b"def sluice_setup(s):\n    s.calls.append('from-url')\n"
    digest = hashlib.sha256(source).hexdigest()
    fetched: list[str] = []

    def fake_urlopen(url: str, timeout: float) -> Any:
        fetched.append(url)
        return io.BytesIO(source)

    import urllib.request

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    url = "https://example.invalid/setup.py"
    with pytest.raises(PreloadError, match=r"a URL needs a pinned digest, '#sha256="):
        load_preloads([url])
    with pytest.raises(PreloadError, match="only https:// URLs are allowed"):
        load_preloads([f"http://example.invalid/setup.py#sha256={digest}"])
    assert fetched == []  # refused before fetching
    with pytest.raises(PreloadError, match=f"sha256 mismatch: expected {'0' * 64}, got {digest}"):
        load_preloads([f"{url}#sha256={'0' * 64}"])
    preloads = load_preloads([f"{url}#sha256={digest}"])
    assert fetched[-1] == url  # the fragment is not sent
    service = Service()
    await run_setup(preloads, service)
    assert service.calls == ["from-url"]


# -- click arguments -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_click_preloads_share_one_command_line(tmp_path: Path) -> None:
    a = write(tmp_path, "a.py", CLICK_A)
    b = write(tmp_path, "b.py", CLICK_B)
    preloads = load_preloads([str(a), str(b)], ["--colour", "blue", "--print-count", "--level=3"])
    service = Service()
    await run_setup(preloads, service)
    assert service.calls == [("a", True, 3), ("b", "blue")]


@pytest.mark.anyio
async def test_click_preload_argv_per_preload(tmp_path: Path) -> None:
    a = write(tmp_path, "a.py", CLICK_A)
    b = write(tmp_path, "b.py", CLICK_B)
    preloads = load_preloads([str(a), str(b)], [["--print-count"], []])
    service = Service()
    await run_setup(preloads, service)
    assert service.calls == [("a", True, 0), ("b", "red")]


def test_option_claimed_by_two_preloads_is_a_usage_error(tmp_path: Path) -> None:
    a = write(tmp_path, "a.py", CLICK_A)
    a2 = write(tmp_path, "a2.py", CLICK_A)
    with pytest.raises(
        PreloadError,
        match=r"option --level is declared by more than one preload: '.*a\.py', '.*a2\.py'",
    ):
        load_preloads([str(a), str(a2)], ["--level", "2"])
    load_preloads([str(a), str(a2)], [])  # declaring the same option is fine


def test_unknown_extra_arguments_are_named(tmp_path: Path) -> None:
    a = write(tmp_path, "a.py", CLICK_A)
    rec = write(tmp_path, "rec.py", RECORDER)
    with pytest.raises(PreloadError, match=r"^unknown preload arguments: --nope stray$"):
        load_preloads([str(a)], ["--print-count", "--nope", "stray"])
    with pytest.raises(
        PreloadError, match=r"^no such option: --x \(and no --preload to take it\)$"
    ):
        load_preloads([], ["--x"])
    with pytest.raises(PreloadError, match=r"unknown preload arguments: --x \(preload .* none\)"):
        load_preloads([str(rec)], [["--x"]])
    with pytest.raises(PreloadError, match=r"Invalid value for '--level'"):
        load_preloads([str(a)], ["--level", "high"])


# -- failures while loading ---------------------------------------------------------------


def test_load_failures_are_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing.py"
    with pytest.raises(PreloadError, match=r"^preload '.*missing\.py': no such file '.*'$"):
        load_preloads([str(missing)])
    with pytest.raises(
        PreloadError,
        match=r"^preload 'no_such_mod_xyz': cannot import it: No module named 'no_such_mod_xyz'$",
    ):
        load_preloads(["no_such_mod_xyz"])
    bad = write(tmp_path, "bad.py", "def f(:\n    pass\n")
    with pytest.raises(PreloadError, match=r"^preload '.*bad\.py': syntax error at line 1: "):
        load_preloads([str(bad)])
    raising = write(tmp_path, "raising.py", "raise RuntimeError('no way')\n")
    with pytest.raises(PreloadError, match=r"failed to import: RuntimeError: no way$"):
        load_preloads([str(raising)])


@pytest.mark.anyio
async def test_setup_failure_is_logged_and_recorded(tmp_path: Path, caplog: Any) -> None:
    boom = write(tmp_path, "boom.py", "def sluice_setup(s):\n    raise KeyError('bad key')\n")
    rec = write(tmp_path, "rec.py", RECORDER)
    preloads = load_preloads([str(boom), str(rec)])
    service = Service()
    await run_setup(preloads, service)
    assert service.events == [
        ("preload-failed", {"preload": str(boom), "error": "KeyError: 'bad key'"})
    ]
    assert service.calls and service.calls[0][0] == "setup"  # the next one still ran
    assert "Traceback" in caplog.text and "bad key" in caplog.text
    service = Service()
    with pytest.raises(PreloadError, match=r"setup of preload '.*boom\.py' failed: KeyError"):
        await run_setup(preloads, service, strict=True)
    assert service.calls == []


# -- servers -----------------------------------------------------------------------------


SINK_PRELOAD = """
    import click

    SEEN = []

    @click.command()
    @click.option("--tag", default="")
    def sluice_setup(service, tag):
        SEEN.append((type(service).__name__, tag, service.address))
        events = []
        service.test_events = events
        service.test_seen = SEEN
        service.bus.subscribe(events.append, mode="inline")

    def sluice_teardown(service):
        SEEN.append(("teardown", type(service).__name__))
"""


@pytest.mark.anyio
async def test_scheduler_and_worker_preloads(tmp_path: Path) -> None:
    path = write(tmp_path, "sinkpre.py", SINK_PRELOAD)
    async with Scheduler(port=0, preload=[str(path)], preload_argv=[["--tag", "s"]]) as s:
        seen = s.test_seen  # type: ignore[attr-defined]
        assert seen == [("Scheduler", "s", s.address)]
        async with Worker(s.address, preload=str(path), preload_argv=["--tag", "w"]) as w:
            wseen = w.test_seen  # type: ignore[attr-defined]
            assert wseen == [("Worker", "w", w.address)]
            assert w.address in s.workers
            w.log_event("hello", 1)
        assert wseen[-1] == ("teardown", "Worker")
        events = s.test_events  # type: ignore[attr-defined]
        assert events[0].seq == 1 and events[0].kind == "scheduler-started"
        wevents = w.test_events  # type: ignore[attr-defined]
        assert [(e.seq, e.kind) for e in wevents] == [(1, "user-event")]
    assert seen[-1] == ("teardown", "Scheduler")
    assert events[-1].kind == "scheduler-closing"


@pytest.mark.anyio
async def test_scheduler_setup_failure_event_and_strict(tmp_path: Path) -> None:
    boom = write(tmp_path, "boom.py", "def dask_setup(s):\n    raise ValueError('nope')\n")
    async with Scheduler(port=0, preload=[str(boom)]) as s:
        found = [e for e in s.bus.history if isinstance(e, UserEvent)]
        assert [(e.topic, e.msg) for e in found] == [
            ("preload-failed", {"preload": str(boom), "error": "ValueError: nope"})
        ]
    s2 = Scheduler(port=0, preload=[str(boom)], preload_strict=True)
    with pytest.raises(PreloadError, match=r"setup of preload .* failed: ValueError: nope"):
        await s2.start()
    await s2.close()
    with pytest.raises(PreloadError, match="no such file"):
        Scheduler(port=0, preload=[str(tmp_path / "nope.py")])


@pytest.mark.anyio
async def test_worker_strict_setup_failure(tmp_path: Path) -> None:
    boom = write(tmp_path, "boom.py", "def dask_setup(s):\n    raise ValueError('nope')\n")
    async with Scheduler(port=0) as s:
        w = Worker(s.address, preload=[str(boom)], preload_strict=True)
        with pytest.raises(PreloadError, match="ValueError: nope"):
            await w.start()
        assert not s.workers  # never registered
        async with Worker(s.address, preload=[str(boom)]) as w2:
            assert w2.address in s.workers


@pytest.mark.anyio
async def test_config_preloads(tmp_path: Path) -> None:
    from sluice import config

    rec = write(tmp_path, "rec.py", "def sluice_setup(s):\n    s.log_event('cfg', 1)\n")
    with config.set({"sluice.scheduler.preload": str(rec)}):
        async with Scheduler(port=0) as s:
            assert [e.topic for e in s.bus.history if isinstance(e, UserEvent)] == ["cfg"]


# -- command line ----------------------------------------------------------------------------


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SLUICE, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--preload", "missing-file.py"],
            "Error: preload 'missing-file.py': no such file",
        ),
        (
            ["--preload", "no_such_mod_xyz"],
            "Error: preload 'no_such_mod_xyz': cannot import it: No module named 'no_such_mod_xyz'",
        ),
        (
            ["--preload", "examples/scheduler-setup.py", "--print-count", "--bogus"],
            "Error: unknown preload arguments: --bogus",
        ),
        (["--bogus"], "Error: no such option: --bogus (and no --preload to take it)"),
    ],
)
def test_scheduler_cli_load_failures(args: list[str], message: str, tmp_path: Path) -> None:
    sfile = tmp_path / "s.json"
    done = run_cli("scheduler", "--port", "0", "--scheduler-file", str(sfile), *args)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(message), lines[0]
    assert not sfile.exists()


def test_scheduler_cli_syntax_error(tmp_path: Path) -> None:
    bad = write(tmp_path, "bad.py", "def f(:\n")
    done = run_cli("scheduler", "--port", "0", "--preload", str(bad))
    assert done.returncode != 0
    assert done.stderr.strip() == f"Error: preload '{bad}': syntax error at line 1: invalid syntax"


def test_scheduler_cli_strict_setup_failure(tmp_path: Path) -> None:
    boom = write(tmp_path, "boom.py", "def dask_setup(s):\n    raise ValueError('nope')\n")
    sfile = tmp_path / "s.json"
    done = run_cli(
        "scheduler",
        "--port",
        "0",
        "--scheduler-file",
        str(sfile),
        "--preload",
        str(boom),
        "--preload-strict",
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last == f"Error: setup of preload '{boom}' failed: ValueError: nope"
    assert "Traceback" in done.stderr  # the failure was logged with its traceback
    assert not sfile.exists()


def test_worker_cli_load_failure() -> None:
    done = run_cli("worker", "tcp://127.0.0.1:1", "--no-nanny", "--preload", "no_such_mod_xyz")
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        "Error: preload 'no_such_mod_xyz': cannot import it: No module named 'no_such_mod_xyz'"
    )


def _read_until(path: Path, needle: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text() if path.exists() else ""
        if needle in text:
            return text
        if time.monotonic() > deadline:
            raise TimeoutError(f"{needle!r} not in output:\n{text}")
        time.sleep(0.05)


def test_scheduler_setup_example_with_two_workers(tmp_path: Path) -> None:
    """The Dask docs' example: ``--preload examples/scheduler-setup.py --print-count``."""
    sfile = tmp_path / "scheduler.json"
    out = tmp_path / "scheduler.out"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with out.open("wb") as log:
            procs.append(
                subprocess.Popen(
                    [
                        *SLUICE,
                        "scheduler",
                        "--port",
                        "0",
                        "--scheduler-file",
                        str(sfile),
                        "--preload",
                        "examples/scheduler-setup.py",
                        "--print-count",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=ROOT,
                )
            )
        deadline = time.monotonic() + WAIT
        while not sfile.exists():
            assert procs[0].poll() is None, out.read_text()
            assert time.monotonic() < deadline, "no scheduler file"
            time.sleep(0.05)
        address = json.loads(sfile.read_text())["address"]
        for _ in range(2):
            procs.append(
                subprocess.Popen(
                    [*SLUICE, "worker", address, "--no-nanny"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    cwd=ROOT,
                )
            )
        text = _read_until(out, "Total workers: 2", WAIT)
        assert text.count("Added a new worker at: tcp://") == 2
        assert "Total workers: 1" in text
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert procs[0].returncode == 0


@pytest.mark.anyio
async def test_nanny_and_client_preloads(tmp_path: Path) -> None:
    from sluice.client import Client
    from sluice.nanny import Nanny

    worker_pre = write(
        tmp_path,
        "wpre.py",
        """
        import click

        @click.command()
        @click.option("--tag", default="")
        def sluice_setup(worker, tag):
            worker.log_event("worker-preload", tag)
        """,
    )
    nanny_pre = write(
        tmp_path,
        "npre.py",
        """
        def dask_setup(nanny):
            nanny.test_seen = ["setup", nanny.worker_address]

        def dask_teardown(nanny):
            nanny.test_seen.append("teardown")
        """,
    )
    client_pre = "def sluice_setup(client):\n    client.test_seen = client.status\n"
    async with Scheduler(port=0) as s:
        topics = anyio.Event()

        def watch(event: Any) -> None:
            if isinstance(event, UserEvent) and event.topic == "worker-preload":
                topics.set()

        s.bus.subscribe(watch, mode="inline")
        nanny = Nanny(
            s.address,
            preload=[str(worker_pre)],
            preload_argv=[["--tag", "n1"]],
            preload_nanny=str(nanny_pre),
        )
        async with nanny:
            assert nanny.test_seen == ["setup", None]  # type: ignore[attr-defined]
            with anyio.fail_after(WAIT):
                await topics.wait()
            found = [e for e in s.bus.history if isinstance(e, UserEvent)]
            assert [(e.topic, e.msg) for e in found] == [("worker-preload", "n1")]
            assert found[0].source == nanny.worker_address
            async with Client(s.address, asynchronous=True, preload=[client_pre]) as c:
                assert c.test_seen == "running"  # type: ignore[attr-defined]
        assert nanny.test_seen[-1] == "teardown"  # type: ignore[attr-defined]
    with pytest.raises(PreloadError, match="unknown preload arguments: --zzz"):
        Nanny("tcp://127.0.0.1:1", preload=[str(worker_pre)], preload_argv=["--zzz"])


@pytest.mark.anyio
async def test_client_setup_failure_reaches_the_scheduler(tmp_path: Path) -> None:
    from sluice.client import Client

    script = "def sluice_setup(client):\n    raise OSError('disk')\n"
    async with Scheduler(port=0) as s:
        async with Client(s.address, asynchronous=True, preload=script) as c:
            await c.log_event("after", 2)
        found = [(e.topic, e.msg) for e in s.bus.history if isinstance(e, UserEvent)]
        name = "<script 'def sluice_setup(client):'...>"
        assert found == [
            ("preload-failed", {"preload": name, "error": "OSError: disk"}),
            ("after", 2),
        ]


def test_sync_client_preload(tmp_path: Path) -> None:
    from sluice.client import Client

    async def main() -> None:
        async with Scheduler(port=0) as s:
            script = "def sluice_setup(client):\n    raise OSError('disk')\n"

            def use() -> list[Any]:
                with Client(s.address, preload=script) as c:
                    assert c.status == "running"
                return [e.topic for e in s.bus.history if isinstance(e, UserEvent)]

            assert await anyio.to_thread.run_sync(use) == ["preload-failed"]

    anyio.run(main)


@pytest.mark.anyio
async def test_worker_cli_with_nanny_splits_preload_arguments(tmp_path: Path) -> None:
    worker_pre = write(
        tmp_path,
        "wpre.py",
        """
        import click

        @click.command()
        @click.option("--tag", default="")
        def sluice_setup(worker, tag):
            worker.log_event("worker-preload", tag)
        """,
    )
    marker = tmp_path / "nanny.txt"
    nanny_pre = write(
        tmp_path,
        "npre.py",
        f"""
        import click

        @click.command()
        @click.option("--ntag", default="")
        def sluice_setup(nanny, ntag):
            open({str(marker)!r}, "w").write(ntag)
        """,
    )
    async with Scheduler(port=0) as s:
        seen = anyio.Event()

        def watch(event: Any) -> None:
            if isinstance(event, UserEvent) and event.topic == "worker-preload":
                seen.set()

        s.bus.subscribe(watch, mode="inline")
        proc = await anyio.open_process(
            [
                *SLUICE, "worker", s.address, "--preload", str(worker_pre),
                "--preload-nanny", str(nanny_pre), "--tag", "t1", "--ntag", "n1",
            ],
            cwd=ROOT,
        )  # fmt: skip
        try:
            with anyio.fail_after(WAIT):
                await seen.wait()
        finally:
            proc.terminate()
            with anyio.fail_after(WAIT):
                await proc.wait()
            await proc.aclose()
        found = [e.msg for e in s.bus.history if isinstance(e, UserEvent)]
        assert found == ["t1"]
        assert marker.read_text() == "n1"
