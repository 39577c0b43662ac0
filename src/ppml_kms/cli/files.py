"""``ppml-kms encrypt``, ``decrypt`` and ``migrate`` for files and directory trees."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

from .. import envelope
from .. import format as fmt
from ..exceptions import ConfigError, Error, FormatError, KeyFileError, KmsRequestError
from ..format import constants as fc
from ..legacy import is_fernet_file
from ._common import UsageError, int_range, kms_client, parse_context, printable
from ._progress import Progress

SUFFIX = ".encrypted"
DEFAULT_JOBS = min(4, os.cpu_count() or 1)

Job = tuple[Path, Path]


class FileFailed(Error):
    """One file of a batch failed; the message names it."""


def register(add) -> None:  # type: ignore[no-untyped-def]
    p = add(
        "encrypt",
        _encrypt,
        "encrypt a file, or every file of a directory tree, into the ppml-kms format",
        description="Encrypt a file, or every regular file of a directory tree (hidden files included; "
        "the relative layout is kept), into the ppml-kms format. Inputs are never modified; outputs "
        "appear only when complete. If any file fails or the run is interrupted, the outputs this "
        "run wrote are removed again.",
    )
    p.add_argument("input", metavar="INPUT", help="file or directory to encrypt (never modified)")
    p.add_argument(
        "--out",
        metavar="PATH",
        help="output file, or directory (for a directory INPUT, or when PATH ends in /); default: INPUT.encrypted",
    )
    p.add_argument("--primary-key", type=Path, required=True, metavar="FILE", help="primary key file")
    p.add_argument(
        "--data-key",
        type=Path,
        metavar="FILE",
        help="wrapped data key file (default: ask the KMS for a fresh data key for this run)",
    )
    p.add_argument(
        "--legacy-aad", metavar="VALUE", help="eHSM aad field the data key was generated with (BigDL used 'test')"
    )
    p.add_argument("--context", action="append", metavar="KEY=VALUE", help="encryption context pair (repeatable)")
    p.add_argument(
        "--segment-size",
        type=int_range(fc.MIN_SEGMENT_SIZE, fc.MAX_SEGMENT_SIZE, "--segment-size"),
        default=fc.DEFAULT_SEGMENT_SIZE,
        metavar="BYTES",
        help=f"plaintext bytes per segment, {fc.MIN_SEGMENT_SIZE}..{fc.MAX_SEGMENT_SIZE} "
        f"(default: {fc.DEFAULT_SEGMENT_SIZE})",
    )
    _batch_options(p)

    p = add(
        "decrypt",
        _decrypt,
        "decrypt a ppml-kms encrypted file, or every *.encrypted file of a directory tree",
        description="Decrypt a ppml-kms encrypted file, or every *.encrypted file of a directory tree "
        "(other files are left alone). The key comes from the KMS named in each file's header. "
        "Output appears only after the whole file verified; a tampered, truncated or wrongly keyed "
        "file leaves nothing behind. Also reads BigDL's Fernet .encrypted files given their key files.",
    )
    p.add_argument("input", metavar="INPUT", help="encrypted file or directory")
    p.add_argument(
        "--out",
        metavar="PATH",
        help="output file or directory (default: INPUT without .encrypted, or INPUT.decrypted)",
    )
    p.add_argument(
        "--context", action="append", metavar="KEY=VALUE", help="require this encryption context pair (repeatable)"
    )
    _legacy_options(p, required=False)
    _batch_options(p)

    p = add(
        "migrate",
        _migrate,
        "re-encrypt BigDL Fernet .encrypted files into the ppml-kms format",
        description="Re-encrypt BigDL Fernet .encrypted files into the ppml-kms format under a fresh "
        "data key (or --new-data-key); the plaintext never touches disk.",
    )
    p.add_argument("input", metavar="INPUT", help="BigDL encrypted file or directory")
    p.add_argument("--out", required=True, metavar="PATH", help="output file or directory")
    _legacy_options(p, required=True)
    p.add_argument(
        "--new-data-key",
        type=Path,
        metavar="FILE",
        help="wrapped data key file for the new files (default: a fresh data key under the same primary key)",
    )
    p.add_argument("--context", action="append", metavar="KEY=VALUE", help="encryption context pair (repeatable)")
    _batch_options(p)


def _legacy_options(p: argparse.ArgumentParser, *, required: bool) -> None:
    """Key files of BigDL Fernet files: optional for decrypt (v1 files need none), required for migrate."""
    group = p.add_argument_group("BigDL (legacy) files")
    group.add_argument(
        "--primary-key", type=Path, required=required, metavar="FILE", help="BigDL encrypted_primary_key file"
    )
    group.add_argument("--data-key", type=Path, required=required, metavar="FILE", help="BigDL encrypted_data_key file")
    group.add_argument(
        "--legacy-aad",
        metavar="VALUE",
        default="test",
        help="eHSM aad field the BigDL data key was generated with (default: test, what BigDL used)",
    )


def _batch_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="replace existing outputs (never the inputs)")
    p.add_argument(
        "--jobs",
        "-j",
        type=int_range(1, 256, "--jobs"),
        default=DEFAULT_JOBS,
        metavar="N",
        help=f"files processed at once (default: {DEFAULT_JOBS})",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it shows only on a terminal)")


# -- planning ----------------------------------------------------------------------------------


def _plan(
    src_arg: str,
    out_arg: str | None,
    *,
    to_name: Callable[[str], str],
    select: Callable[[Path], bool],
    what: str,
) -> list[Job]:
    """Pair every input file with its output path; warn about what a directory walk leaves out."""
    src = Path(src_arg)
    out = Path(out_arg) if out_arg else None
    if not src.exists():
        raise ConfigError(f"{src} does not exist")
    name = src.resolve().name
    if src.is_dir():
        root_out = out or src.resolve().with_name(to_name(name))
        if root_out.resolve() == src.resolve() or src.resolve() in root_out.resolve().parents:
            raise UsageError("the output directory must not be the input directory or inside it")
        if root_out.exists() and not root_out.is_dir():
            raise UsageError(f"output {root_out} exists and is not a directory")
        jobs: list[Job] = []
        skipped: list[str] = []
        for root, dirs, files in os.walk(src):
            dirs.sort()
            skipped.extend(str(Path(root) / d) for d in dirs if (Path(root) / d).is_symlink())
            for entry in sorted(files):
                path = Path(root) / entry
                if not path.is_file():
                    skipped.append(str(path))
                elif select(path):
                    rel = path.relative_to(src)
                    jobs.append((path, root_out / rel.parent / to_name(entry)))
        if skipped:
            shown = ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "")
            print(
                f"ppml-kms: warning: skipped {len(skipped)} entries that are not regular files "
                f"(symbolic links to directories, sockets, devices): {shown}",
                file=sys.stderr,
            )
        if not jobs:
            raise ConfigError(f"no {what} in {src}")
        return jobs
    if not src.is_file():
        raise ConfigError(f"{src} is not a regular file")
    if out is not None and (out.is_dir() or (out_arg or "").endswith(os.sep)):
        return [(src, out / to_name(name))]
    return [(src, out or src.resolve().with_name(to_name(name)))]


def _check_outputs(jobs: list[Job], force: bool) -> None:
    """Refuse before any work starts, so a batch never stops half-way on an existing output."""
    seen: set[Path] = set()
    for src, dst in jobs:
        envelope.check_output(src, dst, overwrite=force)  # the same rule each job applies again
        if dst in seen:
            raise ConfigError(f"two inputs would both be written to {dst}")
        seen.add(dst)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM/SIGHUP for the duration (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


class _Cancelled(Exception):
    """Raised inside a worker when the batch was cancelled (another file failed, or a signal)."""


class _Batch:
    """Runs file jobs on a thread pool: all-or-nothing, cancellable, with one progress bar.

    When a job fails or the user interrupts, the running jobs stop at their next read, queued
    jobs never start, and every output this run created (files and the directories made for
    them) is removed again; outputs that existed before (``--force``) are left as they are.
    """

    def __init__(self, jobs: list[Job], args: argparse.Namespace, verb: str) -> None:
        self.jobs = jobs
        self.args = args
        self.verb = verb
        self.cancel = threading.Event()
        self.existed = {dst for _, dst in jobs if dst.exists()}
        self.created_dirs: list[Path] = []

    def _make_dirs(self) -> None:
        for parent in sorted({dst.parent for _, dst in self.jobs}):
            missing = []
            probe = parent
            while not probe.exists():
                missing.append(probe)
                probe = probe.parent
            parent.mkdir(parents=True, exist_ok=True)
            self.created_dirs.extend(reversed(missing))

    def _undo(self) -> int:
        removed = 0
        for _, dst in self.jobs:
            if dst not in self.existed and dst.is_file():
                dst.unlink()
                removed += 1
        for directory in sorted(self.created_dirs, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                directory.rmdir()
        return removed

    def run(self, work: Callable[[Path, Path, Callable[[int], None]], int]) -> None:
        total_in = sum(src.stat().st_size for src, _ in self.jobs)
        total_out = 0
        self._make_dirs()
        progress = Progress(total_in, self.verb, enabled=False if self.args.no_progress else None)

        def tick(n: int) -> None:
            if self.cancel.is_set():
                raise _Cancelled
            progress(n)

        def one(job: Job) -> tuple[Job, int]:
            src, dst = job
            if self.cancel.is_set():
                raise _Cancelled
            try:
                return job, work(src, dst, tick)
            except Error as exc:
                self.cancel.set()  # queued jobs must not start, whatever the main thread is doing
                raise FileFailed(f"{printable(src)}: {exc.diagnostics()}") from exc
            except OSError as exc:
                self.cancel.set()
                raise FileFailed(f"{printable(src)}: {exc.strerror or exc}") from exc

        pool = ThreadPoolExecutor(max_workers=min(self.args.jobs, len(self.jobs)))
        try:
            with progress:
                pending = {pool.submit(one, job) for job in self.jobs}
                while pending:
                    finished, pending = wait(pending, timeout=0.5, return_when=FIRST_EXCEPTION)
                    for future in finished:
                        error = future.exception()
                        if isinstance(error, _Cancelled):
                            continue  # stopped because another job failed: that job reports why
                        if error is not None:
                            raise error
                        (src, dst), size = future.result()
                        total_out += size
                        progress.println(f"{self.verb} {printable(src)} -> {printable(dst)} ({size} bytes)")
        except BaseException as exc:
            self.cancel.set()
            with _signals_held():  # a second Ctrl-C or SIGTERM must not cut the clean-up short
                pool.shutdown(wait=True, cancel_futures=True)
                removed = self._undo()
            note = f" (removed the {removed} outputs this run had written)" if removed else ""
            if isinstance(exc, Error):
                raise FileFailed(f"{exc.diagnostics()}{note}") from exc
            if isinstance(exc, KeyboardInterrupt):
                raise KeyboardInterrupt(note) from None
            raise
        pool.shutdown(wait=True)
        if len(self.jobs) > 1:
            print(f"{self.verb} {len(self.jobs)} files, {total_out} bytes of plaintext")


# -- commands ----------------------------------------------------------------------------------


def _encrypt(args: argparse.Namespace) -> int:
    context = parse_context(args.context)
    jobs = _plan(args.input, args.out, to_name=lambda n: n + SUFFIX, select=lambda p: True, what="files")
    _check_outputs(jobs, args.force)
    primary = envelope.read_primary_key_file(args.primary_key)
    aad = envelope.legacy_aad(args.legacy_aad) if args.legacy_aad else envelope.DATA_KEY_AAD
    with kms_client(args) as client:
        encryptor = _encryptor(client, primary, args.data_key, aad, context, args.segment_size, args.primary_key)
    _Batch(jobs, args, "Encrypted").run(
        lambda src, dst, tick: encryptor.encrypt_file(src, dst, overwrite=args.force, progress=tick)
    )
    return 0


def _encryptor(  # type: ignore[no-untyped-def]
    client, primary: str, data_key_file: Path | None, aad: bytes, context, segment_size: int, primary_file: Path
) -> envelope.FileEncryptor:
    if data_key_file:
        wrapped = envelope.read_data_key_file(data_key_file)
        try:
            return envelope.FileEncryptor.from_kms(
                client, primary, wrapped, data_key_aad=aad, context=context, segment_size=segment_size
            )
        except KmsRequestError as exc:
            raise KeyFileError(
                f"the data key in {data_key_file} does not open with the primary key in {primary_file} "
                f"(keys from different runs, or a BigDL key that needs --legacy-aad test?): KMS said {exc.message!r}"
            ) from exc
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
    raise FormatError(f"{path}: not a ppml-kms encrypted file (bad magic) nor a BigDL Fernet file")


def _legacy_data_key(client, args: argparse.Namespace) -> bytes:  # type: ignore[no-untyped-def]
    if not args.primary_key or not args.data_key:
        raise ConfigError(
            "this is a BigDL Fernet file: pass its --primary-key and --data-key files (and --legacy-aad test)"
        )
    primary = envelope.read_primary_key_file(args.primary_key)
    wrapped = envelope.read_data_key_file(args.data_key)
    try:
        return client.unwrap_data_key(primary, wrapped, envelope.legacy_aad(args.legacy_aad))
    except KmsRequestError as exc:
        raise KeyFileError(
            f"the BigDL data key in {args.data_key} does not open with {args.primary_key} and "
            f"--legacy-aad {args.legacy_aad!r}: KMS said {exc.message!r}"
        ) from exc


def _decrypt(args: argparse.Namespace) -> int:
    context = parse_context(args.context)
    jobs = _plan(
        args.input, args.out, to_name=_decrypted_name, select=lambda p: p.name.endswith(SUFFIX),
        what="*.encrypted files",
    )
    _check_outputs(jobs, args.force)
    kinds = {src: _sniff(src) for src, _ in jobs}
    if context and "fernet" in kinds.values():
        raise UsageError("BigDL files carry no encryption context; drop --context")
    with kms_client(args) as client:
        legacy_key = _legacy_data_key(client, args) if "fernet" in kinds.values() else b""

        def work(src: Path, dst: Path, tick: Callable[[int], None]) -> int:
            if kinds[src] == "fernet":
                return envelope.decrypt_legacy_file(src, dst, legacy_key, overwrite=args.force, progress=tick)
            return envelope.decrypt_file(
                src, dst, client, overwrite=args.force, expected_context=context, progress=tick
            )

        _Batch(jobs, args, "Decrypted").run(work)
    return 0


def _migrate(args: argparse.Namespace) -> int:
    context = parse_context(args.context)
    jobs = _plan(
        args.input, args.out, to_name=lambda n: n, select=lambda p: p.name.endswith(SUFFIX),
        what="*.encrypted files",
    )
    _check_outputs(jobs, args.force)
    for src, _ in jobs:
        if _sniff(src) != "fernet":
            raise FormatError(f"{src} is not a BigDL Fernet file; nothing to migrate")
    with kms_client(args) as client:
        legacy_key = _legacy_data_key(client, args)
        primary = envelope.read_primary_key_file(args.primary_key)
        encryptor = _encryptor(
            client, primary, args.new_data_key, envelope.DATA_KEY_AAD, context, fc.DEFAULT_SEGMENT_SIZE,
            args.primary_key,
        )
    _Batch(jobs, args, "Migrated").run(
        lambda src, dst, tick: envelope.migrate_legacy_file(
            src, dst, legacy_key, encryptor, overwrite=args.force, progress=tick
        )
    )
    return 0
