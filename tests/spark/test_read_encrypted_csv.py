"""Spark reads encrypted CSV: decryption happens in the executors, schema kept, splits correct."""

from __future__ import annotations

import csv
import io
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ppml_kms import envelope
from ppml_kms.demo import iris_schema, run_demo
from ppml_kms.spark import read_encrypted_csv

IRIS = Path(__file__).resolve().parents[2] / "examples" / "data" / "iris"


def _expected_versicolor() -> list[tuple]:
    rows = []
    for name in ("iris_2.csv", "iris_1.csv"):
        with open(IRIS / name, newline="") as handle:
            for rec in csv.DictReader(handle):
                if rec["class"] == "Iris-versicolor":
                    rows.append(tuple(float(rec[k]) for k in list(rec)[:4]) + (rec["class"],))
    return rows


def test_demo_query_returns_all_50_versicolor_rows(spark, tmp_path) -> None:
    out = io.StringIO()
    count = run_demo(tmp_path / "demo", IRIS, out=out, spark=spark)
    text = out.getvalue()
    assert count == 50
    for name, kind in [("sepal length", "double"), ("petal width", "double"), ("class", "string")]:
        assert f" |-- {name}: {kind} (nullable = false)" in text
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0].split("|")[1:-1] == ["sepal length", "sepal width", "petal length", "petal width", "          class"]
    assert [c.strip() for c in table[1].split("|")[1:-1]] == ["6.6", "3.0", "4.4", "1.4", "Iris-versicolor"]
    assert len(table) == 21  # header + 20 rows
    for step in ("Generate Primary Key Successfully!", "Generate Data Key Successfully!", "Encrypt Successfully!"):
        assert step in text
    keys = tmp_path / "demo" / "keys"
    assert sorted(p.name for p in keys.iterdir()) == ["encrypted_data_key", "encrypted_primary_key"]
    assert sorted(p.name for p in (tmp_path / "demo" / "encrypted_output").iterdir()) == [
        "iris_1.csv.encrypted",
        "iris_2.csv.encrypted",
    ]


def test_query_result_matches_plaintext_and_schema(spark, tmp_path, app) -> None:
    with app.client() as client:
        keyid = client.create_primary_key()
        wrapped = client.generate_wrapped_data_key(keyid, 32, envelope.DATA_KEY_AAD)
        enc = envelope.FileEncryptor.from_kms(client, keyid, wrapped)
    for name in ("iris_1.csv", "iris_2.csv"):
        enc.encrypt_file(IRIS / name, tmp_path / f"{name}.encrypted")
    df = read_encrypted_csv(spark, tmp_path, iris_schema(), kms=app.config())
    assert df.schema == iris_schema()
    assert all(not f.nullable for f in df.schema.fields)
    df.createOrReplaceTempView("iris_t")
    rows = [tuple(r) for r in spark.sql("SELECT * FROM iris_t WHERE class = 'Iris-versicolor'").collect()]
    assert sorted(rows) == sorted(_expected_versicolor())
    assert df.count() == 150


def test_large_file_is_split_across_tasks(spark, tmp_path, app) -> None:
    rng = random.Random(7)
    lines = ["id,name,score"]
    for i in range(20_000):
        lines.append(f"{i},{'n' * rng.randint(0, 60)},{rng.random():.6f}")
    plain = tmp_path / "big.csv"
    plain.write_text("\n".join(lines) + "\n")
    with app.client() as client:
        keyid = client.create_primary_key()
        wrapped = client.generate_wrapped_data_key(keyid, 32, envelope.DATA_KEY_AAD)
        enc = envelope.FileEncryptor.from_kms(client, keyid, wrapped, segment_size=4096)
    (tmp_path / "enc").mkdir()
    enc.encrypt_file(plain, tmp_path / "enc" / "big.csv.encrypted")
    from pyspark.sql.types import DoubleType, LongType, StringType, StructField, StructType

    schema = StructType(
        [StructField("id", LongType(), False), StructField("name", StringType(), False),
         StructField("score", DoubleType(), False)]
    )
    df = read_encrypted_csv(spark, tmp_path / "enc", schema, kms=app.config(), split_size=64 * 1024)
    assert df.rdd.getNumPartitions() > 10
    got = sorted(tuple(r) for r in df.collect())
    expected = [(int(a), b, float(c)) for a, b, c in (line.split(",") for line in lines[1:])]
    assert got == sorted(expected)


