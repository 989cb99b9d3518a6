"""Preload scripts: custom code run around the life of a scheduler, worker, nanny or client.

A preload is named by a VALUE, one of:

- a path ending in ``.py``;
- a module name importable from ``sys.path`` (``"pkg.mod"``);
- the text of a Python script (anything containing a space or a newline);
- an ``https://`` URL with a pinned digest, ``https://host/setup.py#sha256=<hex>``:
  the file is fetched and its SHA-256 checked before any of it runs.

Its module may define ``sluice_setup(service)`` and ``sluice_teardown(service)``
(or Dask's names, ``dask_setup`` / ``dask_teardown``), plain or ``async def``.
When ``sluice_setup`` is a :class:`click.Command`, the extra command-line
arguments are parsed by it and its callback is called as
``callback(service, **params)``, as in Dask::

    @click.command()
    @click.option("--print-count/--no-print-count", default=False)
    def dask_setup(scheduler, print_count): ...

Loading (:func:`load_preloads`) imports every module and parses its arguments,
so a preload that cannot be found or imported, or an argument nobody declares,
fails with :class:`PreloadError` before the service opens a port. Each server
calls :func:`setup_preloads` once it exists and before it accepts connections
or registers, and :func:`teardown_preloads` (reverse order) when it closes.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import itertools
import logging
import re
import sys
import traceback
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import cloudpickle

__all__ = (
    "Preload",
    "PreloadError",
    "from_config",
    "load_preloads",
    "normalize",
    "setup_preloads",
    "strict_from_config",
    "teardown_preloads",
)

logger = logging.getLogger("sluice.preload")

_SETUP_NAMES = ("sluice_setup", "dask_setup")
_TEARDOWN_NAMES = ("sluice_teardown", "dask_teardown")
_SHA256 = re.compile(r"^sha256=([0-9a-fA-F]{64})$")
_ids = itertools.count(1)


class PreloadError(ValueError):
    """A preload that cannot be loaded, or arguments that cannot be given to it (one line)."""


class PreloadArgumentError(PreloadError):
    """Command-line arguments that no preload takes: a usage error (exit status 2)."""


def _short(value: str) -> str:
    """How a preload is named in messages: a script's text is cut to its first line."""
    if ("\n" in value or " " in value) and not value.startswith("https://"):
        first = value.strip().splitlines()[0] if value.strip() else ""
        return f"<script {first[:40]!r}...>"
    return value


def normalize(preload: str | Sequence[str] | None) -> list[str]:
    """A single string is one preload; ``None`` is none."""
    if preload is None:
        return []
    if isinstance(preload, str):
        return [preload]
    return [str(p) for p in preload]


def _import_failed(label: str, exc: BaseException) -> str:
    return f"preload {label!r} failed to import: {type(exc).__name__}: {exc}"


def _from_source(
    source: str, filename: str, label: str, name: str | None = None
) -> types.ModuleType:
    name = name or f"sluice_preload_{next(_ids)}"
    module = types.ModuleType(name)
    module.__file__ = filename
    try:
        code = compile(source, filename, "exec")
    except SyntaxError as exc:
        raise PreloadError(
            f"preload {label!r}: syntax error at line {exc.lineno}: {exc.msg}"
        ) from None
    try:
        exec(code, module.__dict__)
    except Exception as exc:
        raise PreloadError(_import_failed(label, exc)) from exc
    return module


def _fetch(url: str, label: str) -> str:
    base, _, fragment = url.partition("#")
    match = _SHA256.match(fragment)
    if match is None:
        raise PreloadError(
            f"preload {label!r}: a URL needs a pinned digest, '#sha256=<64 hex digits>'"
        )
    expected = match.group(1).lower()
    import urllib.request

    try:
        with urllib.request.urlopen(base, timeout=30) as response:
            data: bytes = response.read()
    except Exception as exc:
        raise PreloadError(f"preload {label!r}: cannot fetch it: {exc}") from None
    got = hashlib.sha256(data).hexdigest()
    if got != expected:
        raise PreloadError(
            f"preload {label!r}: sha256 mismatch: expected {expected}, got {got}; not run"
        )
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise PreloadError(f"preload {label!r}: the fetched file is not UTF-8 text") from None


