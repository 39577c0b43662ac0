"""Every implemented Action over real HTTPS (docs/ehsm-compat.md §5)."""

from __future__ import annotations

import base64

import httpx
import pytest

from ppml_kms.server.run import ServerThread
from ppml_kms.server.store import CMK_LIFETIME_MS

from .conftest import ABSENT, Caller, FakeClock, enroll


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize("suffix", ["", "/"])
def test_get_version(http: httpx.Client, server: ServerThread, suffix: str) -> None:
    response = http.get(server.url + suffix, params={"Action": "GetVersion"})
    assert response.status_code == 200
    reply = response.json()
    assert reply["code"] == 200 and "success" in reply["message"]
    assert reply["result"]["version"]
    git_sha = reply["result"]["git_sha"]
    assert len(git_sha) == 7 and all(c in "0123456789abcdef" for c in git_sha)


@pytest.mark.parametrize("suffix", ["", "/"])
def test_enroll(http: httpx.Client, server: ServerThread, suffix: str) -> None:
    alphabet = set("0123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnpqrstuvwxyz")
    caller = enroll(http, server.url + suffix)
    assert caller.appid == caller.appid.lower() and len(caller.appid) == 36
    assert caller.appid[14] == "4"  # uuid4
    assert len(caller.apikey) == 32 and set(caller.apikey) <= alphabet
    other = enroll(http, server.url)
    assert (other.appid, other.apikey) != (caller.appid, caller.apikey)


@pytest.mark.parametrize("keyspec", ["EH_AES_GCM_128", "EH_AES_GCM_192", "EH_AES_GCM_256"])
def test_create_key_and_round_trip(app: Caller, keyspec: str) -> None:
    keyid = app.create_key(keyspec, keyusage="EH_KEYUSAGE_ENCRYPT_DECRYPT")
    assert len(keyid) == 36 and keyid == keyid.lower() and keyid[14] == "4"
    plaintext = b64(b"attack at dawn")
    ct = app.ok("Encrypt", {"keyid": keyid, "plaintext": plaintext})["ciphertext"]
    assert len(base64.b64decode(ct)) == len(b"attack at dawn") + 12 + 16  # ct || IV || tag
    assert app.ok("Decrypt", {"keyid": keyid, "ciphertext": ct})["plaintext"] == plaintext


@pytest.mark.parametrize("suffix", ["", "/"])
def test_post_with_and_without_trailing_slash(app: Caller, suffix: str) -> None:
    keyid = app.create_key()
    reply = app.call("ListKey", url=app.url + suffix)
    assert reply["code"] == 200 and [k["keyid"] for k in reply["result"]["list"]] == [keyid]


@pytest.mark.parametrize("aad", ["Y2hhbGxlbmdl", "test", ABSENT, ""])
def test_encrypt_decrypt_with_aad(app: Caller, aad: str) -> None:
    keyid = app.create_key()
    request = {"keyid": keyid, "plaintext": b64(b"secret")}
    if aad is not ABSENT:
        request["aad"] = aad
    ct = app.ok("Encrypt", request)["ciphertext"]
    decrypt = {"keyid": keyid, "ciphertext": ct}
    if aad is not ABSENT:
        decrypt["aad"] = aad
    assert app.ok("Decrypt", decrypt)["plaintext"] == b64(b"secret")


def test_aad_test_is_base64_decoded(app: Caller) -> None:
    # BigDL sends aad "test": base64 for b"\xb5\xeb\x2d". Encrypting with that raw aad must match.
    keyid = app.create_key()
    ct = app.ok("Encrypt", {"keyid": keyid, "plaintext": b64(b"x"), "aad": "test"})["ciphertext"]
    assert app.ok("Decrypt", {"keyid": keyid, "ciphertext": ct, "aad": b64(b"\xb5\xeb\x2d")})
    wrong = app.call("Decrypt", {"keyid": keyid, "ciphertext": ct, "aad": b64(b"test")})
    assert wrong["code"] == 400


def test_decrypt_failures(app: Caller) -> None:
    keyid = app.create_key()
    ct = app.ok("Encrypt", {"keyid": keyid, "plaintext": b64(b"secret"), "aad": "YWFk"})[
        "ciphertext"
    ]
    expected = {
        "code": 400,
        "message": "Decryption failed, Please confirm that your parameters are correct.",
        "result": None,
    }
    assert app.call("Decrypt", {"keyid": keyid, "ciphertext": ct}) == expected  # aad missing
    assert app.call("Decrypt", {"keyid": keyid, "ciphertext": ct, "aad": "YWFl"}) == expected
    raw = bytearray(base64.b64decode(ct))
    raw[0] ^= 1
    assert (
        app.call("Decrypt", {"keyid": keyid, "ciphertext": b64(bytes(raw)), "aad": "YWFk"})
        == expected
    )
    assert (
        app.call("Decrypt", {"keyid": keyid, "ciphertext": b64(b"short"), "aad": "YWFk"})
        == expected
    )
    other = app.create_key()
    assert app.call("Decrypt", {"keyid": other, "ciphertext": ct, "aad": "YWFk"}) == expected


