"""What the commands share: security options, the scheduler address, keys as typed."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

__all__ = (
    "OneLineCommand",
    "OneLineGroup",
    "OneLineUsageError",
    "parse_key",
    "scheduler_address",
    "security_from_options",
    "sink_and_log_options",
)


F = TypeVar("F", bound=Callable[..., Any])


class OneLineUsageError(click.UsageError):
    """A usage error shown as one ``Error:`` line (exit status 2), without the usage text.

    Whoever mistyped an option wants to know which and why; the full usage is one
    ``--help`` away.
    """

    def show(self, file: Any = None) -> None:
        click.echo(f"Error: {self.format_message()}", file=file or sys.stderr)


def _one_line(exc: click.UsageError) -> OneLineUsageError:
    return OneLineUsageError(exc.format_message(), exc.ctx)


class OneLineCommand(click.Command):
    """A click command whose parse errors are one line, like every other failure."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except OneLineUsageError:
            raise
        except click.UsageError as exc:
            raise _one_line(exc) from None


class OneLineGroup(click.Group):
    """A click group whose usage errors, and its subcommands', are one line."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except OneLineUsageError:
            raise
        except click.UsageError as exc:
            raise _one_line(exc) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OneLineUsageError:
            raise
        except click.UsageError as exc:
            raise _one_line(exc) from None


def security_from_options(
    tls_ca_file: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    auth_token_file: str | None,
    *,
    inherited_token: bytes | None = None,
) -> Any:
    """The ``Security`` the TLS and token options describe, or ``None`` for neither.

    A bad file, certificate or key is a one-line usage error now, before anything
    starts. ``inherited_token`` is a token handed down by a nanny, used when no
    token file was given.
    """
    from sluice.security import Security

    try:
        sec = Security.from_files(
            tls_ca_file=tls_ca_file,
            tls_cert=tls_cert,
            tls_key=tls_key,
            auth_token_file=auth_token_file,
        )
        if inherited_token and sec.auth_token is None:
            sec = Security(sec.tls_ca_file, sec.tls_cert, sec.tls_key, inherited_token)
        if sec.tls and sec.tls_cert is not None:
            sec.server_ssl_context()
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    if not sec.tls and sec.auth_token is None:
        return None
    return sec


def parse_key(text: str) -> Any:
    """A key as typed: JSON for tuple keys (``'["x", 1]'``), else the string itself."""
    if text.startswith("["):
        from sluice.events import to_key

        try:
            return to_key(json.loads(text))
        except ValueError:
            raise click.BadParameter(f"not a JSON list: {text}") from None
    return text


def scheduler_address(address: str | None, scheduler_file: Path | None, timeout: float) -> str:
    """ADDRESS or the address in the scheduler file (waited for up to ``timeout`` s)."""
    if address and scheduler_file:
        raise click.UsageError("give the scheduler ADDRESS or --scheduler-file, not both")
    if address:
        return address
    if scheduler_file is None:
        raise click.UsageError("missing the scheduler ADDRESS (or --scheduler-file FILE)")
    # The scheduler may still be starting: wait for its file a little.
    deadline = time.monotonic() + timeout
    while not scheduler_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        found = json.loads(scheduler_file.read_text())["address"]
    except FileNotFoundError:
        raise click.ClickException(
            f"scheduler file {str(scheduler_file)!r} does not exist (waited {timeout}s)"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise click.ClickException(
            f"cannot read the scheduler address from {str(scheduler_file)!r}: {exc}"
        ) from None
    if not isinstance(found, str):
        raise click.ClickException(f"no scheduler address in {str(scheduler_file)!r}")
    return found


def sink_and_log_options(service: str) -> Callable[[F], F]:
    """``--sink``, ``--log-format`` and ``--log-level``, as every service takes them."""
    options = [
        click.option(
            "--sink",
            "sinks",
            multiple=True,
            metavar="SPEC",
            help="Send every event to this sink: counter, errors, json-log:stderr,"
            " json-log:///path, eventlog:///path, amqp://... (repeatable; default: config"
            f" sluice.{service}.sinks).",
        ),
        click.option(
            "--log-format",
            type=click.Choice(["console", "json"]),
            default="console",
            show_default=True,
            help="console: readable lines; json: one JSON object per line, for log shippers.",
        ),
        click.option(
            "--log-level",
            type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
            default="info",
            show_default=True,
            help="The lowest level of sluice's own log lines that is shown.",
        ),
    ]

    def apply(fn: F) -> F:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return apply
