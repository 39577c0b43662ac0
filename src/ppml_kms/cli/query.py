"""``ppml-kms query``: SQL over encrypted CSV files with a local Spark."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..exceptions import ConfigError
from ._common import kms_config


def register(add) -> None:  # type: ignore[no-untyped-def]
    p = add(
        "query",
        _query,
        "run SQL on encrypted CSV files with a local Spark; files are decrypted inside the executors",
    )
    p.add_argument("input", type=Path, nargs="+", help="encrypted CSV files or directories of them")
    p.add_argument(
        "--schema",
        required=True,
        help="column types as Spark DDL, e.g. \"`sepal length` DOUBLE NOT NULL, class STRING NOT NULL\"",
    )
    p.add_argument("--table", default="data", help="view name to query (default: data)")
    p.add_argument("--sql", help="query to run (default: SELECT * FROM <table>)")
    p.add_argument("--no-header", action="store_true", help="the files have no header line")
    p.add_argument("--delimiter", default=",", help="field delimiter (default: ,)")
    p.add_argument("--limit", type=int, default=20, help="rows to show (default: 20)")
    p.add_argument("--master", default="local[*]", help="Spark master (default: local[*])")


def _query(args: argparse.Namespace) -> int:
    config = kms_config(args)
    config.require_url()
    config.require_credentials()
    if not config.credentials_file:
        raise ConfigError(
            "query needs a credentials file (--credentials or PPML_KMS_CREDENTIALS) so that Spark's "
            "executors can authenticate without the apikey travelling in task closures"
        )
    if len(args.delimiter) != 1:
        raise ConfigError("--delimiter must be one character")
    from pyspark.errors import PySparkException
    from pyspark.sql import SparkSession
    from pyspark.sql.types import StructType

    from ..demo import spark_session
    from ..spark import read_encrypted_csv

    existing = SparkSession.getActiveSession()  # e.g. when called from a notebook or tests
    spark = existing or spark_session("ppml-kms query", master=args.master)
    try:
        try:
            schema = StructType.fromDDL(args.schema)
        except PySparkException as exc:
            raise ConfigError(f"--schema is not valid Spark DDL: {_first_line(exc)}") from None
        df = read_encrypted_csv(
            spark, args.input, schema, kms=config, header=not args.no_header, delimiter=args.delimiter
        )
        df.createOrReplaceTempView(args.table)
        try:
            result = spark.sql(args.sql or f"SELECT * FROM `{args.table}`")
            print(result._jdf.showString(args.limit, 20, False).rstrip("\n"))
        except PySparkException as exc:
            raise ConfigError(f"query failed: {_first_line(exc)}") from None
    finally:
        if existing is None:
            spark.stop()
    return 0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or getattr(exc, "getMessage", lambda: "")() or ""
    for line in text.splitlines():
        if "ppml_kms.exceptions." in line:
            return line.split("ppml_kms.exceptions.", 1)[1]
    return text.splitlines()[0] if text else type(exc).__name__
