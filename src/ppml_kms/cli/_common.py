"""Helpers shared by the CLI commands."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from ..exceptions import ConfigError, KeyFileError
from ..format import constants as fc
from ..kms.config import KmsConfig
from ..kms.ehsm import EhsmClient


#: What the CLI allows the encryption context to take of the 64 KiB header, leaving room for
#: the largest key id, wrapped data key and AAD the format accepts.
MAX_CONTEXT_BYTES = 32 << 10


class UsageError(ConfigError):
    """A command-line value is invalid (exit code 2, like argparse's own usage errors)."""


def printable(path: object) -> str:
    """A file name safe to print on one terminal line (control characters escaped)."""
    text = str(path)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def kms_config(args: argparse.Namespace) -> KmsConfig:
    config = KmsConfig.load(
        url=getattr(args, "url", None),
        ca_cert=getattr(args, "ca_cert", None),
        insecure=getattr(args, "insecure", False),
        credentials_file=getattr(args, "credentials", None),
    )
    if config.insecure:
        print("ppml-kms: warning: TLS certificate verification is off (--insecure)", file=sys.stderr)
    return config


def kms_client(args: argparse.Namespace, *, need_credentials: bool = True) -> EhsmClient:
    return EhsmClient.from_config(kms_config(args), need_credentials=need_credentials)


def parse_context(pairs: list[str] | None) -> dict[str, str]:
    """``KEY=VALUE`` options to an encryption context, checked against the format's bounds."""
    context: dict[str, str] = {}
    for item in pairs or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--context expects KEY=VALUE, got {item!r}")
        if key in context:
            raise UsageError(f"--context key {key!r} given twice")
        for part in (key, value):
            try:
                encoded = part.encode("utf-8")
            except UnicodeEncodeError:
                raise UsageError("--context keys and values must be valid UTF-8 text") from None
            if len(encoded) > fc.MAX_CONTEXT_ITEM_LENGTH:
                raise UsageError(f"--context keys and values are limited to {fc.MAX_CONTEXT_ITEM_LENGTH} bytes")
        context[key] = value
    if len(context) > fc.MAX_CONTEXT_PAIRS:
        raise UsageError(f"at most {fc.MAX_CONTEXT_PAIRS} --context pairs")
    total = sum(4 + len(k.encode()) + len(v.encode()) for k, v in context.items())
    if total > MAX_CONTEXT_BYTES:
        raise UsageError(f"--context pairs are limited to {MAX_CONTEXT_BYTES} bytes in all (got {total})")
    return context


def int_range(low: int, high: int, what: str = "value"):  # type: ignore[no-untyped-def]
    """An argparse ``type`` for integers in ``[low, high]`` (bad values exit 2 with a usage line)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what} must be between {low} and {high}, got {value}")
        return value

    return parse


def check_key_output(path: Path, force: bool) -> None:
    """Make sure a key file can be written to ``path`` before asking the KMS to create anything.

    Raises:
        KeyFileError: it exists (without ``force``), is a directory or a symbolic link, or its
            directory cannot be created or written.
    """
    if path.is_symlink():
        raise KeyFileError(f"{path} is a symbolic link; give the real path of the key file")
    if path.is_dir():
        raise KeyFileError(f"{path} is a directory; give a file name for the key file")
    if path.exists() and not path.is_file():
        raise KeyFileError(f"{path} exists and is not a regular file; refusing to replace it")
    if path.exists() and not force:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key file (use --force)")
    parent = path.absolute().parent
    while not parent.exists():  # the write creates missing directories; probe the first one that exists
        parent = parent.parent
    if not parent.is_dir():
        raise KeyFileError(f"cannot write a key file under {parent}: not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ppml-kms-", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise KeyFileError(f"cannot write a key file in {parent}: {exc.strerror}") from exc
