"""Envelope encryption with a real KMS: key files, file encryption and decryption, the key cache."""

from __future__ import annotations

import os
import stat

import pytest

from ppml_kms import envelope
from ppml_kms import format as fmt
from ppml_kms.exceptions import FormatError, InvalidCiphertext, KeyFileError, OutputExistsError


@pytest.fixture
def encryptor(client):
    keyid = client.create_primary_key()
    wrapped = client.generate_wrapped_data_key(keyid, 32, envelope.DATA_KEY_AAD)
    return envelope.FileEncryptor.from_kms(client, keyid, wrapped, cache=envelope.DataKeyCache(), segment_size=4096)


def test_key_files_are_private_atomic_and_never_overwritten(tmp_path) -> None:
    primary = tmp_path / "keys" / "encrypted_primary_key"
    data = tmp_path / "keys" / "encrypted_data_key"
    envelope.write_primary_key_file(primary, "aac3e45a-d3dc-4791-89b6-4ada0e38e6ef")
    envelope.write_data_key_file(data, b"\x01\x02wrapped")
    for path in (primary, data):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert primary.read_text() == "aac3e45a-d3dc-4791-89b6-4ada0e38e6ef"
    assert envelope.read_data_key_file(data) == b"\x01\x02wrapped"
    with pytest.raises(KeyFileError, match="already exists"):
        envelope.write_primary_key_file(primary, "other")
    assert envelope.read_primary_key_file(primary) == "aac3e45a-d3dc-4791-89b6-4ada0e38e6ef"
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["encrypted_data_key", "encrypted_primary_key"]


@pytest.mark.parametrize("content", [b"", b"\xff\xfe", b"not base64 !!"])
def test_bad_data_key_files(tmp_path, content: bytes) -> None:
    path = tmp_path / "dk"
    path.write_bytes(content)
    with pytest.raises(KeyFileError):
        envelope.read_data_key_file(path)
    with pytest.raises(KeyFileError, match="does not exist"):
        envelope.read_data_key_file(tmp_path / "missing")


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 50_000])
def test_file_round_trip(tmp_path, client, encryptor, size: int) -> None:
    src = tmp_path / "plain.bin"
    src.write_bytes(os.urandom(size))
    enc, dec = tmp_path / "plain.bin.encrypted", tmp_path / "out.bin"
    assert encryptor.encrypt_file(src, enc) == size
    cache = envelope.DataKeyCache()
    assert envelope.decrypt_file(enc, dec, client, cache=cache) == size
    assert dec.read_bytes() == src.read_bytes()
    assert stat.S_IMODE(os.stat(dec).st_mode) == 0o600


def test_header_names_key_and_carries_wrapped_key(tmp_path, client, encryptor) -> None:
    src = tmp_path / "a"
    src.write_bytes(b"abc")
    encryptor.encrypt_file(src, tmp_path / "a.enc")
    header = fmt.parse_header((tmp_path / "a.enc").read_bytes())
    assert header.kms.kms_type == "ehsm"
    assert len(header.kms.key_id) == 36
    assert header.kms.data_key_aad == envelope.DATA_KEY_AAD
    # The file alone is enough: a fresh cache and client decrypt it.
    assert envelope.decrypt_file(tmp_path / "a.enc", tmp_path / "a.out", client, cache=envelope.DataKeyCache())


def test_one_kms_call_per_data_key(tmp_path, client, encryptor) -> None:
    cache = envelope.DataKeyCache()
    for i in range(5):
        src = tmp_path / f"f{i}"
        src.write_bytes(os.urandom(100))
        encryptor.encrypt_file(src, tmp_path / f"f{i}.enc")
        envelope.decrypt_file(tmp_path / f"f{i}.enc", tmp_path / f"f{i}.out", client, cache=cache)
    assert cache.kms_calls == 1


def test_tampered_file_leaves_no_output(tmp_path, client, encryptor) -> None:
    src = tmp_path / "p"
    src.write_bytes(os.urandom(20_000))
    enc = tmp_path / "p.enc"
    encryptor.encrypt_file(src, enc)
    data = bytearray(enc.read_bytes())
    data[-5000] ^= 1
    enc.write_bytes(bytes(data))
    with pytest.raises(InvalidCiphertext):
        envelope.decrypt_file(enc, tmp_path / "out", client)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p", "p.enc"]


def test_never_overwrites_input_or_existing_output(tmp_path, client, encryptor) -> None:
    src = tmp_path / "p"
    src.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError, match="input"):
        encryptor.encrypt_file(src, src, overwrite=True)
    assert src.read_bytes() == b"keep me"
    existing = tmp_path / "exists"
    existing.write_bytes(b"old")
    with pytest.raises(OutputExistsError, match="already exists"):
        encryptor.encrypt_file(src, existing)
    assert existing.read_bytes() == b"old"
    encryptor.encrypt_file(src, existing, overwrite=True)
    assert existing.read_bytes().startswith(fmt.MAGIC)


def test_encryption_context_must_match(tmp_path, client) -> None:
    keyid = client.create_primary_key()
    wrapped = client.generate_wrapped_data_key(keyid, 32, envelope.DATA_KEY_AAD)
    enc = envelope.FileEncryptor.from_kms(client, keyid, wrapped, context={"table": "iris"})
    src = tmp_path / "p"
    src.write_bytes(b"row")
    enc.encrypt_file(src, tmp_path / "p.enc")
    envelope.decrypt_file(tmp_path / "p.enc", tmp_path / "ok", client, expected_context={"table": "iris"})
    with pytest.raises(InvalidCiphertext, match="context"):
        envelope.decrypt_file(tmp_path / "p.enc", tmp_path / "bad", client, expected_context={"table": "x"})
    assert not (tmp_path / "bad").exists()


def test_plaintext_input_is_not_mistaken_for_ciphertext(tmp_path, client) -> None:
    src = tmp_path / "iris.csv"
    src.write_text("a,b\n1,2\n")
    with pytest.raises(FormatError, match="not a ppml-kms"):
        envelope.decrypt_file(src, tmp_path / "out", client)


def test_encryptor_refuses_pickling_and_hides_key(encryptor) -> None:
    import pickle

    with pytest.raises(TypeError):
        pickle.dumps(encryptor)
    assert "redacted" in repr(encryptor)
