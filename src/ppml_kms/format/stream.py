"""Segmented AES-256-GCM streams (the STREAM construction) over a v1 header.

Segment ``i`` holds at most ``segment_size`` plaintext bytes and is stored as ``ciphertext || tag``
(16 bytes more than its plaintext) at offset ``header.size + i * (segment_size + 16)``. Its nonce is
``nonce_prefix (7) || i as u32 big-endian || last flag (1 byte, 0 or 1)`` and its associated data is
the header tag, so a segment cannot move to another position, another file or another header.
Every plaintext has one encoding: ``max(1, ceil(n / segment_size))`` segments, all full except the
last, which is flagged; an empty plaintext is one empty, flagged segment.
"""

from __future__ import annotations

import ctypes
import functools
import io
import os
import queue
import stat
import struct
import sys
import threading
from collections.abc import Callable, Iterator
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

# encrypt_stream/decrypt_stream read, transform and write whole segments in chunks of up to this
# many bytes (at least one segment), so that small segments do not mean small system calls.
# Measured on 1 GiB (bench/format_bench.py): 1 MiB beats 2, 4 and 8 MiB, which fit less well in
# the CPU caches.
_IO_CHUNK_SIZE = 1 << 20
# The writer thread also encrypts/decrypts (see _Pipeline) only for segments of at least this size:
# with smaller ones, two threads taking turns at the GIL between short AES calls cost more than
# the sharing gains (measured with 64 KiB segments: 1 GiB encrypted in about 0.3 s alone, 0.6 to
# 0.75 s shared).
_SHARE_MIN_SEGMENT = 256 << 10

# encrypt_into/decrypt_into (recent cryptography releases) fill our buffers instead of allocating a
# bytes object per segment; older releases get the same result through a copy.
_HAS_INTO = hasattr(AESGCM, "encrypt_into") and hasattr(AESGCM, "decrypt_into")


class SegmentCipher:
    """Seals and opens individual segments of one file. Holds key material: never pickled."""

    __slots__ = ("_aad", "_aead", "_prefix", "segment_size")

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

    def _seal_nonce(self, index: int, last: bool) -> bytes:
        if index >= c.MAX_SEGMENTS:
            raise ValueError("plaintext too large for one file (2**32 segments)")
        return self._nonce(index, last)

    def _check_segment(self, index: int, length: int, last: bool) -> None:
        if length < c.TAG_SIZE or length > self.segment_size + c.TAG_SIZE:
            raise InvalidCiphertext()
        if last and index > 0 and length == c.TAG_SIZE:
            raise InvalidCiphertext()  # only an empty file ends in an empty segment
        if not last and length != self.segment_size + c.TAG_SIZE:
            raise InvalidCiphertext()

    def seal(self, index: int, plaintext: bytes | memoryview, last: bool) -> bytes:
        """Encrypt segment ``index``; returns ``ciphertext || tag``."""
        return self._aead.encrypt(self._seal_nonce(index, last), plaintext, self._aad)

    def seal_into(
        self, index: int, plaintext: bytes | memoryview, last: bool, out: memoryview
    ) -> int:
        """Encrypt segment ``index`` into ``out``, which is exactly ``len(plaintext) + 16`` bytes."""
        nonce = self._seal_nonce(index, last)
        if _HAS_INTO:
            return self._aead.encrypt_into(nonce, plaintext, self._aad, out)
        out[:] = self._aead.encrypt(nonce, plaintext, self._aad)
        return len(out)

    def open(self, index: int, segment: bytes | memoryview, last: bool) -> bytes:
        """Decrypt and verify segment ``index``.

        Raises:
            InvalidCiphertext: the segment is not the authentic segment ``index`` (with this last flag).
        """
        self._check_segment(index, len(segment), last)
        try:
            return self._aead.decrypt(self._nonce(index, last), segment, self._aad)
        except InvalidTag:
            raise InvalidCiphertext() from None

    def open_into(
        self, index: int, segment: bytes | memoryview, last: bool, out: memoryview
    ) -> int:
        """Decrypt and verify segment ``index`` into ``out`` (exactly ``len(segment) - 16`` bytes).

        If this raises, ``out`` may hold unverified plaintext: it must then be discarded, never used.

        Raises:
            InvalidCiphertext: as :meth:`open`.
        """
        self._check_segment(index, len(segment), last)
        nonce = self._nonce(index, last)
        try:
            if _HAS_INTO:
                return self._aead.decrypt_into(nonce, segment, self._aad, out)
            out[:] = self._aead.decrypt(nonce, segment, self._aad)
            return len(out)
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


