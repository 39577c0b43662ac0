"""One handler per eHSM Action (``docs/ehsm-compat.md`` §5), over a :class:`.store.KeyStore`.

Handlers run after the envelope was authenticated and the payload passed
:func:`~ppml_kms.server.validation.check_payload`; they return the reply envelope.

Symmetric ciphertext is eHSM's AES-GCM layout, ``ct || IV(12) || tag(16)``, with the aad being the
base64-decoded ``aad`` field (absent or empty means ``b""``).
"""

from __future__ import annotations

import base64
import functools
import importlib.metadata
import os
import secrets
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ppml_kms.server import responses as r
from ppml_kms.server.store import KeyRecord, KeyStore
from ppml_kms.server.validation import AES_KEY_SIZES, DEFAULT_KEYUSAGE, KEYUSAGES

__all__ = [
    "APIKEY_ALPHABET",
    "GET_ACTIONS",
    "GIT_SHA",
    "POST_ACTIONS",
    "Context",
    "GetHandler",
    "PostHandler",
    "server_version",
]

APIKEY_ALPHABET = "0123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnpqrstuvwxyz"
APIKEY_LENGTH = 32
GIT_SHA = "0000000"  # eHSM reports its build's 7-hex git sha; we have no build stamp

_IV_SIZE = 12
_TAG_SIZE = 16
_SERVER_EXCEPTION = "Server exception."


@functools.cache
def server_version() -> str:
    """The installed ppml-kms version (``0.0.0`` when running from an uninstalled tree)."""
    try:
        return importlib.metadata.version("ppml-kms")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


@dataclass(frozen=True)
class Context:
    """What handlers share: the key store and the server clock (seconds, like ``time.time``)."""

    store: KeyStore
    clock: Callable[[], float]

    def now_ms(self) -> int:
        return int(self.clock() * 1000)


GetHandler = Callable[[Context], r.Reply]
PostHandler = Callable[[Context, str, Mapping[str, Any]], r.Reply]


# -- AES-GCM in eHSM's layout ----------------------------------------------------------------------


def _seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    iv = os.urandom(_IV_SIZE)
    sealed = AESGCM(key).encrypt(iv, plaintext, aad)  # ct || tag
    return sealed[:-_TAG_SIZE] + iv + sealed[-_TAG_SIZE:]


def _open(key: bytes, blob: bytes, aad: bytes) -> bytes | None:
    if len(blob) < _IV_SIZE + _TAG_SIZE:
        return None
    ct, iv, tag = (
        blob[: -_IV_SIZE - _TAG_SIZE],
        blob[-_IV_SIZE - _TAG_SIZE : -_TAG_SIZE],
        blob[-_TAG_SIZE:],
    )
    try:
        return AESGCM(key).decrypt(iv, ct + tag, aad)
    except InvalidTag:
        return None


def _b64(value: Any) -> bytes:
    """Decode a field that passed the base64 check; absent or empty means ``b""``."""
    if not value:
        return b""
    return base64.b64decode(value, validate=True)


