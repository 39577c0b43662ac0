"""Small, careful file operations: atomic writes, no-overwrite publishing, private modes."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write_bytes", "publish", "temporary_output"]


@contextlib.contextmanager
def temporary_output(target: Path, *, mode: int = 0o600) -> Iterator[tuple[BinaryIO, Path]]:
    """Yield a temporary file beside ``target``; it is removed unless the caller published it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # A short name that does not grow with the target's (long names must still work).
    fd, name = tempfile.mkstemp(prefix=".ppml-kms-", suffix=".part", dir=target.parent)
    tmp = Path(name)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            yield handle, tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def publish(tmp: Path, target: Path, *, overwrite: bool) -> None:
    """Move a finished temporary file to ``target``.

    Without ``overwrite`` this uses a hard link, so an existing ``target`` is never replaced,
    even by a concurrent writer (raises ``FileExistsError``).
    """
    if overwrite:
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise
    except OSError:
        # Filesystems without hard links: best effort check-then-rename.
        if target.exists():
            raise FileExistsError(str(target)) from None
        os.rename(tmp, target)
        return
    tmp.unlink()


def atomic_write_bytes(target: Path, data: bytes, *, mode: int = 0o600, overwrite: bool = False) -> None:
    """Write ``data`` to ``target`` atomically with ``mode``; refuse to replace it unless ``overwrite``."""
    if not overwrite and target.exists():
        raise FileExistsError(str(target))
    with temporary_output(target, mode=mode) as (handle, tmp):
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        publish(tmp, target, overwrite=overwrite)
