"""eHSM's payload checker (``svc/payload_checker.js``), with its exact messages and limits.

The rules follow ``docs/ehsm-compat.md`` §4. They are reproduced with JavaScript semantics where a
client could notice the difference:

* a field counts as absent when it is missing, ``null`` or ``""``; a required field that is absent
  gives ``Missing required parameters, The <k> cannot be empty.``;
* lengths are counted in UTF-16 code units (JavaScript's ``String.length``);
* an integer is a JSON number with an integral value (``32`` or ``32.0``); ``true`` and ``"32"`` are
  not integers;
* base64 means standard alphabet, ``=`` padding, a length that is a multiple of 4, not empty.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "AES_KEY_SIZES",
    "CRYPTO_ACTIONS",
    "DEFAULT_KEYUSAGE",
    "KEYSPECS",
    "KEYUSAGES",
    "ORIGINS",
    "PAYLOAD_RULES",
    "Rule",
    "check_payload",
    "is_base64",
    "js_length",
]

KEYSPECS: tuple[str, ...] = (
    "EH_AES_GCM_128",
    "EH_AES_GCM_192",
    "EH_AES_GCM_256",
    "EH_RSA_2048",
    "EH_RSA_3072",
    "EH_RSA_4096",
    "EH_EC_P224",
    "EH_EC_P256",
    "EH_EC_P256K",
    "EH_EC_P384",
    "EH_EC_P521",
    "EH_SM2",
    "EH_SM4_CTR",
    "EH_SM4_CBC",
    "EH_HMAC",
)
ORIGINS: tuple[str, ...] = ("EH_INTERNAL_KEY", "EH_EXTERNAL_KEY")
KEYUSAGES: tuple[str, ...] = ("EH_KEYUSAGE_ENCRYPT_DECRYPT", "EH_KEYUSAGE_SIGN_VERIFY")
DEFAULT_KEYUSAGE = "EH_KEYUSAGE_ENCRYPT_DECRYPT"
AES_KEY_SIZES: dict[str, int] = {"EH_AES_GCM_128": 16, "EH_AES_GCM_192": 24, "EH_AES_GCM_256": 32}

#: Actions eHSM calls "cryptographic": their envelope must carry a payload (``_checkParams``).
CRYPTO_ACTIONS: frozenset[str] = frozenset(
    {
        "CreateKey",
        "Encrypt",
        "Decrypt",
        "GenerateDataKey",
        "GenerateDataKeyWithoutPlaintext",
        "ExportDataKey",
        "Sign",
        "Verify",
        "AsymmetricEncrypt",
        "AsymmetricDecrypt",
        "GetPublicKey",
        "GetParametersForImport",
        "ImportKeyMaterial",
    }
)

_MAX_LENGTH = 6 * 1024  # eHSM's MAX_LENGTH, in bytes before base64
_B64_MAX = _MAX_LENGTH * 4 // 3  # 8192 characters
_CIPHERTEXT_B64_MAX = (_MAX_LENGTH + 30) * 4 // 3  # 8232 characters: + IV(12) + tag(16)
# ASCII only: JavaScript's \d, unlike Python's, matches no other digits.
_KEYID_RE = re.compile(r"[a-z0-9]{8}-[a-z0-9]{4}-[a-z0-9]{4}-[a-z0-9]{4}-[a-z0-9]{12}")
_BASE64_RE = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_JS_INTEGER_TEXT_LIMIT = 1e21  # String(n) switches to exponent notation from here on


@dataclass(frozen=True)
class Rule:
    """A payload field: its kind (``string``, ``base64``, ``int`` or ``const``) and limits."""

    kind: str
    required: bool = False
    min_length: int | None = None
    max_length: int | None = None
    pattern: re.Pattern[str] | None = None
    min_num: int | None = None
    max_num: int | None = None
    choices: tuple[str, ...] = ()


_KEYID = Rule("string", required=True, min_length=36, max_length=36, pattern=_KEYID_RE)
_AAD = Rule("base64", max_length=_B64_MAX)
_KEYLEN = Rule("int", required=True, min_num=1, max_num=1024)

#: Field rules per action, in eHSM's order (the first failing field is reported).
PAYLOAD_RULES: dict[str, dict[str, Rule]] = {
    "CreateKey": {
        "keyspec": Rule("const", required=True, choices=KEYSPECS),
        "origin": Rule("const", required=True, choices=ORIGINS),
    },
    "Encrypt": {
        "keyid": _KEYID,
        "plaintext": Rule("base64", required=True, min_length=1, max_length=_B64_MAX),
        "aad": _AAD,
    },
    "Decrypt": {
        "keyid": _KEYID,
        "ciphertext": Rule("base64", required=True, min_length=1, max_length=_CIPHERTEXT_B64_MAX),
        "aad": _AAD,
    },
    "GenerateDataKey": {"keyid": _KEYID, "keylen": _KEYLEN, "aad": _AAD},
    "GenerateDataKeyWithoutPlaintext": {"keyid": _KEYID, "keylen": _KEYLEN, "aad": _AAD},
    "ListKey": {},
    "DeleteKey": {"keyid": _KEYID},
    "DeleteAllKey": {},
    "EnableKey": {"keyid": _KEYID},
    "DisableKey": {"keyid": _KEYID},
}


def js_length(text: str) -> int:
    """``text.length`` as JavaScript counts it (UTF-16 code units)."""
    return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)


def is_base64(value: object) -> bool:
    """eHSM's ``is_base64``: a non-empty string, length a multiple of 4, standard alphabet."""
    return (
        isinstance(value, str)
        and len(value) > 0
        and len(value) % 4 == 0
        and _BASE64_RE.fullmatch(value) is not None
    )