def _import(value: str) -> types.ModuleType:
    label = _short(value)
    if value.startswith(("https://", "http://")):
        if not value.startswith("https://"):
            raise PreloadError(f"preload {label!r}: only https:// URLs are allowed")
        return _from_source(_fetch(value, label), value.partition("#")[0], label)
    if " " in value or "\n" in value:
        return _from_source(value, "<preload script>", label)
    if value.endswith(".py"):
        path = Path(value).expanduser()
        try:
            source = path.read_text()
        except FileNotFoundError:
            raise PreloadError(f"preload {label!r}: no such file {str(path.resolve())!r}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise PreloadError(f"preload {label!r}: cannot read it: {exc}") from None
        # As in Dask, the file is importable by its name afterwards (a task on a
        # worker may `import worker_info`), and cloudpickle ships what it defines
        # by value, since other processes cannot import it.
        name = path.stem if path.stem.isidentifier() and path.stem not in sys.modules else None
        module = _from_source(source, str(path.resolve()), label, name)
        if name is not None:
            sys.modules[name] = module
            cloudpickle.register_pickle_by_value(module)
        return module
    try:
        return importlib.import_module(value)
    except SyntaxError as exc:
        raise PreloadError(
            f"preload {label!r}: syntax error in {exc.filename} at line {exc.lineno}: {exc.msg}"
        ) from None
    except ImportError as exc:
        raise PreloadError(f"preload {label!r}: cannot import it: {exc}") from None
    except Exception as exc:
        raise PreloadError(_import_failed(label, exc)) from exc


class Preload:
    """One loaded preload: its module, its hooks, and its parsed command-line arguments."""

    def __init__(self, value: str, module: types.ModuleType) -> None:
        self.value = value
        self.name = _short(value)
        self.module = module
        self.setup_hook: Any = next(
            (getattr(module, n) for n in _SETUP_NAMES if hasattr(module, n)), None
        )
        self.teardown_hook: Any = next(
            (getattr(module, n) for n in _TEARDOWN_NAMES if hasattr(module, n)), None
        )
        for names in (_SETUP_NAMES, _TEARDOWN_NAMES):
            if all(hasattr(module, n) for n in names):
                logger.warning(
                    "preload %r defines both %s and %s; only %s runs",
                    value,
                    names[0],
                    names[1],
                    names[0],
                )
        self.argv: list[str] = []
        self._ctx: click.Context | None = None

    def __repr__(self) -> str:
        return f"<Preload {self.name}>"

    @property
    def command(self) -> click.Command | None:
        """The click command that ``sluice_setup`` is, if it is one."""
        return self.setup_hook if isinstance(self.setup_hook, click.Command) else None

    def parse(self, argv: Sequence[str]) -> None:
        """Parse this preload's arguments now, so a bad one fails before any port opens."""
        self.argv = list(argv)
        command = self.command
        if command is None:
            if self.argv:
                raise PreloadArgumentError(
                    f"unknown preload arguments: {' '.join(self.argv)}"
                    f" (preload {self.name!r} takes none)"
                )
            return
        try:
            self._ctx = command.make_context(self.name, list(self.argv))
        except click.exceptions.Exit:
            raise PreloadError(f"preload {self.name!r}: {' '.join(self.argv)}") from None
        except click.ClickException as exc:
            raise PreloadError(f"preload {self.name!r}: {exc.format_message()}") from None

    async def setup(self, service: Any) -> None:
        """Call the setup hook (with the parsed arguments of a click command)."""
        hook = self.setup_hook
        if hook is None:
            return
        command = self.command
        if command is not None:
            ctx = self._ctx or command.make_context(self.name, [])
            callback = command.callback
            if callback is None:
                return
            with ctx:
                result = callback(service, *ctx.args, **ctx.params)
        else:
            result = hook(service)
        if inspect.isawaitable(result):
            await result

    async def teardown(self, service: Any) -> None:
        hook = self.teardown_hook
        if hook is None:
            return
        result = hook(service)
        if inspect.isawaitable(result):
            await result


def _option_names(command: click.Command) -> dict[str, click.Option]:
    names: dict[str, click.Option] = {}
    for param in command.params:
        if isinstance(param, click.Option):
            for opt in (*param.opts, *param.secondary_opts):
                names[opt] = param
    return names


def _split_argv(preloads: Sequence[Preload], argv: Sequence[str]) -> list[list[str]]:
    """Give each click preload the options it declares, out of one shared argv."""
    shares: list[list[str]] = [[] for _ in preloads]
    declared = [_option_names(p.command) if p.command is not None else {} for p in preloads]
    takes_args = [
        i
        for i, p in enumerate(preloads)
        if p.command is not None and any(isinstance(a, click.Argument) for a in p.command.params)
    ]
    unknown: list[str] = []
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if token == "--":
            rest = tokens[i:]
            if len(takes_args) == 1:
                shares[takes_args[0]] += ["--", *rest]
            else:
                unknown += rest
            break
        if not token.startswith("-") or token == "-":
            if len(takes_args) == 1:
                shares[takes_args[0]].append(token)
            else:
                unknown.append(token)
            continue
        name, eq, _ = token.partition("=")
        owners = [j for j, d in enumerate(declared) if name in d]
        if not owners:
            unknown.append(token)
            continue
        if len(owners) > 1:
            who = ", ".join(repr(preloads[j].name) for j in owners)
            raise PreloadError(f"option {name} is declared by more than one preload: {who}")
        owner = owners[0]
        shares[owner].append(token)
        option = declared[owner][name]
        if not eq and not option.is_flag and not option.count and i < len(tokens):
            for _ in range(max(option.nargs, 1)):
                if i < len(tokens):
                    shares[owner].append(tokens[i])
                    i += 1
    if unknown:
        if not preloads:
            # Nothing to hand them to: to the user this is simply an unknown option.
            raise PreloadArgumentError(
                f"no such option: {unknown[0]} (and no --preload to take it)"
            )
        raise PreloadArgumentError(f"unknown preload arguments: {' '.join(unknown)}")
    return shares


def load_preloads(
    preload: str | Sequence[str] | None,
    argv: Sequence[str] | Sequence[Sequence[str]] | None = None,
) -> list[Preload]:
    """Import every preload and parse its arguments; :class:`PreloadError` if one fails.

    ``argv`` is either one list per preload (Dask's ``preload_argv``), or one flat
    list of arguments (the rest of a command line) that the click preloads share:
    each takes the options it declares.
    """
    values = normalize(preload)
    loaded = [Preload(v, _import(v)) for v in values]
    arg_list: list[Any] = list(argv or [])
    if arg_list and all(isinstance(a, str) for a in arg_list):
        shares = _split_argv(loaded, arg_list)
    elif arg_list:
        if len(arg_list) > len(loaded):
            extra = [" ".join(map(str, a)) for a in arg_list[len(loaded) :] if a]
            if extra:
                raise PreloadArgumentError(f"unknown preload arguments: {' '.join(extra)}")
        shares = [[str(t) for t in a] for a in arg_list] + [[]] * (len(loaded) - len(arg_list))
    else:
        shares = [[] for _ in loaded]
    for p, share in zip(loaded, shares, strict=False):
        p.parse(share)
    return loaded


async def _log_failure(service: Any, name: str, text: str) -> None:
    # A Client's setup runs on its own loop: its sync log_event would block there.
    log_event = getattr(service, "_log_event", None) or getattr(service, "log_event", None)
    if log_event is None:
        return
    try:
        result = log_event("preload-failed", {"preload": name, "error": text})
        if inspect.isawaitable(result):
            await result
    except Exception:
        logger.warning("cannot record the failure of preload %r", name, exc_info=True)


async def setup_preloads(preloads: Sequence[Preload], service: Any, *, strict: bool) -> None:
    """Run every setup hook in order.

    A hook that raises is logged with its traceback and recorded as a ``UserEvent``
    on topic ``preload-failed``; the others still run, unless ``strict``, in which
    case :class:`PreloadError` is raised at once.
    """
    for p in preloads:
        try:
            await p.setup(service)
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}"
            logger.error(
                "setup of preload %r failed:\n%s",
                p.name,
                "".join(traceback.format_exception(exc)).rstrip(),
            )
            await _log_failure(service, p.name, text)
            if strict:
                raise PreloadError(f"setup of preload {p.name!r} failed: {text}") from exc


async def teardown_preloads(preloads: Sequence[Preload], service: Any) -> None:
    """Run every teardown hook in reverse order; a failure is logged and the rest run."""
    for p in reversed(preloads):
        try:
            await p.teardown(service)
        except Exception:
            logger.exception("teardown of preload %r failed", p.name)


def from_config(service: str, preload: Any, argv: Any) -> tuple[list[str], Any]:
    """The constructor's preloads, else ``sluice.<service>.preload`` from the configuration."""
    if preload is not None:
        return normalize(preload), argv
    try:
        from sluice import config
    except ImportError:  # pragma: no cover - config is optional
        return [], argv
    values = normalize(config.get(f"sluice.{service}.preload", None))
    if argv is None:
        argv = config.get(f"sluice.{service}.preload-argv", None)
    return values, argv


def strict_from_config(service: str, strict: bool | None) -> bool:
    if strict is not None:
        return strict
    try:
        from sluice import config
    except ImportError:  # pragma: no cover
        return False
    return bool(config.get(f"sluice.{service}.preload-strict", False))
