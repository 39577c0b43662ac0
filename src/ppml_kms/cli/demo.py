"""``ppml-kms demo``."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(add) -> None:  # type: ignore[no-untyped-def]
    p = add(
        "demo",
        _demo,
        "run the end-to-end demo on the iris data",
        kms=False,
        description="Run the end-to-end demo on the iris data: start a KMS server, enroll, generate a "
        "primary and a data key, encrypt the CSV files, then query them with Spark SQL while the "
        "executors decrypt them.",
    )
    p.add_argument(
        "--workdir", type=Path, metavar="DIR", help="empty or new directory for the demo's files (default: a new temporary one)"
    )
    p.add_argument("--input", type=Path, metavar="DIR", help="directory of CSV files to use (default: examples/data/iris)")


def _demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(args.workdir, args.input)
    return 0
