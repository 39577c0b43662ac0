#!/usr/bin/env python3
"""Generate the test vectors of the ppml-kms encrypted file format v1.

Writes ``tests/vectors/format_v1.json`` (schema: the ``schema`` member of that file, and
``docs/format.md`` for the format itself). Every input is fixed (data keys, salts, nonce
prefixes, plaintexts, KMS descriptor, encryption contexts), and AES-GCM, HKDF and HMAC are
deterministic, so running this script twice gives byte-identical output.

Valid files are produced by the library's public functions ``derive_keys``, ``seal_header`` and
``encrypt_stream`` with a fixed salt and nonce prefix. Invalid files are edits of valid ones; a
few are forged *with* the data key (correct tags, wrong structure) so that a decoder which only
checks cryptography, and not the canonical layout, is caught.

Usage::

    python scripts/make_format_vectors.py            # (re)write the JSON file
    python scripts/make_format_vectors.py --check    # exit 1 if the committed file is stale
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import io
import json
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # use the working tree's code, installed or not

from ppml_kms import format as fmt  # noqa: E402
from ppml_kms.format import constants as c  # noqa: E402

OUTPUT = ROOT / "tests" / "vectors" / "format_v1.json"

SEG = 1024  # small segments (c.MIN_SEGMENT_SIZE) keep multi-segment vectors short


def fixed_bytes(label: str, n: int) -> bytes:
    """Deterministic, random-looking bytes: SHAKE-256 of a label."""
    return hashlib.shake_256(f"ppml-kms format v1 test vectors: {label}".encode()).digest(n)


DATA_KEY = fixed_bytes("data key", 32)
OTHER_DATA_KEY = fixed_bytes("another data key", 32)
KMS = fmt.KmsDescriptor(
    kms_type="ehsm",
    key_id="5d7f0a52-1c2b-4e8f-9a3d-6b1e2c4d8f00",
    wrapped_key=fixed_bytes("wrapped data key (opaque to the format)", 72),
    data_key_aad=b"ppml-kms data key",
)
CONTEXT = {
    "path": "examples/data/iris/iris_1.csv",
    "Owner": "analytics",
    "r\u00e9gion": "eu-west",
    "empty": "",
}

assert c.MIN_SEGMENT_SIZE <= SEG <= c.MAX_SEGMENT_SIZE

SCHEMA = {
    "valid[]": {
        "name": "unique identifier of the vector",
        "description": "what the vector exercises",
        "data_key": "hex; the plaintext data key (HKDF input keying material)",
        "salt": "hex, 32 bytes; the header salt",
        "nonce_prefix": "hex, 7 bytes; the header nonce prefix",
        "suite": "algorithm suite id (1)",
        "segment_size": "plaintext bytes per segment",
        "kms": "object: kms_type (ASCII), key_id (text), wrapped_key (hex), data_key_aad (hex)",
        "context": "list of [key, value] string pairs in header order "
        "(sorted by the UTF-8 bytes of the key)",
        "plaintext": "hex",
        "intermediate": "object: file_key, header_key, header_tag (hex), header_size, "
        "num_segments, file_size (integers)",
        "file": "hex; the exact encrypted file",
    },
    "invalid[]": {
        "name": "unique identifier of the vector",
        "description": "how the file was derived from its base vector",
        "base": "name of the valid vector it was derived from",
        "data_key": "hex; the data key to try (the base's unless the case is about a wrong key)",
        "file": "hex; the bytes to decrypt",
        "error": "InvalidCiphertext (integrity failure) or FormatError "
        "(not a file this version reads)",
        "fails_at": "'header' (parsing or header-tag check fails) or 'segments' (the header "
        "verifies with data_key, a segment or the segment layout fails)",
    },
}


# -- valid vectors -----------------------------------------------------------------------------


def encrypt(
    plaintext: bytes,
    *,
    data_key: bytes = DATA_KEY,
    salt: bytes,
    nonce_prefix: bytes,
    segment_size: int = SEG,
    context: dict[str, str] | None = None,
) -> tuple[bytes, fmt.Header, fmt.FileKeys]:
    keys = fmt.derive_keys(data_key, salt)
    header = fmt.seal_header(
        keys=keys,
        salt=salt,
        nonce_prefix=nonce_prefix,
        kms=KMS,
        context=context,
        segment_size=segment_size,
    )
    out = io.BytesIO()
    fmt.encrypt_stream(io.BytesIO(plaintext), out, header, keys)
    return out.getvalue(), header, keys


VALID_SPECS: list[dict] = [
    {"name": "empty", "n": 0, "description": "empty plaintext: one empty segment flagged last"},
    {"name": "one_byte", "n": 1, "description": "one plaintext byte"},
    {"name": "segment_minus_one", "n": SEG - 1, "description": "one byte short of a full segment"},
    {"name": "one_full_segment", "n": SEG, "description": "exactly one full segment, flagged last"},
    {"name": "segment_plus_one", "n": SEG + 1, "description": "a full segment, a 1-byte final one"},
    {
        "name": "two_full_segments",
        "n": 2 * SEG,
        "description": "two full segments; the second is flagged last (no empty trailer)",
    },
    {
        "name": "three_segments_context",
        "n": 2 * SEG + 100,
        "context": CONTEXT,
        "description": "two full segments and a partial one, non-empty encryption context "
        "(non-ASCII key, empty value, keys given unsorted); base of most invalid vectors",
    },
    {
        "name": "three_segments_context_other_file",
        "n": 2 * SEG + 100,
        "context": CONTEXT,
        "salt_label": "salt 2",
        "prefix_label": "nonce prefix 2",
        "plaintext_label": "three_segments_context",
        "description": "same data key, plaintext and context as three_segments_context, another "
        "salt and nonce prefix: every byte after the fixed fields differs",
    },
    {
        "name": "five_segments",
        "n": 4 * SEG + 517,
        "context": {"dataset": "iris"},
        "description": "several segments, one context entry",
    },
    {
        "name": "min_data_key",
        "n": 100,
        "data_key": fixed_bytes("16-byte data key", c.MIN_DATA_KEY_SIZE),
        "description": f"a {c.MIN_DATA_KEY_SIZE}-byte data key (HKDF input need not be 32 bytes)",
    },
    {
        "name": "default_segment_size",
        "n": None,
        "plaintext": b"sepal length,sepal width,petal length,petal width,class\n"
        b"6.6,3.0,4.4,1.4,Iris-versicolor\n",
        "segment_size": c.DEFAULT_SEGMENT_SIZE,
        "context": {"path": "iris_2.csv"},
        "description": "default segment size (1 MiB) with a short text plaintext",
    },
]


def build_valid() -> tuple[list[dict], dict[str, dict]]:
    vectors, internals = [], {}
    for spec in VALID_SPECS:
        name = spec["name"]
        data_key = spec.get("data_key", DATA_KEY)
        salt = fixed_bytes(spec.get("salt_label", "salt"), c.SALT_SIZE)
        prefix = fixed_bytes(spec.get("prefix_label", "nonce prefix"), c.NONCE_PREFIX_SIZE)
        plaintext = spec.get("plaintext") or fixed_bytes(
            "plaintext " + spec.get("plaintext_label", name), spec["n"]
        )
        segment_size = spec.get("segment_size", SEG)
        blob, header, keys = encrypt(
            plaintext,
            data_key=data_key,
            salt=salt,
            nonce_prefix=prefix,
            segment_size=segment_size,
            context=spec.get("context"),
        )
        # Cross-check the library against an encoder written from docs/format.md.
        assert header.raw == independent_header(
            keys.header_key, salt=salt, prefix=prefix, segment_size=segment_size,
            pairs=[(k.encode(), v.encode()) for k, v in header.context],
        ), name
        num_segments = max(1, -(-len(plaintext) // segment_size))
        assert len(blob) == header.size + len(plaintext) + num_segments * c.TAG_SIZE
        vectors.append(
            {
                "name": name,
                "description": spec["description"],
                "data_key": data_key.hex(),
                "salt": salt.hex(),
                "nonce_prefix": prefix.hex(),
                "suite": header.suite,
                "segment_size": segment_size,
                "kms": {
                    "kms_type": KMS.kms_type,
                    "key_id": KMS.key_id,
                    "wrapped_key": KMS.wrapped_key.hex(),
                    "data_key_aad": KMS.data_key_aad.hex(),
                },
                "context": [list(pair) for pair in header.context],
                "plaintext": plaintext.hex(),
                "intermediate": {
                    "file_key": keys.file_key.hex(),
                    "header_key": keys.header_key.hex(),
                    "header_tag": header.tag.hex(),
                    "header_size": header.size,
                    "num_segments": num_segments,
                    "file_size": len(blob),
                },
                "file": blob.hex(),
            }
        )
        internals[name] = {
            "blob": blob, "header": header, "keys": keys,
            "plaintext": plaintext, "data_key": data_key,
        }
    return vectors, internals


# -- an independent header encoder (for forged headers and for cross-checking) ----------------


def _lp16(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def independent_header(
    header_key: bytes,
    *,
    salt: bytes,
    prefix: bytes,
    segment_size: int,
    pairs: list[tuple[bytes, bytes]],
    kms_type: bytes | None = None,
    slack: bytes = b"",
) -> bytes:
    """Serialize a v1 header as docs/format.md describes it, without any validation."""
    kms_type = KMS.kms_type.encode("ascii") if kms_type is None else kms_type
    variable = (
        struct.pack(">B", len(kms_type)) + kms_type
        + _lp16(KMS.key_id.encode("utf-8"))
        + _lp16(KMS.wrapped_key)
        + _lp16(KMS.data_key_aad)
        + struct.pack(">H", len(pairs))
        + b"".join(_lp16(k) + _lp16(v) for k, v in pairs)
        + slack
    )
    total = 57 + len(variable) + 32
    body = b"PPMLKMS" + struct.pack(">BHII", 1, 1, total, segment_size) + salt + prefix + variable
    return body + hmac.new(header_key, body, hashlib.sha256).digest()


# -- invalid vectors ---------------------------------------------------------------------------


def flip(blob: bytes, offset: int, mask: int = 0x01) -> bytes:
    out = bytearray(blob)
    out[offset] ^= mask
    return bytes(out)


def split(blob: bytes, header: fmt.Header) -> tuple[bytes, list[bytes]]:
    body = blob[header.size :]
    stride = header.segment_size + c.TAG_SIZE
    return blob[: header.size], [body[i : i + stride] for i in range(0, len(body), stride)]


def build_invalid(internals: dict[str, dict]) -> list[dict]:
    cases: list[dict] = []

    def add(name, base, blob, error, fails_at, description, data_key=None):
        cases.append(
            {
                "name": name,
                "description": description,
                "base": base,
                "data_key": (data_key or internals[base]["data_key"]).hex(),
                "file": blob.hex(),
                "error": error,
                "fails_at": fails_at,
            }
        )

    IC, FE = "InvalidCiphertext", "FormatError"
    base = "three_segments_context"
    b = internals[base]
    blob, header, keys = b["blob"], b["header"], b["keys"]
    head, segs = split(blob, header)
    assert len(segs) == 3 and len(segs[2]) == 100 + c.TAG_SIZE
    stride = SEG + c.TAG_SIZE
    h = header.size

    # Integrity of segments.
    add("segment_bit_flip", base, flip(blob, h + stride + 10), IC, "segments",
        "one bit flipped in the ciphertext of segment 1")
    add("segment_tag_bit_flip", base, flip(blob, len(blob) - 1, 0x80), IC, "segments",
        "one bit flipped in the GCM tag of the final segment")
    add("truncated_at_segment_boundary", base, head + segs[0], IC, "segments",
        "cut after segment 0: the now-final segment was not sealed as the last one")
    add("truncated_mid_segment", base, blob[: h + stride + 500], IC, "segments",
        "cut 500 bytes into segment 1")
    add("truncated_last_byte", base, blob[:-1], IC, "segments",
        "the last byte (of the final segment's tag) removed")
    add("final_segment_dropped", base, head + segs[0] + segs[1], IC, "segments",
        "the final (partial) segment removed; the file now ends on a full segment")
    add("header_only", base, head, IC, "segments",
        "every segment removed: a file always has at least one segment")
    add("segments_swapped", base, head + segs[1] + segs[0] + segs[2], IC, "segments",
        "segments 0 and 1 exchanged")
    add("segment_duplicated", base, head + segs[0] + segs[0] + segs[1] + segs[2], IC, "segments",
        "segment 0 repeated at position 1")
    add("appended_byte", base, blob + b"\x00", IC, "segments", "one zero byte appended")
    add("appended_segment", base, blob + segs[1], IC, "segments",
        "a copy of segment 1 appended after the final segment")
    other = internals["three_segments_context_other_file"]
    other_head, _ = split(other["blob"], other["header"])
    add("header_of_another_file", base, other_head + segs[0] + segs[1] + segs[2], IC, "segments",
        "header of three_segments_context_other_file (same data key, so it verifies) followed "
        "by the segments of three_segments_context")

    # Forged with the key: cryptographically valid segments, non-canonical STREAM layout.
    cipher = fmt.SegmentCipher(header, keys)
    p = b["plaintext"]
    add("final_segment_not_flagged", base,
        head + segs[0] + segs[1] + cipher.seal(2, p[2 * SEG :], False), IC, "segments",
        "forged with the key: the final segment sealed with last-flag 0")
    add("early_segment_flagged_last", base,
        head + cipher.seal(0, p[:SEG], True) + segs[1] + segs[2], IC, "segments",
        "forged with the key: segment 0 sealed with last-flag 1 but followed by more segments")
    full = internals["two_full_segments"]
    fhead, fsegs = split(full["blob"], full["header"])
    fcipher = fmt.SegmentCipher(full["header"], full["keys"])
    add("empty_final_segment_after_full", "two_full_segments",
        fhead + fcipher.seal(0, full["plaintext"][:SEG], False)
        + fcipher.seal(1, full["plaintext"][SEG:], False) + fcipher.seal(2, b"", True),
        IC, "segments",
        "forged with the key: two full segments with flag 0, then an empty segment flagged last "
        "(only the empty file may end in an empty segment)")
    empty = internals["empty"]
    ehead, _ = split(empty["blob"], empty["header"])
    add("empty_segment_not_flagged", "empty",
        ehead + fmt.SegmentCipher(empty["header"], empty["keys"]).seal(0, b"", False),
        IC, "segments",
        "forged with the key: the empty file's only segment sealed with last-flag 0")

    # Header integrity and key commitment.
    add("wrong_data_key", base, blob, IC, "header",
        "the unmodified file tried with another data key: the header tag fails",
        data_key=OTHER_DATA_KEY)
    add("header_salt_bit_flip", base, flip(blob, 18 + 5), IC, "header",
        "one bit flipped in the salt")
    ctx_value = b"analytics"
    pos = blob.index(ctx_value, 57)
    assert pos < h - 32
    add("header_context_bit_flip", base, flip(blob, pos, 0x02), IC, "header",
        "one bit flipped in an encryption context value ('analytics' -> 'cnalytics')")
    add("header_segment_size_edited", base, flip(blob, 14 + 3, 0x01), IC, "header",
        "segment size field changed from 1024 to 1025 (in bounds, but authenticated)")
    add("header_tag_bit_flip", base, flip(blob, h - 1, 0x40), IC, "header",
        "one bit flipped in the header tag")
    longer = bytearray(blob)
    longer[10:14] = struct.pack(">I", h + 1)
    add("header_length_edited", base, bytes(longer), IC, "header",
        "header length field increased by one")
    big = bytearray(blob)
    big[10:14] = struct.pack(">I", c.MAX_HEADER_SIZE + 1)
    add("header_length_too_large", base, bytes(big), IC, "header",
        f"header length field set to {c.MAX_HEADER_SIZE + 1}, above the {c.MAX_HEADER_SIZE} limit")
    small = bytearray(blob)
    small[14:18] = struct.pack(">I", c.MIN_SEGMENT_SIZE // 2)
    add("segment_size_too_small", base, bytes(small), IC, "header",
        f"segment size field set to {c.MIN_SEGMENT_SIZE // 2}, "
        f"below the {c.MIN_SEGMENT_SIZE} minimum")
    add("truncated_in_header", base, blob[:60], IC, "header", "only the first 60 bytes")
    add("truncated_in_fixed_fields", base, blob[:12], IC, "header",
        "only the first 12 bytes (magic and version are intact)")

    # Forged with the key: correct header tag, non-canonical header structure.
    def forged(name, description, **kw):
        pairs = kw.pop("pairs", [(k.encode(), v.encode()) for k, v in header.context])
        raw = independent_header(
            keys.header_key, salt=header.salt, prefix=header.nonce_prefix,
            segment_size=SEG, pairs=pairs, **kw,
        )
        add(name, base, raw + b"".join(segs), IC, "header", "forged with the key (valid header "
            "tag): " + description)

    ordered = [(k.encode(), v.encode()) for k, v in header.context]
    forged("context_not_sorted", "the first two context pairs in the wrong order",
           pairs=[ordered[1], ordered[0], *ordered[2:]])
    forged("context_duplicate_key", "a context key repeated",
           pairs=[*ordered, (ordered[-1][0], b"x")])
    forged("context_empty_key", "a context pair with an empty key", pairs=[(b"", b"v"), *ordered])
    forged("header_trailing_byte", "one extra byte between the context and the tag "
           "(header length counts it)", slack=b"\x00")
    forged("empty_kms_type", "a zero-length KMS type", kms_type=b"")
    forged("context_invalid_utf8", "a context value that is not UTF-8",
           pairs=[*ordered[:-1], (ordered[-1][0], b"\xff\xfe")])

    # Not a file this version reads.
    add("bad_magic", base, b"Q" + blob[1:], FE, "header", "first magic byte changed")
    add("unsupported_version", base, blob[:7] + b"\x02" + blob[8:], FE, "header",
        "version byte 2")
    add("future_version_short", base, b"PPMLKMS\x02\x00", FE, "header",
        "magic and version 2 only: the version is recognised before any other field is needed")
    add("unsupported_suite", base, blob[:8] + b"\x00\x02" + blob[10:], FE, "header",
        "suite id 2")
    add("not_encrypted", base, b"sepal length,sepal width,petal length,petal width,class\n",
        FE, "header", "a plain CSV file")
    add("empty_input", base, b"", FE, "header", "zero bytes (shorter than the magic)")

    names = [case["name"] for case in cases]
    assert len(names) == len(set(names))
    return cases


# -- output ------------------------------------------------------------------------------------


def generate() -> str:
    valid, internals = build_valid()
    document = {
        "description": "Test vectors of the ppml-kms encrypted file format, version 1 "
        "(spec: docs/format.md). All inputs are fixed; the files are exact.",
        "format_version": c.VERSION,
        "generator": "scripts/make_format_vectors.py",
        "schema": SCHEMA,
        "valid": valid,
        "invalid": build_invalid(internals),
    }
    return json.dumps(document, indent=2, ensure_ascii=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if the file differs from the generated text")
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"default: {OUTPUT}")
    args = parser.parse_args(argv)
    text = generate()
    if args.check:
        try:
            current = args.output.read_text(encoding="utf-8")
        except FileNotFoundError:
            print(f"{args.output} does not exist; run {Path(__file__).name}", file=sys.stderr)
            return 1
        if current != text:
            print(f"{args.output} is out of date; run {Path(__file__).name}", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8", newline="\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
