"""Client for Intel eHSM's REST API (and for our compatible server).

One method per eHSM Action; see ``docs/ehsm-compat.md`` for the wire protocol. Every POST is signed
(:mod:`ppml_kms.signing`) with a fresh millisecond timestamp and a random nonce; every answer's
JSON ``code`` is checked (eHSM answers HTTP 200 even for errors).
"""

from __future__ import annotations

import base64
import re
import secrets
import ssl
import time
from typing import Any

import httpx

from .. import signing
from ..exceptions import ConfigError, KmsAuthError, KmsRequestError, KmsTransportError
from .base import DataKey, KeyManagementService
from .config import KmsConfig

__all__ = ["EhsmClient", "normalize_url"]

_KEYID = re.compile(r"^[a-z\d]{8}-[a-z\d]{4}-[a-z\d]{4}-[a-z\d]{4}-[a-z\d]{12}$")
_AUTH_MESSAGES = (
    "sign error",
    "timestamp error",
    "timestamp can't be repeated",
    "timestamp length error",
)


def normalize_url(url: str, *, allow_http: bool = False) -> str:
    """Return the ``.../ehsm`` endpoint for ``url`` (``https://host:port`` gets ``/ehsm`` appended).

    Plain ``http://`` would send credentials and keys in clear: refused unless ``allow_http``
    (the user's ``--insecure``), for 2021-era eHSM servers that had no TLS.

    Raises:
        ConfigError: not an https URL (or http without ``allow_http``).
    """
    try:
        parsed = httpx.URL(url.strip())
    except (httpx.InvalidURL, TypeError) as exc:
        raise ConfigError(f"invalid KMS URL {url!r}: {exc}") from None
    if parsed.scheme not in ("https", "http") or not parsed.host:
        raise ConfigError(f"invalid KMS URL {url!r}: expected https://HOST:PORT/ehsm")
    if parsed.scheme == "http" and not allow_http:
        raise ConfigError(
            f"refusing plain-HTTP KMS URL {url!r}: keys and credentials would travel in clear "
            "(use https, or --insecure for a test server without TLS)"
        )
    path = parsed.path.rstrip("/")
    if not path:
        path = "/ehsm"
    return str(parsed.copy_with(path=path, query=None, fragment=None))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: Any, action: str, field: str) -> bytes:
    if not isinstance(value, str):
        raise KmsTransportError(f"KMS {action} answer has no {field}")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise KmsTransportError(f"KMS {action} answer has a malformed {field}") from None


