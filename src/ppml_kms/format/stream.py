"""Segmented AES-256-GCM streams (the STREAM construction) over a v1 header.

Segment ``i`` holds at most ``segment_size`` plaintext bytes and is stored as ``ciphertext || tag``
(16 bytes more than its plaintext) at offset ``header.size + i * (segment_size + 16)``. Its nonce is
``nonce_prefix (7) || i as u32 big-endian || last flag (1 byte, 0 or 1)`` and its associated data is
the header tag, so a segment cannot move to another position, another file or another header.
Every plaintext has one encoding: ``max(1, ceil(n / segment_size))`` segments, all full except the
last, which is flagged; an empty plaintext is one empty, flagged segment.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterator
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..exceptions import InvalidCiphertext
from . import constants as c
from .header import FileKeys, Header

__all__ = [
    "DecryptingReader",
    "EncryptingWriter",
    "SegmentCipher",
    "SegmentReader",
    "decrypt_stream",
    "encrypt_stream",
    "segment_layout",
]

_NONCE_TAIL = struct.Struct(">IB")


class SegmentCipher:
    """Seals and opens individual segments of one file. Holds key material: never pickled."""

    __slots__ = ("_aead", "_prefix", "_aad", "segment_size")

    def __init__(self, header: Header, keys: FileKeys) -> None:
        self._aead = AESGCM(keys.file_key)
        self._prefix = header.nonce_prefix
        self._aad = header.tag
        self.segment_size = header.segment_size

    def __repr__(self) -> str:
        return "SegmentCipher(<redacted>)"

    def __reduce__(self) -> object:
        raise TypeError("SegmentCipher holds key material and cannot be pickled")

    def _nonce(self, index: int, last: bool) -> bytes:
        if not 0 <= index < c.MAX_SEGMENTS:
            raise InvalidCiphertext("too many segments")
        return self._prefix + _NONCE_TAIL.pack(index, 1 if last else 0)

    def seal(self, index: int, plaintext: bytes | memoryview, last: bool) -> bytes:
        """Encrypt segment ``index``; returns ``ciphertext || tag``."""
        if index >= c.MAX_SEGMENTS:
            raise ValueError("plaintext too large for one file (2**32 segments)")
        return self._aead.encrypt(self._nonce(index, last), plaintext, self._aad)

    def open(self, index: int, segment: bytes | memoryview, last: bool) -> bytes:
        """Decrypt and verify segment ``index``.

        Raises:
            InvalidCiphertext: the segment is not the authentic segment ``index`` (with this last flag).
        """
        if len(segment) < c.TAG_SIZE or len(segment) > self.segment_size + c.TAG_SIZE:
            raise InvalidCiphertext()
        if last and index > 0 and len(segment) == c.TAG_SIZE:
            raise InvalidCiphertext()  # only an empty file ends in an empty segment
        if not last and len(segment) != self.segment_size + c.TAG_SIZE:
            raise InvalidCiphertext()
        try:
            return self._aead.decrypt(self._nonce(index, last), segment, self._aad)
        except InvalidTag:
            raise InvalidCiphertext() from None


def segment_layout(header: Header, file_size: int) -> tuple[int, int]:
    """Return ``(number of segments, plaintext size)`` of a file of ``file_size`` bytes.

    Raises:
        InvalidCiphertext: no size is a valid v1 file with this header.
    """
    body = file_size - header.size
    stride = header.segment_size + c.TAG_SIZE
    if body < c.TAG_SIZE:
        raise InvalidCiphertext("encrypted file is truncated")
    full, rem = divmod(body, stride)
    if rem == 0:
        count, last_len = full, header.segment_size
    elif rem < c.TAG_SIZE or (rem == c.TAG_SIZE and full > 0):
        raise InvalidCiphertext("encrypted file is truncated or has trailing bytes")
    else:
        count, last_len = full + 1, rem - c.TAG_SIZE
    if count > c.MAX_SEGMENTS:
        raise InvalidCiphertext("too many segments")
    return count, (count - 1) * header.segment_size + last_len


def _read_full(src: BinaryIO, buf: bytearray) -> int:
    """Fill ``buf`` from ``src``; return how many bytes were read (short only at EOF)."""
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        n = src.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            break
        got += n
    return got


def encrypt_stream(src: BinaryIO, dest: BinaryIO, header: Header, keys: FileKeys) -> int:
    """Write ``header`` then every segment of ``src`` to ``dest``; return the plaintext size.

    Memory use is two segments whatever the input size.
    """
    cipher = SegmentCipher(header, keys)
    size = header.segment_size
    dest.write(header.raw)
    cur, nxt = bytearray(size), bytearray(size)
    n_cur = _read_full(src, cur)
    index = 0
    total = 0
    while True:
        n_nxt = _read_full(src, nxt) if n_cur == size else 0
        last = n_nxt == 0
        dest.write(cipher.seal(index, memoryview(cur)[:n_cur], last))
        total += n_cur
        if last:
            return total
        cur, nxt, n_cur = nxt, cur, n_nxt
        index += 1


def _iter_segments(src: BinaryIO, header: Header) -> Iterator[tuple[bytes | memoryview, bool]]:
    stride = header.segment_size + c.TAG_SIZE
    cur, nxt = bytearray(stride), bytearray(stride)
    n_cur = _read_full(src, cur)
    if n_cur == 0:
        raise InvalidCiphertext("encrypted file is truncated")
    while True:
        n_nxt = _read_full(src, nxt) if n_cur == stride else 0
        last = n_nxt == 0
        yield memoryview(cur)[:n_cur], last
        if last:
            return
        cur, nxt, n_cur = nxt, cur, n_nxt


def decrypt_stream(src: BinaryIO, dest: BinaryIO, header: Header, keys: FileKeys) -> int:
    """Decrypt every segment after the header (already read from ``src``) into ``dest``.

    ``dest`` receives only verified segments, but a failure can come after some were written:
    callers writing files must write to a temporary file and rename only on success.

    Raises:
        InvalidCiphertext: any segment fails, or the file is truncated or extended.
    """
    cipher = SegmentCipher(header, keys)
    total = 0
    for index, (segment, last) in enumerate(_iter_segments(src, header)):
        plain = cipher.open(index, segment, last)
        dest.write(plain)
        total += len(plain)
    return total


class EncryptingWriter(io.RawIOBase):
    """A writable file object that encrypts into ``dest``.

    The header is written at once; full segments are written as data arrives; the final segment
    is written by :meth:`close`. A writer that is never closed leaves a file without its final
    segment, which does not decrypt. ``write`` always consumes all of its argument.
    """

    def __init__(self, dest: BinaryIO, header: Header, keys: FileKeys, *, close_dest: bool = False):
        super().__init__()
        self._dest = dest
        self._cipher = SegmentCipher(header, keys)
        self._size = header.segment_size
        self._buf = bytearray()
        self._index = 0
        self._close_dest = close_dest
        dest.write(header.raw)

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        if self.closed:
            raise ValueError("write to a closed EncryptingWriter")
        view = memoryview(data).cast("B")
        self._buf += view
        size = self._size
        if len(self._buf) > size:
            # Keep at least one byte back: only close() knows which segment is the last.
            cut = ((len(self._buf) - 1) // size) * size
            mv = memoryview(self._buf)
            for start in range(0, cut, size):
                self._dest.write(self._cipher.seal(self._index, mv[start : start + size], False))
                self._index += 1
            mv.release()
            del self._buf[:cut]
        return len(view)

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._dest.write(self._cipher.seal(self._index, bytes(self._buf), True))
            self._buf = bytearray()
            self._dest.flush()
            if self._close_dest:
                self._dest.close()
        finally:
            super().close()


class DecryptingReader(io.RawIOBase):
    """A readable file object over the plaintext of ``src`` (positioned just after the header).

    Only verified data is returned. A missing final segment or trailing bytes raise
    :class:`~ppml_kms.exceptions.InvalidCiphertext` from the read that reaches them.
    """

    def __init__(self, src: BinaryIO, header: Header, keys: FileKeys, *, close_src: bool = False):
        super().__init__()
        self._src = src
        self._cipher = SegmentCipher(header, keys)
        self._segments = _iter_segments(src, header)
        self._index = 0
        self._pending = memoryview(b"")
        self._done = False
        self._close_src = close_src

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._pending and not self._done:
            segment, last = next(self._segments)
            self._pending = memoryview(self._cipher.open(self._index, segment, last))
            self._index += 1
            self._done = last
        n = min(len(buffer), len(self._pending))
        memoryview(buffer).cast("B")[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self._close_src:
                self._src.close()
        finally:
            super().close()


class SegmentReader:
    """Random access to the plaintext of a seekable encrypted file.

    ``read_segment(i)`` reads and verifies segment ``i`` only; ``read_range`` reads the segments
    that cover a byte range. The number of segments comes from the file size, so a truncated or
    extended file fails when its (apparent) last segment is read.
    """

    def __init__(self, src: BinaryIO, header: Header, keys: FileKeys, file_size: int | None = None):
        self._src = src
        self._header = header
        self._cipher = SegmentCipher(header, keys)
        if file_size is None:
            file_size = os.fstat(src.fileno()).st_size  # type: ignore[attr-defined]
        self.num_segments, self.plaintext_size = segment_layout(header, file_size)
        self.segment_size = header.segment_size

    def read_segment(self, index: int) -> bytes:
        if not 0 <= index < self.num_segments:
            raise IndexError(f"segment {index} out of range 0..{self.num_segments - 1}")
        stride = self.segment_size + c.TAG_SIZE
        last = index == self.num_segments - 1
        length = stride if not last else (
            self.plaintext_size - index * self.segment_size + c.TAG_SIZE
        )
        self._src.seek(self._header.size + index * stride)
        data = self._src.read(length)
        if len(data) != length:
            raise InvalidCiphertext("encrypted file is truncated")
        return self._cipher.open(index, data, last)

    def read_range(self, offset: int, length: int) -> bytes:
        """Plaintext bytes ``[offset, offset + length)`` (clipped to the end of the plaintext)."""
        if offset < 0 or length < 0:
            raise ValueError("offset and length must be non-negative")
        end = min(offset + length, self.plaintext_size)
        if offset >= end:
            return b""
        first, last = offset // self.segment_size, (end - 1) // self.segment_size
        data = b"".join(self.read_segment(i) for i in range(first, last + 1))
        start = offset - first * self.segment_size
        return data[start : start + (end - offset)]
