"""Header of the v1 encrypted file format: structure, serialization, parsing, authentication.

Layout (big-endian; ``docs/format.md`` is the normative description)::

    magic "PPMLKMS" (7) | version u8 (=1) | suite u16 | header length u32 | segment size u32
    | salt (32) | nonce prefix (7)
    | kms type (u8 len + ASCII) | key id (u16 len + UTF-8) | wrapped data key (u16 len + bytes)
    | data-key AAD (u16 len + bytes)
    | context: u16 count, then count x (u16 len + UTF-8 key, u16 len + UTF-8 value), keys sorted, unique
    | header tag (32) = HMAC-SHA256(header key, every header byte before the tag)

The file key and the header key come from HKDF-SHA256(data key, salt, info). Because the tag is
an HMAC under a key derived from the data key, checking it both authenticates the header and
commits to the data key: a wrong data key fails here, before any segment is touched.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import BinaryIO

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..exceptions import FormatError, InvalidCiphertext
from . import constants as c

__all__ = [
    "FileKeys",
    "Header",
    "KmsDescriptor",
    "derive_keys",
    "parse_header",
    "read_header",
    "seal_header",
]

_FIXED = struct.Struct(">7sBHII")
_KMS_TYPE = re.compile(r"[a-z0-9._-]{1,32}")  # magic, version, suite, header length, segment size


@dataclass(frozen=True)
class KmsDescriptor:
    """Where the data key comes from: the KMS kind, the primary key token and the wrapped data key."""

    kms_type: str
    key_id: str
    wrapped_key: bytes = field(repr=False)
    data_key_aad: bytes = b""


@dataclass(frozen=True)
class Header:
    """A parsed (not yet authenticated) or sealed header."""

    suite: int
    segment_size: int
    salt: bytes
    nonce_prefix: bytes
    kms: KmsDescriptor
    context: tuple[tuple[str, str], ...]
    #: The serialized header, tag included; its length is where segment 0 starts.
    raw: bytes = field(repr=False)

    @property
    def size(self) -> int:
        return len(self.raw)

    @property
    def tag(self) -> bytes:
        return self.raw[-c.HEADER_TAG_SIZE :]

    @property
    def context_dict(self) -> dict[str, str]:
        return dict(self.context)


class FileKeys:
    """The two keys derived for one file. Refuses pickling and keeps its bytes out of ``repr``."""

    __slots__ = ("file_key", "header_key")

    def __init__(self, file_key: bytes, header_key: bytes) -> None:
        self.file_key = file_key
        self.header_key = header_key

    def __repr__(self) -> str:
        return "FileKeys(<redacted>)"

    def __reduce__(self) -> object:
        raise TypeError("FileKeys holds key material and cannot be pickled")


def derive_keys(data_key: bytes, salt: bytes, suite: int = c.SUITE_AES256GCM_HKDF_SHA256) -> FileKeys:
    """Derive the per-file AES key and header-MAC key from ``data_key`` and the file's ``salt``.

    Raises:
        ValueError: the data key length is outside the supported range.
    """
    if not c.MIN_DATA_KEY_SIZE <= len(data_key) <= c.MAX_DATA_KEY_SIZE:
        raise ValueError(
            f"data key must be {c.MIN_DATA_KEY_SIZE}..{c.MAX_DATA_KEY_SIZE} bytes, got {len(data_key)}"
        )
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=c.FILE_KEY_SIZE + c.HEADER_KEY_SIZE,
        salt=salt,
        info=c.HKDF_INFO + struct.pack(">H", suite),
    ).derive(bytes(data_key))
    return FileKeys(okm[: c.FILE_KEY_SIZE], okm[c.FILE_KEY_SIZE :])


def _normalize_context(context: Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
    if not context:
        return ()
    if len(context) > c.MAX_CONTEXT_PAIRS:
        raise ValueError(f"encryption context has more than {c.MAX_CONTEXT_PAIRS} entries")
    items = []
    for key, value in context.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError("encryption context keys and values must be strings")
        if not key:
            raise ValueError("encryption context keys must not be empty")
        for item in (key, value):
            if len(item.encode("utf-8")) > c.MAX_CONTEXT_ITEM_LENGTH:
                raise ValueError(
                    f"encryption context entries are limited to {c.MAX_CONTEXT_ITEM_LENGTH} bytes"
                )
        items.append((key, value))
    return tuple(sorted(items, key=lambda kv: kv[0].encode("utf-8")))


def _lp(data: bytes, width: int, limit: int, what: str) -> bytes:
    if len(data) > limit:
        raise ValueError(f"{what} is longer than {limit} bytes")
    return (struct.pack(">B", len(data)) if width == 1 else struct.pack(">H", len(data))) + data


def seal_header(
    *,
    keys: FileKeys,
    salt: bytes,
    nonce_prefix: bytes,
    kms: KmsDescriptor,
    context: Mapping[str, str] | None = None,
    segment_size: int = c.DEFAULT_SEGMENT_SIZE,
    suite: int = c.SUITE_AES256GCM_HKDF_SHA256,
) -> Header:
    """Serialize and authenticate a header.

    Raises:
        ValueError: a field is out of bounds.
    """
    if suite not in c.SUPPORTED_SUITES:
        raise ValueError(f"unsupported suite {suite}")
    if not c.MIN_SEGMENT_SIZE <= segment_size <= c.MAX_SEGMENT_SIZE:
        raise ValueError(
            f"segment size must be {c.MIN_SEGMENT_SIZE}..{c.MAX_SEGMENT_SIZE} bytes, got {segment_size}"
        )
    if len(salt) != c.SALT_SIZE or len(nonce_prefix) != c.NONCE_PREFIX_SIZE:
        raise ValueError("salt must be 32 bytes and nonce prefix 7 bytes")
    ctx = _normalize_context(context)
    if not _KMS_TYPE.fullmatch(kms.kms_type):
        raise ValueError("KMS type must be 1-32 characters of a-z, 0-9, '.', '_' or '-'")
    kms_type = kms.kms_type.encode("ascii")
    parts = [
        _lp(kms_type, 1, c.MAX_KMS_TYPE_LENGTH, "KMS type"),
        _lp(kms.key_id.encode("utf-8"), 2, c.MAX_KEY_ID_LENGTH, "key id"),
        _lp(bytes(kms.wrapped_key), 2, c.MAX_WRAPPED_KEY_LENGTH, "wrapped data key"),
        _lp(bytes(kms.data_key_aad), 2, c.MAX_DATA_KEY_AAD_LENGTH, "data-key AAD"),
        struct.pack(">H", len(ctx)),
    ]
    for key, value in ctx:
        parts.append(_lp(key.encode("utf-8"), 2, c.MAX_CONTEXT_ITEM_LENGTH, "context key"))
        parts.append(_lp(value.encode("utf-8"), 2, c.MAX_CONTEXT_ITEM_LENGTH, "context value"))
    variable = b"".join(parts)
    total = c.FIXED_HEADER_SIZE + len(variable) + c.HEADER_TAG_SIZE
    if total > c.MAX_HEADER_SIZE:
        raise ValueError(f"header would be {total} bytes, more than {c.MAX_HEADER_SIZE}")
    body = (
        _FIXED.pack(c.MAGIC, c.VERSION, suite, total, segment_size) + salt + nonce_prefix + variable
    )
    tag = hmac.new(keys.header_key, body, hashlib.sha256).digest()
    return Header(suite, segment_size, bytes(salt), bytes(nonce_prefix), kms, ctx, body + tag)


class _Cursor:
    """Bounded reader over the header bytes; any overrun is a malformed header."""

    def __init__(self, data: bytes, pos: int) -> None:
        self.data = data
        self.pos = pos

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise InvalidCiphertext("encrypted file header is malformed")
        out = self.data[self.pos : end]
        self.pos = end
        return out

    def lp(self, width: int, limit: int) -> bytes:
        (n,) = struct.unpack(">B" if width == 1 else ">H", self.take(width))
        if n > limit:
            raise InvalidCiphertext("encrypted file header is malformed")
        return self.take(n)

    def text(self, width: int, limit: int, encoding: str = "utf-8") -> str:
        try:
            return self.lp(width, limit).decode(encoding)
        except UnicodeDecodeError:
            raise InvalidCiphertext("encrypted file header is malformed") from None


def _parse_fixed(prefix: bytes) -> tuple[int, int, int]:
    """Check magic, version and suite; return (suite, header length, segment size)."""
    if len(prefix) < len(c.MAGIC) or prefix[: len(c.MAGIC)] != c.MAGIC:
        raise FormatError("not a ppml-kms encrypted file (bad magic)")
    if len(prefix) < len(c.MAGIC) + 1:
        raise InvalidCiphertext("encrypted file is truncated")
    version = prefix[len(c.MAGIC)]
    if version != c.VERSION:
        raise FormatError(
            f"unsupported ppml-kms file format version {version} (this release reads version {c.VERSION})"
        )
    if len(prefix) < _FIXED.size:
        raise InvalidCiphertext("encrypted file is truncated")
    _, _, suite, total, segment_size = _FIXED.unpack_from(prefix)
    if suite not in c.SUPPORTED_SUITES:
        raise FormatError(f"unsupported algorithm suite {suite} in encrypted file")
    # Smallest variable part: a 1-byte KMS type, empty key id, wrapped key, AAD and context.
    minimum = c.FIXED_HEADER_SIZE + (1 + 1) + 2 + 2 + 2 + 2 + c.HEADER_TAG_SIZE
    if not minimum <= total <= c.MAX_HEADER_SIZE:
        raise InvalidCiphertext("encrypted file header is malformed")
    if not c.MIN_SEGMENT_SIZE <= segment_size <= c.MAX_SEGMENT_SIZE:
        raise InvalidCiphertext("encrypted file header is malformed")
    return suite, total, segment_size


def parse_header(data: bytes) -> Header:
    """Parse a header from ``data`` (which may continue past it). The tag is NOT checked here.

    Raises:
        FormatError: not a ppml-kms file, or an unknown version or suite.
        InvalidCiphertext: the header is truncated or malformed.
    """
    suite, total, segment_size = _parse_fixed(data[: _FIXED.size])
    if len(data) < total:
        raise InvalidCiphertext("encrypted file is truncated")
    raw = bytes(data[:total])
    cur = _Cursor(raw[: total - c.HEADER_TAG_SIZE], _FIXED.size)
    salt = cur.take(c.SALT_SIZE)
    nonce_prefix = cur.take(c.NONCE_PREFIX_SIZE)
    kms_type = cur.text(1, c.MAX_KMS_TYPE_LENGTH, "ascii")
    key_id = cur.text(2, c.MAX_KEY_ID_LENGTH)
    wrapped = cur.lp(2, c.MAX_WRAPPED_KEY_LENGTH)
    aad = cur.lp(2, c.MAX_DATA_KEY_AAD_LENGTH)
    (count,) = struct.unpack(">H", cur.take(2))
    if count > c.MAX_CONTEXT_PAIRS:
        raise InvalidCiphertext("encrypted file header is malformed")
    pairs: list[tuple[str, str]] = []
    for _ in range(count):
        key = cur.text(2, c.MAX_CONTEXT_ITEM_LENGTH)
        value = cur.text(2, c.MAX_CONTEXT_ITEM_LENGTH)
        if not key or (pairs and pairs[-1][0].encode() >= key.encode()):
            raise InvalidCiphertext("encrypted file header is malformed")
        pairs.append((key, value))
    if cur.pos != len(cur.data) or not _KMS_TYPE.fullmatch(kms_type):
        raise InvalidCiphertext("encrypted file header is malformed")
    return Header(
        suite,
        segment_size,
        salt,
        nonce_prefix,
        KmsDescriptor(kms_type, key_id, wrapped, aad),
        tuple(pairs),
        raw,
    )


def read_header(stream: BinaryIO) -> Header:
    """Read exactly one header from ``stream`` (bounded: at most 64 KiB).

    Raises:
        FormatError, InvalidCiphertext: as :func:`parse_header`.
    """
    prefix = _read_exact(stream, _FIXED.size)
    _, total, _ = _parse_fixed(prefix)
    rest = _read_exact(stream, total - len(prefix))
    return parse_header(prefix + rest)


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    chunks = []
    remaining = n
    while remaining:
        chunk = stream.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def verify_header(header: Header, data_key: bytes) -> FileKeys:
    """Authenticate ``header`` with ``data_key`` and return the file's keys.

    Raises:
        InvalidCiphertext: wrong data key, or the header was modified.
    """
    try:
        keys = derive_keys(data_key, header.salt, header.suite)
    except ValueError:
        raise InvalidCiphertext() from None
    body = header.raw[: -c.HEADER_TAG_SIZE]
    expected = hmac.new(keys.header_key, body, hashlib.sha256).digest()
    if not hmac.compare_digest(expected, header.tag):
        raise InvalidCiphertext()
    return keys


__all__ += ["verify_header"]
