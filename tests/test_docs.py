"""The documentation's runnable code blocks, executed.

A fenced code block in README.md or docs/**/*.md whose line right above is
``<!-- runnable -->`` (or ``<!-- runnable: OPTIONS -->``) is run by one test, named
``<file>:<line>`` after the block's opening fence. The convention, for authors, is in
docs/contributing.md:

- ``python`` blocks run as a script with this interpreter, in a fresh temporary
  working directory; the test fails unless the exit status is 0. Line numbers in
  the traceback are the Markdown file's.
- ``console`` blocks: each ``$ `` line (with its ``\\``-continued lines) is one
  command, run with ``bash -o pipefail -c`` in a fresh temporary working directory
  with ``.venv/bin`` first on ``PATH``; every command must exit 0, except that
  ``exit=N`` is the status expected of the last one. Other lines are output, not
  checked.
- ``script``: a console block's commands run as one bash script (``set -e``), so
  a server started with ``&`` in one command is there for the next ones, and
  ``kill %1`` / ``wait`` work as a user would type them.
- ``session``: consecutive ``session`` blocks of one file (no other runnable block
  between them) share one temporary directory and run in order, as one test named
  after the first. Otherwise blocks share nothing.

The working directory has the repository's ``examples/`` (a symlink), so blocks
can use the example preloads and plugins as a user of a clone would.

Each block (each command of a console block) has TIMEOUT seconds; whatever a block
leaves running is killed with its process group.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60.0  # seconds, per python block or per console command

MARKER = re.compile(r"^\s*<!--\s*runnable\s*(?::(?P<opts>.*?))?\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
LANGS = ("python", "console")


@dataclass
class Block:
    file: str  # relative to the repository root
    line: int  # 1-based line of the opening fence
    lang: str = ""
    body: list[str] = field(default_factory=list)
    exit: int = 0
    session: bool = False
    script: bool = False
    error: str | None = None  # a misuse of the convention: the test fails with this

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def _options(block: Block, opts: str) -> None:
    for opt in re.split(r"[\s,]+", opts.strip()):
        if not opt:
            continue
        if opt == "session":
            block.session = True
        elif opt == "script":
            block.script = True
        elif re.fullmatch(r"exit=\d+", opt):
            block.exit = int(opt.partition("=")[2])
        else:
            block.error = f"unknown runnable option {opt!r} (known: session, script, exit=N)"


def parse(text: str, file: str) -> list[Block]:
    """The runnable blocks of one Markdown text, in order."""
    lines = text.splitlines()
    blocks: list[Block] = []
    marker: tuple[int, str] | None = None  # (index, options) of a marker not yet used
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None or (m["fence"][0] == "`" and "`" in m["info"]):
            if marker is not None:
                error = "<!-- runnable --> must be followed directly by a fenced code block"
                blocks.append(Block(file, marker[0] + 1, error=error))
                marker = None
            mm = MARKER.match(lines[i])
            if mm is not None:
                marker = (i, mm["opts"] or "")
            i += 1
            continue
        # An opening fence: its block ends at a fence of the same character, at least
        # as long, with nothing after it (CommonMark), or at the end of the file.
        fence, indent = m["fence"], len(m["indent"])
        close = re.compile(rf"^ *{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        end = i + 1
        while end < len(lines) and not close.match(lines[end]):
            end += 1
        if marker is not None:
            block = Block(file, i + 1, lang=(m["info"].split() or [""])[0])
            body = [ln[min(indent, len(ln) - len(ln.lstrip(" "))) :] for ln in lines[i + 1 : end]]
            block.body = body
            _options(block, marker[1])
            if block.error is None and block.lang not in LANGS:
                block.error = f"a runnable block must be one of {LANGS}, not {block.lang!r}"
            blocks.append(block)
            marker = None
        i = end + 1
    if marker is not None:
        blocks.append(Block(file, marker[0] + 1, error="<!-- runnable --> at the end of the file"))
    return blocks


def commands(body: list[str]) -> list[str]:
    """The commands of a console block: ``$ `` lines, joined with their continuations."""
    cmds: list[str] = []
    continued = False
    for line in body:
        if continued:
            cmds[-1] += "\n" + line
        elif line.startswith("$ "):
            cmds.append(line[2:])
        else:
            continue  # output
        continued = line.endswith("\\")
    return cmds


def groups(blocks: list[Block]) -> list[list[Block]]:
    """One test per block, except consecutive session blocks, which share one."""
    out: list[list[Block]] = []
    for block in blocks:
        if block.session and out and out[-1][-1].session and out[-1][-1].file == block.file:
            out[-1].append(block)
        else:
            out.append([block])
    return out


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]


def collect() -> list[list[Block]]:
    blocks: list[Block] = []
    for path in doc_files():
        blocks += parse(path.read_text(encoding="utf-8"), path.relative_to(ROOT).as_posix())
    return groups(blocks)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    bins = [str(ROOT / ".venv" / "bin"), str(Path(sys.executable).parent)]
    env["PATH"] = os.pathsep.join([*bins, env.get("PATH", "")])
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def _run(argv: list[str], cwd: Path, what: str, expected: int) -> None:
    """Run argv in its own process group; output goes to files, so a process the block
    left behind cannot hold the test up; whatever is left is killed afterwards."""
    out_path, err_path = cwd / ".doc-block.out", cwd / ".doc-block.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=_env(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        try:
            rc: int | None = proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    stdout = out_path.read_text(errors="replace")
    stderr = err_path.read_text(errors="replace")
    out_path.unlink()
    err_path.unlink()
    if rc == expected:
        return
    status = f"did not finish within {TIMEOUT:.0f}s" if rc is None else f"exit status {rc}"
    pytest.fail(
        f"{what}: {status}, expected {expected}\n"
        f"--- stderr ---\n{stderr[-6000:]}\n--- stdout ---\n{stdout[-3000:]}",
        pytrace=False,
    )


def run_block(block: Block, cwd: Path) -> None:
    if block.error is not None:
        pytest.fail(f"{block.where}: {block.error}", pytrace=False)
    if block.lang == "python":
        # Blank lines first, so the traceback's line numbers are the Markdown file's.
        script = cwd / f"doc_block_{Path(block.file).stem}_{block.line}.py"
        script.write_text("\n" * block.line + "\n".join(block.body) + "\n", encoding="utf-8")
        _run([sys.executable, str(script)], cwd, f"{block.where} (python)", block.exit)
        return
    cmds = commands(block.body)
    if not cmds:
        pytest.fail(f"{block.where}: a runnable console block with no '$ ' command", pytrace=False)
    if block.script:
        script = "set -e -o pipefail\n" + "\n".join(cmds) + "\n"
        _run(["bash", "-c", script], cwd, f"{block.where} (script)", block.exit)
        return
    for n, cmd in enumerate(cmds):
        expected = block.exit if n == len(cmds) - 1 else 0
        what = f"{block.where}: $ {cmd}"
        _run(["bash", "-o", "pipefail", "-c", cmd], cwd, what, expected)


def _params() -> list[object]:
    params: list[object] = []
    for group in collect():
        steps = sum(max(1, len(commands(b.body))) if b.lang == "console" else 1 for b in group)
        params.append(
            pytest.param(group, id=group[0].where, marks=pytest.mark.timeout(TIMEOUT * steps + 30))
        )
    return params


@pytest.mark.parametrize("group", _params())
def test_runnable_block(group: list[Block], tmp_path: Path) -> None:
    (tmp_path / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    for block in group:
        run_block(block, tmp_path)


# The collector itself.


def test_the_docs_have_runnable_blocks() -> None:
    assert len(collect()) >= 5


def test_parse_markers_options_and_fences() -> None:
    text = textwrap.dedent(
        """\
        # Page

        ```python
        print("not marked")
        ```

        <!-- runnable -->
        ```python
        print(1)
        ```

        - a list item:

          <!-- runnable: exit=2 -->
          ```console
          $ false \\
              --flag
          output
          $ exit 2
          ```

        ````markdown
        <!-- runnable -->
        ```python
        inside another fence: not a block
        ```
        ````
        <!-- runnable: session -->
        ```python
        x = 1
        ```
        <!-- runnable:session -->
        ```python
        y = 2
        ```
        """
    )
    blocks = parse(text, "doc.md")
    assert [(b.line, b.lang, b.exit, b.session, b.error) for b in blocks] == [
        (8, "python", 0, False, None),
        (15, "console", 2, False, None),
        (29, "python", 0, True, None),
        (33, "python", 0, True, None),
    ]
    assert blocks[1].body[0] == "$ false \\"
    assert commands(blocks[1].body) == ["false \\\n    --flag", "exit 2"]
    assert [[b.line for b in g] for g in groups(blocks)] == [[8], [15], [29, 33]]


def test_parse_refuses_misuse() -> None:
    text = "<!-- runnable -->\n\n```python\nx\n```\n<!-- runnable: bogus -->\n```python\n```\n"
    text += "<!-- runnable -->\n```yaml\na: 1\n```\n<!-- runnable -->\n"
    errors = [(b.line, b.error) for b in parse(text, "doc.md")]
    assert [line for line, _ in errors] == [1, 7, 10, 13]
    assert all(errors[n][1] for n in range(4))


def test_console_commands_run_with_the_venv_first_on_path(tmp_path: Path) -> None:
    venv = ROOT / ".venv" / "bin"
    bindir = venv if (venv / "python").exists() else Path(sys.executable).parent
    cmd = f'test "$(dirname "$(command -v python)")" = {shlex.quote(str(bindir))}'
    run_block(Block("doc.md", 1, lang="console", body=[f"$ {cmd}"]), tmp_path)
    run_block(Block("doc.md", 1, lang="console", body=["$ true", "$ exit 3"], exit=3), tmp_path)
    with pytest.raises(pytest.fail.Exception, match=r"doc\.md:1: \$ exit 3: exit status 3"):
        run_block(Block("doc.md", 1, lang="console", body=["$ exit 3"]), tmp_path)
