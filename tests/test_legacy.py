"""BigDL's whole-file Fernet files: streaming verification/decryption, CLI decrypt and migrate."""

from __future__ import annotations

import base64
import io
import os

import pytest
from cryptography.fernet import Fernet
from hypothesis import given, settings
from hypothesis import strategies as st

from ppml_kms import envelope
from ppml_kms import format as fmt
from ppml_kms.exceptions import InvalidCiphertext
from ppml_kms.legacy import iter_fernet_plaintext, verify_fernet_file

# Published Fernet specification vector (github.com/fernet/spec, verify.json).
SPEC_TOKEN = (
    b"gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA=="
)
SPEC_SECRET = "cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4="


def plaintext_of(token: bytes, key: bytes) -> bytes:
    return b"".join(iter_fernet_plaintext(io.BytesIO(token), key))


def test_fernet_spec_vector() -> None:
    assert plaintext_of(SPEC_TOKEN, base64.urlsafe_b64decode(SPEC_SECRET)) == b"hello"


@given(st.binary(max_size=5000))
@settings(max_examples=50, deadline=None)
def test_matches_cryptography_fernet(data: bytes) -> None:
    key = bytes(range(32))
    token = Fernet(base64.urlsafe_b64encode(key)).encrypt(data)
    assert plaintext_of(token, key) == data
    assert plaintext_of(token + b"\n", key) == data  # a trailing newline is tolerated


def test_large_token_streams_in_chunks() -> None:
    key = os.urandom(32)
    data = os.urandom(3 * 1024 * 1024 + 7)
    token = Fernet(base64.urlsafe_b64encode(key)).encrypt(data)
    assert plaintext_of(token, key) == data


@pytest.mark.parametrize(
    "mutate",
    [
        lambda t: t[:-10],
        lambda t: t[:40] + (b"A" if t[40:41] != b"A" else b"B") + t[41:],
        lambda t: t + b"AAAA",
        lambda t: t.replace(b"=", b""),
        lambda t: b"g" + t[2:],
        lambda t: t[:30] + b"!" + t[31:],
    ],
)
def test_modified_tokens_fail(mutate) -> None:
    key = os.urandom(32)
    token = Fernet(base64.urlsafe_b64encode(key)).encrypt(b"x" * 100)
    with pytest.raises(InvalidCiphertext):
        plaintext_of(mutate(token), key)


def test_wrong_key_fails_before_any_plaintext() -> None:
    token = Fernet(base64.urlsafe_b64encode(os.urandom(32))).encrypt(b"secret rows")
    with pytest.raises(InvalidCiphertext):
        verify_fernet_file(io.BytesIO(token), os.urandom(32))
    gen = iter_fernet_plaintext(io.BytesIO(token), os.urandom(32))
    with pytest.raises(InvalidCiphertext):
        next(gen)


@pytest.fixture
def bigdl_files(tmp_path, app, monkeypatch):
    """Key files and encrypted files made the way BigDL's Python client made them."""
    app.env(monkeypatch)
    with app.client() as client:
        keyid = client.create_key("EH_AES_GCM_128")
        dk = client.generate_data_key(keyid, 32, envelope.legacy_aad("test"))
    keys = tmp_path / "bigdl_keys"
    envelope.write_primary_key_file(keys / "encrypted_primary_key", keyid)
    envelope.write_data_key_file(keys / "encrypted_data_key", dk.wrapped)
    fernet = Fernet(base64.urlsafe_b64encode(dk.plaintext))
    plain = {"a.csv": b"x,y\n1,2\n", "sub/b.csv": os.urandom(70_000)}
    for name, data in plain.items():
        target = tmp_path / "old" / f"{name}.encrypted"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(fernet.encrypt(data))
    return keys / "encrypted_primary_key", keys / "encrypted_data_key", tmp_path / "old", plain


def test_cli_decrypts_bigdl_files(cli, tmp_path, bigdl_files) -> None:
    pk, dk, old, plain = bigdl_files
    result = cli("decrypt", old, "--out", tmp_path / "dec", "--primary-key", pk, "--data-key", dk, "--legacy-aad", "test")
    assert result.code == 0, result.err
    for name, data in plain.items():
        assert (tmp_path / "dec" / name).read_bytes() == data


def test_cli_explains_missing_legacy_keys(cli, tmp_path, bigdl_files) -> None:
    _, _, old, _ = bigdl_files
    result = cli("decrypt", old / "a.csv.encrypted", "--out", tmp_path / "a.csv")
    assert result.code == 1 and "--primary-key" in result.err
    assert not (tmp_path / "a.csv").exists()


def test_cli_migrates_to_v1(cli, tmp_path, bigdl_files) -> None:
    pk, dk, old, plain = bigdl_files
    result = cli("migrate", old, "--out", tmp_path / "new", "--primary-key", pk, "--data-key", dk)
    assert result.code == 0, result.err
    for name in plain:
        assert (tmp_path / "new" / f"{name}.encrypted").read_bytes()[: len(fmt.MAGIC)] == fmt.MAGIC
    result = cli("decrypt", tmp_path / "new", "--out", tmp_path / "dec")
    assert result.code == 0, result.err
    for name, data in plain.items():
        assert (tmp_path / "dec" / name).read_bytes() == data


def test_tampered_bigdl_file_leaves_nothing(cli, tmp_path, bigdl_files) -> None:
    pk, dk, old, _ = bigdl_files
    target = old / "sub" / "b.csv.encrypted"
    token = bytearray(target.read_bytes())
    token[5000] = ord("A") if token[5000] != ord("A") else ord("B")
    target.write_bytes(bytes(token))
    result = cli("decrypt", target, "--out", tmp_path / "b.csv", "--primary-key", pk, "--data-key", dk)
    assert result.code == 1 and "Traceback" not in result.err
    result = cli("migrate", target, "--out", tmp_path / "b.enc", "--primary-key", pk, "--data-key", dk)
    assert result.code == 1
    assert not (tmp_path / "b.csv").exists() and not (tmp_path / "b.enc").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
