"""Envelope encryption: data keys wrapped by a KMS, self-describing encrypted files.

A file's header names the KMS kind and primary key and carries the wrapped data key and the AAD
it was wrapped with, so a file decrypts with KMS access alone. Plaintext data keys live only in
memory: in :class:`FileEncryptor` objects and in the per-process :class:`DataKeyCache`; neither
can be pickled.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

from . import format as fmt
from ._files import atomic_write_bytes, publish, temporary_output
from .exceptions import ConfigError, InvalidCiphertext, KeyFileError, OutputExistsError
from .kms.base import KeyManagementService

__all__ = [
    "DATA_KEY_AAD",
    "DataKeyCache",
    "FileEncryptor",
    "check_output",
    "decrypt_file",
    "decrypt_legacy_file",
    "decrypt_stream_to",
    "migrate_legacy_file",
    "legacy_aad",
    "open_encrypted",
    "read_data_key_file",
    "read_primary_key_file",
    "unwrap_header_key",
    "write_data_key_file",
    "write_primary_key_file",
]

#: AAD ppml-kms binds to the data keys it asks a KMS to generate (domain separation).
DATA_KEY_AAD = b"ppml-kms data key"


def legacy_aad(field_value: str) -> bytes:
    """Turn an eHSM ``aad`` field value as BigDL sent it (e.g. ``test``) into AAD bytes.

    eHSM reads the field as base64, so ``test`` means the bytes ``b5 eb 2d``.

    Raises:
        KeyFileError: the value is not base64 (eHSM would have refused it too).
    """
    try:
        return base64.b64decode(field_value, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"legacy AAD {field_value!r} is not a base64 string as eHSM requires") from None


# -- key files ---------------------------------------------------------------------------------


def write_primary_key_file(path: Path, token: str, *, force: bool = False) -> None:
    """Write the primary key token exactly as the KMS returned it (0600, atomic, no silent overwrite).

    Raises:
        KeyFileError: the file exists (without ``force``) or cannot be written.
    """
    _write_key_file(path, token.encode("utf-8"), force)


def write_data_key_file(path: Path, wrapped: bytes, *, force: bool = False) -> None:
    """Write a wrapped data key as base64 (0600, atomic, no silent overwrite).

    Raises:
        KeyFileError: the file exists (without ``force``) or cannot be written.
    """
    _write_key_file(path, base64.b64encode(wrapped), force)


def _write_key_file(path: Path, data: bytes, force: bool) -> None:
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise KeyFileError(f"{path} exists and is not a regular file; refusing to replace it")
    try:
        atomic_write_bytes(Path(path), data, mode=0o600, overwrite=force)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key file (use --force)") from None
    except OSError as exc:
        raise KeyFileError(f"cannot write key file {path}: {exc.strerror}") from exc


def _read_key_file(path: Path, what: str) -> str:
    if Path(path).exists() and not Path(path).is_file():
        raise KeyFileError(f"{what} file {path} is not a regular file")
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{what} file {path} does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} file {path}: {exc.strerror}") from exc
    if len(raw) > 16384:
        raise KeyFileError(f"{path} is too large to be a {what} file")
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise KeyFileError(f"{path} is not a {what} file (not ASCII text)") from None
    if not text:
        raise KeyFileError(f"{what} file {path} is empty")
    return text


def read_primary_key_file(path: Path) -> str:
    """Return the primary key token stored in ``path``.

    Raises:
        KeyFileError: missing, unreadable, empty or not text.
    """
    return _read_key_file(path, "primary key")


def read_data_key_file(path: Path) -> bytes:
    """Return the wrapped data key stored (base64) in ``path``.

    Raises:
        KeyFileError: missing, unreadable, empty or not base64.
    """
    text = _read_key_file(path, "data key")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"data key file {path} does not hold base64 text") from None


# -- data-key cache ----------------------------------------------------------------------------


class DataKeyCache:
    """Per-process cache of unwrapped data keys: one KMS call per distinct wrapped key.

    Keyed by (KMS identity, primary key, wrapped key, AAD). Bounded (LRU). Never pickled.
    """

    def __init__(self, max_entries: int = 1024) -> None:
        self._entries: OrderedDict[tuple[str, str, bytes, bytes], bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._max = max_entries
        self.kms_calls = 0

    def __repr__(self) -> str:
        return f"DataKeyCache({len(self._entries)} keys)"

    def __reduce__(self) -> object:
        raise TypeError("DataKeyCache holds key material and cannot be pickled")

    def unwrap(self, kms: KeyManagementService, primary_key: str, wrapped: bytes, aad: bytes) -> bytes:
        """Return the plaintext data key, asking ``kms`` only on a miss.

        Raises:
            KmsError: the KMS refused or could not be reached.
        """
        slot = (kms.identity(), primary_key, bytes(wrapped), bytes(aad))
        with self._lock:
            key = self._entries.get(slot)
            if key is not None:
                self._entries.move_to_end(slot)
                return key
        key = kms.unwrap_data_key(primary_key, wrapped, aad)
        with self._lock:
            self.kms_calls += 1
            self._entries[slot] = key
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
        return key

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


# -- encryption --------------------------------------------------------------------------------


class FileEncryptor:
    """Encrypts files and streams under one data key; each output gets a fresh salt and nonce prefix."""

    def __init__(
        self,
        *,
        kms_type: str,
        primary_key: str,
        wrapped_key: bytes,
        data_key: bytes,
        data_key_aad: bytes = DATA_KEY_AAD,
        context: Mapping[str, str] | None = None,
        segment_size: int = fmt.DEFAULT_SEGMENT_SIZE,
    ) -> None:
        self._descriptor = fmt.KmsDescriptor(kms_type, primary_key, bytes(wrapped_key), bytes(data_key_aad))
        self._data_key = bytes(data_key)
        self._context = dict(context or {})
        self._segment_size = segment_size
        try:
            self._new_header()  # validate everything once, up front
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"cannot encrypt with these settings: {exc}") from None

    @classmethod
    def from_kms(
        cls,
        kms: KeyManagementService,
        primary_key: str,
        wrapped_key: bytes,
        *,
        data_key_aad: bytes = DATA_KEY_AAD,
        cache: DataKeyCache | None = None,
        **kwargs: object,
    ) -> FileEncryptor:
        """Unwrap ``wrapped_key`` through ``kms`` and build an encryptor around it."""
        cache = cache or DEFAULT_CACHE
        data_key = cache.unwrap(kms, primary_key, wrapped_key, data_key_aad)
        return cls(
            kms_type=kms.kind,
            primary_key=primary_key,
            wrapped_key=wrapped_key,
            data_key=data_key,
            data_key_aad=data_key_aad,
            **kwargs,  # type: ignore[arg-type]
        )

    def __repr__(self) -> str:
        return f"FileEncryptor(key_id={self._descriptor.key_id!r}, data_key=<redacted>)"

    def __reduce__(self) -> object:
        raise TypeError("FileEncryptor holds a data key and cannot be pickled")

    def _new_header(self) -> tuple[fmt.Header, fmt.FileKeys]:
        salt = os.urandom(32)
        keys = fmt.derive_keys(self._data_key, salt)
        header = fmt.seal_header(
            keys=keys,
            salt=salt,
            nonce_prefix=os.urandom(7),
            kms=self._descriptor,
            context=self._context,
            segment_size=self._segment_size,
        )
        return header, keys

    def encrypt_stream(self, src: BinaryIO, dest: BinaryIO) -> int:
        """Encrypt all of ``src`` into ``dest``; returns the plaintext size."""
        header, keys = self._new_header()
        return fmt.encrypt_stream(src, dest, header, keys)

    def writer(self, dest: BinaryIO, *, close_dest: bool = False) -> fmt.EncryptingWriter:
        """A writable file object; closing it writes the final segment."""
        header, keys = self._new_header()
        return fmt.EncryptingWriter(dest, header, keys, close_dest=close_dest)

    def encrypt_file(
        self, src: Path, dst: Path, *, overwrite: bool = False, progress: Progress | None = None
    ) -> int:
        """Encrypt ``src`` into ``dst`` through a temporary file; never replaces ``src``.

        ``progress`` is called with the number of input bytes read, as they are read.

        Raises:
            OutputExistsError: ``dst`` exists and not ``overwrite``, or ``dst`` is ``src``.
            OSError: reading or writing failed.
        """
        src, dst = Path(src), Path(dst)
        check_output(src, dst, overwrite=overwrite)
        with open(src, "rb") as raw, temporary_output(dst, mode=0o644) as (fout, tmp):
            fin = _counted(raw, progress)
            size = self.encrypt_stream(fin, fout)
            fout.flush()
            fout.close()
            _publish(tmp, dst, overwrite)
        return size


def check_output(src: Path, dst: Path, *, overwrite: bool) -> None:
    """Refuse to write over the input, over something that is not a regular file, or without leave.

    Raises:
        OutputExistsError: ``dst`` is ``src``, is not a regular file, or exists without ``overwrite``.
    """
    _check_distinct(src, dst)
    if dst.is_symlink() or (dst.exists() and not dst.is_file()):
        raise OutputExistsError(f"output {dst} exists and is not a regular file; refusing to replace it")
    if not overwrite and dst.exists():
        raise OutputExistsError(f"{dst} already exists (use --force to replace it)")


def _check_distinct(src: Path, dst: Path) -> None:
    try:
        same = dst.exists() and os.path.samefile(src, dst)
    except OSError:
        same = False
    if same or src.resolve() == dst.resolve():
        raise OutputExistsError(f"output {dst} is the input file; refusing to overwrite the input")


def _publish(tmp: Path, dst: Path, overwrite: bool) -> None:
    try:
        publish(tmp, dst, overwrite=overwrite)
    except FileExistsError:
        raise OutputExistsError(f"{dst} already exists (use --force to replace it)") from None


DEFAULT_CACHE = DataKeyCache()

Progress = Callable[[int], None]


class _CountingReader(io.RawIOBase):
    """Passes reads through to a binary file and reports how many bytes went by."""

    def __init__(self, raw: BinaryIO, progress: Progress) -> None:
        super().__init__()
        self._raw = raw
        self._progress = progress

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = self._raw.readinto(buffer)  # type: ignore[attr-defined]
        if n:
            self._progress(n)
        return n or 0

    def seekable(self) -> bool:
        return self._raw.seekable()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()


def _counted(raw: BinaryIO, progress: Progress | None) -> BinaryIO:
    return raw if progress is None else _CountingReader(raw, progress)  # type: ignore[return-value]


# -- decryption --------------------------------------------------------------------------------


def unwrap_header_key(
    header: fmt.Header,
    kms: KeyManagementService,
    *,
    cache: DataKeyCache | None = None,
    expected_context: Mapping[str, str] | None = None,
) -> fmt.FileKeys:
    """Get the data key named by ``header`` from ``kms`` and authenticate the header with it.

    Raises:
        FormatError: the header names another kind of KMS.
        KmsError: the KMS refused to unwrap the data key.
        InvalidCiphertext: the header was modified, or ``expected_context`` does not match.
    """
    from .exceptions import FormatError

    if header.kms.kms_type != kms.kind:
        raise FormatError(
            f"file was encrypted with a key from a {header.kms.kms_type!r} KMS, not {kms.kind!r}"
        )
    data_key = (cache or DEFAULT_CACHE).unwrap(
        kms, header.kms.key_id, header.kms.wrapped_key, header.kms.data_key_aad
    )
    keys = fmt.verify_header(header, data_key)
    if expected_context:
        actual = header.context_dict
        if any(actual.get(k) != v for k, v in expected_context.items()):
            raise InvalidCiphertext("encryption context does not match the file's")
    return keys


def open_encrypted(path: Path) -> tuple[BinaryIO, fmt.Header]:
    """Open ``path`` and read its header; the returned file is positioned at segment 0."""
    handle = open(path, "rb")
    try:
        return handle, fmt.read_header(handle)
    except BaseException:
        handle.close()
        raise


def decrypt_stream_to(
    src: BinaryIO,
    dest: BinaryIO,
    kms: KeyManagementService,
    *,
    cache: DataKeyCache | None = None,
    expected_context: Mapping[str, str] | None = None,
) -> int:
    """Read a header from ``src``, unwrap its key and decrypt the rest into ``dest``."""
    header = fmt.read_header(src)
    keys = unwrap_header_key(header, kms, cache=cache, expected_context=expected_context)
    return fmt.decrypt_stream(src, dest, header, keys)


def decrypt_file(
    src: Path,
    dst: Path,
    kms: KeyManagementService,
    *,
    overwrite: bool = False,
    cache: DataKeyCache | None = None,
    expected_context: Mapping[str, str] | None = None,
    progress: Progress | None = None,
) -> int:
    """Decrypt ``src`` into ``dst``; ``dst`` appears only once the last segment verified.

    Raises:
        OutputExistsError: ``dst`` exists and not ``overwrite``, or is ``src``.
        FormatError, InvalidCiphertext, KmsError: see :func:`unwrap_header_key`.
    """
    src, dst = Path(src), Path(dst)
    check_output(src, dst, overwrite=overwrite)
    with open(src, "rb") as raw:
        fin = _counted(raw, progress)
        header = fmt.read_header(fin)
        keys = unwrap_header_key(header, kms, cache=cache, expected_context=expected_context)
        with temporary_output(dst, mode=0o600) as (fout, tmp):
            size = fmt.decrypt_stream(fin, fout, header, keys)
            fout.flush()
            fout.close()
            _publish(tmp, dst, overwrite)
    return size


# -- BigDL's whole-file Fernet files (read-only, for migration) --------------------------------


def _from_legacy(
    src: Path,
    dst: Path,
    data_key: bytes,
    *,
    overwrite: bool,
    progress: Progress | None,
    mode: int,
    sink: Callable[[BinaryIO], BinaryIO],
) -> int:
    """Stream the verified plaintext of a BigDL Fernet file into ``sink(temporary output)``."""
    from .legacy import iter_fernet_plaintext

    src, dst = Path(src), Path(dst)
    check_output(src, dst, overwrite=overwrite)
    size = 0
    with open(src, "rb") as raw, temporary_output(dst, mode=mode) as (fout, tmp):
        writer = sink(fout)
        for chunk in iter_fernet_plaintext(_counted(raw, progress), data_key):
            writer.write(chunk)
            size += len(chunk)
        writer.close()
        fout.close()
        _publish(tmp, dst, overwrite)
    return size


def decrypt_legacy_file(
    src: Path, dst: Path, data_key: bytes, *, overwrite: bool = False, progress: Progress | None = None
) -> int:
    """Decrypt a BigDL Fernet ``.encrypted`` file with its (unwrapped) data key; same guarantees
    as :func:`decrypt_file`: ``dst`` appears only after the whole token verified.

    Raises:
        OutputExistsError, InvalidCiphertext.
    """
    return _from_legacy(src, dst, data_key, overwrite=overwrite, progress=progress, mode=0o600, sink=lambda f: f)


def migrate_legacy_file(
    src: Path,
    dst: Path,
    data_key: bytes,
    encryptor: FileEncryptor,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> int:
    """Re-encrypt a BigDL Fernet file into format v1 with ``encryptor``, in constant memory.

    The plaintext only ever exists in memory, one chunk at a time.

    Raises:
        OutputExistsError, InvalidCiphertext.
    """
    return _from_legacy(
        src, dst, data_key, overwrite=overwrite, progress=progress, mode=0o644, sink=encryptor.writer
    )
