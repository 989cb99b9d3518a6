"""Tests for sluice.security.Security."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest

from sluice.security import Security


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_defaults_mean_no_security() -> None:
    sec = Security()
    assert not sec.tls
    assert sec.auth_token is None
    assert sec.server_ssl_context() is None
    assert sec.client_ssl_context() is None


def test_token_file_is_read_and_stripped(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text("  s3cret-token\n\n")
    sec = Security.from_files(auth_token_file=f)
    assert sec.auth_token == b"s3cret-token"
    assert not sec.tls


def test_token_is_not_in_repr(tmp_path: Path) -> None:
    sec = Security(auth_token=b"s3cret-token")
    assert "s3cret" not in repr(sec)


def test_missing_token_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ValueError) as info:
        Security.from_files(auth_token_file=missing)
    msg = str(info.value)
    assert str(missing) in msg and "cannot read auth token file" in msg
    assert "\n" not in msg


def test_empty_token_file(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text(" \n\t\n")
    with pytest.raises(ValueError, match=r"auth token file .*token' is empty") as info:
        Security.from_files(auth_token_file=f)
    assert "\n" not in str(info.value)


def test_token_file_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read auth token file") as info:
        Security.from_files(auth_token_file=tmp_path)
    assert str(tmp_path) in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_token_file(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text("x")
    f.chmod(0)
    with pytest.raises(ValueError, match="cannot read auth token file"):
        Security.from_files(auth_token_file=f)


def test_missing_tls_files(tmp_path: Path) -> None:
    for kw, what in [
        ("tls_ca_file", "TLS CA file"),
        ("tls_cert", "TLS certificate file"),
        ("tls_key", "TLS key file"),
    ]:
        with pytest.raises(ValueError, match=what) as info:
            Security.from_files(**{kw: tmp_path / "missing.pem"})
        assert "missing.pem" in str(info.value)


def test_inconsistent_settings() -> None:
    with pytest.raises(ValueError, match="tls_key given without tls_cert"):
        Security(tls_key="k.pem")
    with pytest.raises(ValueError, match="must not be empty"):
        Security(auth_token=b"")


def test_tls_server_needs_a_certificate(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    sec = Security(tls_ca_file=str(ca))
    assert sec.tls
    with pytest.raises(ValueError, match="needs a certificate"):
        sec.server_ssl_context()


def test_frozen() -> None:
    sec = Security(auth_token=b"t")
    with pytest.raises(AttributeError):
        sec.auth_token = b"other"  # type: ignore[misc]


def test_ssl_contexts(tmp_path: Path) -> None:
    """Mutual TLS: the server requires client certificates when a CA is given."""
    import subprocess

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    subprocess.run(
        ["openssl", "req", "-x509", *ec, "-keyout", "k.pem", "-out", "c.pem", "-days", "1",
         "-subj", "/CN=t"],
        cwd=tmp_path, check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    sec = Security.from_files(
        tls_ca_file=tmp_path / "c.pem", tls_cert=tmp_path / "c.pem", tls_key=tmp_path / "k.pem"
    )
    server = sec.server_ssl_context()
    client = sec.client_ssl_context()
    assert server is not None and client is not None
    assert server.verify_mode == ssl.CERT_REQUIRED
    assert client.verify_mode == ssl.CERT_REQUIRED
    assert not client.check_hostname
    assert server.minimum_version >= ssl.TLSVersion.TLSv1_2
    # without a CA the server does not ask for client certificates
    no_ca = Security(tls_cert=str(tmp_path / "c.pem"), tls_key=str(tmp_path / "k.pem"))
    ctx = no_ca.server_ssl_context()
    assert ctx is not None and ctx.verify_mode == ssl.CERT_NONE
