"""``sluice scheduler``: run a scheduler until SIGINT or SIGTERM.

Every expected failure (a port in use, a non-loopback host without TLS or a
token, an unreadable token file, an event log that already exists) ends with
one ``Error:`` line and a non-zero exit, never a traceback: whoever reads it is
starting a service, not debugging sluice. Inputs are checked before logging is
configured or any port is opened.

On a signal the scheduler closes gracefully: the bus is drained, so the event
log holds every event up to ``scheduler-closing``, and the exit code is 0.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import anyio
import click

from sluice._cli_common import (
    OneLineCommand,
    OneLineUsageError,
    security_from_options,
    sink_and_log_options,
)

__all__ = ("scheduler",)

logger = logging.getLogger("sluice.cli")


def _security(
    tls_ca_file: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    auth_token_file: str | None,
) -> Any:
    return security_from_options(tls_ca_file, tls_cert, tls_key, auth_token_file)


@click.command(
    "scheduler",
    cls=OneLineCommand,
    context_settings={
        "help_option_names": ["-h", "--help"],
        # The rest of the command line belongs to the click preloads.
        "ignore_unknown_options": True,
        "allow_extra_args": True,
    },
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8786,
    show_default=True,
    help="Port to listen on (0: any free port).",
)
@click.option(
    "--scheduler-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help='Write {"address": ...} to this JSON file for workers and clients.',
)
@click.option(
    "--event-log",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Record every event of the run in this file (must not exist yet).",
)
@sink_and_log_options("scheduler")
@click.option("--tls-ca-file", default=None, help="CA certificate (clients must present one).")
@click.option("--tls-cert", default=None, help="The scheduler's TLS certificate (enables TLS).")
@click.option("--tls-key", default=None, help="The key of --tls-cert.")
@click.option("--auth-token-file", default=None, help="File holding the cluster's shared token.")
@click.option("--insecure", is_flag=True, help="Allow a non-loopback --host without TLS or token.")
@click.option(
    "--heartbeat-timeout",
    type=click.FloatRange(0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds of silence after which a worker is removed.",
)
@click.option(
    "--preload",
    multiple=True,
    help="A module, .py file, script text or pinned https URL to run at startup (repeatable).",
)
@click.option(
    "--preload-strict/--no-preload-strict",
    default=None,
    help="Stop (non-zero exit) if a preload's setup raises; default: log it and run on.",
)
@click.pass_context
def scheduler(
    ctx: click.Context,
    host: str,
    port: int,
    scheduler_file: Path | None,
    event_log: Path | None,
    sinks: tuple[str, ...],
    log_format: str,
    log_level: str,
    tls_ca_file: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    auth_token_file: str | None,
    insecure: bool,
    heartbeat_timeout: float,
    preload: tuple[str, ...],
    preload_strict: bool | None,
) -> None:
    """Start a scheduler; run until SIGINT or SIGTERM.

    Arguments after the options are given to the ``--preload`` scripts whose
    ``sluice_setup`` is a click command (each takes the options it declares).
    """
    from sluice._logging import configure_logging
    from sluice._tuning import tune_process
    from sluice.preload import PreloadArgumentError
    from sluice.scheduler import Scheduler

    security = _security(tls_ca_file, tls_cert, tls_key, auth_token_file)
    try:
        server = Scheduler(
            host,
            port,
            security=security,
            insecure=insecure,
            event_log=event_log,
            sinks=list(sinks) if sinks else None,
            heartbeat_timeout=heartbeat_timeout,
            scheduler_file=scheduler_file,
            preload=list(preload) if preload else None,
            preload_argv=list(ctx.args) if preload else (list(ctx.args) or None),
            preload_strict=preload_strict,
        )
    except PreloadArgumentError as exc:
        raise OneLineUsageError(str(exc)) from None
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    configure_logging(log_format, log_level.upper())  # type: ignore[arg-type]
    tune_process()
    error = anyio.run(_serve, server)
    if error is not None:
        raise click.ClickException(error)


async def _serve(server: Any) -> str | None:
    """Run ``server`` until a signal; return a one-line startup error, if any."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        from sluice.preload import PreloadError

        try:
            await server.start()
        except PreloadError as exc:
            with anyio.CancelScope(shield=True):
                await server.close()
            return str(exc)
        except OSError as exc:
            with anyio.CancelScope(shield=True):
                await server.close()
            return str(exc.strerror or exc)
        async for signum in signals:
            logger.info("received %s; closing", signal.Signals(signum).name)
            break
        with anyio.CancelScope(shield=True):
            await server.close()
    return None


if __name__ == "__main__":
    scheduler()
