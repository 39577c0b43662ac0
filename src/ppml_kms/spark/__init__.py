"""Spark integration: read encrypted CSV into DataFrames, decrypting inside the executors.

Requires ``pyspark`` and ``pyarrow``. The driver only lists files and reads headers (no keys);
each task decrypts whole segments of one file, cuts lines at split boundaries the Hadoop way,
parses them with ``pyarrow.csv`` and returns Arrow batches (``mapInArrow``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from ..kms.config import KmsConfig
from ._planning import DEFAULT_SPLIT_SIZE, Split, expand_paths, plan_splits

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.types import StructType

__all__ = ["DEFAULT_SPLIT_SIZE", "Split", "plan_splits", "read_encrypted_csv"]

_TASK_DDL = "path string, first_segment long, end_segment long, segment_size long, plaintext_size long"


def read_encrypted_csv(
    spark: SparkSession,
    paths: str | os.PathLike[str] | list[str | os.PathLike[str]],
    schema: StructType,
    *,
    kms: KmsConfig,
    header: bool = True,
    delimiter: str = ",",
    context: Mapping[str, str] | None = None,
    split_size: int = DEFAULT_SPLIT_SIZE,
) -> DataFrame:
    """Read ppml-kms encrypted CSV files (files or directories) into a DataFrame of ``schema``.

    Args:
        spark: the session.
        paths: encrypted files and/or directories of them.
        schema: the columns, types and nullability; kept exactly in the result.
        kms: where executors unwrap data keys. Its apikey is NOT shipped: executors resolve it
            from ``kms.credentials_file`` or their environment.
        header: the first line of every file is a header to skip.
        context: encryption-context pairs every file must carry.
        split_size: plaintext bytes per task (rounded to whole segments).

    Raises:
        ConfigError: a path does not exist or holds no files.
        FormatError, InvalidCiphertext: a header is not a readable ppml-kms header.
    """
    from pyspark.sql.pandas.types import to_arrow_schema

    arrow_schema = to_arrow_schema(schema)
    splits = plan_splits(expand_paths(paths), split_size)
    config = kms.without_secret()
    expected = dict(context or {})

    def decrypt_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from ._executor import decrypt_split_to_batches

        for batch in batches:
            for row in batch.to_pylist():
                split = Split(
                    row["path"], row["first_segment"], row["end_segment"], row["segment_size"], row["plaintext_size"]
                )
                yield from decrypt_split_to_batches(
                    split, config, arrow_schema, header=header, delimiter=delimiter, expected_context=expected
                )

    rows = [
        (s.path, s.first_segment, s.end_segment, s.segment_size, s.plaintext_size) for s in splits
    ]
    tasks = spark.createDataFrame(
        spark.sparkContext.parallelize(rows, len(rows)), _TASK_DDL
    )
    return tasks.mapInArrow(decrypt_partition, schema)