def _is_js_integer(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) < _JS_INTEGER_TEXT_LIMIT
    if isinstance(value, float):
        return math.isfinite(value) and value.is_integer() and abs(value) < _JS_INTEGER_TEXT_LIMIT
    return False


def _check_field(key: str, rule: Rule, value: Any) -> str | None:
    invalid = f"Parameter invalid, The {key}"
    if rule.kind in ("string", "base64"):
        if not isinstance(value, str):
            return f"{invalid} must be of string type."
        length = js_length(value)
        if (rule.max_length is not None and length > rule.max_length) or (
            rule.min_length is not None and length < rule.min_length
        ):
            return f"{invalid} length error."
        if rule.kind == "base64" and not is_base64(value):
            return f"{invalid} not a vailed base64 string."  # sic, as eHSM spells it
        if rule.pattern is not None and rule.pattern.fullmatch(value) is None:
            return f"{invalid} format wrong."
        return None
    if rule.kind == "int":
        if not _is_js_integer(value):
            return f"{invalid} must be of integer type."
        if rule.max_num is not None and value > rule.max_num:
            return f"{invalid} value must be less than or equal to {rule.max_num}."
        if rule.min_num is not None and value < rule.min_num:
            return f"{invalid} value must be greater than or equal to {rule.min_num}."
        return None
    if rule.kind == "const":
        if not (isinstance(value, str) and value in rule.choices):
            return f"{invalid} type is incorrect."
        return None
    raise ValueError(f"unknown rule kind {rule.kind!r}")


def check_payload(action: str, payload: Mapping[str, Any]) -> str | None:
    """Check ``payload`` for ``action``; return eHSM's 400 message, or ``None`` when it passes.

    Actions without rules (unknown ones included) pass, as in eHSM.
    """
    for key, rule in PAYLOAD_RULES.get(action, {}).items():
        value = payload.get(key)
        if value is None or (isinstance(value, str) and value == ""):
            if rule.required:
                return f"Missing required parameters, The {key} cannot be empty."
            continue
        message = _check_field(key, rule, value)
        if message is not None:
            return message
    return None
