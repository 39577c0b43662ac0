"""The ppml-kms encrypted file format (v1): header, key derivation and segmented streams.

Pure: depends on ``cryptography`` only (no network, no KMS). See ``docs/format.md``.
"""

from __future__ import annotations

from .constants import DEFAULT_SEGMENT_SIZE, MAGIC, VERSION
from .header import FileKeys, Header, KmsDescriptor, derive_keys, parse_header, read_header, seal_header, verify_header
from .stream import (
    DecryptingReader,
    EncryptingWriter,
    SegmentCipher,
    SegmentReader,
    decrypt_stream,
    encrypt_stream,
    segment_layout,
)

__all__ = [
    "DEFAULT_SEGMENT_SIZE",
    "MAGIC",
    "VERSION",
    "DecryptingReader",
    "EncryptingWriter",
    "FileKeys",
    "Header",
    "KmsDescriptor",
    "SegmentCipher",
    "SegmentReader",
    "decrypt_stream",
    "derive_keys",
    "encrypt_stream",
    "parse_header",
    "read_header",
    "seal_header",
    "segment_layout",
    "verify_header",
]