def _write_all(dest: BinaryIO, data: memoryview) -> None:
    """``dest.write`` until all of ``data`` is taken (raw files may take only part of it)."""
    while data:
        n = dest.write(data)
        if n is None or n >= len(data):
            return
        data = data[n:]


def _chunks(src: BinaryIO, size: int) -> Iterator[tuple[memoryview, bool]]:
    """Read ``src`` in chunks of ``size`` bytes; yield ``(chunk, is_the_last_chunk)``.

    Every chunk but the last is full; the last may be short or, for an empty ``src`` only, empty.
    One chunk is read ahead (that is how the end is known); a yielded view is valid until the next.
    """
    cur, nxt = bytearray(size), bytearray(size)
    n_cur = _read_full(src, cur)
    while True:
        n_nxt = _read_full(src, nxt) if n_cur == size else 0
        last = n_nxt == 0
        yield memoryview(cur)[:n_cur], last
        if last:
            return
        cur, nxt, n_cur = nxt, cur, n_nxt


def _iter_segments(src: BinaryIO, header: Header) -> Iterator[tuple[bytes | memoryview, bool]]:
    """Yield ``(segment, is_last)`` one segment at a time (for :class:`DecryptingReader`)."""
    for segment, last in _chunks(src, header.segment_size + c.TAG_SIZE):
        if not segment:
            raise InvalidCiphertext("encrypted file is truncated")
        yield segment, last


_FALLOC_FL_KEEP_SIZE = 1
# Preallocate regular output files (see _preallocate); a switch for benchmarks and tests.
_PREALLOCATE = True


