"""The ``ppml-kms`` command. Thin: parses arguments, calls the library, prints.

Exit codes: 0 success, 1 a ppml-kms error (one line on stderr, no traceback), 2 usage error,
130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .. import __version__
from ..exceptions import Error

__all__ = ["main"]

_COMMON_HELP = """
Endpoint and credentials come from the environment (PPML_KMS_URL, PPML_KMS_APPID,
PPML_KMS_APIKEY, PPML_KMS_CA_CERT; BigDL's APPID/APIKEY are accepted too) or from a
credentials file (--credentials, PPML_KMS_CREDENTIALS, ~/.config/ppml-kms/credentials),
never from command-line arguments.
"""


def _kms_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("KMS connection")
    group.add_argument("--url", help="KMS endpoint, https://HOST:PORT/ehsm (default: $PPML_KMS_URL)")
    group.add_argument(
        "--ca-cert", metavar="FILE", help="PEM certificate(s) to trust for the KMS (default: $PPML_KMS_CA_CERT)"
    )
    group.add_argument(
        "--insecure", action="store_true", help="do not verify the KMS's TLS certificate (testing only)"
    )
    group.add_argument(
        "--credentials", metavar="FILE", help="credentials file of NAME=value lines (default: $PPML_KMS_CREDENTIALS)"
    )


def build_parser() -> argparse.ArgumentParser:
    from . import files, keys, serve

    parser = argparse.ArgumentParser(
        prog="ppml-kms",
        description="Key management and encrypted files for privacy-preserving analytics "
        "(eHSM-compatible KMS server, client, encrypted file format, Spark reader).",
        epilog=_COMMON_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ppml-kms {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], help_text: str, *, kms: bool = True):
        p = sub.add_parser(
            name, help=help_text, description=help_text, epilog=_COMMON_HELP if kms else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(func=func)
        if kms:
            _kms_options(p)
        return p

    serve.register(add)
    keys.register(add)
    files.register(add)
    from . import demo, query

    query.register(add)
    demo.register(add)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (also used by the console script)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Error as exc:
        print(f"ppml-kms: error: {exc.diagnostics()}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"ppml-kms: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ppml-kms: interrupted", file=sys.stderr)
        return 130


def console_main() -> None:
    sys.exit(main())