def _b64text(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _usable_key(ctx: Context, appid: str, keyid: str) -> KeyRecord | r.Reply:
    """The key ``appid`` may use for encryption now, or eHSM's refusal (``find_cmk_by_keyid``)."""
    record = ctx.store.get_key(keyid)
    if record is None:
        return r.error(400, "keyid error")
    if record.creator != appid:
        return r.error(400, "appid error")
    if record.key_state == 0:
        return r.error(400, "keyid is disabled")
    if ctx.now_ms() > record.expire_time:
        return r.error(400, "keyid expire")
    if record.keyusage != DEFAULT_KEYUSAGE or record.keyspec not in AES_KEY_SIZES:
        # The enclave refuses a key of the wrong usage or kind this way.
        return r.enclave_error(500, _SERVER_EXCEPTION)
    return record


def _encrypt_with(
    ctx: Context, appid: str, keyid: str, plaintext: bytes, aad: bytes
) -> str | r.Reply:
    record = _usable_key(ctx, appid, keyid)
    if not isinstance(record, KeyRecord):
        return record
    return _b64text(_seal(ctx.store.release_key_material(record), plaintext, aad))


# -- GET actions -----------------------------------------------------------------------------------


def get_version(ctx: Context) -> r.Reply:
    return r.success({"version": server_version(), "git_sha": GIT_SHA})


def enroll(ctx: Context) -> r.Reply:
    appid = str(uuid.uuid4())
    apikey = "".join(secrets.choice(APIKEY_ALPHABET) for _ in range(APIKEY_LENGTH))
    ctx.store.add_app(appid, apikey, ctx.now_ms())
    return r.success({"appid": appid, "apikey": apikey}, "successful")


# -- POST actions ----------------------------------------------------------------------------------


def create_key(ctx: Context, appid: str, payload: Mapping[str, Any]) -> r.Reply:
    keyspec, origin = payload["keyspec"], payload["origin"]
    keyusage = payload.get("keyusage")
    if keyusage is None or keyusage == "":
        # Lenient on purpose: BigDL's pre-0.4 clients (eHSM < 0.4 API) send no keyusage.
        keyusage = DEFAULT_KEYUSAGE
    elif not (isinstance(keyusage, str) and keyusage in KEYUSAGES):
        return r.error(400, "Parameter invalid, The keyusage type is incorrect.")
    size = AES_KEY_SIZES.get(keyspec)
    if size is None or origin != "EH_INTERNAL_KEY" or keyusage != DEFAULT_KEYUSAGE:
        return r.error(400, "create cmk failed")
    record = ctx.store.create_key(
        creator=appid,
        keyspec=keyspec,
        origin=origin,
        keyusage=keyusage,
        material=secrets.token_bytes(size),
        now_ms=ctx.now_ms(),
    )
    return r.success({"keyid": record.keyid})


def encrypt(ctx: Context, appid: str, payload: Mapping[str, Any]) -> r.Reply:
    out = _encrypt_with(
        ctx, appid, payload["keyid"], _b64(payload["plaintext"]), _b64(payload.get("aad"))
    )
    return r.success({"ciphertext": out}) if isinstance(out, str) else out


def decrypt(ctx: Context, appid: str, payload: Mapping[str, Any]) -> r.Reply:
    record = _usable_key(ctx, appid, payload["keyid"])
    if not isinstance(record, KeyRecord):
        return record
    plaintext = _open(
        ctx.store.release_key_material(record),
        _b64(payload["ciphertext"]),
        _b64(payload.get("aad")),
    )
    if plaintext is None:
        return r.enclave_error(400, r.DECRYPTION_FAILED)
    return r.success({"plaintext": _b64text(plaintext)})


def _generate_data_key(
    ctx: Context, appid: str, payload: Mapping[str, Any], *, with_plaintext: bool
) -> r.Reply:
    datakey = secrets.token_bytes(int(payload["keylen"]))
    out = _encrypt_with(ctx, appid, payload["keyid"], datakey, _b64(payload.get("aad")))
    if not isinstance(out, str):
        return out
    if with_plaintext:
        return r.success({"plaintext": _b64text(datakey), "ciphertext": out})
    return r.success({"ciphertext": out})


def generate_data_key(ctx: Context, appid: str, payload: Mapping[str, Any]) -> r.Reply:
    return _generate_data_key(ctx, appid, payload, with_plaintext=True)


def generate_data_key_without_plaintext(
    ctx: Context, appid: str, payload: Mapping[str, Any]
) -> r.Reply:
    return _generate_data_key(ctx, appid, payload, with_plaintext=False)


def list_key(ctx: Context, appid: str, payload: Mapping[str, Any]) -> r.Reply:
    return r.success({"list": [k.listing() for k in ctx.store.list_keys(appid)]}, "successful")


def delete_key(ctx: Context, appid: str, payload: Mapping[str, Any]) -> r.Reply:
    # eHSM answers 200 whether or not the key existed (or belonged to this appid).
    keyid = payload.get("keyid")
    if isinstance(keyid, str):
        ctx.store.delete_key(keyid, appid)
    return r.success(None, "successful")


def delete_all_key(ctx: Context, appid: str, payload: Mapping[str, Any]) -> r.Reply:
    ctx.store.delete_all_keys(appid)
    return r.success(None, "successful")


def _set_state(ctx: Context, appid: str, payload: Mapping[str, Any], state: int) -> r.Reply:
    keyid = payload.get("keyid")
    if not (isinstance(keyid, str) and ctx.store.set_key_state(keyid, appid, state)):
        return r.error(400, "not find this keyid")
    return r.success(None, "successful")


def enable_key(ctx: Context, appid: str, payload: Mapping[str, Any]) -> r.Reply:
    return _set_state(ctx, appid, payload, 1)


def disable_key(ctx: Context, appid: str, payload: Mapping[str, Any]) -> r.Reply:
    return _set_state(ctx, appid, payload, 0)


#: Unauthenticated GET actions.
GET_ACTIONS: dict[str, GetHandler] = {"GetVersion": get_version, "Enroll": enroll}

#: Signed POST actions.
POST_ACTIONS: dict[str, PostHandler] = {
    "CreateKey": create_key,
    "Encrypt": encrypt,
    "Decrypt": decrypt,
    "GenerateDataKey": generate_data_key,
    "GenerateDataKeyWithoutPlaintext": generate_data_key_without_plaintext,
    "ListKey": list_key,
    "DeleteKey": delete_key,
    "DeleteAllKey": delete_all_key,
    "EnableKey": enable_key,
    "DisableKey": disable_key,
}