@pytest.mark.parametrize("keylen", [1, 16, 32, 1024])
def test_generate_data_key(app: Caller, keylen: int) -> None:
    keyid = app.create_key()
    result = app.ok("GenerateDataKey", {"keyid": keyid, "keylen": keylen, "aad": "test"})
    assert len(base64.b64decode(result["plaintext"])) == keylen
    opened = app.ok("Decrypt", {"keyid": keyid, "ciphertext": result["ciphertext"], "aad": "test"})
    assert opened["plaintext"] == result["plaintext"]


def test_generate_data_key_without_plaintext(app: Caller) -> None:
    keyid = app.create_key()
    result = app.ok(
        "GenerateDataKeyWithoutPlaintext", {"keyid": keyid, "keylen": 32, "aad": "test"}
    )
    assert set(result) == {"ciphertext"}
    plaintext = app.ok(
        "Decrypt", {"keyid": keyid, "ciphertext": result["ciphertext"], "aad": "test"}
    )
    assert len(base64.b64decode(plaintext["plaintext"])) == 32
    again = app.ok("GenerateDataKeyWithoutPlaintext", {"keyid": keyid, "keylen": 32})
    assert again["ciphertext"] != result["ciphertext"]


def test_keylen_as_float_integer_is_accepted(app: Caller) -> None:
    # JavaScript's Number.isInteger(32.0) is true: eHSM accepts it.
    keyid = app.create_key()
    assert app.ok("GenerateDataKey", {"keyid": keyid, "keylen": 32.0})


def test_list_key(app: Caller) -> None:
    assert app.ok("ListKey") == {"list": []}
    first, second = app.create_key("EH_AES_GCM_128"), app.create_key()
    listing = app.ok("ListKey")["list"]
    assert [k["keyid"] for k in listing] == [first, second]
    entry = listing[0]
    assert set(entry) == {"keyid", "creationDate", "expireTime", "alias", "keyspec", "keyState"}
    assert entry["keyspec"] == "EH_AES_GCM_128" and entry["alias"] == "" and entry["keyState"] == 1
    assert entry["expireTime"] - entry["creationDate"] == CMK_LIFETIME_MS
    reply = app.call("ListKey")
    assert reply["message"] == "successful"


def test_list_key_shows_only_own_keys(
    app: Caller, http: httpx.Client, server: ServerThread
) -> None:
    mine = app.create_key()
    other = enroll(http, server.url)
    other.create_key()
    assert [k["keyid"] for k in app.ok("ListKey")["list"]] == [mine]


def test_disable_enable_key(app: Caller) -> None:
    keyid = app.create_key()
    request = {"keyid": keyid, "plaintext": b64(b"x")}
    assert app.call("DisableKey", {"keyid": keyid}) == {
        "code": 200,
        "message": "successful",
        "result": {},
    }
    assert app.call("Encrypt", request) == {
        "code": 400,
        "message": "keyid is disabled",
        "result": {},
    }
    assert (
        app.call("GenerateDataKey", {"keyid": keyid, "keylen": 16})["message"]
        == "keyid is disabled"
    )
    assert app.ok("ListKey")["list"][0]["keyState"] == 0
    assert app.call("EnableKey", {"keyid": keyid})["message"] == "successful"
    assert app.ok("Encrypt", request)
    assert app.ok("ListKey")["list"][0]["keyState"] == 1


def test_enable_unknown_key(app: Caller, http: httpx.Client, server: ServerThread) -> None:
    missing = "00000000-0000-4000-8000-000000000000"
    expected = {"code": 400, "message": "not find this keyid", "result": {}}
    assert app.call("EnableKey", {"keyid": missing}) == expected
    assert app.call("DisableKey", {"keyid": missing}) == expected
    foreign = enroll(http, server.url).create_key()
    assert app.call("DisableKey", {"keyid": foreign}) == expected


def test_delete_key(app: Caller, http: httpx.Client, server: ServerThread) -> None:
    keyid = app.create_key()
    ok = {"code": 200, "message": "successful", "result": {}}
    assert app.call("DeleteKey", {"keyid": keyid}) == ok
    assert app.ok("ListKey")["list"] == []
    assert app.call("Encrypt", {"keyid": keyid, "plaintext": "eA=="})["message"] == "keyid error"
    assert app.call("DeleteKey", {"keyid": keyid}) == ok  # eHSM: a missing key is fine too
    other = enroll(http, server.url)
    foreign = other.create_key()
    assert app.call("DeleteKey", {"keyid": foreign}) == ok
    assert [k["keyid"] for k in other.ok("ListKey")["list"]] == [foreign]  # not deleted


def test_delete_all_key(app: Caller) -> None:
    app.create_key()
    app.create_key()
    assert app.call("DeleteAllKey")["message"] == "successful"
    assert app.ok("ListKey")["list"] == []


