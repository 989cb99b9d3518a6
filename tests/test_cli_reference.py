"""docs/cli.md keeps up with the command line.

Each command of the click tree under ``sluice.cli.main`` has a section in
docs/cli.md headed ``## `sluice COMMAND` `` (the group itself: ``## `sluice` ``).
Every visible option of the command (each of its spellings, ``--nanny`` and
``--no-nanny`` alike) and every argument must appear in that section as inline
code, and an option's default, when it has one worth showing, must appear in the
row of the option's table that documents it. The other way round, a row of a
section's option table that names an option the command no longer has fails too.
So an option added, renamed, removed or given a new default in the code fails
this test until the reference says so.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from sluice.cli import main

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "cli.md"
HEADING = re.compile(r"^## `(?P<name>sluice[^`]*)`\s*$")


def commands(
    cmd: click.Command = main, path: tuple[str, ...] = ("sluice",)
) -> Iterator[tuple[str, click.Command]]:
    """``("sluice worker", worker)`` for the group and every command under it."""
    yield " ".join(path), cmd
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            if not sub.hidden:
                yield from commands(sub, (*path, name))


def sections() -> dict[str, str]:
    """The text of each ``## `sluice ...` `` section of the reference, by command."""
    found: dict[str, str] = {}
    current: str | None = None
    for line in REFERENCE.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            m = HEADING.match(line)
            current = m["name"] if m else None
            if current is not None:
                found[current] = ""
            continue
        if current is not None:
            found[current] += line + "\n"
    return found


def visible_options(cmd: click.Command) -> list[click.Option]:
    return [p for p in cmd.params if isinstance(p, click.Option) and not p.hidden]


def spellings(option: click.Option) -> list[str]:
    return [o for o in [*option.opts, *option.secondary_opts] if o.startswith("-")]


def cells(row: str) -> list[str]:
    """The cells of a Markdown table row (``\\|`` is a pipe inside a cell)."""
    return re.split(r"(?<!\\)\|", row.strip().strip("|"))


def row_of(text: str, spelling: str) -> str | None:
    """The table row whose first cell documents ``spelling``."""
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        first = cells(line)[0]
        if re.search(rf"`{re.escape(spelling)}(?:[ =][^`]*)?`", first):
            return line
    return None


def shown_default(option: click.Option) -> str | None:
    """The default as the reference must show it, or None if there is none to show."""
    default = option.default
    if default is None or option.is_flag or option.multiple or callable(default):
        return None
    return str(default)


ALL = list(commands())


def test_the_reference_exists_and_every_command_has_a_section() -> None:
    found = sections()
    missing = [name for name, _ in ALL if name not in found]
    assert not missing, f"docs/cli.md has no '## `...`' section for: {', '.join(missing)}"


@pytest.mark.parametrize(("name", "cmd"), ALL, ids=[name for name, _ in ALL])
def test_every_option_and_argument_is_documented(name: str, cmd: click.Command) -> None:
    text = sections().get(name, "")
    problems: list[str] = []
    for option in visible_options(cmd):
        for spelling in spellings(option):
            if not re.search(rf"`{re.escape(spelling)}(?![\w-])", text):
                problems.append(f"option {spelling} is not mentioned")
            elif (default := shown_default(option)) is not None:
                row = row_of(text, spelling)
                if row is None:
                    problems.append(f"option {spelling} has no row in the options table")
                elif default not in row:
                    problems.append(f"the row of {spelling} does not show its default {default}")
    for arg in cmd.params:
        if isinstance(arg, click.Argument) and arg.human_readable_name not in text:
            problems.append(f"argument {arg.human_readable_name} is not mentioned")
    assert not problems, f"docs/cli.md, section `{name}`:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize(("name", "cmd"), ALL, ids=[name for name, _ in ALL])
def test_no_documented_option_is_gone(name: str, cmd: click.Command) -> None:
    text = sections().get(name, "")
    known = {
        s for option in cmd.params if isinstance(option, click.Option) for s in spellings(option)
    }
    known |= {"-h", "--help"}
    documented: set[str] = set()
    for line in text.splitlines():
        if line.startswith("|"):
            documented |= set(re.findall(r"`(--?[\w-]+)", cells(line)[0]))
    gone = sorted(documented - known)
    assert not gone, f"docs/cli.md, section `{name}`, documents options it lacks: {gone}"


def test_the_walker_finds_every_command_and_skips_hidden_options() -> None:
    names = {name for name, _ in ALL}
    assert {"sluice", "sluice scheduler", "sluice worker", "sluice replay"} <= names
    assert {"sluice demo", "sluice events"} <= names
    worker = dict(ALL)["sluice worker"]
    hidden = {s for p in worker.params if isinstance(p, click.Option) and p.hidden for s in p.opts}
    assert "--nanny-fd" in hidden
    assert not hidden & {s for o in visible_options(worker) for s in spellings(o)}
