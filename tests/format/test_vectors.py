"""Format v1 test vectors (tests/vectors/format_v1.json) against the implementation and the spec.

* every valid vector decrypts (streaming, file-object and random-access readers) and re-encrypts
  to exactly the same bytes from its fixed inputs;
* every invalid vector fails with exactly the named error, at the named stage;
* the generator reproduces the committed JSON (``--check``);
* one vector is decoded from first principles (``struct``, ``hmac``, ``cryptography``'s HKDF and
  AESGCM, following docs/format.md), without the ppml_kms package.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import struct
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ppml_kms import format as fmt
from ppml_kms.exceptions import Error, FormatError, InvalidCiphertext

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "tests" / "vectors" / "format_v1.json"
GENERATOR = ROOT / "scripts" / "make_format_vectors.py"
ERRORS = {"InvalidCiphertext": InvalidCiphertext, "FormatError": FormatError}


@cache
def load() -> dict:
    return json.loads(VECTORS.read_text(encoding="utf-8"))


def valid_vectors() -> list[dict]:
    return load()["valid"]


def invalid_vectors() -> list[dict]:
    return load()["invalid"]


def by_name(name: str) -> dict:
    return next(v for v in valid_vectors() if v["name"] == name)


# -- the three ways to read a file -------------------------------------------------------------


def open_header(blob: bytes, data_key: bytes) -> tuple[io.BytesIO, fmt.Header, fmt.FileKeys]:
    src = io.BytesIO(blob)
    header = fmt.read_header(src)
    return src, header, fmt.verify_header(header, data_key)


def decrypt_streaming(blob: bytes, data_key: bytes) -> bytes:
    src, header, keys = open_header(blob, data_key)
    out = io.BytesIO()
    assert fmt.decrypt_stream(src, out, header, keys) == len(out.getvalue())
    return out.getvalue()


def decrypt_reader(blob: bytes, data_key: bytes) -> bytes:
    src, header, keys = open_header(blob, data_key)
    with fmt.DecryptingReader(src, header, keys) as reader:
        return reader.read()


def decrypt_random_access(blob: bytes, data_key: bytes) -> bytes:
    src, header, keys = open_header(blob, data_key)
    reader = fmt.SegmentReader(src, header, keys, file_size=len(blob))
    # Last segment first, as a Spark task owning the end of the file would.
    parts = {i: reader.read_segment(i) for i in reversed(range(reader.num_segments))}
    data = b"".join(parts[i] for i in range(reader.num_segments))
    assert len(data) == reader.plaintext_size
    return data


READERS = [decrypt_streaming, decrypt_reader, decrypt_random_access]


# -- valid vectors -----------------------------------------------------------------------------


def test_vector_file_covers_the_required_cases() -> None:
    doc = load()
    assert doc["format_version"] == fmt.VERSION
    lengths = {(v["segment_size"], len(v["plaintext"]) // 2) for v in valid_vectors()}
    seg = 1024
    for n in (0, 1, seg - 1, seg, seg + 1, 2 * seg, 4 * seg + 517):
        assert (seg, n) in lengths
    assert any(v["segment_size"] == fmt.DEFAULT_SEGMENT_SIZE for v in valid_vectors())
    assert any(v["context"] for v in valid_vectors())
    assert {v["error"] for v in invalid_vectors()} == set(ERRORS)
    names = [v["name"] for v in valid_vectors() + invalid_vectors()]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("vector", valid_vectors(), ids=lambda v: v["name"])
@pytest.mark.parametrize("read", READERS, ids=lambda f: f.__name__)
def test_valid_vector_decrypts(vector: dict, read) -> None:
    blob, key = bytes.fromhex(vector["file"]), bytes.fromhex(vector["data_key"])
    assert read(blob, key) == bytes.fromhex(vector["plaintext"])


@pytest.mark.parametrize("vector", valid_vectors(), ids=lambda v: v["name"])
def test_valid_vector_header_fields(vector: dict) -> None:
    blob = bytes.fromhex(vector["file"])
    header = fmt.parse_header(blob)
    mid = vector["intermediate"]
    assert header.suite == vector["suite"]
    assert header.segment_size == vector["segment_size"]
    assert header.salt.hex() == vector["salt"]
    assert header.nonce_prefix.hex() == vector["nonce_prefix"]
    assert header.kms.kms_type == vector["kms"]["kms_type"]
    assert header.kms.key_id == vector["kms"]["key_id"]
    assert header.kms.wrapped_key.hex() == vector["kms"]["wrapped_key"]
    assert header.kms.data_key_aad.hex() == vector["kms"]["data_key_aad"]
    assert [list(p) for p in header.context] == vector["context"]
    assert (header.size, header.tag.hex()) == (mid["header_size"], mid["header_tag"])
    keys = fmt.verify_header(header, bytes.fromhex(vector["data_key"]))
    assert (keys.file_key.hex(), keys.header_key.hex()) == (mid["file_key"], mid["header_key"])
    assert fmt.segment_layout(header, len(blob)) == (
        mid["num_segments"],
        len(vector["plaintext"]) // 2,
    )
    assert len(blob) == mid["file_size"]


def _seal(vector: dict) -> tuple[fmt.Header, fmt.FileKeys]:
    salt = bytes.fromhex(vector["salt"])
    keys = fmt.derive_keys(bytes.fromhex(vector["data_key"]), salt, vector["suite"])
    kms = vector["kms"]
    header = fmt.seal_header(
        keys=keys,
        salt=salt,
        nonce_prefix=bytes.fromhex(vector["nonce_prefix"]),
        kms=fmt.KmsDescriptor(
            kms["kms_type"],
            kms["key_id"],
            bytes.fromhex(kms["wrapped_key"]),
            bytes.fromhex(kms["data_key_aad"]),
        ),
        # Reversed: the encoder, not the caller, puts the context in canonical order.
        context=dict(reversed([tuple(p) for p in vector["context"]])),
        segment_size=vector["segment_size"],
        suite=vector["suite"],
    )
    return header, keys


@pytest.mark.parametrize("vector", valid_vectors(), ids=lambda v: v["name"])
def test_valid_vector_reencrypts_to_the_same_bytes(vector: dict) -> None:
    plaintext = bytes.fromhex(vector["plaintext"])
    header, keys = _seal(vector)
    out = io.BytesIO()
    assert fmt.encrypt_stream(io.BytesIO(plaintext), out, header, keys) == len(plaintext)
    assert out.getvalue().hex() == vector["file"]

    # The incremental writer produces the same canonical encoding, whatever the write sizes.
    out = io.BytesIO()
    writer = fmt.EncryptingWriter(out, header, keys)
    for i in range(0, len(plaintext), 700):
        writer.write(plaintext[i : i + 700])
    writer.close()
    assert out.getvalue().hex() == vector["file"]


# -- invalid vectors ---------------------------------------------------------------------------


@pytest.mark.parametrize("vector", invalid_vectors(), ids=lambda v: v["name"])
@pytest.mark.parametrize("read", READERS, ids=lambda f: f.__name__)
def test_invalid_vector_fails_with_the_named_error(vector: dict, read) -> None:
    blob, key = bytes.fromhex(vector["file"]), bytes.fromhex(vector["data_key"])
    error = ERRORS[vector["error"]]
    with pytest.raises(Error) as caught:
        read(blob, key)
    assert type(caught.value) is error, f"{vector['name']}: got {type(caught.value).__name__}"


@pytest.mark.parametrize("vector", invalid_vectors(), ids=lambda v: v["name"])
def test_invalid_vector_fails_at_the_named_stage(vector: dict) -> None:
    blob, key = bytes.fromhex(vector["file"]), bytes.fromhex(vector["data_key"])
    assert vector["fails_at"] in ("header", "segments")
    if vector["fails_at"] == "header":
        with pytest.raises(ERRORS[vector["error"]]):
            open_header(blob, key)
    else:
        open_header(blob, key)  # the header parses and verifies with this data key
    assert vector["base"] in {v["name"] for v in valid_vectors()}


# -- the generator -----------------------------------------------------------------------------


def test_generator_check_passes() -> None:
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_generator_check_detects_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "format_v1.json"
    stale.write_text(VECTORS.read_text(encoding="utf-8").replace('"empty"', '"emptY"', 1))
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--check", "--output", str(stale)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0


# -- from first principles (docs/format.md only; no ppml_kms code) -----------------------------


def test_first_principles_decode() -> None:
    vector = by_name("three_segments_context")
    blob = bytes.fromhex(vector["file"])
    data_key = bytes.fromhex(vector["data_key"])

    # Fixed fields: magic (7) | version u8 | suite u16 | header length u32 | segment size u32
    #               | salt (32) | nonce prefix (7), big-endian.
    magic, version, suite, header_len, seg = struct.unpack_from(">7sBHII", blob, 0)
    assert (magic, version, suite) == (b"PPMLKMS", 1, 1)
    assert seg == vector["segment_size"] == 1024
    salt, prefix = blob[18:50], blob[50:57]
    assert (salt.hex(), prefix.hex()) == (vector["salt"], vector["nonce_prefix"])

    # Variable fields, each length-prefixed; then the 32-byte tag ends the header.
    pos = 57

    def take(width: int) -> bytes:
        nonlocal pos
        (n,) = struct.unpack_from(">B" if width == 1 else ">H", blob, pos)
        pos += width + n
        return blob[pos - n : pos]

    kms_type, key_id, wrapped, aad = take(1), take(2), take(2), take(2)
    (count,) = struct.unpack_from(">H", blob, pos)
    pos += 2
    pairs = [[take(2).decode(), take(2).decode()] for _ in range(count)]
    assert pos == header_len - 32
    assert kms_type.decode("ascii") == vector["kms"]["kms_type"]
    assert key_id.decode() == vector["kms"]["key_id"]
    kms = vector["kms"]
    assert (wrapped.hex(), aad.hex()) == (kms["wrapped_key"], kms["data_key_aad"])
    assert pairs == vector["context"] and count == 4
    assert [k.encode() for k, _ in pairs] == sorted(k.encode() for k, _ in pairs)

    # HKDF-SHA256(ikm = data key, salt = file salt, info = "ppml-kms file v1" || suite u16) -> 64.
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=64,
        salt=salt,
        info=b"ppml-kms file v1\x00\x01",
    ).derive(data_key)
    file_key, header_key = okm[:32], okm[32:]

    # Header tag: HMAC-SHA256(header key, every header byte before the tag).
    tag = blob[header_len - 32 : header_len]
    expected = hmac.new(header_key, blob[: header_len - 32], hashlib.sha256).digest()
    assert hmac.compare_digest(expected, tag)
    wrong = HKDF(algorithm=hashes.SHA256(), length=64, salt=salt, info=b"ppml-kms file v1\x00\x01")
    wrong_header_key = wrong.derive(bytes(32))[32:]
    assert hmac.new(wrong_header_key, blob[: header_len - 32], hashlib.sha256).digest() != tag

    # Segments: stride = segment size + 16; nonce = prefix || u32 BE index || last flag;
    # AAD = header tag. The number of segments follows from the file size.
    stride = seg + 16
    body = len(blob) - header_len
    full, rem = divmod(body, stride)
    count = full + (1 if rem else 0)
    assert count == vector["intermediate"]["num_segments"] == 3
    aead = AESGCM(file_key)
    plaintext = b""
    for i in range(count):
        segment = blob[header_len + i * stride : header_len + (i + 1) * stride]
        last = i == count - 1
        nonce = prefix + i.to_bytes(4, "big") + (b"\x01" if last else b"\x00")
        assert len(nonce) == 12
        plaintext += aead.decrypt(nonce, segment, tag)
    assert plaintext.hex() == vector["plaintext"]

    # Segment 0 with the wrong flag, the wrong index or without the header tag does not open.
    seg0 = blob[header_len : header_len + stride]
    for nonce, ad in [
        (prefix + (0).to_bytes(4, "big") + b"\x01", tag),
        (prefix + (1).to_bytes(4, "big") + b"\x00", tag),
        (prefix + (0).to_bytes(4, "big") + b"\x00", b""),
    ]:
        with pytest.raises(InvalidTag):
            aead.decrypt(nonce, seg0, ad)
