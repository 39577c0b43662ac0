"""``ppml-kms server``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import int_range


def register(add) -> None:  # type: ignore[no-untyped-def]
    p = add(
        "server",
        _server,
        "run the eHSM-compatible KMS server (HTTPS, SQLite store)",
        kms=False,
        description="Run the eHSM-compatible KMS server over HTTPS. Keys, applications and the "
        "domain key that wraps them live in --data-dir (SQLite); on first start a self-signed "
        "certificate is written to DATA_DIR/tls/cert.pem, which clients trust with --ca-cert. "
        "The certificate covers localhost, 127.0.0.1 and ::1, plus every --hostname. "
        "SIGTERM or SIGINT stops the server cleanly.",
    )
    p.add_argument("--data-dir", required=True, type=Path, metavar="DIR", help="where keys and TLS files live")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument(
        "--port", type=int_range(0, 65535, "--port"), default=9000, help="port to listen on (default: 9000)"
    )
    p.add_argument(
        "--hostname",
        action="append",
        default=[],
        metavar="NAME",
        help="extra DNS name or IP address for the certificate, for clients on other hosts (repeatable)",
    )


def _server(args: argparse.Namespace) -> int:
    from ..server.run import serve

    serve(args.data_dir, host=args.host, port=args.port, hostnames=args.hostname)
    return 0
