"""eHSM's payload checker: exact messages and limits (docs/ehsm-compat.md §3-§4)."""

from __future__ import annotations

from typing import Any

import pytest

from ppml_kms.server.validation import check_payload, is_base64, js_length

from .conftest import Caller

KEYID = "aac3e45a-d3dc-4791-89b6-4ada0e38e6ef"


def p(**fields: Any) -> dict[str, Any]:
    return {"keyid": KEYID, **fields}


@pytest.mark.parametrize(
    ("action", "payload", "message"),
    [
        (
            "Encrypt",
            {"plaintext": "eA=="},
            "Missing required parameters, The keyid cannot be empty.",
        ),
        ("Encrypt", p(plaintext=""), "Missing required parameters, The plaintext cannot be empty."),
        (
            "Encrypt",
            p(plaintext=None),
            "Missing required parameters, The plaintext cannot be empty.",
        ),
        ("Encrypt", p(plaintext=12), "Parameter invalid, The plaintext must be of string type."),
        (
            "Encrypt",
            p(plaintext="eA="),
            "Parameter invalid, The plaintext not a vailed base64 string.",
        ),
        (
            "Encrypt",
            p(plaintext="eA-_"),
            "Parameter invalid, The plaintext not a vailed base64 string.",
        ),
        (
            "Encrypt",
            p(plaintext="e==="),
            "Parameter invalid, The plaintext not a vailed base64 string.",
        ),
        (
            "Encrypt",
            p(plaintext="eA==\n"),
            "Parameter invalid, The plaintext not a vailed base64 string.",
        ),
        ("Encrypt", p(plaintext="A" * 8196), "Parameter invalid, The plaintext length error."),
        (
            "Encrypt",
            p(plaintext="eA==", aad="x"),
            "Parameter invalid, The aad not a vailed base64 string.",
        ),
        (
            "Encrypt",
            p(plaintext="eA==", aad=["eA=="]),
            "Parameter invalid, The aad must be of string type.",
        ),
        (
            "Encrypt",
            p(plaintext="eA==", aad="A" * 8196),
            "Parameter invalid, The aad length error.",
        ),
        ("Decrypt", p(ciphertext="A" * 8236), "Parameter invalid, The ciphertext length error."),
        (
            "Encrypt",
            {"keyid": KEYID.upper(), "plaintext": "eA=="},
            "Parameter invalid, The keyid format wrong.",
        ),
        (
            "Encrypt",
            {"keyid": KEYID[:-1], "plaintext": "eA=="},
            "Parameter invalid, The keyid length error.",
        ),
        (
            "Encrypt",
            {"keyid": "٣" * 8 + KEYID[8:], "plaintext": "eA=="},
            "Parameter invalid, The keyid format wrong.",
        ),
        (
            "GenerateDataKey",
            p(keylen="32"),
            "Parameter invalid, The keylen must be of integer type.",
        ),
        (
            "GenerateDataKey",
            p(keylen=True),
            "Parameter invalid, The keylen must be of integer type.",
        ),
        (
            "GenerateDataKey",
            p(keylen=32.5),
            "Parameter invalid, The keylen must be of integer type.",
        ),
        (
            "GenerateDataKey",
            p(keylen=0),
            "Parameter invalid, The keylen value must be greater than or equal to 1.",
        ),
        (
            "GenerateDataKey",
            p(keylen=-1),
            "Parameter invalid, The keylen value must be greater than or equal to 1.",
        ),
        (
            "GenerateDataKey",
            p(keylen=1025),
            "Parameter invalid, The keylen value must be less than or equal to 1024.",
        ),
        (
            "GenerateDataKey",
            p(keylen=10**30),
            "Parameter invalid, The keylen must be of integer type.",
        ),
        ("GenerateDataKey", p(), "Missing required parameters, The keylen cannot be empty."),
        (
            "GenerateDataKeyWithoutPlaintext",
            p(keylen="32"),
            "Parameter invalid, The keylen must be of integer type.",
        ),
        (
            "CreateKey",
            {"keyspec": "EH_AES_GCM_256"},
            "Missing required parameters, The origin cannot be empty.",
        ),
        (
            "CreateKey",
            {"keyspec": "eh_aes_gcm_256", "origin": "EH_INTERNAL_KEY"},
            "Parameter invalid, The keyspec type is incorrect.",
        ),
        ("DeleteKey", {}, "Missing required parameters, The keyid cannot be empty."),
        ("EnableKey", {"keyid": 1}, "Parameter invalid, The keyid must be of string type."),
    ],
)
def test_messages(action: str, payload: dict[str, Any], message: str) -> None:
    assert check_payload(action, payload) == message


@pytest.mark.parametrize(
    ("action", "payload"),
    [
        ("Encrypt", p(plaintext="eA==")),
        ("Encrypt", p(plaintext="eA==", aad="")),
        ("Encrypt", p(plaintext="eA==", aad=None)),
        ("Encrypt", p(plaintext="A" * 8192, aad="A" * 8192)),
        ("Decrypt", p(ciphertext="A" * 8232)),
        ("GenerateDataKey", p(keylen=1)),
        ("GenerateDataKey", p(keylen=1024)),
        ("GenerateDataKey", p(keylen=16.0)),
        ("CreateKey", {"keyspec": "EH_HMAC", "origin": "EH_EXTERNAL_KEY", "keyusage": "anything"}),
        ("ListKey", {"whatever": [1, {"x": 2}]}),
        ("NotAnAction", {"x": 1}),
    ],
)
def test_accepted(action: str, payload: dict[str, Any]) -> None:
    assert check_payload(action, payload) is None


def test_first_failing_field_in_ehsm_order() -> None:
    assert (
        check_payload("Encrypt", {"keyid": "x", "plaintext": 5})
        == "Parameter invalid, The keyid length error."
    )


def test_is_base64() -> None:
    assert is_base64("dGVzdA==") and is_base64("test") and is_base64("+/+/")
    for bad in ["", "abc", "ab=c", "ab c", "a===", None, 5, "dGVzdA==\n"]:
        assert not is_base64(bad)


def test_js_length_counts_utf16_units() -> None:
    assert js_length("abc") == 3 and js_length("é") == 1 and js_length("😀") == 2


@pytest.mark.parametrize(
    ("keylen", "message"),
    [
        ("32", "Parameter invalid, The keylen must be of integer type."),
        (0, "Parameter invalid, The keylen value must be greater than or equal to 1."),
        (1025, "Parameter invalid, The keylen value must be less than or equal to 1024."),
        (False, "Parameter invalid, The keylen must be of integer type."),
    ],
)
def test_keylen_over_https(app: Caller, keylen: Any, message: str) -> None:
    keyid = app.create_key()
    for action in ["GenerateDataKey", "GenerateDataKeyWithoutPlaintext"]:
        reply = app.call(action, {"keyid": keyid, "keylen": keylen})
        assert reply == {"code": 400, "message": message, "result": {}}
