"""The v1 format on its own: round trips, canonical encodings, tamper evidence, random access."""

from __future__ import annotations

import io
import os
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ppml_kms import format as fmt
from ppml_kms.exceptions import FormatError, InvalidCiphertext
from ppml_kms.format import constants as c

SEG = 1024  # small segments keep multi-segment cases cheap


def make_header(data_key: bytes, *, context=None, segment_size: int = SEG, wrapped: bytes = b"wrapped"):
    salt, prefix = os.urandom(c.SALT_SIZE), os.urandom(c.NONCE_PREFIX_SIZE)
    keys = fmt.derive_keys(data_key, salt)
    header = fmt.seal_header(
        keys=keys,
        salt=salt,
        nonce_prefix=prefix,
        kms=fmt.KmsDescriptor("ehsm", "aac3e45a-d3dc-4791-89b6-4ada0e38e6ef", wrapped, b"aad"),
        context=context,
        segment_size=segment_size,
    )
    return header, keys


def encrypt(plaintext: bytes, data_key: bytes, **kwargs) -> bytes:
    header, keys = make_header(data_key, **kwargs)
    out = io.BytesIO()
    fmt.encrypt_stream(io.BytesIO(plaintext), out, header, keys)
    return out.getvalue()


def decrypt(blob: bytes, data_key: bytes) -> bytes:
    src = io.BytesIO(blob)
    header = fmt.read_header(src)
    keys = fmt.verify_header(header, data_key)
    out = io.BytesIO()
    fmt.decrypt_stream(src, out, header, keys)
    return out.getvalue()


@pytest.fixture
def key() -> bytes:
    return os.urandom(32)