@functools.cache
def _fallocate() -> Callable[[int, int, int, int], int] | None:
    """``fallocate(2)`` from the C library, or ``None`` where there is none (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    # fallocate64 takes a 64-bit off_t everywhere; plain fallocate does only on 64-bit systems.
    func = getattr(libc, "fallocate64", None)
    if func is None and ctypes.sizeof(ctypes.c_long) == 8:
        func = getattr(libc, "fallocate", None)
    if func is None:
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    func.restype = ctypes.c_int
    return func


def _remaining_in_file(stream: BinaryIO) -> int | None:
    """Bytes between the position of ``stream`` and its end if it is a regular file, else ``None``."""
    try:
        st = os.fstat(stream.fileno())
        if not stat.S_ISREG(st.st_mode):
            return None
        return st.st_size - stream.tell()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


def _preallocate(dest: BinaryIO, length: int) -> None:
    """Best effort: reserve ``length`` bytes of disk at the position of ``dest``, a regular file.

    Without this, ext4 and others do per-page delayed-allocation bookkeeping in every write: on
    1 GiB, writes took 0.25 s instead of 0.18 s. ``FALLOC_FL_KEEP_SIZE`` leaves the file size and
    contents alone, so a wrong guess costs at most unused reserved blocks; any failure (no
    ``fallocate``, unsupported file system, no space) is ignored and the writes report real errors.
    """
    if not _PREALLOCATE or length < _IO_CHUNK_SIZE or _remaining_in_file(dest) is None:
        return
    fallocate = _fallocate()
    if fallocate is not None:
        fallocate(dest.fileno(), _FALLOC_FL_KEEP_SIZE, dest.tell(), length)


# transform(k, chunk, last_chunk, out): turn input chunk number ``k`` into ``out``; return the
# number of bytes of ``out`` used. ``last_chunk`` says that no input follows.
_Transform = Callable[[int, memoryview, bool, memoryview], int]


class _Pipeline:
    """Reads ``src`` in chunks, transforms every chunk and writes the results to ``dest``, in order.

    Two threads share the work. The caller's thread reads, and transforms (AES-GCM) while the
    writer thread is busy; when the writer would otherwise sit idle, it is handed the next input
    chunk to transform itself before writing it. So both cores stay busy whichever side is the
    slower one. AES-GCM and file I/O release the GIL. An input of one chunk uses no thread.

    ``make_transform()`` is called once per thread, so that each has its own cipher. Memory: three
    input chunks (one is read ahead to tell which is the last), two output chunks for the caller
    and one for the writer thread. Only the writer thread touches ``dest`` until :meth:`run`
    returns. A chunk reaches ``dest`` only if its transform succeeded; after any error nothing more
    is written, and the error is raised from :meth:`run`.
    """

    def __init__(
        self,
        dest: BinaryIO,
        make_transform: Callable[[], _Transform],
        in_size: int,
        out_size: int,
        share: bool,
    ) -> None:
        self._dest = dest
        self._share = share
        self._make_transform = make_transform
        self._transform = make_transform()
        self._in_size = in_size
        self._out_size = out_size
        self._inputs: queue.SimpleQueue[bytearray] = queue.SimpleQueue()  # free input chunks
        self._inputs_made = 0
        self._outputs: queue.SimpleQueue[bytearray] = queue.SimpleQueue()  # free output chunks
        # For the writer: (k, buffer, length, last_chunk, transformed), or None to stop.
        self._jobs: queue.SimpleQueue[tuple[int, bytearray, int, bool, bool] | None] = (
            queue.SimpleQueue()
        )
        self._submitted = 0  # jobs queued (counted by the caller's thread only)
        self._completed = 0  # jobs done (counted by the writer thread only)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._abort = False
        self.written = 0

    def run(self, src: BinaryIO) -> int:
        """Process all of ``src``; return the number of bytes read."""
        total = 0
        try:
            cur = self._input_buffer()
            n_cur = _read_full(src, cur)
            k = 0
            while True:
                nxt, n_nxt = None, 0
                if n_cur == self._in_size:
                    nxt = self._input_buffer()
                    n_nxt = _read_full(src, nxt)
                last_chunk = n_nxt == 0
                self._dispatch(k, cur, n_cur, last_chunk)
                total += n_cur
                if last_chunk:
                    break
                cur, n_cur, k = nxt, n_nxt, k + 1  # type: ignore[assignment]
        except BaseException:
            self._abort = True
            self._stop_writer()
            raise
        self._stop_writer()
        if self._error is not None:
            raise self._error
        return total

    def _input_buffer(self) -> bytearray:
        if self._inputs_made < 3:
            self._inputs_made += 1
            return bytearray(self._in_size)
        return self._inputs.get()

    def _dispatch(self, k: int, buf: bytearray, n: int, last_chunk: bool) -> None:
        if self._error is not None:
            raise self._error
        if k == 0 and last_chunk:  # the whole input is one chunk: no thread
            out = memoryview(bytearray(self._out_size))
            data = out[: self._transform(k, memoryview(buf)[:n], last_chunk, out)]
            _write_all(self._dest, data)
            self.written += len(data)
            return
        if self._thread is None:
            for _ in range(2):
                self._outputs.put(bytearray(self._out_size))
            self._thread = threading.Thread(target=self._run, name="ppml-kms-writer", daemon=True)
            self._thread.start()
        if self._share and self._submitted == self._completed:  # idle writer: it transforms this
            self._submit((k, buf, n, last_chunk, False))
            return
        out = self._outputs.get()
        if self._error is not None:
            raise self._error
        length = self._transform(k, memoryview(buf)[:n], last_chunk, memoryview(out))
        self._inputs.put(buf)
        self._submit((k, out, length, last_chunk, True))

    def _submit(self, job: tuple[int, bytearray, int, bool, bool]) -> None:
        self._submitted += 1
        self._jobs.put(job)

    def _stop_writer(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()

    def _run(self) -> None:
        transform = self._make_transform()
        own = memoryview(bytearray(self._out_size))
        while (job := self._jobs.get()) is not None:
            k, buf, n, last_chunk, transformed = job
            try:
                if self._error is None and not self._abort:
                    data = memoryview(buf)[:n]
                    if not transformed:
                        data = own[: transform(k, data, last_chunk, own)]
                    _write_all(self._dest, data)
                    self.written += len(data)
            except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
                self._error = exc
            finally:
                (self._outputs if transformed else self._inputs).put(buf)
                self._completed += 1


def encrypt_stream(src: BinaryIO, dest: BinaryIO, header: Header, keys: FileKeys) -> int:
    """Write ``header`` then every segment of ``src`` to ``dest``; return the plaintext size.

    Memory use is six I/O chunks (1 MiB, or one segment if larger) whatever the input size.
    Encryption and writing run on two threads (see :class:`_Pipeline`); all is written when this
    returns.
    """
    size = header.segment_size
    per_chunk = max(1, _IO_CHUNK_SIZE // size)

    def make_sealer() -> _Transform:
        cipher = SegmentCipher(header, keys)

        def seal_chunk(k: int, chunk: memoryview, last_chunk: bool, out: memoryview) -> int:
            pos = 0
            for i, start in enumerate(range(0, max(len(chunk), 1), size)):  # empty: one segment
                plain = chunk[start : start + size]
                last = last_chunk and start + size >= len(chunk)
                end = pos + len(plain) + c.TAG_SIZE
                pos += cipher.seal_into(k * per_chunk + i, plain, last, out[pos:end])
            return pos

        return seal_chunk

    _write_all(dest, memoryview(header.raw))
    plain_size = _remaining_in_file(src)
    if plain_size is not None:
        _preallocate(dest, plain_size + max(1, -(-plain_size // size)) * c.TAG_SIZE)
    share = size >= _SHARE_MIN_SEGMENT
    pipeline = _Pipeline(
        dest, make_sealer, per_chunk * size, per_chunk * (size + c.TAG_SIZE), share
    )
    return pipeline.run(src)


def decrypt_stream(src: BinaryIO, dest: BinaryIO, header: Header, keys: FileKeys) -> int:
    """Decrypt every segment after the header (already read from ``src``) into ``dest``.

    ``dest`` receives only verified segments, but a failure can come after some were written:
    callers writing files must write to a temporary file and rename only on success. Decryption
    and writing run on two threads (see :class:`_Pipeline`); all writing is over when this
    returns or raises.

    Raises:
        InvalidCiphertext: any segment fails, or the file is truncated or extended.
    """
    stride = header.segment_size + c.TAG_SIZE
    per_chunk = max(1, _IO_CHUNK_SIZE // stride)

    def make_opener() -> _Transform:
        cipher = SegmentCipher(header, keys)

        def open_chunk(k: int, chunk: memoryview, last_chunk: bool, out: memoryview) -> int:
            if not chunk:
                raise InvalidCiphertext("encrypted file is truncated")
            pos = 0
            for i, start in enumerate(range(0, len(chunk), stride)):
                segment = chunk[start : start + stride]
                last = last_chunk and start + stride >= len(chunk)
                end = pos + max(len(segment) - c.TAG_SIZE, 0)  # open_into rejects short segments
                pos += cipher.open_into(k * per_chunk + i, segment, last, out[pos:end])
            return pos  # every segment of the chunk verified: only now may it be written

        return open_chunk

    body_size = _remaining_in_file(src)
    if body_size is not None and body_size >= c.TAG_SIZE:
        _preallocate(dest, body_size - -(-body_size // stride) * c.TAG_SIZE)
    share = header.segment_size >= _SHARE_MIN_SEGMENT
    out_size = per_chunk * header.segment_size
    pipeline = _Pipeline(dest, make_opener, per_chunk * stride, out_size, share)
    pipeline.run(src)
    return pipeline.written


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
        self._pending = bytearray(self._size)  # plaintext of the segment being filled
        self._filled = 0
        self._out = bytearray(self._size + c.TAG_SIZE)  # reused for every sealed segment
        self._index = 0
        self._close_dest = close_dest
        _write_all(dest, memoryview(header.raw))

    def writable(self) -> bool:
        return True

    def _emit(self, plaintext: memoryview, last: bool) -> None:
        out = memoryview(self._out)[: len(plaintext) + c.TAG_SIZE]
        self._cipher.seal_into(self._index, plaintext, last, out)
        _write_all(self._dest, out)
        self._index += 1

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        if self.closed:
            raise ValueError("write to a closed EncryptingWriter")
        view = memoryview(data).cast("B")
        size, pos, end = self._size, 0, len(view)
        # A full segment is sealed only once a later byte exists: only close() knows the last one.
        while pos < end:
            if self._filled == size:
                self._emit(memoryview(self._pending), False)
                self._filled = 0
            if self._filled == 0 and end - pos > size:  # whole segments straight from ``data``
                self._emit(view[pos : pos + size], False)
                pos += size
                continue
            take = min(size - self._filled, end - pos)
            self._pending[self._filled : self._filled + take] = view[pos : pos + take]
            self._filled += take
            pos += take
        return end

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._emit(memoryview(self._pending)[: self._filled], True)
            self._filled = 0
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
        self._plain = bytearray(header.segment_size)  # reused for every segment
        self._pending = memoryview(b"")  # verified plaintext not yet returned
        self._done = False
        self._close_src = close_src

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._pending and not self._done:
            segment, last = next(self._segments)
            plain = memoryview(self._plain)[: max(len(segment) - c.TAG_SIZE, 0)]
            self._pending = plain[: self._cipher.open_into(self._index, segment, last, plain)]
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
        length = (
            stride if not last else (self.plaintext_size - index * self.segment_size + c.TAG_SIZE)
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
