"""Transport security settings: TLS certificates and a shared auth token.

One :class:`Security` object describes how a process protects its connections; the
comm layer (:mod:`sluice.comm`) turns it into SSL contexts and the HMAC handshake.

* TLS (``tls://`` addresses) encrypts the traffic.  When a CA file is given, both sides
  verify the other's certificate against it (mutual TLS), so only holders of a
  certificate signed by the cluster's private CA can connect.  Host names are not
  checked: workers reach each other by IP address, and trust comes from the private CA,
  not from DNS.
* An auth token is a shared secret proved with an HMAC challenge at connection time;
  the token itself never crosses the wire.  It works with and without TLS.
"""

from __future__ import annotations

import os
import ssl

import attrs

__all__ = ["Security"]


def _read_file_setting(path: str | os.PathLike[str] | None, what: str) -> str | None:
    """Return ``path`` as a string after checking the file is readable, or ``None``."""
    if path is None:
        return None
    path = os.fspath(path)
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ValueError(f"{what} {path!r} does not exist or is not a readable file")
    return path


@attrs.frozen
class Security:
    """How this process secures its connections (TLS files and/or an auth token).

    ``auth_token`` is kept out of ``repr`` so that it never lands in a log line.
    """

    tls_ca_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    auth_token: bytes | None = attrs.field(default=None, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.auth_token is not None and not self.auth_token:
            raise ValueError("auth_token must not be empty")
        if self.tls_key is not None and self.tls_cert is None:
            raise ValueError("tls_key given without tls_cert")

    @classmethod
    def from_files(
        cls,
        *,
        tls_ca_file: str | os.PathLike[str] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        auth_token_file: str | os.PathLike[str] | None = None,
    ) -> Security:
        """Build settings from file names, as given on the command line.

        The token file is read now (surrounding whitespace stripped) so that a missing,
        unreadable or empty file is reported at startup with a one-line ``ValueError``
        naming the file, rather than as a confusing failure at the first connection.
        """
        token: bytes | None = None
        if auth_token_file is not None:
            name = os.fspath(auth_token_file)
            try:
                with open(name, "rb") as f:
                    token = f.read().strip()
            except OSError as exc:
                reason = exc.strerror or type(exc).__name__
                raise ValueError(f"cannot read auth token file {name!r}: {reason}") from None
            if not token:
                raise ValueError(f"auth token file {name!r} is empty")
        return cls(
            tls_ca_file=_read_file_setting(tls_ca_file, "TLS CA file"),
            tls_cert=_read_file_setting(tls_cert, "TLS certificate file"),
            tls_key=_read_file_setting(tls_key, "TLS key file"),
            auth_token=token,
        )

    @property
    def tls(self) -> bool:
        """Whether TLS is configured (a CA file or a certificate was given)."""
        return self.tls_ca_file is not None or self.tls_cert is not None

    def _base_context(self, purpose: ssl.Purpose) -> ssl.SSLContext:
        ctx = ssl.create_default_context(purpose, cafile=self.tls_ca_file)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.tls_cert is not None:
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
        return ctx

    def server_ssl_context(self) -> ssl.SSLContext | None:
        """The SSL context a listener uses, or ``None`` without TLS.

        With a CA file, clients must present a certificate signed by it (mutual TLS).
        """
        if not self.tls:
            return None
        if self.tls_cert is None:
            raise ValueError("a TLS listener needs a certificate (--tls-cert)")
        ctx = self._base_context(ssl.Purpose.CLIENT_AUTH)
        if self.tls_ca_file is not None:
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_ssl_context(self) -> ssl.SSLContext | None:
        """The SSL context for outgoing connections, or ``None`` without TLS.

        The server's certificate is verified against the CA file (or the system's CAs
        when none is given); host names are not checked (see the module docstring).
        """
        if not self.tls:
            return None
        ctx = self._base_context(ssl.Purpose.SERVER_AUTH)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx
