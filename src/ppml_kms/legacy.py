"""Read BigDL PPML's whole-file Fernet ``.encrypted`` files, in constant memory (migration only).

BigDL's Python KMS client wrote each encrypted file as one Fernet token (base64url text) of the
whole input, under the 32-byte plaintext data key. A Fernet token is::

    0x80 | timestamp (8, big-endian) | IV (16) | AES-128-CBC ciphertext, PKCS7 | HMAC-SHA256 (32)

with the HMAC (key: data key bytes 0..15) over everything before it and AES-128 keyed by bytes
16..31. ``cryptography.fernet`` needs the whole token in memory; this module reads it twice
instead: once to check the HMAC, then to decrypt, so files of any size work and no plaintext is
released before the whole token is authenticated. Nothing here writes this format.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .exceptions import InvalidCiphertext

__all__ = ["is_fernet_file", "iter_fernet_plaintext", "verify_fernet_file"]

_VERSION = 0x80
_PREFIX = 1 + 8 + 16
_MAC = 32
_CHUNK = 1 << 20  # base64 characters per read; a multiple of 4


def is_fernet_file(path: Path) -> bool:
    """True when ``path`` starts like a Fernet token (``gAAAAA``: version 0x80, a 1970+ timestamp)."""
    with open(path, "rb") as handle:
        return handle.read(6) == b"gAAAAA"


def _decoded_chunks(src: BinaryIO) -> Iterator[bytes]:
    """Decode base64url text from ``src`` chunk by chunk (whitespace around the token ignored)."""
    carry = b""
    ended = False  # padding seen: nothing may follow
    while block := src.read(_CHUNK):
        text = carry + b"".join(block.split())
        if not text:
            continue
        if ended:
            raise InvalidCiphertext("not a valid BigDL Fernet file")
        cut = len(text) - len(text) % 4
        piece, carry = text[:cut], text[cut:]
        if not piece:
            continue
        ended = piece.endswith(b"=")
        try:
            yield base64.b64decode(piece, altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):
            raise InvalidCiphertext("not a valid BigDL Fernet file") from None
    if carry:
        raise InvalidCiphertext("not a valid BigDL Fernet file (truncated)")


def _split_tail(chunks: Iterator[bytes], tail: int) -> Iterator[bytes | tuple[bytes]]:
    """Yield the stream's bytes except the last ``tail``, then a 1-tuple holding those."""
    held = b""
    for chunk in chunks:
        held += chunk
        if len(held) > tail:
            yield held[:-tail]
            held = held[-tail:]
    if len(held) < tail:
        raise InvalidCiphertext("not a valid BigDL Fernet file (truncated)")
    yield (held,)


def _keys(data_key: bytes) -> tuple[bytes, bytes]:
    if len(data_key) != 32:
        raise InvalidCiphertext("BigDL Fernet files need a 32-byte data key")
    return data_key[:16], data_key[16:]


def verify_fernet_file(src: BinaryIO, data_key: bytes) -> None:
    """First pass: check the token's structure and HMAC.

    Raises:
        InvalidCiphertext: not a Fernet token, wrong key, or modified/truncated.
    """
    mac_key, _ = _keys(data_key)
    mac = hmac.new(mac_key, digestmod=hashlib.sha256)
    length = 0
    first = b""
    tag = b""
    for part in _split_tail(_decoded_chunks(src), _MAC):
        if isinstance(part, tuple):
            tag = part[0]
            break
        if len(first) < 1:
            first = part[:1]
        mac.update(part)
        length += len(part)
    if first != bytes([_VERSION]) or length < _PREFIX + 16 or (length - _PREFIX) % 16:
        raise InvalidCiphertext("not a valid BigDL Fernet file")
    if not hmac.compare_digest(mac.digest(), tag):
        raise InvalidCiphertext()


def iter_fernet_plaintext(src: BinaryIO, data_key: bytes) -> Iterator[bytes]:
    """Verify, rewind, then yield the plaintext of the Fernet token in ``src`` (seekable).

    Raises:
        InvalidCiphertext: as :func:`verify_fernet_file`, or bad padding.
    """
    start = src.tell()
    verify_fernet_file(src, data_key)
    src.seek(start)
    _, aes_key = _keys(data_key)
    header = b""
    decryptor = None
    unpadder = padding.PKCS7(128).unpadder()
    for part in _split_tail(_decoded_chunks(src), _MAC):
        if isinstance(part, tuple):
            break
        if decryptor is None:
            header += part
            if len(header) < _PREFIX:
                continue
            iv, part = header[9:_PREFIX], header[_PREFIX:]
            decryptor = Cipher(algorithms.AES(aes_key), modes.CBC(iv)).decryptor()
        out = unpadder.update(decryptor.update(part))
        if out:
            yield out
    if decryptor is None:
        raise InvalidCiphertext("not a valid BigDL Fernet file")
    try:
        yield unpadder.update(decryptor.finalize()) + unpadder.finalize()
    except ValueError:
        raise InvalidCiphertext() from None
