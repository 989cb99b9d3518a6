"""The command line explains itself: complete help, and one clear line for every mistake."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from sluice.cli import main

BIN = Path(sys.executable).parent


def _commands() -> list[tuple[str, click.Command]]:
    found: list[tuple[str, click.Command]] = [("sluice", main)]
    for name, command in sorted(main.commands.items()):
        found.append((f"sluice {name}", command))
    return found


@pytest.mark.parametrize(("path", "command"), _commands(), ids=[p for p, _ in _commands()])
def test_every_option_and_command_has_help(path: str, command: click.Command) -> None:
    assert command.help, f"{path} has no help text"
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            assert param.help, f"{path} {param.opts[0]} has no help text"


def test_help_lists_every_command_and_option() -> None:
    done = subprocess.run(
        [str(BIN / "sluice"), "--help"], capture_output=True, text=True, timeout=60, check=True
    )
    for name in main.commands:
        assert name in done.stdout
    for name, command in main.commands.items():
        sub = subprocess.run(
            [str(BIN / "sluice"), name, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                assert param.opts[0] in sub.stdout, (name, param.opts[0])


@pytest.fixture
def bad_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "sluice.yaml"
    path.write_text("sluice:\n  scheduler: [unclosed\n")
    return path


CASES = [
    # (arguments, environment, exit status, the line)
    (["worker"], {}, 2, "Error: missing the scheduler ADDRESS (or --scheduler-file FILE)"),
    (["events"], {}, 2, "Error: missing the scheduler ADDRESS (or --scheduler-file FILE)"),
    (
        ["scheduler", "--port", "99999"],
        {},
        2,
        "Error: Invalid value for '--port': 99999 is not in the range 0<=x<=65535.",
    ),
    (
        ["worker", "tcp://127.0.0.1:99999"],
        {},
        1,
        "Error: bad address 'tcp://127.0.0.1:99999': expected tcp://host:port",
    ),
    (
        ["events", "tcp://127.0.0.1:0"],
        {},
        2,
        "Error: bad port 0 in address 'tcp://127.0.0.1:0': expected a number from 1 to 65535",
    ),
    (["--bogus"], {}, 2, "Error: No such option '--bogus'."),
    (["frobnicate"], {}, 2, "Error: No such command 'frobnicate'."),
    (["replay", "x.jsonl", "--bogus"], {}, 2, "Error: No such option '--bogus'."),
    (["demo", "--tasks", "zero"], {}, 2, "Error: Invalid value for '--tasks': 'zero' is not"),
    (
        ["scheduler", "--port", "0", "--bogus"],
        {},
        2,
        "Error: no such option: --bogus (and no --preload to take it)",
    ),
    (
        ["worker", "tcp://127.0.0.1:9", "--bogus"],
        {},
        2,
        "Error: no such option: --bogus (and no --preload to take it)",
    ),
    (
        ["scheduler", "--port", "0"],
        {"SLUICE_CONFIG": "/nonexistent/sluice.yaml"},
        1,
        "Error: cannot read configuration file /nonexistent/sluice.yaml",
    ),
    (["scheduler", "--port", "0"], {"SLUICE_CONFIG": "BAD_YAML"}, 1, "not valid YAML"),
    (["scheduler", "--port", "0", "--sink", "nope"], {}, 1, "Error: unknown sink 'nope'"),
]


@pytest.mark.parametrize(
    ("args", "env", "status", "line"), CASES, ids=[" ".join(c[0]) for c in CASES]
)
def test_a_bad_invocation_is_one_clear_line(
    args: list[str], env: dict[str, str], status: int, line: str, bad_yaml: Path
) -> None:
    environ = dict(os.environ)
    environ.pop("SLUICE_CONFIG", None)
    environ.update({k: v.replace("BAD_YAML", str(bad_yaml)) for k, v in env.items()})
    done = subprocess.run(
        [str(BIN / "sluice"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=environ,
    )
    output = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == status, output
    assert len(output) == 1, output
    assert output[0].startswith("Error: ") and line.replace("BAD_YAML", "") in output[0], output