SIZES = [0, 1, SEG - 1, SEG, SEG + 1, 2 * SEG, 7 * SEG + 13]


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_and_exact_length(key: bytes, size: int) -> None:
    plaintext = os.urandom(size)
    blob = encrypt(plaintext, key)
    header = fmt.parse_header(blob)
    segments = max(1, -(-size // SEG))
    assert len(blob) == header.size + size + segments * c.TAG_SIZE
    assert decrypt(blob, key) == plaintext


@pytest.mark.parametrize("size", SIZES)
def test_writer_matches_stream_encoding(key: bytes, size: int) -> None:
    plaintext = os.urandom(size)
    header, keys = make_header(key)
    whole = io.BytesIO()
    fmt.encrypt_stream(io.BytesIO(plaintext), whole, header, keys)
    pieces = io.BytesIO()
    writer = fmt.EncryptingWriter(pieces, header, keys)
    for i in range(0, size, 333):
        assert writer.write(plaintext[i : i + 333]) == len(plaintext[i : i + 333])
    writer.close()
    assert pieces.getvalue() == whole.getvalue()


@given(data=st.binary(max_size=5 * 1024 + 7), chunk=st.integers(1, 3000))
@settings(max_examples=60, deadline=None)
def test_round_trip_property(data: bytes, chunk: int) -> None:
    key = b"k" * 32
    header, keys = make_header(key)
    out = io.BytesIO()
    writer = fmt.EncryptingWriter(out, header, keys)
    for i in range(0, len(data), chunk):
        writer.write(data[i : i + chunk])
    writer.close()
    blob = out.getvalue()
    src = io.BytesIO(blob)
    parsed = fmt.read_header(src)
    reader = fmt.DecryptingReader(src, parsed, fmt.verify_header(parsed, key))
    assert reader.read() == data


def test_unclosed_writer_does_not_decrypt(key: bytes) -> None:
    header, keys = make_header(key)
    out = io.BytesIO()
    writer = fmt.EncryptingWriter(out, header, keys)
    writer.write(os.urandom(3 * SEG + 5))
    with pytest.raises(InvalidCiphertext):
        decrypt(out.getvalue(), key)


def _split(blob: bytes) -> tuple[bytes, list[bytes]]:
    header = fmt.parse_header(blob)
    body = blob[header.size :]
    stride = SEG + c.TAG_SIZE
    return blob[: header.size], [body[i : i + stride] for i in range(0, len(body), stride)]


def test_every_single_bit_flip_fails(key: bytes) -> None:
    blob = encrypt(os.urandom(2 * SEG + 100), key)
    for pos in range(0, len(blob), 7):
        tampered = bytearray(blob)
        tampered[pos] ^= 1 << (pos % 8)
        with pytest.raises((InvalidCiphertext, FormatError)):
            decrypt(bytes(tampered), key)


def test_flip_in_header_body_is_an_integrity_error(key: bytes) -> None:
    blob = encrypt(b"x" * 10, key)
    header = fmt.parse_header(blob)
    for pos in range(len(c.MAGIC) + 3, header.size):  # after magic, version, suite
        tampered = bytearray(blob)
        tampered[pos] ^= 0x80
        with pytest.raises(InvalidCiphertext):
            decrypt(bytes(tampered), key)


def test_truncation_at_and_between_segment_boundaries(key: bytes) -> None:
    blob = encrypt(os.urandom(3 * SEG + 50), key)
    header = fmt.parse_header(blob)
    stride = SEG + c.TAG_SIZE
    cuts = {header.size + k * stride for k in range(4)} | {header.size + k * stride + 9 for k in range(4)}
    cuts |= {len(blob) - 1, header.size - 1, 3, 0}
    for cut in sorted(cuts):
        with pytest.raises((InvalidCiphertext, FormatError)):
            decrypt(blob[:cut], key)


def test_dropped_duplicated_swapped_segments_and_appended_bytes(key: bytes) -> None:
    blob = encrypt(os.urandom(3 * SEG + 50), key)
    head, segs = _split(blob)
    variants = [
        head + segs[0] + segs[2] + segs[3],  # dropped
        head + segs[0] + segs[1] + segs[1] + segs[2] + segs[3],  # duplicated
        head + segs[1] + segs[0] + segs[2] + segs[3],  # swapped
        head + segs[0] + segs[1] + segs[2],  # final segment dropped
        blob + b"\x00",  # appended byte
        blob + segs[3],  # appended segment
        head + segs[0] + segs[1] + segs[2] + segs[3][:-1],
    ]
    for variant in variants:
        with pytest.raises(InvalidCiphertext):
            decrypt(variant, key)


def test_header_of_another_file_fails(key: bytes) -> None:
    a = encrypt(os.urandom(2 * SEG), key)
    b = encrypt(os.urandom(2 * SEG), key)
    head_a, _ = _split(a)
    _, segs_b = _split(b)
    with pytest.raises(InvalidCiphertext):
        decrypt(head_a + b"".join(segs_b), key)


def test_wrong_data_key_fails_at_the_header(key: bytes) -> None:
    blob = encrypt(b"secret", key)
    header = fmt.parse_header(blob)
    with pytest.raises(InvalidCiphertext):
        fmt.verify_header(header, os.urandom(32))
    with pytest.raises(InvalidCiphertext):
        fmt.verify_header(header, key[:16])


def test_context_is_bound_and_canonical(key: bytes) -> None:
    blob = encrypt(b"x", key, context={"b": "2", "a": "1"})
    header = fmt.parse_header(blob)
    assert header.context == (("a", "1"), ("b", "2"))
    assert decrypt(blob, key) == b"x"


def test_not_our_file_and_future_version() -> None:
    with pytest.raises(FormatError, match="not a ppml-kms"):
        fmt.parse_header(b"sepal length,sepal width\n1,2\n")
    with pytest.raises(FormatError, match="version 2"):
        fmt.parse_header(c.MAGIC + b"\x02" + b"\x00" * 100)


@given(st.binary(max_size=400))
@settings(max_examples=300, deadline=None)
def test_header_parser_fuzz_only_defined_errors(data: bytes) -> None:
    for blob in (data, c.MAGIC + b"\x01" + data):
        try:
            fmt.read_header(io.BytesIO(blob))
        except (FormatError, InvalidCiphertext):
            pass


@given(st.binary(max_size=3000), st.integers(0, 3000))
@settings(max_examples=100, deadline=None)
def test_reader_fuzz_on_corrupted_bodies(garbage: bytes, cut: int) -> None:
    key = b"q" * 32
    blob = encrypt(b"z" * 2100, key)
    header = fmt.parse_header(blob)
    corrupted = blob[: header.size] + garbage[:cut]
    with pytest.raises(InvalidCiphertext):
        decrypt(corrupted, key)


def test_random_access_ranges_and_segments(key: bytes) -> None:
    plaintext = os.urandom(5 * SEG + 77)
    blob = encrypt(plaintext, key)
    src = io.BytesIO(blob)
    header = fmt.read_header(src)
    reader = fmt.SegmentReader(src, header, fmt.verify_header(header, key), file_size=len(blob))
    assert (reader.num_segments, reader.plaintext_size) == (6, len(plaintext))
    assert reader.read_segment(5) == plaintext[5 * SEG :]
    assert reader.read_segment(2) == plaintext[2 * SEG : 3 * SEG]
    for offset, length in [(0, 1), (SEG - 3, 10), (3 * SEG, SEG), (5 * SEG + 70, 100), (10 * SEG, 5)]:
        assert reader.read_range(offset, length) == plaintext[offset : offset + length]


def test_random_access_detects_truncation(key: bytes) -> None:
    blob = encrypt(os.urandom(4 * SEG), key)
    stride = SEG + c.TAG_SIZE
    truncated = blob[: len(blob) - stride]  # drop the final segment exactly
    src = io.BytesIO(truncated)
    header = fmt.read_header(src)
    reader = fmt.SegmentReader(src, header, fmt.verify_header(header, key), file_size=len(truncated))
    reader.read_segment(0)  # authentic, still readable
    with pytest.raises(InvalidCiphertext):
        reader.read_segment(reader.num_segments - 1)


def test_key_holders_refuse_pickling_and_hide_keys(key: bytes) -> None:
    header, keys = make_header(key)
    for obj in (keys, fmt.SegmentCipher(header, keys)):
        with pytest.raises(TypeError):
            pickle.dumps(obj)
        assert key.hex() not in repr(obj)
    assert "wrapped" not in repr(header.kms)
