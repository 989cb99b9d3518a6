"""``sluice worker``: start workers (each under a nanny by default) for a scheduler.

Every expected failure (no address, a bad one, an unreachable scheduler, an
unreadable token file, a refused registration) ends with one ``Error:`` line
and a non-zero exit, never a traceback: whoever reads it is starting a service,
not debugging sluice.

Exit codes: 0 after SIGINT/SIGTERM or a ``close`` from the scheduler; 1 when
the scheduler connection was lost (a nanny then starts a fresh worker);
:data:`~sluice.worker.EXIT_RESTART` when the scheduler asked for a restart.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

import anyio
import click

from sluice._cli_common import (
    OneLineCommand,
    OneLineUsageError,
    scheduler_address,
    security_from_options,
    sink_and_log_options,
)

__all__ = ("worker",)

logger = logging.getLogger("sluice.cli")

#: Startup errors a user can cause and fix; shown as one line.
_EXPECTED: tuple[type[BaseException], ...] = (OSError, ValueError, RuntimeError, TimeoutError)


def _security(
    tls_ca_file: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    auth_token_file: str | None,
) -> Any:
    from sluice.nanny import TOKEN_ENV

    inherited = os.environ.pop(TOKEN_ENV, None)  # from our nanny; not for our children
    return security_from_options(
        tls_ca_file,
        tls_cert,
        tls_key,
        auth_token_file,
        inherited_token=bytes.fromhex(inherited) if inherited else None,
    )


@click.command(
    "worker",
    cls=OneLineCommand,
    context_settings={
        "help_option_names": ["-h", "--help"],
        # The rest of the command line belongs to the click preloads.
        "ignore_unknown_options": True,
        "allow_extra_args": True,
    },
)
@click.argument("address", required=False)
@click.option(
    "--scheduler-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Read the scheduler's address from this JSON file (written by the scheduler).",
)
@click.option(
    "--nthreads", type=click.IntRange(1), default=1, show_default=True, help="Threads per worker."
)
@click.option(
    "--nworkers",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Workers (or nannies) to start.",
)
@click.option(
    "--nanny/--no-nanny",
    default=True,
    show_default=True,
    help="Run each worker in a child process that a nanny restarts when it dies.",
)
@click.option("--name", default=None, help="Worker name (suffixed -0, -1... with --nworkers).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="Worker port (0: any free port).",
)
@sink_and_log_options("worker")
@click.option("--tls-ca-file", default=None, help="CA certificate (enables TLS).")
@click.option("--tls-cert", default=None, help="This process's TLS certificate.")
@click.option("--tls-key", default=None, help="The key of --tls-cert.")
@click.option("--auth-token-file", default=None, help="File holding the cluster's shared token.")
@click.option(
    "--forward-events/--no-forward-events",
    default=None,
    help="Send this worker's transition events to the scheduler's bus"
    " [default: config sluice.worker.forward-events, true].",
)
@click.option("--insecure", is_flag=True, help="Allow a non-loopback --host without TLS or token.")
@click.option(
    "--connect-timeout",
    type=click.FloatRange(0),
    default=10.0,
    show_default=True,
    help="Seconds to keep trying to reach the scheduler.",
)
@click.option(
    "--preload",
    multiple=True,
    help="A module, .py file, script text or pinned https URL run by each worker (repeatable).",
)
@click.option(
    "--preload-nanny",
    multiple=True,
    help="Like --preload, for the nanny process itself (repeatable).",
)
@click.option(
    "--preload-strict/--no-preload-strict",
    default=None,
    help="Stop (non-zero exit) if a preload's setup raises; default: log it and run on.",
)
@click.option("--preload-argv-json", default=None, hidden=True)
@click.option("--nanny-fd", type=int, default=None, hidden=True)
@click.option("--nanny-address", default=None, hidden=True)
@click.pass_context
def worker(
    ctx: click.Context,
    address: str | None,
    scheduler_file: Path | None,
    nthreads: int,
    nworkers: int,
    nanny: bool,
    name: str | None,
    host: str,
    port: int,
    sinks: tuple[str, ...],
    log_format: str,
    log_level: str,
    tls_ca_file: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    auth_token_file: str | None,
    forward_events: bool | None,
    insecure: bool,
    connect_timeout: float,
    preload: tuple[str, ...],
    preload_nanny: tuple[str, ...],
    preload_strict: bool | None,
    preload_argv_json: str | None,
    nanny_fd: int | None,
    nanny_address: str | None,
) -> None:
    """Start workers for the scheduler at ADDRESS; run until SIGINT or SIGTERM.

    Arguments after the options are given to the ``--preload`` (and
    ``--preload-nanny``) scripts whose ``sluice_setup`` is a click command; each
    takes the options it declares.
    """
    from sluice._logging import configure_logging
    from sluice._tuning import tune_process
    from sluice.comm import parse_address

    configure_logging(log_format, log_level.upper())  # type: ignore[arg-type]
    target = scheduler_address(address, scheduler_file, connect_timeout)
    try:
        parse_address(target)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if port and nworkers > 1:
        raise click.UsageError("--port needs --nworkers 1 (the workers would share the port)")
    security = _security(tls_ca_file, tls_cert, tls_key, auth_token_file)
    worker_argv, nanny_argv = _preload_argv(
        list(ctx.args), preload, preload_nanny if nanny else (), preload_argv_json
    )
    if preload_nanny and not nanny:
        raise click.UsageError("--preload-nanny needs --nanny")
    tune_process()

    def make(i: int) -> Any:
        wname = name if name is None or nworkers == 1 else f"{name}-{i}"
        if nanny:
            from sluice.nanny import Nanny

            return Nanny(
                target,
                nthreads=nthreads,
                name=wname,
                host=host,
                security=security,
                worker_port=port,
                forward_events=forward_events,
                insecure=insecure,
                log_format=log_format,
                log_level=log_level,
                connect_timeout=connect_timeout,
                preload=list(preload) if preload else None,
                preload_argv=worker_argv,
                preload_nanny=list(preload_nanny) if preload_nanny else None,
                preload_nanny_argv=nanny_argv,
                preload_strict=preload_strict,
                sinks=list(sinks) if sinks else None,
            )
        from sluice.worker import Worker

        return Worker(
            target,
            nthreads=nthreads,
            name=wname,
            host=host,
            port=port,
            security=security,
            forward_events=forward_events,
            nanny=nanny_address,
            connect_timeout=connect_timeout,
            insecure=insecure,
            preload=list(preload) if preload else None,
            preload_argv=worker_argv,
            preload_strict=preload_strict,
            sinks=list(sinks) if sinks else None,
        )

    # A bad preload fails in make(0), before any server opens a port.
    code = anyio.run(_serve, make, nworkers, nanny_fd)
    raise SystemExit(code)


def _preload_argv(
    extra: list[str],
    preload: tuple[str, ...],
    preload_nanny: tuple[str, ...],
    argv_json: str | None,
) -> tuple[Any, Any]:
    """Split the extra arguments between the worker's and the nanny's click preloads."""
    from sluice.preload import PreloadError, _option_names, load_preloads

    if argv_json is not None:  # from our nanny: exactly what its constructor was given
        return json.loads(argv_json), None
    if not preload_nanny:
        return (extra if preload or extra else None), None
    # Options the nanny's preloads declare go to them; the rest to the worker's.
    try:
        nanny_loaded = load_preloads(list(preload_nanny))
    except PreloadError as exc:
        raise click.ClickException(str(exc)) from None
    declared: set[str] = set()
    flags: set[str] = set()
    for p in nanny_loaded:
        if p.command is not None:
            for name, opt in _option_names(p.command).items():
                declared.add(name)
                if opt.is_flag or opt.count:
                    flags.add(name)
    worker_args: list[str] = []
    nanny_args: list[str] = []
    i = 0
    while i < len(extra):
        token = extra[i]
        name = token.partition("=")[0]
        i += 1
        if name in declared:
            nanny_args.append(token)
            if "=" not in token and name not in flags and i < len(extra):
                nanny_args.append(extra[i])
                i += 1
        else:
            worker_args.append(token)
    return worker_args, nanny_args


_EXIT_CODES = {"scheduler-lost": 1, "nanny-lost": 1}


async def _serve(make: Any, n: int, nanny_fd: int | None) -> int:
    from sluice.worker import EXIT_RESTART

    servers: list[Any] = []
    stop = anyio.Event()
    startup = anyio.CancelScope()
    signalled = False
    error: BaseException | None = None
    lifeline = socket.socket(fileno=nanny_fd) if nanny_fd is not None else None
    reasons: list[str] = []

    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:

            async def on_signal() -> None:
                nonlocal signalled
                async for signum in signals:
                    logger.info("received %s; closing", signal.Signals(signum).name)
                    signalled = True
                    stop.set()
                    startup.cancel()
                    return

            async def watch(server: Any) -> None:
                await server.finished()
                reasons.append(server.close_reason or "closed")
                if all(s.close_reason is not None for s in servers):
                    stop.set()

            async def watch_nanny(sock: socket.socket) -> None:
                sock.setblocking(False)
                while True:
                    await anyio.wait_readable(sock)
                    try:
                        if not sock.recv(4096):
                            break
                    except BlockingIOError:
                        continue
                    except OSError:
                        break
                logger.warning("the nanny is gone; closing")
                reasons.append("nanny-lost")
                stop.set()

            tg.start_soon(on_signal)
            try:
                with startup:
                    for i in range(n):
                        server = make(i)
                        await server.start()
                        servers.append(server)
            except _EXPECTED as exc:
                error = exc
                stop.set()
            if not stop.is_set():
                if lifeline is not None:
                    lifeline.sendall(f"{servers[0].address}\n".encode())
                    tg.start_soon(watch_nanny, lifeline)
                for server in servers:
                    tg.start_soon(watch, server)
                await stop.wait()
            with anyio.CancelScope(shield=True):
                for server in reversed(servers):
                    await server.close()
            tg.cancel_scope.cancel()
    if lifeline is not None:
        lifeline.close()
    if error is not None:
        from sluice.preload import PreloadArgumentError

        if isinstance(error, PreloadArgumentError):
            raise OneLineUsageError(str(error))
        raise click.ClickException(str(error) or type(error).__name__)
    if signalled:
        return 0
    if "scheduler-restart" in reasons:
        return EXIT_RESTART
    return max((_EXIT_CODES.get(r, 0) for r in reasons), default=0)


if __name__ == "__main__":
    worker()
