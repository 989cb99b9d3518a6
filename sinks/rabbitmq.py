"""``amqp://``: publishes each event to RabbitMQ, at least once, without ever stalling.

Each event becomes one persistent message (``delivery_mode=2``,
``content_type=application/json``) whose body is ``event.to_dict()`` as JSON, so
``key``, ``start`` and ``finish`` are top-level as in Dask's RabbitMQ example,
and whose ``message_id`` is ``"<run_id>:<seq>"``: a consumer drops a message id
it has seen and gets each event exactly once. Messages go to a durable queue
(``queue=``, default ``sluice-events``) or to a durable topic exchange
(``exchange=``) routed by a template such as ``task.{finish}``.

``write(batch)`` only hands the events to a publisher of the sink's own: a child
process fed by a pipe (:mod:`sluice._amqp_process`, the default) or, with
``process=False``, a thread in this process (:mod:`sluice._amqp_publisher`, which
the child runs too). The publisher owns the pika connection, publishes with
confirms in batches, reconnects with backoff and keeps every event until the
broker confirmed it: first in memory (``max_memory`` messages), then in a disk
spool (:mod:`sluice._amqp_spool`) that outlives the process. See
``docs/rabbitmq.md``.

As a preload::

    sluice scheduler --preload sluice.sinks.rabbitmq --url 'amqp://guest:guest@host/?queue=q'
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import click

from sluice._amqp_publisher import ThreadBackend  # raises the pip-install hint without pika
from sluice._amqp_spool import Message, SpoolInUseError, message_encoder
from sluice._amqp_url import (
    DEFAULT_QUEUE,
    DEFAULT_URL,
    RoutingKey,
    check_pika_url,
    default_spool_dir,
    parse_bool,
    parse_kinds,
    queue_arguments,
    redact,
    split_url,
    target_label,
)
from sluice.events import Event, TaskTransition
from sluice.sinks import Sink

__all__ = ("DEFAULT_QUEUE", "RabbitMQ", "SpoolInUseError", "sluice_setup")

#: Default spool directories tried, when the first is in use, before giving up.
_SPOOL_SLOTS = 64

logger = logging.getLogger("sluice.sinks.rabbitmq")

_DEFAULT_KINDS = frozenset({TaskTransition.kind})


class Backend(Protocol):
    """Where the publishing happens: a thread here, or a child process."""

    def start(self) -> None: ...
    def submit(self, batch: Sequence[Event]) -> None: ...
    def connected(self) -> bool: ...
    def wait_confirmed(self, timeout: float | None) -> bool: ...
    def close(self, timeout: float) -> None: ...
    def stats(self) -> dict[str, int]: ...


_UNSET: Any = object()


class RabbitMQ(Sink):
    """Publish events to RabbitMQ; see the module docstring and ``docs/rabbitmq.md``.

    ``url`` may carry the options as query arguments (``?queue=q``,
    ``?exchange=x&routing_key=task.{finish}``, ``&spool=``, ``&kinds=``,
    ``&close_timeout=``); the keyword arguments give the same options (giving
    one both ways is an error). ``kinds``: the event kinds to publish (default
    ``task-transition``; ``None`` or ``"all"`` for every kind). ``spool``: the
    spool directory (default under ``~/.cache/sluice/rabbitmq-spool/``, keyed by
    broker and queue/exchange); it is locked for the life of the sink.
    ``close_timeout``: how long ``close()`` waits for the broker's confirms
    before spooling what is left. ``process``: publish from a child process fed
    by a pipe (the default: pika's ~30 us of Python per message would otherwise
    hold this process's GIL, see :mod:`sluice._amqp_process`), or from a thread
    with ``process=False`` (no extra process; fine at low rates). ``forwarded=True``: also
    publish the transitions workers forward to the scheduler (by default a sink on
    the scheduler publishes the scheduler's own events: the task status that
    consumers follow, at 5 messages per task instead of 11; the broker spends tens
    of microseconds of CPU on each persistent message). ``queue_args`` (or
    ``x-...=`` in the URL): arguments of the queue's declaration; on RabbitMQ
    3.10-3.12, ``x-queue-version=2&x-queue-mode=lazy`` cut the broker's CPU per
    message by about 40% (what 3.13's classic queues do by default; docs/rabbitmq.md).
    """

    name = "rabbitmq"
    # A broker that falls behind must cost disk, never the scheduler: past this many
    # events waiting for the sink, the bus writes the rest to a file and feeds them
    # back in order ("spill"), instead of pushing back on the scheduler ("block").
    # The sink's own memory and spool come after that.
    maxsize = 20_000
    overflow = "spill"

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        queue: str | None = None,
        exchange: str | None = None,
        routing_key: str | None = None,
        kinds: Iterable[str] | str | None = _UNSET,
        spool: str | os.PathLike[str] | None = None,
        close_timeout: float | None = None,
        max_memory: int = 100_000,
        max_inflight: int = 10_000,
        max_backoff: float = 5.0,
        segment_messages: int = 10_000,
        run_id: str | None = None,
        process: bool | None = None,
        forwarded: bool | None = None,
        queue_args: dict[str, Any] | None = None,
    ) -> None:
        plain, opts = split_url(url)
        declare_args = queue_arguments(opts, queue_args)
        opts = {k: v for k, v in opts.items() if not k.startswith("x-")}
        given: dict[str, Any] = {
            "queue": queue,
            "exchange": exchange,
            "routing_key": routing_key,
            "spool": spool,
            "close_timeout": close_timeout,
            "kinds": None if kinds is _UNSET else kinds,
            "process": process,
            "forwarded": forwarded,
        }
        for option, value in opts.items():
            if given[option] is not None:
                raise ValueError(f"{option} is given both in the URL and as an argument")
            given[option] = value
        queue, exchange, routing_key = given["queue"], given["exchange"], given["routing_key"]
        if queue is not None and exchange is not None:
            raise ValueError("give a queue or an exchange, not both")
        if routing_key is not None and exchange is None:
            raise ValueError("routing_key needs an exchange (a queue gets messages by its name)")
        if exchange is not None and routing_key is None:
            raise ValueError("an exchange needs a routing_key template, e.g. task.{finish}")
        if exchange == "":
            raise ValueError("exchange must not be empty (give queue= for the default exchange)")
        if declare_args and exchange is not None:
            raise ValueError(
                f"queue arguments ({', '.join(sorted(declare_args))}) need a queue, not an exchange"
            )
        if queue is None and exchange is None:
            queue = DEFAULT_QUEUE
        timeout = given["close_timeout"]
        try:
            self.close_timeout = 5.0 if timeout is None else float(timeout)
        except ValueError:
            raise ValueError(
                f"close_timeout must be a number of seconds, not {timeout!r}"
            ) from None
        if not self.close_timeout >= 0:
            raise ValueError(f"close_timeout must be >= 0, not {timeout!r}")
        if kinds is _UNSET and "kinds" not in opts:
            chosen: frozenset[str] | None = _DEFAULT_KINDS
        else:
            chosen = parse_kinds(given["kinds"])
        for what, number in (("max_memory", max_memory), ("max_inflight", max_inflight)):
            if type(number) is not int or number < 1:
                raise ValueError(f"{what} must be a positive int, not {number!r}")
        self.parameters = check_pika_url(plain)
        self.url = plain
        self.queue: str | None = queue
        self.exchange: str | None = exchange
        self.routing_key = RoutingKey(routing_key if routing_key is not None else queue or "")
        # Instance values of the Sink class attributes, read by the bus at subscribe.
        vars(self)["kinds"] = chosen
        target = f"queue={queue}" if queue is not None else f"exchange={exchange}"
        vars(self)["name"] = f"rabbitmq:{target}"
        host, port, vhost = target_label(plain)
        self.label = f"{host}:{port}{'' if vhost == '/' else '/' + vhost} {target}"
        spool_dir = given["spool"]
        self.spool_dir = (
            Path(spool_dir).expanduser()
            if spool_dir is not None
            else default_spool_dir(plain, queue, exchange)
        )
        self._run_id = run_id
        self._encoder: Callable[[Event], Message] | None = None  # fixed at the first event
        self.max_backoff = max_backoff
        # The spool is locked now, so a directory in use fails where the sink is made.
        backend_options: dict[str, Any] = {
            "exchange": exchange or "",
            "queue": queue,
            "spool_dir": self.spool_dir,
            "segment_messages": segment_messages,
            "label": self.label,
            "max_memory": max_memory,
            "max_inflight": max_inflight,
            "max_backoff": max_backoff,
            "queue_arguments": declare_args,
        }
        self.process = parse_bool("process", True if given["process"] is None else given["process"])
        self.forwarded = parse_bool("forwarded", given["forwarded"] or False)
        if not self.forwarded:
            # The bus then never queues the workers' events for this sink: a
            # publisher that lags would otherwise spill them to disk to drop them.
            self.accepts = self._is_own
        self._backend: Backend = self._make_backend(plain, backend_options, given["spool"] is None)
        self._start_lock = threading.Lock()
        self._started = False
        self._closed = False

    def _make_backend(self, url: str, options: dict[str, Any], default_spool: bool) -> Backend:
        """The publisher, with its spool locked. With the default spool, a directory in use
        (another worker of this machine streaming to the same queue) is passed over for
        the next free sibling ``<dir>-1``, ``<dir>-2``...: each sink gets a spool of its
        own, and one that a stopped process left behind is taken up and sent."""
        base = self.spool_dir
        for slot in range(_SPOOL_SLOTS):
            if slot:
                self.spool_dir = options["spool_dir"] = base.with_name(f"{base.name}-{slot}")
            try:
                if self.process:
                    from sluice._amqp_process import ProcessBackend

                    return ProcessBackend(url, message_format=self._message_format, **options)
                return ThreadBackend(self.parameters, encode=self._encode, **options)
            except SpoolInUseError:
                if not default_spool or slot == _SPOOL_SLOTS - 1:
                    raise
        raise AssertionError("unreachable")

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RabbitMQ:
        """``RabbitMQ.from_url("amqp://user:pw@host:5672/vhost?queue=q")``; see the class."""
        return cls(url, **options)

    def __repr__(self) -> str:
        return f"<RabbitMQ {redact(self.url)} {self.label.split(' ', 1)[1]}>"

    # -- message format ----------------------------------------------------------------

    @property
    def run_id(self) -> str:
        """The run id in every message id: the argument, else the bus's, else a new one."""
        if self._run_id is None:
            bus_run_id = getattr(self.bus, "run_id", None)
            self._run_id = bus_run_id if bus_run_id else uuid.uuid4().hex
        return self._run_id

    def _encode(self, event: Event) -> Message:
        encode = self._encoder
        if encode is None:
            encode = self._encoder = message_encoder(f"{self.run_id}:", self.routing_key)
        return encode(event)

    def _message_format(self) -> dict[str, str]:
        """What the publisher child needs to make the messages as ``_encode`` does."""
        return {"id_prefix": f"{self.run_id}:", "routing_key": self.routing_key.template}

    def _is_own(self, event: Event) -> bool:
        """Whether ``event`` is this sink's scheduler's own, not one a worker forwarded."""
        bus = self.bus
        return bus is None or event.source == "scheduler" or event.source == bus.address

    def _own(self, batch: Sequence[Event]) -> Sequence[Event]:
        """``batch`` without the events workers forwarded to this sink's scheduler: a
        bus has left them out already (``accepts``), a direct ``write`` may not have."""
        if self.forwarded or self.bus is None:
            return batch
        return [e for e in batch if self._is_own(e)]

    # -- Sink interface ----------------------------------------------------------------

    def start(self) -> None:
        """Start the publisher thread or process (a first ``write`` starts it too)."""
        with self._start_lock:
            if self._closed:
                raise RuntimeError(f"RabbitMQ sink {self.label} is closed")
            if not self._started:
                _ = self.run_id  # fixed before anything is encoded
                self._backend.start()
                self._started = True

    def write(self, batch: Sequence[Event], /) -> None:
        """Hand ``batch`` to the publisher and return at once."""
        if self._closed:
            raise RuntimeError(f"RabbitMQ sink {self.label} is closed")
        if not self._started:
            self.start()
        batch = self._own(batch)
        if batch:
            self._backend.submit(batch)

    def flush(self) -> None:
        """Nothing to do: the publisher sends continuously (see :meth:`wait_confirmed`)."""

    def wait_confirmed(self, timeout: float | None = None) -> bool:
        """Wait until every event written so far is confirmed; False on timeout."""
        return self._backend.wait_confirmed(timeout)

    def close(self) -> None:
        """Wait up to ``close_timeout`` for confirms, then spool what is left; idempotent."""
        with self._start_lock:
            if self._closed:
                return
            self._closed = True
        self._backend.close(self.close_timeout)

    # -- observability -----------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a confirm-mode channel to the broker is open."""
        return self._backend.connected()

    def stats(self) -> dict[str, int]:
        """Counters: published (incl. resent), confirmed, spooled, resent, pending, corrupt."""
        return self._backend.stats()


def _check_url(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    """Reject a malformed URL while arguments are parsed: before the service opens a port."""
    try:
        check_pika_url(split_url(value)[0])
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


@click.command()
@click.option(
    "--url",
    default=DEFAULT_URL,
    show_default=True,
    callback=_check_url,
    help="amqp://user:pw@host:5672/vhost, options as query arguments (?queue=q...)",
)
@click.option("--queue", default=None, help=f"durable queue (default {DEFAULT_QUEUE})")
@click.option("--exchange", default=None, help="durable topic exchange instead of a queue")
@click.option("--routing-key", default=None, help="routing-key template, e.g. task.{finish}")
@click.option("--spool", default=None, help="spool directory (default under ~/.cache/sluice)")
@click.option("--kinds", default=None, help="event kinds, comma-separated, or all")
@click.option("--close-timeout", type=float, default=None, help="seconds to wait at close")
@click.option(
    "--process/--no-process",
    default=None,
    help="publish from a child process (default) or from a thread",
)
@click.option(
    "--forwarded/--no-forwarded",
    default=None,
    help="also publish the transitions workers forward (default: the scheduler's own)",
)
def sluice_setup(
    server: Any,
    url: str,
    queue: str | None,
    exchange: str | None,
    routing_key: str | None,
    spool: str | None,
    kinds: str | None,
    close_timeout: float | None,
    process: bool | None,
    forwarded: bool | None,
) -> None:
    """Add a RabbitMQ sink to the scheduler (or worker) this preload runs in."""
    add_sink = getattr(server, "add_sink", None)
    if add_sink is None:
        raise TypeError(f"{type(server).__name__} has no add_sink: preload it on a scheduler")
    options: dict[str, Any] = {
        "queue": queue,
        "exchange": exchange,
        "routing_key": routing_key,
        "spool": spool,
        "close_timeout": close_timeout,
        "process": process,
        "forwarded": forwarded,
    }
    if kinds is not None:
        options["kinds"] = kinds
    add_sink(RabbitMQ(url, **options))
