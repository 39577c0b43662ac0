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
from ppml_kms.server.tls import certificate_names, ensure_tls


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


# -- names the certificate must cover --------------------------------------------------------------


def _names(cert_path: Path) -> set[str]:
    return set(certificate_names(cert_path))


def test_reissued_when_a_requested_name_is_missing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cert_path, key_path = ensure_tls(tmp_path)
    first = cert_path.read_bytes(), key_path.read_bytes()
    assert _names(cert_path) == {"localhost", "127.0.0.1", "::1"}
    caplog.clear()
    caplog.set_level("INFO", logger="ppml_kms.server.tls")
    assert ensure_tls(tmp_path, ["KMS.example.org", "10.1.2.3"]) == (cert_path, key_path)
    assert _names(cert_path) == {"localhost", "127.0.0.1", "::1", "kms.example.org", "10.1.2.3"}
    assert cert_path.read_bytes() != first[0] and key_path.read_bytes() != first[1]
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "tls").stat().st_mode) == 0o700
    assert not [p for p in (tmp_path / "tls").iterdir() if p.name not in ("cert.pem", "key.pem")]
    [record] = caplog.records
    assert record.levelname == "INFO"
    assert record.getMessage() == (
        f"re-issued the self-signed TLS certificate {cert_path} to add kms.example.org, 10.1.2.3; "
        "clients must trust the new one"
    )
    # Covered now: reused as is. A new name keeps the old ones.
    second = cert_path.read_bytes()
    ensure_tls(tmp_path, ["kms.example.org"])
    assert cert_path.read_bytes() == second
    ensure_tls(tmp_path, ["other.example.org"])
    assert _names(cert_path) >= {"kms.example.org", "10.1.2.3", "other.example.org", "localhost"}
    _strict_context(cert_path)  # still a valid trust anchor


def test_an_installed_certificate_is_not_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import datetime

    from cryptography.hazmat.primitives import hashes, serialization

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kms.corp.example")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Corp CA")]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("kms.corp.example")]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    tls = tmp_path / "tls"
    tls.mkdir()
    (tls / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tls / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    before = (tls / "cert.pem").read_bytes()
    ensure_tls(tmp_path, ["other.example.org"])
    assert (tls / "cert.pem").read_bytes() == before
    assert "not generated by ppml-kms" in caplog.text and "other.example.org" in caplog.text


def _loopback_alias() -> bool:
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _loopback_alias(), reason="127.0.0.2 is not usable")
def test_server_on_a_new_address_covers_it(tmp_path: Path) -> None:
    data = tmp_path / "kms"
    with ServerThread(data):
        pass
    assert "127.0.0.2" not in _names(data / "tls" / "cert.pem")
    with ServerThread(data, host="127.0.0.2", hostnames=["kms.example.org"]) as server:
        assert server.url.startswith("https://127.0.0.2:")
        response = httpx.get(
            server.url, params={"Action": "GetVersion"}, verify=_strict_context(server.ca_cert)
        )
        assert response.json()["code"] == 200
    assert {"127.0.0.2", "kms.example.org"} <= _names(data / "tls" / "cert.pem")
