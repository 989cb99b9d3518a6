"""The RabbitMQ sink's options: its URL, the routing-key template, the default spool.

``amqp://user:pw@host:5672/vhost?queue=q`` (or ``amqps://``) names the broker
the way pika does; the sink's own options ride along as query arguments and
are taken out before pika sees the rest (``heartbeat=``, ``ssl_options=``...):

- ``queue=NAME``: publish to this durable queue (declared), through the default
  exchange. ``sluice-events`` when neither ``queue`` nor ``exchange`` is given.
- ``exchange=NAME`` and ``routing_key=TEMPLATE``: publish to this durable topic
  exchange (declared), routed by the template, e.g. ``task.{finish}``.
- ``spool=PATH``, ``kinds=a,b``, ``close_timeout=SECONDS``, ``process=true``,
  ``forwarded=true``.
- ``x-...=VALUE``: an argument of the queue's declaration, such as
  ``x-queue-mode=lazy`` or ``x-queue-version=2`` (digits become integers).

Every error is a :class:`ValueError` with a one-line message naming the problem.
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

__all__ = (
    "ALL_KINDS",
    "DEFAULT_QUEUE",
    "DEFAULT_URL",
    "RoutingKey",
    "default_spool_dir",
    "parse_kinds",
    "split_url",
)

DEFAULT_QUEUE = "sluice-events"
DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
#: ``kinds=all`` (or ``*``) subscribes the sink to every event kind.
ALL_KINDS = ("all", "*")

_OWN = (
    "queue",
    "exchange",
    "routing_key",
    "spool",
    "kinds",
    "close_timeout",
    "process",
    "forwarded",
)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_bool(name: str, value: str | bool) -> bool:
    """``true``/``false`` (and 1/0, yes/no, on/off) from a URL option."""
    if isinstance(value, bool):
        return value
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ValueError(f"{name} must be true or false, not {value!r}")


def split_url(url: str) -> tuple[str, dict[str, str]]:
    """``(url for pika, the sink's own options)``; ``ValueError`` for a malformed URL."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"RabbitMQ URL must be a non-empty string, not {url!r}")
    parts = urlsplit(url)
    if parts.scheme not in ("amqp", "amqps"):
        shown = parts.scheme or url
        raise ValueError(f"RabbitMQ URL must start with amqp:// or amqps://, not {shown!r}")
    if parts.fragment:
        raise ValueError(f"RabbitMQ URL must not have a #fragment: {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"RabbitMQ URL has a bad port: {parts.netloc!r}") from None
    del port
    own: dict[str, str] = {}
    rest: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in seen:
            raise ValueError(f"RabbitMQ URL gives {name}= more than once")
        seen.add(name)
        if name in _OWN or name.startswith("x-"):
            if not value:
                raise ValueError(f"RabbitMQ URL option {name}= is empty")
            own[name] = value
        else:
            rest.append((name, value))
    plain = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(rest), ""))
    return plain, own


def queue_arguments(options: Mapping[str, str], given: Mapping[str, Any] | None) -> dict[str, Any]:
    """The queue's declaration arguments: the URL's ``x-...`` options and ``given``.

    A value of digits is an integer (``x-queue-version=2``, ``x-max-length=1000``),
    as RabbitMQ wants those arguments typed.
    """
    from_url = {
        name: int(value) if value.isdigit() else value
        for name, value in options.items()
        if name.startswith("x-")
    }
    both = sorted(set(from_url) & set(given or ()))
    if both:
        raise ValueError(f"{', '.join(both)} is given both in the URL and as an argument")
    return {**from_url, **(given or {})}


def check_pika_url(url: str) -> Any:
    """``pika.URLParameters(url)``, its errors turned into one-line ``ValueError``s."""
    import pika

    try:
        return pika.URLParameters(url)
    except Exception as exc:
        raise ValueError(f"RabbitMQ URL {redact(url)!r} is invalid: {exc}") from None


def redact(url: str) -> str:
    """The URL with its password replaced by ``***`` (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query, ""))


def target_label(url: str) -> tuple[str, int, str]:
    """``(host, port, vhost)`` of a URL, as the broker will see them."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    return host, port, vhost


def default_spool_dir(url: str, queue: str | None, exchange: str | None) -> Path:
    """``$XDG_CACHE_HOME`` (else ``~/.cache``) ``/sluice/rabbitmq-spool/<broker>-<target>``."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    host, port, vhost = target_label(url)
    target = f"queue-{queue}" if queue is not None else f"exchange-{exchange}"
    name = f"{host}_{port}_{quote(vhost, safe='')}_{target}"
    name = re.sub(r"[^A-Za-z0-9._%+-]", "_", name)
    return Path(cache) / "sluice" / "rabbitmq-spool" / name


def parse_kinds(value: str | Any) -> frozenset[str] | None:
    """``"a,b"`` or an iterable of kinds -> a frozenset; ``"all"``/``"*"``/``None`` -> None."""
    from sluice.events import KINDS

    if value is None:
        return None
    items = [k.strip() for k in value.split(",")] if isinstance(value, str) else list(value)
    items = [k for k in items if k]
    if not items:
        raise ValueError("kinds= is empty (give event kinds such as task-transition, or all)")
    if any(k in ALL_KINDS for k in items):
        return None
    unknown = sorted(k for k in items if k not in KINDS)
    if unknown:
        raise ValueError(
            f"unknown event kind(s) {', '.join(unknown)}; known: {', '.join(sorted(KINDS))}"
        )
    return frozenset(items)


class _Fields(dict[str, Any]):
    """An event's dict for ``format_map``: a field it lacks becomes the event's kind."""

    def __missing__(self, name: str) -> Any:
        return self.get("kind", "event")


class RoutingKey:
    """A routing-key template such as ``task.{finish}``, formatted from an event's dict.

    A field the event does not have (``{finish}`` on a ``worker-added`` event) is
    replaced by the event's kind, so ``task.{finish}`` routes a ``WorkerAdded`` as
    ``task.worker-added``; a template that cannot be formatted for an event at all
    (``{key[3]}`` on a short key) gives the event's kind. Keys longer than 255
    bytes (AMQP's limit) are cut there.
    """

    def __init__(self, template: str) -> None:
        self.template = template
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        except ValueError as exc:
            raise ValueError(f"routing_key template {template!r} is invalid: {exc}") from None
        if any(f == "" or f.isdigit() for f in fields):
            raise ValueError(
                f"routing_key template {template!r} needs named fields such as {{finish}}"
            )
        self.constant = not fields
        self._format: Callable[[Mapping[str, Any]], str] = template.format_map
        # Fail now, not on the first event, for a template no event can fill.
        sample = {"kind": "task-transition", "key": "x", "start": "a", "finish": "b", "seq": 1}
        try:
            template.format_map(_Fields(sample))
        except ValueError as exc:  # a bad conversion or format spec
            raise ValueError(f"routing_key template {template!r} is invalid: {exc}") from None
        except (KeyError, IndexError, AttributeError, TypeError):
            # Fields this sample lacks may well be in other events ({key[1]}, tuple keys).
            return

    def __call__(self, fields: Mapping[str, Any]) -> str:
        if self.constant:
            return self.template
        try:
            key = self._format(_Fields(fields))
        except (KeyError, IndexError, AttributeError, TypeError, ValueError):
            key = str(fields.get("kind", "event"))
        if len(key) > 255:
            key = key.encode()[:255].decode(errors="ignore")
        return key