class EhsmClient(KeyManagementService):
    """A signed-request client for eHSM's REST API.

    Args:
        url: the endpoint, ``https://HOST:PORT/ehsm`` (``/ehsm`` is added when missing).
        appid, apikey: credentials from Enroll; only needed for POST actions.
        ca_cert: PEM file of the certificate(s) to trust (e.g. our server's ``tls/cert.pem``).
        insecure: skip certificate verification (only when the user asked for it).
        http_client: an ``httpx.Client`` to use instead of building one (tests, custom transports).
    """

    kind = "ehsm"

    def __init__(
        self,
        url: str,
        appid: str | None = None,
        apikey: str | None = None,
        *,
        ca_cert: str | None = None,
        insecure: bool = False,
        timeout: float = 30.0,
        http_client: httpx.Client | None = None,
    ) -> None:
        self.url = normalize_url(url, allow_http=insecure)
        self.appid = appid
        self._apikey = apikey
        if http_client is None:
            verify: ssl.SSLContext | bool
            if insecure:  # only when the user asked, with a warning printed by the CLI
                verify = False
            else:
                try:
                    verify = ssl.create_default_context(cafile=ca_cert)
                except (OSError, ssl.SSLError) as exc:
                    raise ConfigError(f"cannot load CA certificate {ca_cert}: {exc}") from None
            http_client = httpx.Client(verify=verify, timeout=timeout)
        self._http = http_client

    @classmethod
    def from_config(cls, config: KmsConfig, *, need_credentials: bool = True) -> EhsmClient:
        """Build a client from resolved settings.

        Raises:
            ConfigError: endpoint or credentials missing, CA certificate unreadable.
        """
        url = config.require_url()
        appid, apikey = config.require_credentials() if need_credentials else (config.appid, config.apikey)
        config.check_ca_cert()
        return cls(url, appid, apikey, ca_cert=config.ca_cert, insecure=config.insecure)

    def __repr__(self) -> str:
        return f"EhsmClient(url={self.url!r}, appid={self.appid!r})"

    def __reduce__(self) -> object:
        raise TypeError("EhsmClient holds credentials and cannot be pickled; ship a KmsConfig instead")

    def identity(self) -> str:
        return f"ehsm:{self.url}:{self.appid}"

    def close(self) -> None:
        self._http.close()

    # -- transport -----------------------------------------------------------------------

    def _send(self, action: str, method: str, body: dict[str, Any] | None) -> Any:
        try:
            if method == "GET":
                response = self._http.get(self.url, params={"Action": action})
            else:
                response = self._http.post(self.url, params={"Action": action}, json=body)
        except httpx.ConnectError as exc:
            text = str(exc)
            if "hostname mismatch" in text.lower() or "doesn't match" in text.lower():
                raise KmsTransportError(
                    f"TLS certificate of {self.url} does not cover host {httpx.URL(self.url).host!r}; "
                    "use a name the certificate was issued for (ppml-kms server --hostname NAME)"
                ) from exc
            if "CERTIFICATE_VERIFY_FAILED" in text or "certificate" in text.lower():
                raise KmsTransportError(
                    f"TLS certificate of {self.url} is not trusted ({text.strip()}); pass the server's "
                    "CA certificate with --ca-cert or PPML_KMS_CA_CERT"
                ) from exc
            raise KmsTransportError(f"cannot connect to KMS at {self.url}: {text or 'connection failed'}") from exc
        except httpx.TimeoutException as exc:
            raise KmsTransportError(f"KMS at {self.url} timed out during {action}") from exc
        except httpx.HTTPError as exc:
            raise KmsTransportError(f"KMS {action} request to {self.url} failed: {exc}") from exc
        if response.status_code != 200:
            raise KmsTransportError(f"KMS {action} answered HTTP {response.status_code}")
        try:
            reply = response.json()
        except ValueError:
            raise KmsTransportError(f"KMS {action} answer is not JSON") from None
        if not isinstance(reply, dict) or not isinstance(reply.get("code"), int):
            raise KmsTransportError(f"KMS {action} answer has no code")
        code, message = reply["code"], reply.get("message") or ""
        if code != 200:
            if code == 400 and "message" not in reply:
                raise KmsAuthError(action, code, "unknown appid (check PPML_KMS_APPID and the server)")
            if any(m in message.lower() for m in _AUTH_MESSAGES):
                raise KmsAuthError(action, code, message)
            if message == "appid error":
                message += " (the key belongs to another application)"
            raise KmsRequestError(action, code, message)
        result = reply.get("result")
        return result if result is not None else {}

    def _post(self, action: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        if not self.appid or not self._apikey:
            raise ConfigError(f"KMS {action} needs credentials (PPML_KMS_APPID, PPML_KMS_APIKEY)")
        params: dict[str, Any] = {
            "appid": self.appid,
            "timestamp": str(int(time.time() * 1000)),
            "nonce": secrets.token_hex(16),
        }
        if payload is not None:
            # eHSM skips empty values when signing; never send them (docs/ehsm-compat.md §2.3).
            params["payload"] = {k: v for k, v in payload.items() if v not in (None, "")}
        params["sign"] = signing.sign(self._apikey, params)
        result = self._send(action, "POST", params)
        if not isinstance(result, dict):
            raise KmsTransportError(f"KMS {action} answer has a malformed result")
        return result

    @staticmethod
    def _keyid(token: str) -> str:
        if not _KEYID.match(token):
            raise ConfigError(
                "primary key token is not an eHSM key id (a lowercase uuid); key blobs from "
                "2021-era eHSM are not supported"
            )
        return token

    # -- unauthenticated -----------------------------------------------------------------

    def get_version(self) -> dict[str, Any]:
        """GetVersion (GET): ``{"version": ..., "git_sha": ...}``."""
        result = self._send("GetVersion", "GET", None)
        return result if isinstance(result, dict) else {}

    def enroll(self) -> tuple[str, str]:
        """Enroll (GET): register a new application; returns ``(appid, apikey)``."""
        result = self._send("Enroll", "GET", None)
        appid, apikey = (result or {}).get("appid"), (result or {}).get("apikey")
        if not isinstance(appid, str) or not isinstance(apikey, str) or not appid or not apikey:
            raise KmsTransportError("KMS Enroll answer has no appid/apikey")
        return appid, apikey

    # -- actions -------------------------------------------------------------------------

    def create_key(
        self,
        keyspec: str = "EH_AES_GCM_256",
        origin: str = "EH_INTERNAL_KEY",
        keyusage: str = "EH_KEYUSAGE_ENCRYPT_DECRYPT",
    ) -> str:
        """CreateKey: returns the new key id."""
        result = self._post("CreateKey", {"keyspec": keyspec, "origin": origin, "keyusage": keyusage})
        keyid = result.get("keyid")
        if not isinstance(keyid, str) or not keyid:
            raise KmsTransportError("KMS CreateKey answer has no keyid")
        return keyid

    def encrypt(self, keyid: str, plaintext: bytes, aad: bytes = b"") -> bytes:
        """Encrypt (at most 6 KiB): returns the ciphertext bytes."""
        result = self._post("Encrypt", {"keyid": keyid, "plaintext": _b64(plaintext), "aad": _b64(aad)})
        return _unb64(result.get("ciphertext"), "Encrypt", "ciphertext")

    def decrypt(self, keyid: str, ciphertext: bytes, aad: bytes = b"") -> bytes:
        """Decrypt: returns the plaintext bytes."""
        result = self._post("Decrypt", {"keyid": keyid, "ciphertext": _b64(ciphertext), "aad": _b64(aad)})
        return _unb64(result.get("plaintext"), "Decrypt", "plaintext")

    def generate_data_key_pair(self, keyid: str, keylen: int, aad: bytes = b"") -> tuple[bytes, bytes]:
        """GenerateDataKey: returns ``(plaintext, ciphertext)``."""
        result = self._post("GenerateDataKey", {"keyid": keyid, "keylen": keylen, "aad": _b64(aad)})
        return (
            _unb64(result.get("plaintext"), "GenerateDataKey", "plaintext"),
            _unb64(result.get("ciphertext"), "GenerateDataKey", "ciphertext"),
        )

    def generate_data_key_without_plaintext(self, keyid: str, keylen: int, aad: bytes = b"") -> bytes:
        """GenerateDataKeyWithoutPlaintext: returns the ciphertext only."""
        result = self._post(
            "GenerateDataKeyWithoutPlaintext", {"keyid": keyid, "keylen": keylen, "aad": _b64(aad)}
        )
        return _unb64(result.get("ciphertext"), "GenerateDataKeyWithoutPlaintext", "ciphertext")

    def list_keys(self) -> list[dict[str, Any]]:
        """ListKey: the caller's keys."""
        listed = self._post("ListKey").get("list")
        return listed if isinstance(listed, list) else []

    def delete_key(self, keyid: str) -> None:
        """DeleteKey."""
        self._post("DeleteKey", {"keyid": keyid})

    def enable_key(self, keyid: str) -> None:
        """EnableKey."""
        self._post("EnableKey", {"keyid": keyid})

    def disable_key(self, keyid: str) -> None:
        """DisableKey."""
        self._post("DisableKey", {"keyid": keyid})

    # -- KeyManagementService --------------------------------------------------------------

    def create_primary_key(self) -> str:
        return self.create_key()

    def generate_data_key(self, primary_key: str, length: int = 32, aad: bytes = b"") -> DataKey:
        plaintext, wrapped = self.generate_data_key_pair(self._keyid(primary_key), length, aad)
        return DataKey(plaintext, wrapped)

    def generate_wrapped_data_key(self, primary_key: str, length: int = 32, aad: bytes = b"") -> bytes:
        return self.generate_data_key_without_plaintext(self._keyid(primary_key), length, aad)

    def unwrap_data_key(self, primary_key: str, wrapped: bytes, aad: bytes = b"") -> bytes:
        return self.decrypt(self._keyid(primary_key), wrapped, aad)
