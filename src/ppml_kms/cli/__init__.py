"""The ``ppml-kms`` command. Thin: parses arguments, calls the library, prints.

Exit codes: 0 success, 1 a ppml-kms error (one line on stderr, no traceback), 2 usage error,
130 interrupted (Ctrl-C, SIGTERM or SIGHUP: work in progress is cancelled and its partial
outputs removed).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType

from .. import __version__
from ..exceptions import Error
from ._common import UsageError

__all__ = ["main"]

_COMMON_HELP = (
    "The KMS endpoint and credentials come from the environment (PPML_KMS_URL, PPML_KMS_APPID, "
    "PPML_KMS_APIKEY, PPML_KMS_CA_CERT; BigDL's APPID/APIKEY work too) or from a credentials file "
    "(--credentials, $PPML_KMS_CREDENTIALS or ~/.config/ppml-kms/credentials), never from "
    "command-line arguments. Exit codes: 0 done, 1 failed, 2 usage error, 130 interrupted."
)


def _kms_options(parser: argparse.ArgumentParser, *, credentials: bool = True) -> None:
    group = parser.add_argument_group("KMS connection")
    group.add_argument("--url", metavar="URL", help="KMS endpoint, https://HOST:PORT/ehsm (default: $PPML_KMS_URL)")
    group.add_argument(
        "--ca-cert", metavar="FILE", help="PEM certificate(s) to trust for the KMS (default: $PPML_KMS_CA_CERT)"
    )
    group.add_argument(
        "--insecure",
        action="store_true",
        help="do not verify the KMS's TLS certificate, and allow http:// URLs (testing only)",
    )
    if credentials:
        group.add_argument(
            "--credentials",
            metavar="FILE",
            help="credentials file of NAME=value lines; wins over the environment (default: $PPML_KMS_CREDENTIALS)",
        )


def build_parser() -> argparse.ArgumentParser:
    from . import demo, files, keys, query, serve

    parser = argparse.ArgumentParser(
        prog="ppml-kms",
        description="Key management and encrypted files for privacy-preserving analytics: an "
        "eHSM-compatible KMS server and client, a streaming authenticated file format, and Spark "
        "SQL over encrypted CSV.",
        epilog=_COMMON_HELP,
    )
    parser.add_argument("--version", action="version", version=f"ppml-kms {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(
        name: str,
        func: Callable[[argparse.Namespace], int],
        help_text: str,
        *,
        kms: bool = True,
        credentials: bool = True,
        description: str | None = None,
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_text,
            description=description or help_text[:1].upper() + help_text[1:] + ".",
            epilog=_COMMON_HELP if kms and credentials else None,
        )
        p.set_defaults(func=func)
        if kms:
            _kms_options(p, credentials=credentials)
        return p

    serve.register(add)
    keys.register(add)
    files.register(add)
    query.register(add)
    demo.register(add)
    return parser


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (also used by the console script)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        # SIGTERM/SIGHUP stop work like Ctrl-C: cancelled, partial outputs removed, exit 130.
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _interrupt)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"ppml-kms {args.command}: error: {exc.diagnostics()}", file=sys.stderr)
        return 2
    except Error as exc:
        print(f"ppml-kms: error: {exc.diagnostics()}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"ppml-kms: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        note = exc.args[0] if exc.args and isinstance(exc.args[0], str) else ""
        print(f"ppml-kms: interrupted{note}", file=sys.stderr)
        return 130


def console_main() -> None:
    sys.exit(main())
