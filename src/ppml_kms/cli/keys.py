"""``ppml-kms enroll``, ``generate-primary-key``, ``generate-data-key``."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from ..envelope import DATA_KEY_AAD, read_primary_key_file, write_data_key_file, write_primary_key_file
from ..exceptions import ConfigError
from ..kms.config import ENV_APIKEY, ENV_APPID, ENV_CA_CERT, ENV_URL, write_credentials_file
from ._common import check_key_output, int_range, kms_client, kms_config


def register(add) -> None:  # type: ignore[no-untyped-def]
    p = add(
        "enroll",
        _enroll,
        "register a new application with the KMS and print its credentials",
        credentials=False,
        description="Register a new application with the KMS. Prints PPML_KMS_URL, PPML_KMS_APPID, "
        "PPML_KMS_APIKEY (and PPML_KMS_CA_CERT) as shell NAME=value lines; the apikey is shown only "
        "once. Load them with `set -a; eval \"$(ppml-kms enroll ...)\"; set +a`, or keep them in a "
        "0600 file with --save FILE and point PPML_KMS_CREDENTIALS at it.",
    )
    p.add_argument("--save", metavar="FILE", type=Path, help="also write the credentials to FILE (mode 0600)")
    p.add_argument("--force", action="store_true", help="replace an existing --save file")

    p = add("generate-primary-key", _generate_primary_key, "create a primary key (AES-256) and store its key id")
    p.add_argument("--out", required=True, type=Path, metavar="FILE", help="key file to write (mode 0600)")
    p.add_argument("--force", action="store_true", help="replace an existing key file")

    p = add(
        "generate-data-key",
        _generate_data_key,
        "generate a data key under a primary key and store it wrapped",
        description="Generate a data key under a primary key and store only its wrapped form; the "
        "plaintext key never leaves the KMS.",
    )
    p.add_argument("--primary-key", required=True, type=Path, metavar="FILE", help="primary key file")
    p.add_argument("--out", required=True, type=Path, metavar="FILE", help="key file to write (mode 0600)")
    p.add_argument(
        "--length",
        type=int_range(16, 1024, "--length"),
        default=32,
        metavar="BYTES",
        help="data key length in bytes, 16..1024 (default: 32)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing key file")


def _enroll(args: argparse.Namespace) -> int:
    if args.save is not None:
        # Checked first: the apikey is shown only once, so it must not be lost to a failed save.
        check_key_output(args.save, args.force)
    config = kms_config(args)
    with kms_client(args, need_credentials=False) as client:
        appid, apikey = client.enroll()
        lines = {ENV_URL: client.url, ENV_APPID: appid, ENV_APIKEY: apikey}
    if config.ca_cert:
        lines[ENV_CA_CERT] = str(Path(config.ca_cert).resolve())
    if args.save is not None:
        try:
            write_credentials_file(args.save, lines, force=args.force)
        except ConfigError as exc:
            for name, value in lines.items():  # never lose the only copy of the apikey
                print(f"{name}={shlex.quote(value)}")
            raise exc
    for name, value in lines.items():
        print(f"{name}={shlex.quote(value)}")
    return 0


def _generate_primary_key(args: argparse.Namespace) -> int:
    check_key_output(args.out, args.force)
    with kms_client(args) as client:
        token = client.create_primary_key()
    write_primary_key_file(args.out, token, force=args.force)
    print(f"Primary key {token} written to {args.out}")
    return 0


def _generate_data_key(args: argparse.Namespace) -> int:
    check_key_output(args.out, args.force)
    primary = read_primary_key_file(args.primary_key)
    with kms_client(args) as client:
        wrapped = client.generate_wrapped_data_key(primary, args.length, DATA_KEY_AAD)
    write_data_key_file(args.out, wrapped, force=args.force)
    print(f"Data key ({args.length} bytes, wrapped by {primary}) written to {args.out}")
    return 0
