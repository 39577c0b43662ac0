"""The request envelope, signature and replay rules (docs/ehsm-compat.md §1-§3), over real HTTPS."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ppml_kms import signing
from ppml_kms.server.run import ServerThread

from .conftest import ABSENT, Caller

KEYID = "00000000-0000-4000-8000-000000000000"


def err(message: str) -> dict[str, Any]:
    return {"code": 400, "message": message, "result": {}}


def test_wrong_apikey_is_sign_error(app: Caller) -> None:
    wrong = ("x" if app.apikey[0] != "x" else "y") + app.apikey[1:]
    assert app.call("ListKey", apikey=wrong) == err("sign error")


def test_tampered_payload_is_sign_error(app: Caller) -> None:
    body = app.envelope({"keyspec": "EH_AES_GCM_256", "origin": "EH_INTERNAL_KEY"})
    body["payload"]["keyspec"] = "EH_AES_GCM_128"
    assert app.post("CreateKey", body) == err("sign error")


def test_unknown_appid_has_no_message(app: Caller) -> None:
    reply = app.call("ListKey", appid="11111111-1111-4111-8111-111111111111")
    assert reply == {"code": 400, "result": {}}
    assert "message" not in reply


def test_replay_is_refused(app: Caller) -> None:
    body = app.envelope()
    assert app.post("ListKey", body)["code"] == 200
    assert app.post("ListKey", body) == err("Timestamp can't be repeated in 20 minutes")


def test_replay_rule_matches_any_entries(app: Caller) -> None:
    # Rejected when *an* entry has the nonce and *an* entry has the timestamp (§2.4).
    t1, t2 = str(int(time.time() * 1000) - 5000), str(int(time.time() * 1000) - 4000)
    assert app.call("ListKey", nonce="n1", timestamp=t1)["code"] == 200
    assert app.call("ListKey", nonce="n2", timestamp=t2)["code"] == 200
    assert app.call("ListKey", nonce="n1", timestamp=t2) == err(
        "Timestamp can't be repeated in 20 minutes"
    )
    assert app.call("ListKey", nonce="n3", timestamp=t1)["code"] == 200


def test_absent_nonces_collide_on_same_timestamp(app: Caller) -> None:
    ts = app.now_ms()
    assert app.call("ListKey", nonce=ABSENT, timestamp=ts)["code"] == 200
    assert app.call("ListKey", nonce=ABSENT, timestamp=ts) == err(
        "Timestamp can't be repeated in 20 minutes"
    )
    assert app.call("ListKey", nonce="fresh", timestamp=ts)["code"] == 200


def test_replay_cache_is_per_appid(app: Caller, http: httpx.Client, server: ServerThread) -> None:
    from .conftest import enroll

    other = enroll(http, server.url)
    ts = app.now_ms()
    assert app.call("ListKey", nonce="same", timestamp=ts)["code"] == 200
    assert other.call("ListKey", nonce="same", timestamp=ts)["code"] == 200


def test_unsigned_requests_do_not_poison_the_replay_cache(app: Caller) -> None:
    good = app.envelope()
    forged = dict(good, sign=signing.sign("not-the-apikey", {"appid": app.appid}))
    assert app.post("ListKey", forged) == err("sign error")
    assert app.post("ListKey", good)["code"] == 200


def test_invalid_payload_is_not_recorded(app: Caller) -> None:
    bad = app.envelope({"keyid": KEYID, "keylen": "32"}, nonce="n", timestamp=app.now_ms())
    assert app.post("GenerateDataKey", bad)["code"] == 400
    keyid = app.create_key()
    good = app.envelope({"keyid": keyid, "keylen": 32}, nonce="n", timestamp=bad["timestamp"])
    assert app.post("GenerateDataKey", good)["code"] == 200


@pytest.mark.parametrize("minutes", [-11, 11])
def test_stale_or_future_timestamp(app: Caller, minutes: int) -> None:
    ts = str(int((time.time() + minutes * 60) * 1000))
    assert app.call("ListKey", timestamp=ts) == err("Timestamp error")


def test_timestamp_within_window_is_accepted(app: Caller) -> None:
    ts = str(int((time.time() - 9 * 60) * 1000))
    assert app.call("ListKey", timestamp=ts)["code"] == 200


@pytest.mark.parametrize("ts", ["170000000000", "17000000000000", "1"])
def test_bad_timestamp_length(app: Caller, ts: str) -> None:
    assert app.call("ListKey", timestamp=ts) == err("Timestamp length error")


@pytest.mark.parametrize("ts", ["abcdefghijklm", "1.70000000000", "-170000000000"])
def test_non_numeric_timestamp(app: Caller, ts: str) -> None:
    assert app.call("ListKey", timestamp=ts) == err("Timestamp error")


def test_nonce_length(app: Caller) -> None:
    assert app.call("ListKey", nonce="n" * 64)["code"] == 200
    assert app.call("ListKey", nonce="n" * 65) == err("Nonce length error")


@pytest.mark.parametrize("field", ["appid", "timestamp", "sign"])
@pytest.mark.parametrize("value", [ABSENT, "", None, 0])
def test_missing_envelope_fields(app: Caller, field: str, value: Any) -> None:
    body = app.envelope()
    if value is ABSENT:
        del body[field]
    else:
        body[field] = value
    assert app.post("ListKey", body) == err("Missing required parameters")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("appid", 5),
        ("timestamp", 1700000000000),
        ("sign", ["x"]),
        ("nonce", 7),
        ("payload", "x"),
        ("payload", [1]),
    ],
)
def test_envelope_types(app: Caller, field: str, value: Any) -> None:
    body = app.envelope()
    body[field] = value
    assert app.post("ListKey", body) == err("param type error")


@pytest.mark.parametrize("payload", [ABSENT, None, "", 0])
def test_crypto_actions_need_a_payload(app: Caller, payload: Any) -> None:
    for action in [
        "CreateKey",
        "Encrypt",
        "Decrypt",
        "GenerateDataKey",
        "GenerateDataKeyWithoutPlaintext",
    ]:
        assert app.call(action, payload) == err("Missing required parameters")


def test_check_order_type_before_nonce_before_timestamp(app: Caller) -> None:
    body = app.envelope(nonce="n" * 65, timestamp="1")
    assert app.post("ListKey", body) == err("Nonce length error")
    body = app.envelope(timestamp="1")
    body["appid"] = 3
    assert app.post("ListKey", body) == err("param type error")


def test_payload_checked_before_signature(app: Caller) -> None:
    body = app.envelope({"keyid": "bad"}, apikey="wrong")
    assert app.post("Encrypt", body)["message"] == "Parameter invalid, The keyid length error."


def test_unknown_action_is_404_after_auth(app: Caller) -> None:
    assert app.call("NoSuchAction") == {"code": 404, "message": "API Not Found", "result": {}}
    assert app.call("encrypt", {"keyid": KEYID}) == {
        "code": 404,
        "message": "API Not Found",
        "result": {},
    }
    # Unsigned, it fails the envelope check first (as in eHSM).
    assert app.post("NoSuchAction", {}) == err("Missing required parameters")


@pytest.mark.parametrize("action", ["Enroll", "GetVersion"])
def test_post_of_get_actions_is_404(http: httpx.Client, server: ServerThread, action: str) -> None:
    response = http.post(server.url, params={"Action": action}, json={})
    assert response.status_code == 200
    assert response.json() == {"code": 404, "message": "API Not Found", "result": {}}


@pytest.mark.parametrize("action", ["ListKey", "CreateKey", "Nope", None])
def test_get_of_other_actions_is_400(
    http: httpx.Client, server: ServerThread, action: str | None
) -> None:
    response = http.get(server.url, params={"Action": action} if action else {})
    assert response.status_code == 200
    assert response.json() == err("Missing required parameters")


@pytest.mark.parametrize(
    "body", [b"   ", b"{not json", b'{"a": NaN}', b"\xff\xfe", b'"text"', b"12"]
)
def test_invalid_json(http: httpx.Client, server: ServerThread, body: bytes) -> None:
    response = http.post(
        server.url,
        params={"Action": "ListKey"},
        content=body,
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 200
    assert response.json() == err("Invalid JSON")


def test_without_json_content_type_the_body_is_empty(app: Caller) -> None:
    body = app.envelope()
    response = app.http.post(
        app.url,
        params={"Action": "ListKey"},
        content=httpx.Request("POST", "/", json=body).content,
        headers={"content-type": "text/plain"},
    )
    assert response.json() == err("Missing required parameters")
    charset = app.http.post(
        app.url,
        params={"Action": "ListKey"},
        content=httpx.Request("POST", "/", json=body).content,
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert charset.json()["code"] == 200


def test_body_limit(app: Caller) -> None:
    body = app.envelope({"filler": "x" * (100 * 1024)})
    assert app.post("ListKey", body) == err("request entity too large")
    small = app.envelope({"filler": "x" * (90 * 1024)})
    assert app.post("ListKey", small)["code"] == 200


def test_streamed_body_over_limit(http: httpx.Client, server: ServerThread) -> None:
    def chunks() -> Iterator[bytes]:  # no content-length: the limit applies while reading
        for _ in range(30):
            yield b" " * 4096

    response = http.post(
        server.url,
        params={"Action": "ListKey"},
        content=chunks(),
        headers={"content-type": "application/json"},
    )
    assert response.json() == err("request entity too large")


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "HEAD"])
def test_other_methods(http: httpx.Client, server: ServerThread, method: str) -> None:
    response = http.request(method, server.url, params={"Action": "Enroll"})
    assert response.status_code == 200
    if method != "HEAD":
        assert response.json() == {"code": 404, "message": "API Not Found", "result": {}}


def test_other_paths_answer_in_the_envelope(http: httpx.Client, server: ServerThread) -> None:
    base = server.url.removesuffix("/ehsm")
    for path in ["/", "/ehsmx", "/ehsm/extra", "/other?Action=Enroll"]:
        response = http.get(base + path)
        assert response.status_code == 200
        assert response.json() == {"code": 404, "message": "API Not Found", "result": {}}
