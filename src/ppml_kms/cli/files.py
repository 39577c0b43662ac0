"""``ppml-kms encrypt`` and ``ppml-kms decrypt`` for files and directory trees."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .. import envelope
from ..exceptions import ConfigError, OutputExistsError
from ..format import constants as fc
from ._common import kms_client, parse_context

SUFFIX = ".encrypted"


def register(add) -> None:  # type: ignore[no-untyped-def]
    p = add(
        "encrypt",
        _encrypt,
        "encrypt a file, or every file of a directory tree, into the ppml-kms format",
    )
    p.add_argument("input", type=Path, help="file or directory to encrypt (never modified)")
    p.add_argument(
        "--out",
        type=Path,
        help="output file, or output directory for a directory input (default: INPUT.encrypted)",
    )
    p.add_argument("--primary-key", type=Path, required=True, help="primary key file")
    p.add_argument(
        "--data-key",
        type=Path,
        help="wrapped data key file (default: ask the KMS for a fresh data key for this run)",
    )
    p.add_argument(
        "--legacy-aad",
        metavar="VALUE",
        help="eHSM aad field the data key was generated with (BigDL used 'test')",
    )
    p.add_argument("--context", action="append", metavar="KEY=VALUE", help="encryption context pair (repeatable)")
    p.add_argument(
        "--segment-size",
        type=int,
        default=fc.DEFAULT_SEGMENT_SIZE,
        help=f"plaintext bytes per segment (default: {fc.DEFAULT_SEGMENT_SIZE})",
    )
    p.add_argument("--force", action="store_true", help="replace existing outputs")

    p = add("decrypt", _decrypt, "decrypt a ppml-kms encrypted file, or every *.encrypted file of a directory tree")
    p.add_argument("input", type=Path, help="encrypted file or directory")
    p.add_argument(
        "--out",
        type=Path,
        help="output file or directory (default: INPUT without .encrypted, or INPUT.decrypted)",
    )
    p.add_argument(
        "--context", action="append", metavar="KEY=VALUE", help="require this encryption context pair (repeatable)"
    )
    p.add_argument("--force", action="store_true", help="replace existing outputs")


def _plan(
    src: Path, out: Path | None, *, to_name, select, default_out
) -> list[tuple[Path, Path]]:  # type: ignore[no-untyped-def]
    if not src.exists():
        raise ConfigError(f"{src} does not exist")
    if src.is_dir():
        root_out = out or default_out(src)
        if root_out.resolve() == src.resolve() or src.resolve() in root_out.resolve().parents:
            raise ConfigError("the output directory must not be the input directory or inside it")
        jobs = []
        for root, dirs, files in os.walk(src):
            dirs.sort()
            for name in sorted(files):
                path = Path(root) / name
                if name.startswith(".") or not select(path):
                    continue
                rel = path.relative_to(src)
                jobs.append((path, root_out / rel.parent / to_name(name)))
        if not jobs:
            raise ConfigError(f"no files to process in {src}")
        return jobs
    if out is not None and out.is_dir():
        return [(src, out / to_name(src.name))]
    return [(src, out or src.parent / to_name(src.name))]


def _check_outputs(jobs: list[tuple[Path, Path]], force: bool) -> None:
    for src, dst in jobs:
        if dst.exists() and os.path.samefile(src, dst):
            raise OutputExistsError(f"output {dst} is the input file; refusing to overwrite the input")
        if dst.exists() and not force:
            raise OutputExistsError(f"{dst} already exists (use --force to replace it)")


def _encrypt(args: argparse.Namespace) -> int:
    context = parse_context(args.context)
    jobs = _plan(
        args.input,
        args.out,
        to_name=lambda n: n + SUFFIX,
        select=lambda p: True,
        default_out=lambda s: s.with_name(s.name + SUFFIX),
    )
    _check_outputs(jobs, args.force)
    primary = envelope.read_primary_key_file(args.primary_key)
    aad = envelope.legacy_aad(args.legacy_aad) if args.legacy_aad else envelope.DATA_KEY_AAD
    with kms_client(args) as client:
        if args.data_key:
            wrapped = envelope.read_data_key_file(args.data_key)
            encryptor = envelope.FileEncryptor.from_kms(
                client, primary, wrapped, data_key_aad=aad, context=context, segment_size=args.segment_size
            )
        else:
            fresh = client.generate_data_key(primary, 32, aad)
            encryptor = envelope.FileEncryptor(
                kms_type=client.kind,
                primary_key=primary,
                wrapped_key=fresh.wrapped,
                data_key=fresh.plaintext,
                data_key_aad=aad,
                context=context,
                segment_size=args.segment_size,
            )
    for src, dst in jobs:
        size = encryptor.encrypt_file(src, dst, overwrite=args.force)
        print(f"Encrypted {src} -> {dst} ({size} bytes)")
    return 0


def _decrypt(args: argparse.Namespace) -> int:
    context = parse_context(args.context)

    def to_name(name: str) -> str:
        return name[: -len(SUFFIX)] if name.endswith(SUFFIX) and len(name) > len(SUFFIX) else name + ".decrypted"

    def default_out(src: Path) -> Path:
        return src.with_name(to_name(src.name))

    jobs = _plan(
        args.input,
        args.out,
        to_name=to_name,
        select=lambda p: p.name.endswith(SUFFIX),
        default_out=default_out,
    )
    _check_outputs(jobs, args.force)
    with kms_client(args) as client:
        for src, dst in jobs:
            size = envelope.decrypt_file(src, dst, client, overwrite=args.force, expected_context=context)
            print(f"Decrypted {src} -> {dst} ({size} bytes)")
    return 0
