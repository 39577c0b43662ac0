"""eHSM request signing (docs/ehsm-compat.md §2.3): known answers, the JavaScript skip rule, the server."""

from __future__ import annotations

import string
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ppml_kms import signing
from ppml_kms.server.run import ServerThread

from .conftest import Caller, enroll

APPID = "b7c62e4d-c238-4016-b35f-47bc4b57dc03"
APIKEY = "D3nK2Vq90QrFkHGRZ3dBAyFEfPTtLfQy"
TIMESTAMP = "1700000000000"


def test_example_a_create_key_without_nonce() -> None:
    params = {
        "appid": APPID,
        "timestamp": TIMESTAMP,
        "payload": {
            "keyspec": "EH_AES_GCM_256",
            "origin": "EH_INTERNAL_KEY",
            "keyusage": "EH_KEYUSAGE_ENCRYPT_DECRYPT",
        },
    }
    assert signing.canonical_string(params) == (
        f"appid={APPID}&payload=keyspec=EH_AES_GCM_256&keyusage=EH_KEYUSAGE_ENCRYPT_DECRYPT"
        f"&origin=EH_INTERNAL_KEY&timestamp={TIMESTAMP}"
    )
    assert signing.sign(APIKEY, params) == "15sVY0CoLLgWBSBdyPKcBX3oL2kw7ldRWgfETtjbZV8="


def test_example_b_nonce_and_integer() -> None:
    params = {
        "appid": APPID,
        "nonce": "abc123",
        "timestamp": TIMESTAMP,
        "payload": {
            "keyid": "aac3e45a-d3dc-4791-89b6-4ada0e38e6ef",
            "keylen": 16,
            "aad": "Y2hhbGxlbmdl",
        },
    }
    assert signing.canonical_string(params) == (
        f"appid={APPID}&nonce=abc123&payload=aad=Y2hhbGxlbmdl"
        f"&keyid=aac3e45a-d3dc-4791-89b6-4ada0e38e6ef&keylen=16&timestamp={TIMESTAMP}"
    )
    assert signing.sign(APIKEY, params) == "+SSAYUz/EGdbJ7DmW2LUlYNd/dxiII6dBilRamS4Pos="


def test_example_c_no_payload() -> None:
    params = {"appid": APPID, "timestamp": TIMESTAMP}
    assert signing.canonical_string(params) == f"appid={APPID}&timestamp={TIMESTAMP}"
    assert signing.sign(APIKEY, params) == "hDaIwPg7vUFWyWqIZSBb26vOVbQm+y2wC1RJiOvsUiQ="


def test_javascript_skip_rule() -> None:
    payload = {"zero": 0, "false": False, "empty": "", "none": None, "zero_text": "0", "yes": True}
    assert signing.canonical_string({"payload": payload}) == "payload=yes=true&zero_text=0"
    assert signing.canonical_string({"appid": "a", "payload": {}}) == "appid=a&payload="
    assert signing.canonical_string({"appid": "a", "payload": None}) == "appid=a"


def test_verify_is_exact() -> None:
    params = {"appid": APPID, "timestamp": TIMESTAMP}
    good = signing.sign(APIKEY, params)
    assert signing.verify(APIKEY, params, good)
    assert not signing.verify(APIKEY, params, good.upper())  # the docs' .upper() is wrong
    assert not signing.verify(APIKEY + "x", params, good)
    assert not signing.verify(APIKEY, params, "é")


_keys = st.text(alphabet=string.ascii_letters + string.digits + "_-.&=", min_size=1, max_size=12)
_values = st.one_of(
    st.text(max_size=40),
    st.integers(min_value=-(2**53), max_value=2**53),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False, allow_infinity=False),
)


@pytest.fixture(scope="module")
def shared_app(http: httpx.Client, server: ServerThread) -> Caller:
    # One app for all examples: hypothesis runs the test body many times per fixture.
    return enroll(http, server.url)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(payload=st.dictionaries(_keys, _values, max_size=6))
def test_server_accepts_any_flat_payload_the_client_signs(
    payload: dict[str, Any], shared_app: Caller
) -> None:
    reply = shared_app.call("ListKey", payload)
    assert reply["code"] == 200, (payload, reply)
