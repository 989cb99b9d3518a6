"""What the service commands (``sluice scheduler``, ``sluice worker``) share."""

from __future__ import annotations

from typing import Any

import click

__all__ = ("security_from_options",)


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
