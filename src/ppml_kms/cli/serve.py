"""``ppml-kms server``."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(add) -> None:  # type: ignore[no-untyped-def]
    p = add(
        "server",
        _server,
        "run the eHSM-compatible KMS server (HTTPS, SQLite store; self-signed certificate on first start)",
        kms=False,
    )
    p.add_argument("--data-dir", required=True, type=Path, help="where keys, the domain key and TLS files live")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=9000, help="port to listen on (default: 9000)")


def _server(args: argparse.Namespace) -> int:
    from ..server.run import serve

    serve(args.data_dir, host=args.host, port=args.port)
    return 0
