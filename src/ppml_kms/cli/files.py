"""``ppml-kms encrypt``, ``decrypt`` and ``migrate`` for files and directory trees."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

from .. import envelope
from .. import format as fmt
from ..exceptions import ConfigError, Error, FormatError, OutputExistsError
from ..format import constants as fc
from ..legacy import is_fernet_file
from ._common import kms_client, parse_context
from ._progress import Progress

SUFFIX = ".encrypted"
DEFAULT_JOBS = min(4, os.cpu_count() or 1)

Job = tuple[Path, Path]


class FileFailed(Error):
    """One file of a batch failed; the message names it."""


def register(add) -> None:  # type: ignore[no-untyped-def]
    p = add("encrypt", _encrypt, "encrypt a file, or every file of a directory tree, into the ppml-kms format")
    p.add_argument("input", type=Path, help="file or directory to encrypt (never modified)")
    p.add_argument(
        "--out", type=Path, help="output file, or output directory for a directory input (default: INPUT.encrypted)"
    )
    p.add_argument("--primary-key", type=Path, required=True, help="primary key file")
    p.add_argument(
        "--data-key", type=Path, help="wrapped data key file (default: ask the KMS for a fresh data key for this run)"
    )
    p.add_argument(
        "--legacy-aad", metavar="VALUE", help="eHSM aad field the data key was generated with (BigDL used 'test')"
    )
    p.add_argument("--context", action="append", metavar="KEY=VALUE", help="encryption context pair (repeatable)")
    p.add_argument(
        "--segment-size",
        type=int,
        default=fc.DEFAULT_SEGMENT_SIZE,
        help=f"plaintext bytes per segment, {fc.MIN_SEGMENT_SIZE}..{fc.MAX_SEGMENT_SIZE} "
        f"(default: {fc.DEFAULT_SEGMENT_SIZE})",
    )
    _batch_options(p)

    p = add(
        "decrypt",
        _decrypt,
        "decrypt a ppml-kms encrypted file, or every *.encrypted file of a directory tree; also reads "
        "BigDL's Fernet .encrypted files when given their key files",
    )
    p.add_argument("input", type=Path, help="encrypted file or directory")
    p.add_argument(
        "--out", type=Path, help="output file or directory (default: INPUT without .encrypted, or INPUT.decrypted)"
    )
    p.add_argument(
        "--context", action="append", metavar="KEY=VALUE", help="require this encryption context pair (repeatable)"
    )
    _legacy_options(p, required=False)
    _batch_options(p)

    p = add(
        "migrate",
        _migrate,
        "re-encrypt BigDL Fernet .encrypted files into the ppml-kms format (plaintext never touches disk)",
    )
    p.add_argument("input", type=Path, help="BigDL encrypted file or directory")
    p.add_argument("--out", type=Path, required=True, help="output file or directory")
    _legacy_options(p, required=True)
    p.add_argument(
        "--new-data-key",
        type=Path,
        help="wrapped data key file for the new files (default: a fresh data key under the same primary key)",
    )
    p.add_argument("--context", action="append", metavar="KEY=VALUE", help="encryption context pair (repeatable)")
    _batch_options(p)


def _legacy_options(p: argparse.ArgumentParser, *, required: bool) -> None:
    """Key files of BigDL Fernet files: optional for decrypt (v1 files need none), required for migrate."""
    group = p.add_argument_group("BigDL (legacy) files")
    group.add_argument("--primary-key", type=Path, required=required, help="BigDL encrypted_primary_key file")
    group.add_argument("--data-key", type=Path, required=required, help="BigDL encrypted_data_key file")
    group.add_argument(
        "--legacy-aad",
        metavar="VALUE",
        default="test",
        help="eHSM aad field the BigDL data key was generated with (default: test, what BigDL used)",
    )


def _batch_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="replace existing outputs (never the inputs)")
    p.add_argument(
        "--jobs", "-j", type=int, default=DEFAULT_JOBS, help=f"files processed at once (default: {DEFAULT_JOBS})"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it shows only on a terminal)")


# -- planning ----------------------------------------------------------------------------------


def _plan(
    src: Path,
    out: Path | None,
    *,
    to_name: Callable[[str], str],
    select: Callable[[Path], bool],
) -> list[Job]:
    if not src.exists():
        raise ConfigError(f"{src} does not exist")
    if src.is_dir():
        root_out = out or src.with_name(to_name(src.name))
        if root_out.resolve() == src.resolve() or src.resolve() in root_out.resolve().parents:
            raise ConfigError("the output directory must not be the input directory or inside it")
        if root_out.exists() and not root_out.is_dir():
            raise ConfigError(f"output {root_out} exists and is not a directory")
        jobs = []
        for root, dirs, files in os.walk(src):
            dirs.sort()
            for name in sorted(files):
                path = Path(root) / name
                if name.startswith(".") or not path.is_file() or not select(path):
                    continue
                rel = path.relative_to(src)
                jobs.append((path, root_out / rel.parent / to_name(name)))
        if not jobs:
            raise ConfigError(f"no files to process in {src}")
        return jobs
    if not src.is_file():
        raise ConfigError(f"{src} is not a regular file")
    if out is not None and out.is_dir():
        return [(src, out / to_name(src.name))]
    return [(src, out or src.with_name(to_name(src.name)))]


def _check_outputs(jobs: list[Job], force: bool) -> None:
    """Refuse before any work starts, so a batch never stops half-way on an existing output."""
    seen: set[Path] = set()
    for src, dst in jobs:
        if dst.exists() and os.path.samefile(src, dst):
            raise OutputExistsError(f"output {dst} is the input file; refusing to overwrite the input")
        if dst.exists() and not force:
            raise OutputExistsError(f"{dst} already exists (use --force to replace it)")
        if dst in seen:
            raise ConfigError(f"two inputs would both be written to {dst}")
        seen.add(dst)


def _run(jobs: list[Job], work: Callable[[Path, Path, Progress], int], args: argparse.Namespace, verb: str) -> None:
    """Run ``work`` over ``jobs`` on a thread pool with one progress bar; stop at the first failure."""
    if args.jobs < 1:
        raise ConfigError("--jobs must be at least 1")
    total = sum(src.stat().st_size for src, _ in jobs)
    with Progress(total, verb, enabled=False if args.no_progress else None) as progress:

        def one(job: Job) -> tuple[Job, int]:
            src, dst = job
            try:
                return job, work(src, dst, progress)
            except Error as exc:
                raise FileFailed(f"{src}: {exc.diagnostics()}") from exc
            except OSError as exc:
                raise FileFailed(f"{src}: {exc.strerror or exc}") from exc

        with ThreadPoolExecutor(max_workers=min(args.jobs, len(jobs))) as pool:
            pending = {pool.submit(one, job) for job in jobs}
            while pending:
                finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in finished:
                    if future.exception() is not None:
                        for other in pending:
                            other.cancel()
                        raise future.exception()  # type: ignore[misc]
                    (src, dst), size = future.result()
                    progress.file_finished()
                    print(f"{verb} {src} -> {dst} ({size} bytes)", flush=True)
    if len(jobs) > 1:
        print(f"{verb} {len(jobs)} files, {total} bytes")


# -- commands ----------------------------------------------------------------------------------


def _encrypt(args: argparse.Namespace) -> int:
    context = parse_context(args.context)
    jobs = _plan(args.input, args.out, to_name=lambda n: n + SUFFIX, select=lambda p: True)
    _check_outputs(jobs, args.force)
    primary = envelope.read_primary_key_file(args.primary_key)
    aad = envelope.legacy_aad(args.legacy_aad) if args.legacy_aad else envelope.DATA_KEY_AAD
    if not fc.MIN_SEGMENT_SIZE <= args.segment_size <= fc.MAX_SEGMENT_SIZE:
        raise ConfigError(f"--segment-size must be between {fc.MIN_SEGMENT_SIZE} and {fc.MAX_SEGMENT_SIZE}")
    with kms_client(args) as client:
        encryptor = _encryptor(client, primary, args.data_key, aad, context, args.segment_size)
    _run(
        jobs,
        lambda src, dst, progress: encryptor.encrypt_file(src, dst, overwrite=args.force, progress=progress),
        args,
        "Encrypted",
    )
    return 0


def _encryptor(client, primary: str, data_key_file: Path | None, aad: bytes, context, segment_size: int):  # type: ignore[no-untyped-def]
    if data_key_file:
        wrapped = envelope.read_data_key_file(data_key_file)
        return envelope.FileEncryptor.from_kms(
            client, primary, wrapped, data_key_aad=aad, context=context, segment_size=segment_size
        )
    fresh = client.generate_data_key(primary, 32, aad)
    return envelope.FileEncryptor(
        kms_type=client.kind,
        primary_key=primary,
        wrapped_key=fresh.wrapped,
        data_key=fresh.plaintext,
        data_key_aad=aad,
        context=context,
        segment_size=segment_size,
    )


def _decrypted_name(name: str) -> str:
    return name[: -len(SUFFIX)] if name.endswith(SUFFIX) and len(name) > len(SUFFIX) else name + ".decrypted"


def _sniff(path: Path) -> str:
    with open(path, "rb") as handle:
        head = handle.read(len(fmt.MAGIC))
    if head == fmt.MAGIC:
        return "v1"
    if is_fernet_file(path):
        return "fernet"
    raise FormatError("not a ppml-kms encrypted file (bad magic) nor a BigDL Fernet file")


def _legacy_data_key(client, args: argparse.Namespace) -> bytes:  # type: ignore[no-untyped-def]
    if not args.primary_key or not args.data_key:
        raise ConfigError(
            "this is a BigDL Fernet file: pass its --primary-key and --data-key files (and --legacy-aad test)"
        )
    primary = envelope.read_primary_key_file(args.primary_key)
    wrapped = envelope.read_data_key_file(args.data_key)
    return client.unwrap_data_key(primary, wrapped, envelope.legacy_aad(args.legacy_aad))


def _decrypt(args: argparse.Namespace) -> int:
    context = parse_context(args.context)
    jobs = _plan(args.input, args.out, to_name=_decrypted_name, select=lambda p: p.name.endswith(SUFFIX))
    _check_outputs(jobs, args.force)
    kinds = {src: _sniff(src) for src, _ in jobs}
    with kms_client(args) as client:
        legacy_key = _legacy_data_key(client, args) if "fernet" in kinds.values() else None

        def work(src: Path, dst: Path, progress: Progress) -> int:
            if kinds[src] == "fernet" and legacy_key is not None:
                if context:
                    raise ConfigError("BigDL files carry no encryption context; drop --context")
                return envelope.decrypt_legacy_file(src, dst, legacy_key, overwrite=args.force, progress=progress)
            return envelope.decrypt_file(
                src, dst, client, overwrite=args.force, expected_context=context, progress=progress
            )

        _run(jobs, work, args, "Decrypted")
    return 0


def _migrate(args: argparse.Namespace) -> int:
    context = parse_context(args.context)
    jobs = _plan(args.input, args.out, to_name=lambda n: n, select=lambda p: p.name.endswith(SUFFIX))
    _check_outputs(jobs, args.force)
    for src, _ in jobs:
        if _sniff(src) != "fernet":
            raise FormatError(f"{src} is not a BigDL Fernet file; nothing to migrate")
    with kms_client(args) as client:
        legacy_key = _legacy_data_key(client, args)
        primary = envelope.read_primary_key_file(args.primary_key)
        encryptor = _encryptor(
            client, primary, args.new_data_key, envelope.DATA_KEY_AAD, context, fc.DEFAULT_SEGMENT_SIZE
        )
    _run(
        jobs,
        lambda src, dst, progress: envelope.migrate_legacy_file(
            src, dst, legacy_key, encryptor, overwrite=args.force, progress=progress
        ),
        args,
        "Migrated",
    )
    return 0
