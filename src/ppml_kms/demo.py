"""The end-to-end run of the original system, on the iris data (``ppml-kms demo``).

1. start a KMS server (in this process, loopback, temporary data directory, self-signed HTTPS);
2. enroll an application; 3. generate a primary key; 4. generate a data key under it;
5. encrypt every CSV of the input directory; 6. a local Spark job decrypts the files inside its
executors and prints the schema and an SQL query's result.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import TextIO

from . import envelope
from .exceptions import ConfigError
from .kms.config import ENV_APIKEY, ENV_APPID, ENV_CA_CERT, ENV_URL, KmsConfig, write_credentials_file
from .kms.ehsm import EhsmClient

__all__ = ["IRIS_DDL", "default_input_dir", "iris_schema", "run_demo", "spark_session"]

IRIS_COLUMNS = (
    ("sepal length", "double"),
    ("sepal width", "double"),
    ("petal length", "double"),
    ("petal width", "double"),
    ("class", "string"),
)
IRIS_DDL = ", ".join(f"`{name}` {kind} NOT NULL" for name, kind in IRIS_COLUMNS)
QUERY = "SELECT * FROM iris WHERE class = 'Iris-versicolor'"


def default_input_dir() -> Path:
    """``examples/data/iris`` of the working directory, else of the source checkout."""
    here = Path("examples/data/iris")
    if here.is_dir():
        return here
    return Path(__file__).resolve().parents[2] / "examples" / "data" / "iris"


def iris_schema():  # type: ignore[no-untyped-def]
    from pyspark.sql.types import DoubleType, StringType, StructField, StructType

    kinds = {"double": DoubleType(), "string": StringType()}
    return StructType([StructField(name, kinds[kind], nullable=False) for name, kind in IRIS_COLUMNS])


def spark_session(app_name: str = "ppml-kms demo", master: str = "local[2]"):  # type: ignore[no-untyped-def]
    """A quiet local Spark session whose Python workers run this interpreter."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    log4j = Path(__file__).with_name("spark") / "log4j2.properties"
    java_opts = f"-Dlog4j2.configurationFile=file:{log4j}"
    spark = (
        SparkSession.builder.master(master)
        .appName(app_name)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.driver.extraJavaOptions", java_opts)
        .config("spark.executor.extraJavaOptions", java_opts)
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    # PySpark logs every failed query with a JVM stack trace; our callers report errors themselves.
    for name in ("SQLQueryContextLogger", "DataFrameQueryContextLogger"):
        logging.getLogger(name).disabled = True
    return spark


def run_demo(
    workdir: Path | None = None,
    input_dir: Path | None = None,
    *,
    out: TextIO = sys.stdout,
    spark=None,  # type: ignore[no-untyped-def]
) -> int:
    """Run the six steps; returns the number of rows the query matched.

    Raises:
        ConfigError: the input directory holds no CSV files or the work directory is not empty.
        Error: any step failed.
    """
    from .server.run import ServerThread

    input_dir = Path(input_dir or default_input_dir())
    if not input_dir.is_dir():
        raise ConfigError(f"input directory {input_dir} does not exist")
    csv_files = sorted(p for p in input_dir.glob("*.csv") if p.is_file())
    if not csv_files:
        raise ConfigError(f"no CSV files in {input_dir}")
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="ppml-kms-demo-"))
    workdir = Path(workdir).resolve()
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"demo work directory {workdir} exists and is not a directory")
    workdir.mkdir(parents=True, exist_ok=True)
    if any(workdir.iterdir()):
        raise ConfigError(f"demo work directory {workdir} is not empty; choose another with --workdir")
    os.chmod(workdir, 0o700)

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    say(f"[INFO] Demo Work Directory Is {workdir}")
    say("[INFO] Start KMS Server...")
    with ServerThread(workdir / "kms-data", host="127.0.0.1", port=0) as server:
        say(f"KMS Server Is Running At {server.url} (CA certificate {server.ca_cert})")

        say("[INFO] Enroll Application Start...")
        with EhsmClient(server.url, ca_cert=str(server.ca_cert)) as anonymous:
            appid, apikey = anonymous.enroll()
        credentials = workdir / "credentials"
        write_credentials_file(
            credentials,
            {ENV_URL: server.url, ENV_APPID: appid, ENV_APIKEY: apikey, ENV_CA_CERT: str(server.ca_cert)},
        )
        say(f"Enroll Successfully! appid {appid}; credentials in {credentials} (mode 0600)")
        config = KmsConfig(
            url=server.url, appid=appid, apikey=apikey, ca_cert=str(server.ca_cert),
            credentials_file=str(credentials),
        )
        keys_dir = workdir / "keys"
        keys_dir.mkdir(mode=0o700)
        primary_path = keys_dir / "encrypted_primary_key"
        data_key_path = keys_dir / "encrypted_data_key"
        with EhsmClient.from_config(config) as client:
            say("[INFO] Generate Primary Key Start...")
            primary = client.create_primary_key()
            envelope.write_primary_key_file(primary_path, primary)
            say("Generate Primary Key Successfully!")

            say("[INFO] Generate Data Key Start...")
            wrapped = client.generate_wrapped_data_key(primary, 32, envelope.DATA_KEY_AAD)
            envelope.write_data_key_file(data_key_path, wrapped)
            say("Generate Data Key Successfully!")

            say("[INFO] Encrypt Files Start...")
            encryptor = envelope.FileEncryptor.from_kms(
                client,
                envelope.read_primary_key_file(primary_path),
                envelope.read_data_key_file(data_key_path),
            )
            output_dir = workdir / "encrypted_output"
            for src in csv_files:
                dst = output_dir / f"{src.name}.encrypted"
                encryptor.encrypt_file(src, dst)
                say(f"Encrypt Successfully! Encrypted Output Is {dst}")
            del encryptor

        say("[INFO] Decrypt Files And Query Them With Spark Start...")
        from .spark import read_encrypted_csv

        own_spark = spark is None
        session = spark or spark_session()
        try:
            df = read_encrypted_csv(session, output_dir, iris_schema(), kms=config.without_secret())
            df.createOrReplaceTempView("iris")
            result = session.sql(QUERY)
            say("[INFO] The Result Of Decrypted CSV Files Content Queried By Spark Is As Below:")
            # printSchema/show print through the JVM-less Python side: capture via their string forms.
            say(df._jdf.schema().treeString().rstrip("\n"))  # same text as df.printSchema()
            say(result._jdf.showString(20, 20, False).rstrip("\n"))  # same text as result.show()
            count = result.count()
            say(f"[INFO] {count} rows match {QUERY!r}")
        finally:
            if own_spark:
                session.stop()
    say("[INFO] KMS Server Stopped. Demo Finished Successfully.")
    return count