def test_tampered_file_fails_the_job(spark, tmp_path, app) -> None:
    with app.client() as client:
        keyid = client.create_primary_key()
        wrapped = client.generate_wrapped_data_key(keyid, 32, envelope.DATA_KEY_AAD)
        enc = envelope.FileEncryptor.from_kms(client, keyid, wrapped)
    target = tmp_path / "iris_2.csv.encrypted"
    enc.encrypt_file(IRIS / "iris_2.csv", target)
    blob = bytearray(target.read_bytes())
    blob[-3] ^= 1
    target.write_bytes(bytes(blob))
    df = read_encrypted_csv(spark, target, iris_schema(), kms=app.config())
    with pytest.raises(Exception, match="InvalidCiphertext|decryption failed"):
        df.collect()


def test_no_secret_in_spark_configuration_or_environment(spark, tmp_path, app) -> None:
    with app.client() as client:
        keyid = client.create_primary_key()
        dk = client.generate_data_key(keyid, 32, envelope.DATA_KEY_AAD)
    enc = envelope.FileEncryptor(kms_type="ehsm", primary_key=keyid, wrapped_key=dk.wrapped, data_key=dk.plaintext)
    enc.encrypt_file(IRIS / "iris_1.csv", tmp_path / "iris_1.csv.encrypted")
    read_encrypted_csv(spark, tmp_path, iris_schema(), kms=app.config()).count()
    conf = " ".join(f"{k}={v}" for k, v in spark.sparkContext.getConf().getAll())
    import base64

    for secret in (app.apikey, dk.plaintext.hex(), base64.b64encode(dk.plaintext).decode()):
        assert secret not in conf
        assert all(secret not in v for v in os.environ.values())


def test_ppml_kms_demo_command(tmp_path) -> None:
    """`ppml-kms demo` as a user runs it: its own server, its own Spark, exit 0, the table."""
    exe = shutil.which("ppml-kms", path=str(Path(sys.executable).parent)) or "ppml-kms"
    done = subprocess.run(
        [exe, "demo", "--workdir", str(tmp_path / "w")], capture_output=True, text=True, timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "|         6.6|        3.0|         4.4|        1.4|Iris-versicolor|" in done.stdout
    assert "50 rows match" in done.stdout
    assert "Traceback" not in done.stderr


def test_one_kms_call_per_data_key_per_executor(spark, tmp_path, app) -> None:
    """Many tasks over files sharing one data key cost a KMS Decrypt per Python worker, not per task."""
    import logging

    with app.client() as client:
        keyid = client.create_primary_key()
        wrapped = client.generate_wrapped_data_key(keyid, 32, envelope.DATA_KEY_AAD)
        enc = envelope.FileEncryptor.from_kms(client, keyid, wrapped, segment_size=1024)
    (tmp_path / "enc").mkdir()
    for name in ("iris_1.csv", "iris_2.csv"):
        enc.encrypt_file(IRIS / name, tmp_path / "enc" / f"{name}.encrypted")

    calls: list[str] = []

    class Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "Action='Decrypt'" in record.getMessage():
                calls.append(record.getMessage())

    logger = logging.getLogger("ppml_kms.server.app")
    handler, level = Count(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        df = read_encrypted_csv(spark, tmp_path / "enc", iris_schema(), kms=app.config(), split_size=1024)
        tasks = df.rdd.getNumPartitions()
        assert df.count() == 150
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert tasks >= 6
    assert 1 <= len(calls) <= 2 < tasks  # local[2]: at most one unwrap in each of two Python workers
