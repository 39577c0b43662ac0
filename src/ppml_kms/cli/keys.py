"""``ppml-kms enroll``, ``generate-primary-key``, ``generate-data-key``."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from ..envelope import DATA_KEY_AAD, read_primary_key_file, write_data_key_file, write_primary_key_file
from ..exceptions import ConfigError, KeyFileError
from ..kms.config import ENV_APIKEY, ENV_APPID, ENV_CA_CERT, ENV_URL, write_credentials_file
from ._common import kms_client


def register(add) -> None:  # type: ignore[no-untyped-def]
    p = add(
        "enroll",
        _enroll,
        "register a new application with the KMS and print its credentials as shell-sourceable lines",
    )
    p.add_argument(
        "--save", metavar="FILE", type=Path, help="also write the credentials to FILE (mode 0600)"
    )
    p.add_argument("--force", action="store_true", help="replace an existing --save file")

    p = add("generate-primary-key", _generate_primary_key, "create a primary key (AES-256) and store its key id")
    p.add_argument("--out", required=True, type=Path, help="file to write the primary key token to (0600)")
    p.add_argument("--force", action="store_true", help="replace an existing key file")

    p = add(
        "generate-data-key",
        _generate_data_key,
        "generate a data key under a primary key and store it wrapped (the plaintext never leaves the KMS)",
    )
    p.add_argument("--primary-key", required=True, type=Path, help="primary key file")
    p.add_argument("--out", required=True, type=Path, help="file to write the wrapped data key to (0600)")
    p.add_argument("--length", type=int, default=32, help="data key length in bytes, 16..1024 (default: 32)")
    p.add_argument("--force", action="store_true", help="replace an existing key file")


def _enroll(args: argparse.Namespace) -> int:
    with kms_client(args, need_credentials=False) as client:
        appid, apikey = client.enroll()
        lines = {ENV_URL: client.url, ENV_APPID: appid, ENV_APIKEY: apikey}
    config_ca = getattr(args, "ca_cert", None)
    if config_ca:
        lines[ENV_CA_CERT] = str(Path(config_ca).resolve())
    if args.save:
        write_credentials_file(args.save, lines, force=args.force)
    for name, value in lines.items():
        print(f"{name}={shlex.quote(value)}")
    return 0


def _generate_primary_key(args: argparse.Namespace) -> int:
    _refuse_existing(args.out, args.force)
    with kms_client(args) as client:
        token = client.create_primary_key()
    write_primary_key_file(args.out, token, force=args.force)
    print(f"Primary key {token} written to {args.out}")
    return 0


def _generate_data_key(args: argparse.Namespace) -> int:
    if not 16 <= args.length <= 1024:
        raise ConfigError("--length must be between 16 and 1024 bytes")
    _refuse_existing(args.out, args.force)
    primary = read_primary_key_file(args.primary_key)
    with kms_client(args) as client:
        wrapped = client.generate_wrapped_data_key(primary, args.length, DATA_KEY_AAD)
    write_data_key_file(args.out, wrapped, force=args.force)
    print(f"Data key ({args.length} bytes, wrapped by {primary}) written to {args.out}")
    return 0


def _refuse_existing(path: Path, force: bool) -> None:
    # Checked before asking the KMS, so nothing is created in vain; the write re-checks atomically.
    if path.exists() and not force:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key file (use --force)")
