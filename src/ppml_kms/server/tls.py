"""The server's TLS identity: a self-signed certificate that clients pin as their trust anchor.

On first start :func:`ensure_tls` writes ``DIR/tls/cert.pem`` and ``DIR/tls/key.pem`` (EC
P-256, key mode 0600, directory 0700, both written atomically); later starts reuse them, unless the
certificate has expired or lacks a name the server was asked to cover: then it is re-issued (new key
pair) and clients must fetch the new ``cert.pem``. Clients verify the server against that file
(``ssl.create_default_context(cafile=...)``) instead of turning verification off, as eHSM's clients
had to.

The certificate is its own CA and the server's leaf at once, and is built so that strict X.509
verification (OpenSSL's ``X509_V_FLAG_X509_STRICT``, Python 3.13's default) accepts it:
BasicConstraints CA=true (critical), KeyUsage digitalSignature + keyCertSign (critical),
ExtendedKeyUsage serverAuth, Subject/Authority Key Identifiers, and a SubjectAltName with
``localhost``, ``127.0.0.1``, ``::1`` and any extra host names or addresses.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ppml_kms._files import atomic_write_bytes
from ppml_kms.exceptions import ConfigError

__all__ = ["CERT_FILE", "COMMON_NAME", "KEY_FILE", "TLS_DIR", "certificate_names", "ensure_tls"]

logger = logging.getLogger(__name__)

TLS_DIR = "tls"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
COMMON_NAME = "ppml-kms"
_VALIDITY = datetime.timedelta(days=3650)
_DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")

_GeneralName = x509.DNSName | x509.IPAddress


def _general_name(name: str) -> _GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        return x509.DNSName(name.lower())


def _wanted_names(hostnames: Iterable[str]) -> list[_GeneralName]:
    names: list[_GeneralName] = []
    for name in (*_DEFAULT_NAMES, *hostnames):
        if not name:
            continue
        general = _general_name(name)
        if general not in names:
            names.append(general)
    return names


def _san(cert: x509.Certificate) -> list[_GeneralName]:
    try:
        extension = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [n for n in extension.value if isinstance(n, (x509.DNSName, x509.IPAddress))]


def certificate_names(cert_path: Path | str) -> list[str]:
    """The DNS names and IP addresses the certificate at ``cert_path`` covers, in its order.

    Raises:
        ConfigError: the file cannot be read as a PEM certificate.
    """
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the TLS certificate {cert_path}: {exc}") from None
    return [str(n.value) for n in _san(cert)]


def _self_issued(cert: x509.Certificate) -> bool:
    """Whether ``cert`` looks like one :func:`ensure_tls` made (not one an operator installed)."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return cert.subject == cert.issuer and [a.value for a in names] == [COMMON_NAME]


def _build_certificate(
    key: ec.EllipticCurvePrivateKey, names: list[_GeneralName]
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, COMMON_NAME)])
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(key, hashes.SHA256())
    )


def _generate(
    cert_path: Path, key_path: Path, names: list[_GeneralName], *, reason: str | None = None
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _build_certificate(key, names)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Key first: a certificate on disk always has its key beside it.
    atomic_write_bytes(key_path, key_pem, mode=0o600, overwrite=True)
    atomic_write_bytes(
        cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644, overwrite=True
    )
    if reason is None:
        logger.info("created a self-signed TLS certificate at %s", cert_path)
    else:
        logger.info(
            "re-issued the self-signed TLS certificate %s %s; clients must trust the new one",
            cert_path,
            reason,
        )


def _load(cert_path: Path, key_path: Path) -> x509.Certificate:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(
            f"cannot load the TLS certificate/key in {cert_path.parent} "
            f"({exc.__class__.__name__}); delete that directory to generate new ones"
        ) from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(
        serialization.Encoding.DER, public
    ) != cert.public_key().public_bytes(serialization.Encoding.DER, public):
        raise ConfigError(
            f"{cert_path} and {key_path} do not belong together; "
            f"delete {cert_path.parent} to generate new ones"
        )
    return cert


def ensure_tls(data_dir: Path | str, hostnames: Iterable[str] = ()) -> tuple[Path, Path]:
    """Return ``(cert_path, key_path)`` under ``data_dir/tls``, generating them on first use.

    ``hostnames`` (DNS names or IP addresses) are covered by the certificate's SubjectAltName
    beside ``localhost``, ``127.0.0.1`` and ``::1``. An existing certificate is reused as long as
    it matches its key, has not expired and covers every requested name (clients pinned it). If it
    lacks a requested name it is re-issued, with a new key pair, for its old names plus the missing
    ones, and one INFO line says so. A certificate that ppml-kms did not generate (not self-issued
    with CN ``ppml-kms``) is never replaced: a warning names what it lacks.

    Raises:
        ConfigError: the existing certificate or key cannot be read, or they do not match.
    """
    tls_dir = Path(data_dir) / TLS_DIR
    tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(tls_dir, 0o700)
    cert_path, key_path = tls_dir / CERT_FILE, tls_dir / KEY_FILE
    names = _wanted_names(hostnames)

    if cert_path.exists() and key_path.exists():
        cert = _load(cert_path, key_path)
        if cert.not_valid_after_utc <= datetime.datetime.now(datetime.UTC):
            logger.warning("the TLS certificate %s has expired; generating a new one", cert_path)
        else:
            covered = _san(cert)
            missing = [n for n in names if n not in covered]
            if not missing:
                return cert_path, key_path
            shown = ", ".join(str(n.value) for n in missing)
            if not _self_issued(cert):
                logger.warning(
                    "the TLS certificate %s does not cover %s; it was not generated by ppml-kms, "
                    "so it is kept: replace it with one that does",
                    cert_path,
                    shown,
                )
                return cert_path, key_path
            _generate(cert_path, key_path, [*covered, *missing], reason=f"to add {shown}")
            return cert_path, key_path

    _generate(cert_path, key_path, names)
    return cert_path, key_path
