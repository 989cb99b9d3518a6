"""``sluice events ADDRESS``: the scheduler's bus, tailed live.

Connects as a client and prints every event as the scheduler publishes it: a
compact line for people (rendered with rich), or with ``--json`` exactly
``event.to_dict()`` as one JSON object per line, for ``jq`` and scripts.
``--kind`` and ``--key`` filter, ``--since`` first catches up on the events
after a seq, ``--count`` stops after that many matching events.

Exit codes: 0 after ``--count`` events, SIGINT or SIGTERM (or a closed stdout,
as under ``| head``); 1 when the scheduler cannot be reached or goes away; 2 for
a bad invocation. Every failure is one ``Error:`` line on stderr, never a
traceback.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import anyio
import click

from sluice._cli_common import (
    OneLineCommand,
    OneLineUsageError,
    parse_key,
    scheduler_address,
    security_from_options,
)

__all__ = ("events",)

#: What a failed connection can raise (AuthenticationError is an OSError too).
_CONNECT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    RuntimeError,
    TimeoutError,
)


def _check_kinds(
    ctx: click.Context, param: click.Parameter, value: Sequence[str]
) -> tuple[str, ...]:
    from sluice.events import KINDS

    for kind in value:
        if kind not in KINDS:
            raise OneLineUsageError(
                f"unknown event kind {kind!r} for --kind; valid kinds: {', '.join(sorted(KINDS))}"
            )
    return tuple(dict.fromkeys(value))


def _parse_keys(
    ctx: click.Context, param: click.Parameter, value: Sequence[str]
) -> tuple[Any, ...]:
    keys = []
    for text in value:
        try:
            keys.append(parse_key(text))
        except click.BadParameter as exc:
            raise OneLineUsageError(f"bad --key {text!r}: {exc.message}") from None
    return tuple(keys)


def _check_address(address: str) -> None:
    """A malformed address or a port no server can listen on: one usage line."""
    from sluice.comm import parse_address

    try:
        _, _, port = parse_address(address)
    except ValueError as exc:
        head, _, tail = address.rpartition(":")
        if tail and _parses(f"{head}:1"):  # all but the port is right
            raise OneLineUsageError(
                f"bad port {tail!r} in address {address!r}: expected a number from 1 to 65535"
            ) from None
        raise OneLineUsageError(str(exc)) from None
    if port == 0:
        raise OneLineUsageError(
            f"bad port 0 in address {address!r}: expected a number from 1 to 65535"
        )


def _parses(address: str) -> bool:
    from sluice.comm import parse_address

    try:
        parse_address(address)
    except ValueError:
        return False
    return True


@click.command(
    "events", cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.argument("address", required=False)
@click.option(
    "--scheduler-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Read the scheduler's address from this JSON file (written by the scheduler).",
)
@click.option(
    "--kind",
    "kinds",
    multiple=True,
    callback=_check_kinds,
    help="Only events of this kind, e.g. task-transition (repeatable).",
)
@click.option(
    "--key",
    "keys",
    multiple=True,
    callback=_parse_keys,
    help="Only events about this task key; JSON for tuples: '[\"x\", 1]' (repeatable).",
)
@click.option(
    "--since",
    type=click.IntRange(min=0),
    default=None,
    help="First catch up on the events after this seq (0: all the scheduler still has).",
)
@click.option(
    "--count",
    type=click.IntRange(min=1),
    default=None,
    help="Exit (status 0) after this many matching events.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per event (to_dict()).")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds to keep trying to reach the scheduler (and to wait for --scheduler-file).",
)
@click.option("--tls-ca-file", default=None, help="CA certificate (enables TLS).")
@click.option("--tls-cert", default=None, help="This client's TLS certificate.")
@click.option("--tls-key", default=None, help="The key of --tls-cert.")
@click.option("--auth-token-file", default=None, help="File holding the cluster's shared token.")
def events(
    address: str | None,
    scheduler_file: Path | None,
    kinds: tuple[str, ...],
    keys: tuple[Any, ...],
    since: int | None,
    count: int | None,
    as_json: bool,
    timeout: float,
    tls_ca_file: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    auth_token_file: str | None,
) -> None:
    """Print the events of the scheduler at ADDRESS as they happen, until Ctrl-C.

    \b
    sluice events tcp://127.0.0.1:8786 --kind task-transition
    sluice events --scheduler-file sched.json --json --key '["load", 3]' | jq .finish
    """
    if address and scheduler_file:
        raise OneLineUsageError("give the scheduler ADDRESS or --scheduler-file, not both")
    if not address and scheduler_file is None:
        raise OneLineUsageError("missing the scheduler ADDRESS (or --scheduler-file FILE)")
    if address:
        _check_address(address)
    # Until the tail's own handlers are installed (waiting for --scheduler-file,
    # say), SIGTERM ends it as quietly as Ctrl-C does.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        target = scheduler_address(address, scheduler_file, timeout)
        if not address:
            _check_address(target)
        security = security_from_options(tls_ca_file, tls_cert, tls_key, auth_token_file)
        # This command reports its own failures, one line each; the client's warnings
        # (such as "lost its connection") would only repeat them.
        logging.getLogger("sluice").setLevel(logging.ERROR)
        printer = _Printer(sys.stdout, as_json=as_json)
        tail = _Tail(target, security, timeout, kinds, keys, since, count, printer)
        code = anyio.run(tail.run)
    except KeyboardInterrupt:
        code = 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    raise SystemExit(code)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _matcher(keys: tuple[Any, ...]) -> Callable[[Any], bool]:
    """Whether an event concerns one of ``keys`` (as ``sluice replay --key`` decides)."""
    if not keys:
        return lambda event: True
    wanted = set(keys)

    def concerns(event: Any) -> bool:
        key = getattr(event, "key", None)
        if key is not None and key in wanted:
            return True
        return any(k in wanted for k in getattr(event, "keys", ())) or any(
            k in wanted for k in getattr(event, "dependencies", {})
        )

    return concerns


class _Tail:
    """One connection to the scheduler, streaming its events to a :class:`_Printer`."""

    def __init__(
        self,
        address: str,
        security: Any,
        timeout: float,
        kinds: tuple[str, ...],
        keys: tuple[Any, ...],
        since: int | None,
        count: int | None,
        printer: _Printer,
    ) -> None:
        self.address = address
        self.security = security
        self.timeout = timeout
        self.kinds = kinds
        self.matches = _matcher(keys)
        self.since = since
        self.count = count
        self.printer = printer
        self.signalled = False
        self.error: str | None = None

    async def run(self) -> int:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with anyio.create_task_group() as tg:

                async def on_signal() -> None:
                    async for _ in signals:
                        self.signalled = True
                        tg.cancel_scope.cancel()
                        return

                tg.start_soon(on_signal)
                await self._stream()
                tg.cancel_scope.cancel()
        if self.signalled:
            return 0
        if self.error is not None:
            click.echo(f"Error: {self.error}", err=True)
            return 1
        return 0

    async def _stream(self) -> None:
        from sluice.client import Client

        try:
            client = Client(
                self.address, asynchronous=True, security=self.security, timeout=self.timeout
            )
            await client
        except _CONNECT_ERRORS as exc:
            self.error = str(exc) or type(exc).__name__
            return
        closing = False
        try:
            stream = client.events(kinds=self.kinds or None, since=self.since)
            seen = 0
            last_seq = self.since
            async for event in stream:
                if self.since is not None and event.seq <= self.since:
                    continue  # a --since ahead of the scheduler: only what comes after it
                if not self.kinds and last_seq is not None and event.seq > last_seq + 1:
                    self.printer.gap(last_seq, event.seq)
                last_seq = event.seq
                closing = closing or event.kind == "scheduler-closing"
                if not self.matches(event):
                    continue
                if not self.printer.show(event):
                    return  # nobody reads our output any more
                seen += 1
                if self.count is not None and seen >= self.count:
                    return
            why = "closed" if closing else "went away"
            self.error = f"the scheduler at {self.address} {why}"
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.timeout):
                await client._close()


#: Task states shown as failures.
_ERROR_STATES = frozenset({"erred", "error"})

#: Fields every event has, shown in the line's prefix instead.
_COMMON = frozenset({"kind", "seq", "time", "source"})


def _key_text(key: Any) -> str:
    """A key as ``--key`` takes it: the string itself, or JSON for a tuple."""
    return key if isinstance(key, str) else json.dumps(key)


def _short(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Printer:
    """Writes each event as a line (rich, or JSON) and flushes it at once."""

    def __init__(self, out: TextIO, *, as_json: bool) -> None:
        self.out = out
        self.as_json = as_json
        self.console: Any = None
        if not as_json:
            from rich.console import Console

            class _Console(Console):
                def on_broken_pipe(self) -> None:
                    raise BrokenPipeError  # handled in show(), with an exit status of 0

            self.console = _Console(file=out, highlight=False, soft_wrap=True)

    def show(self, event: Any) -> bool:
        """Print ``event``; False once stdout is closed (e.g. ``| head`` is done)."""
        try:
            if self.as_json:
                self.out.write(json.dumps(event.to_dict()) + "\n")
            else:
                self.console.print(self._line(event))
            self.out.flush()
        except BrokenPipeError:
            # Point stdout at /dev/null so the interpreter's final flush stays quiet.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.out.fileno())
            os.close(devnull)
            return False
        return True

    def gap(self, last: int, seq: int) -> None:
        missing = f"{last + 1}" if seq == last + 2 else f"{last + 1} to {seq - 1}"
        click.echo(
            f"sluice events: missed event seq {missing} (beyond the scheduler's history,"
            " or dropped while this tail was reading too slowly)",
            err=True,
        )

    def _line(self, event: Any) -> Any:
        from rich.text import Text

        stamp = time.strftime("%H:%M:%S", time.localtime(event.time))
        millis = int((event.time % 1) * 1000)
        line = Text(f"{event.seq:>7} {stamp}.{millis:03d} ", style="dim")
        d = event.to_dict()
        if event.kind == "task-transition":
            failed = d["finish"] in _ERROR_STATES
            line.append("task-transition ", style="bold red" if failed else "cyan")
            line.append(_key_text(d["key"]), style="bold")
            line.append(f" {d['start']} -> ")
            line.append(d["finish"], style="bold red" if failed else "green")
            if d.get("worker"):
                line.append(f" worker={d['worker']}")
            if event.source != "scheduler":
                line.append(f" on {event.source}", style="dim")
            if d.get("stimulus_id"):
                line.append(f" stimulus={d['stimulus_id']}", style="dim")
            if d.get("exception"):
                line.append(f" {d['exception']}", style="red")
            return line
        failed = event.kind == "user-event" and str(d.get("topic", "")).endswith("-failed")
        line.append(event.kind, style="bold red" if failed else "magenta")
        if event.source != "scheduler":
            line.append(f" on {event.source}", style="dim")
        if event.kind == "graph-updated":
            line.append(f" client={d['client']} tasks={len(d['dependencies'])}")
            line.append(f" wanted={len(d['keys'])}")
            return line
        for name, value in d.items():
            if name in _COMMON or value in (None, "", [], {}):
                continue
            if name == "key":
                line.append(f" {_key_text(value)}", style="bold")
            elif name == "keys":
                line.append(f" keys={_short([_key_text(k) for k in value])}")
            else:
                line.append(f" {name}={_short(value)}", style="red" if failed else "")
        return line