def test_unknown_keyid_and_foreign_key(
    app: Caller, http: httpx.Client, server: ServerThread
) -> None:
    missing = "00000000-0000-4000-8000-000000000000"
    request = {"keyid": missing, "plaintext": b64(b"x")}
    assert app.call("Encrypt", request) == {"code": 400, "message": "keyid error", "result": {}}
    foreign = enroll(http, server.url).create_key()
    for action, payload in [
        ("Encrypt", {"keyid": foreign, "plaintext": b64(b"x")}),
        ("Decrypt", {"keyid": foreign, "ciphertext": b64(bytes(40))}),
        ("GenerateDataKey", {"keyid": foreign, "keylen": 32}),
        ("GenerateDataKeyWithoutPlaintext", {"keyid": foreign, "keylen": 32}),
    ]:
        assert app.call(action, payload) == {"code": 400, "message": "appid error", "result": {}}


def test_create_key_keyusage(app: Caller) -> None:
    # BigDL's pre-0.4 clients send no keyusage: it defaults to ENCRYPT_DECRYPT.
    keyid = app.create_key()  # sends keyspec and origin only
    assert app.ok("Encrypt", {"keyid": keyid, "plaintext": b64(b"x")})
    reply = app.call(
        "CreateKey", {"keyspec": "EH_AES_GCM_256", "origin": "EH_INTERNAL_KEY", "keyusage": "SIGN"}
    )
    assert reply == {
        "code": 400,
        "message": "Parameter invalid, The keyusage type is incorrect.",
        "result": {},
    }
    reply = app.call(
        "CreateKey",
        {
            "keyspec": "EH_AES_GCM_256",
            "origin": "EH_INTERNAL_KEY",
            "keyusage": "EH_KEYUSAGE_SIGN_VERIFY",
        },
    )
    assert reply == {"code": 400, "message": "create cmk failed", "result": {}}


@pytest.mark.parametrize("keyspec", ["EH_RSA_2048", "EH_EC_P256", "EH_SM4_CBC", "EH_HMAC"])
def test_create_key_valid_but_unsupported_keyspec(app: Caller, keyspec: str) -> None:
    reply = app.call("CreateKey", {"keyspec": keyspec, "origin": "EH_INTERNAL_KEY"})
    assert reply == {"code": 400, "message": "create cmk failed", "result": {}}


def test_create_key_external_origin_unsupported(app: Caller) -> None:
    reply = app.call("CreateKey", {"keyspec": "EH_AES_GCM_256", "origin": "EH_EXTERNAL_KEY"})
    assert reply == {"code": 400, "message": "create cmk failed", "result": {}}


def test_create_key_invalid_enums(app: Caller) -> None:
    reply = app.call("CreateKey", {"keyspec": "AES", "origin": "EH_INTERNAL_KEY"})
    assert reply["message"] == "Parameter invalid, The keyspec type is incorrect."
    reply = app.call("CreateKey", {"keyspec": "EH_AES_GCM_256", "origin": 1})
    assert reply["message"] == "Parameter invalid, The origin type is incorrect."
    reply = app.call("CreateKey", {"origin": "EH_INTERNAL_KEY"})
    assert reply["message"] == "Missing required parameters, The keyspec cannot be empty."


def test_expired_key(clocked_server: tuple[ServerThread, FakeClock]) -> None:
    server, clock = clocked_server
    with httpx.Client(verify=server.ssl_context()) as http:
        caller = enroll(http, server.url, clock)
        keyid = caller.create_key()
        request = {"keyid": keyid, "plaintext": b64(b"x")}
        assert caller.ok("Encrypt", request)
        clock.advance(CMK_LIFETIME_MS / 1000 + 1)
        assert caller.call("Encrypt", request) == {
            "code": 400,
            "message": "keyid expire",
            "result": {},
        }


def test_wrong_keyusage_is_refused(server: ServerThread, app: Caller) -> None:
    # Not creatable over the API for AES; a row written directly must still be refused.
    record = server.store.create_key(
        creator=app.appid,
        keyspec="EH_AES_GCM_256",
        origin="EH_INTERNAL_KEY",
        keyusage="EH_KEYUSAGE_SIGN_VERIFY",
        material=bytes(32),
        now_ms=int(app.now_ms()),
    )
    reply = app.call("Encrypt", {"keyid": record.keyid, "plaintext": b64(b"x")})
    assert reply == {"code": 500, "message": "Server exception.", "result": None}


def test_large_plaintext_limit(app: Caller) -> None:
    keyid = app.create_key()
    biggest = b64(bytes(6144))  # 8192 characters
    ct = app.ok("Encrypt", {"keyid": keyid, "plaintext": biggest})["ciphertext"]
    assert len(ct) <= 8232
    assert app.ok("Decrypt", {"keyid": keyid, "ciphertext": ct})["plaintext"] == biggest
    reply = app.call("Encrypt", {"keyid": keyid, "plaintext": b64(bytes(6147))})
    assert reply["message"] == "Parameter invalid, The plaintext length error."
