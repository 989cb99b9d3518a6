"""Logging for the command-line services: console for people, JSON for log shippers.

Library code logs through the standard :mod:`logging` module (loggers named
``sluice.*``), so an application embedding sluice keeps control. The CLI calls
:func:`configure_logging` once: structlog's processors then render every
record, ours and third-party ones alike, either as a readable console line or
as one JSON object per line on stderr.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

__all__ = ("LogFormat", "configure_logging")

LogFormat = Literal["console", "json"]


def configure_logging(fmt: LogFormat = "console", level: int | str = logging.INFO) -> None:
    """Route every log record to stderr, rendered as ``fmt``; idempotent."""
    if fmt not in ("console", "json"):
        raise ValueError(f"unknown log format {fmt!r}: expected 'console' or 'json'")
    shared: list[structlog.types.Processor] = [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    handler.set_name("sluice")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "sluice"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # pika narrates every connection at INFO; the RabbitMQ sink logs what matters itself.
    logging.getLogger("pika").setLevel(max(logging.WARNING, root.level))
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
