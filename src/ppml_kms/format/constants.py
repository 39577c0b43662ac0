"""Constants of the ppml-kms encrypted file format, version 1 (see ``docs/format.md``)."""

from __future__ import annotations

MAGIC = b"PPMLKMS"
VERSION = 1

#: AES-256-GCM segments, HKDF-SHA256 file key, STREAM nonces, HMAC-SHA256 header tag.
SUITE_AES256GCM_HKDF_SHA256 = 1
SUPPORTED_SUITES = frozenset({SUITE_AES256GCM_HKDF_SHA256})

SALT_SIZE = 32
NONCE_PREFIX_SIZE = 7
TAG_SIZE = 16
HEADER_TAG_SIZE = 32
FILE_KEY_SIZE = 32
HEADER_KEY_SIZE = 32

#: Plaintext bytes per segment when the caller does not choose.
DEFAULT_SEGMENT_SIZE = 1 << 20
MIN_SEGMENT_SIZE = 1 << 10
MAX_SEGMENT_SIZE = 1 << 26
#: The segment counter is 32 bits.
MAX_SEGMENTS = 1 << 32

MAX_HEADER_SIZE = 1 << 16
MAX_KMS_TYPE_LENGTH = 32
MAX_KEY_ID_LENGTH = 4096
MAX_WRAPPED_KEY_LENGTH = 8192
MAX_DATA_KEY_AAD_LENGTH = 8192
MAX_CONTEXT_PAIRS = 64
MAX_CONTEXT_ITEM_LENGTH = 1024

MIN_DATA_KEY_SIZE = 16
MAX_DATA_KEY_SIZE = 1024

#: Fixed-size part: magic, version, suite, header length, segment size, salt, nonce prefix.
FIXED_HEADER_SIZE = len(MAGIC) + 1 + 2 + 4 + 4 + SALT_SIZE + NONCE_PREFIX_SIZE

#: HKDF info prefix; the info actually used is ``HKDF_INFO || suite as u16 big-endian`` (18 bytes).
HKDF_INFO = b"ppml-kms file v1"
