"""The self-signed certificate: usable as a trust anchor, strict X.509 included."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ppml_kms.exceptions import ConfigError
from ppml_kms.server.run import ServerThread
from ppml_kms.server.tls import ensure_tls


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_certificate_contents(tmp_path: Path) -> None:
    cert_path, key_path = ensure_tls(tmp_path, ["kms.example.org", "10.1.2.3"])
    assert cert_path == tmp_path / "tls" / "cert.pem" and key_path == tmp_path / "tls" / "key.pem"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "tls").stat().st_mode) == 0o700
    cert = load(cert_path)
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "ppml-kms"
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "kms.example.org"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "10.1.2.3")
    }


def test_reused_on_later_starts(tmp_path: Path) -> None:
    cert_path, key_path = ensure_tls(tmp_path)
    before = cert_path.read_bytes(), key_path.read_bytes()
    assert ensure_tls(tmp_path) == (cert_path, key_path)
    assert (cert_path.read_bytes(), key_path.read_bytes()) == before


def test_regenerated_when_half_missing(tmp_path: Path) -> None:
    cert_path, key_path = ensure_tls(tmp_path)
    before = cert_path.read_bytes()
    cert_path.unlink()
    ensure_tls(tmp_path)
    assert cert_path.read_bytes() != before and key_path.exists()


def test_mismatched_pair_is_an_error(tmp_path: Path) -> None:
    cert_path, _ = ensure_tls(tmp_path / "a")
    _, other_key = ensure_tls(tmp_path / "b")
    (tmp_path / "a" / "tls" / "key.pem").write_bytes(other_key.read_bytes())
    with pytest.raises(ConfigError, match="do not belong together"):
        ensure_tls(tmp_path / "a")
    cert_path.write_text("garbage")
    with pytest.raises(ConfigError, match="cannot load"):
        ensure_tls(tmp_path / "a")


def _strict_context(cafile: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cafile))
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_strict_verification_over_https(server: ServerThread, host: str) -> None:
    url = server.url.replace("127.0.0.1", host)
    response = httpx.get(
        url, params={"Action": "GetVersion"}, verify=_strict_context(server.ca_cert)
    )
    assert response.json()["code"] == 200


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6_loopback(tmp_path: Path) -> None:
    with ServerThread(tmp_path / "kms", host="::1") as server:
        assert server.url.startswith("https://[::1]:")
        response = httpx.get(
            server.url, params={"Action": "GetVersion"}, verify=_strict_context(server.ca_cert)
        )
        assert response.json()["code"] == 200


def test_other_ca_is_refused(server: ServerThread, tmp_path: Path) -> None:
    other, _ = ensure_tls(tmp_path)
    with pytest.raises(httpx.ConnectError):
        httpx.get(
            server.url,
            params={"Action": "GetVersion"},
            verify=ssl.create_default_context(cafile=str(other)),
        )
