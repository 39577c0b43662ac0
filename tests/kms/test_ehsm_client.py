"""The eHSM client against our real server over HTTPS on loopback."""

from __future__ import annotations

import base64
import pickle
import socket

import pytest

from ppml_kms.exceptions import ConfigError, KmsAuthError, KmsRequestError, KmsTransportError
from ppml_kms.kms import EhsmClient
from ppml_kms.kms.ehsm import normalize_url


def test_version_and_enroll_shape(kms_server) -> None:
    with EhsmClient(kms_server.url, ca_cert=str(kms_server.ca_cert)) as anonymous:
        assert "version" in anonymous.get_version()
        appid, apikey = anonymous.enroll()
    assert len(appid) == 36 and appid == appid.lower()
    assert len(apikey) == 32


def test_data_key_round_trip(client: EhsmClient) -> None:
    keyid = client.create_primary_key()
    key = client.generate_data_key(keyid, 32, b"ctx")
    assert len(key.plaintext) == 32
    assert client.unwrap_data_key(keyid, key.wrapped, b"ctx") == key.plaintext
    wrapped_only = client.generate_wrapped_data_key(keyid, 16, b"")
    assert len(client.unwrap_data_key(keyid, wrapped_only)) == 16


def test_wrong_aad_is_refused(client: EhsmClient) -> None:
    keyid = client.create_primary_key()
    wrapped = client.generate_wrapped_data_key(keyid, 32, b"right")
    with pytest.raises(KmsRequestError) as info:
        client.unwrap_data_key(keyid, wrapped, b"wrong")
    assert info.value.code == 400
    assert "Decryption failed" in info.value.message


def test_bigdl_aad_test_field_value(client: EhsmClient) -> None:
    """BigDL sent the aad field "test"; as eHSM reads it as base64 it means bytes b5 eb 2d."""
    from ppml_kms.envelope import legacy_aad

    aad = legacy_aad("test")
    assert aad == b"\xb5\xeb\x2d" and base64.b64encode(aad) == b"test"
    keyid = client.create_primary_key()
    wrapped = client.generate_wrapped_data_key(keyid, 32, aad)
    assert len(client.unwrap_data_key(keyid, wrapped, aad)) == 32


def test_encrypt_decrypt_and_list(client: EhsmClient) -> None:
    keyid = client.create_key()
    ciphertext = client.encrypt(keyid, b"hello", b"aad")
    assert ciphertext != b"hello"
    assert client.decrypt(keyid, ciphertext, b"aad") == b"hello"
    assert keyid in {k["keyid"] for k in client.list_keys()}
    client.disable_key(keyid)
    with pytest.raises(KmsRequestError, match="disabled"):
        client.decrypt(keyid, ciphertext, b"aad")
    client.enable_key(keyid)
    assert client.decrypt(keyid, ciphertext, b"aad") == b"hello"


def test_wrong_apikey_and_unknown_appid(app) -> None:
    with EhsmClient(app.url, app.appid, "x" * 32, ca_cert=app.ca_cert) as bad:
        with pytest.raises(KmsAuthError, match="sign error"):
            bad.create_primary_key()
    with EhsmClient(app.url, "00000000-0000-4000-8000-000000000000", app.apikey, ca_cert=app.ca_cert) as bad:
        with pytest.raises(KmsAuthError, match="unknown appid"):
            bad.create_primary_key()


def test_another_apps_key_is_refused(kms_server, client: EhsmClient) -> None:
    from tests.conftest import enroll_app

    keyid = client.create_primary_key()
    wrapped = client.generate_wrapped_data_key(keyid, 32)
    with enroll_app(kms_server).client() as other:
        with pytest.raises(KmsRequestError, match="appid error"):
            other.unwrap_data_key(keyid, wrapped)


def test_untrusted_certificate_is_refused_with_a_hint(app) -> None:
    with EhsmClient(app.url, app.appid, app.apikey) as client:  # system CAs only
        with pytest.raises(KmsTransportError, match="--ca-cert"):
            client.create_primary_key()


def test_insecure_is_possible_when_asked(app) -> None:
    with EhsmClient(app.url, app.appid, app.apikey, insecure=True) as client:
        assert client.create_primary_key()


def test_connection_refused_is_a_transport_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with EhsmClient(f"https://127.0.0.1:{port}/ehsm", "a", "b", timeout=5) as client:
        with pytest.raises(KmsTransportError, match="cannot connect"):
            client.get_version()


def test_primary_key_token_must_be_a_key_id(client: EhsmClient) -> None:
    with pytest.raises(ConfigError, match="key id"):
        client.unwrap_data_key("not-a-key-id", b"x" * 40)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("https://127.0.0.1:9000", "https://127.0.0.1:9000/ehsm"),
        ("https://127.0.0.1:9000/", "https://127.0.0.1:9000/ehsm"),
        ("https://127.0.0.1:9000/ehsm/", "https://127.0.0.1:9000/ehsm"),
        ("https://kms.example:9002/ehsm?Action=GetVersion", "https://kms.example:9002/ehsm"),
    ],
)
def test_normalize_url(given: str, expected: str) -> None:
    assert normalize_url(given) == expected


@pytest.mark.parametrize("bad", ["ftp://x/ehsm", "127.0.0.1:9000", "https://"])
def test_normalize_url_rejects(bad: str) -> None:
    with pytest.raises(ConfigError):
        normalize_url(bad)


def test_client_hides_and_keeps_its_apikey(app) -> None:
    with app.client() as client:
        assert app.apikey not in repr(client)
        with pytest.raises(TypeError):
            pickle.dumps(client)
