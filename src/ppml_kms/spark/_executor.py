"""What runs inside Spark's Python workers: unwrap (cached), decrypt a split, cut lines, parse CSV.

Nothing here is ever on the driver's hot path, and no plaintext key crosses a process boundary:
tasks carry file paths, segment ranges and a :class:`~ppml_kms.kms.config.KmsConfig` without
its apikey; each worker resolves credentials locally and keeps unwrapped data keys in a
per-process cache (one KMS call per distinct data key per worker).
"""

from __future__ import annotations

import io
import re
import threading
from collections.abc import Iterator, Mapping

import pyarrow as pa
import pyarrow.csv as pacsv

from .. import format as fmt
from ..envelope import DataKeyCache, unwrap_header_key
from ..exceptions import Error, InvalidCiphertext
from ..kms.config import KmsConfig
from ..kms.ehsm import EhsmClient
from ._planning import Split

_CACHE = DataKeyCache()
_CLIENTS: dict[KmsConfig, EhsmClient] = {}
_LOCK = threading.Lock()

#: Plaintext bytes handed to the CSV parser at once (bounds a task's memory).
BATCH_BYTES = 8 << 20


def _client(config: KmsConfig) -> EhsmClient:
    with _LOCK:
        client = _CLIENTS.get(config)
        if client is None:
            client = EhsmClient.from_config(config.resolved())
            _CLIENTS[config] = client
        return client


def cache_stats() -> int:
    """KMS unwrap calls made by this process (for tests and benchmarks)."""
    return _CACHE.kms_calls


def iter_split_lines(
    split: Split, config: KmsConfig, expected_context: Mapping[str, str] | None = None
) -> Iterator[bytes]:
    """Yield chunks of whole lines belonging to ``split``, the Hadoop way.

    A split ``[start, end)`` owns every line that starts at a position ``p`` with
    ``start < p <= end`` (or ``p == 0`` for the first split): it skips the partial line it
    starts in and reads past ``end`` to finish its last line.
    """
    with open(split.path, "rb") as handle:
        header = fmt.read_header(handle)
        keys = unwrap_header_key(header, _client(config), cache=_CACHE, expected_context=expected_context)
        reader = fmt.SegmentReader(handle, header, keys)
        if reader.plaintext_size != split.plaintext_size:
            raise InvalidCiphertext(f"{split.path} changed while it was being read")
        size, end = reader.segment_size, split.end
        skipping = split.start > 0
        pending = bytearray()
        for index in range(split.first_segment, reader.num_segments):
            data = reader.read_segment(index)
            offset, local = index * size, 0
            if skipping:
                cut = data.find(b"\n")
                if cut < 0:
                    if offset + len(data) >= end:
                        return  # the line we start in runs past our end: it is not ours
                    continue
                if offset + cut >= end:
                    return
                local, skipping = cut + 1, False
            # Stop after the first newline at or beyond `end` (it ends the last line we own).
            search_from = max(local, end - offset)
            if search_from < len(data):
                cut = data.find(b"\n", search_from)
                if cut >= 0:
                    pending += memoryview(data)[local : cut + 1]
                    break
            pending += memoryview(data)[local:]
            if len(pending) >= BATCH_BYTES:
                cut = pending.rfind(b"\n")
                if cut >= 0:
                    yield bytes(pending[: cut + 1])
                    del pending[: cut + 1]
        if pending:
            yield bytes(pending)


_QUOTED = re.compile(r"'[^']*'")
_AFTER_COUNTS = re.compile(r"(Expected \d+ columns, got \d+).*", re.DOTALL)


def redact_arrow_error(message: str) -> str:
    """An Arrow CSV error without the decrypted data it quotes (rows and cell values stay secret)."""
    message = _AFTER_COUNTS.sub(r"\1", message)
    return _QUOTED.sub("'<redacted>'", message).strip()


def csv_batches(
    chunks: Iterator[bytes],
    schema: pa.Schema,
    *,
    skip_header: bool,
    delimiter: str = ",",
    source: str = "",
) -> Iterator[pa.RecordBatch]:
    """Parse chunks of whole lines into record batches of ``schema`` (nullability enforced)."""
    read_options = pacsv.ReadOptions(column_names=schema.names, use_threads=False)
    parse_options = pacsv.ParseOptions(delimiter=delimiter)
    convert_options = pacsv.ConvertOptions(
        column_types={f.name: f.type for f in schema},
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    first = True
    for chunk in chunks:
        if first and skip_header:
            cut = chunk.find(b"\n")
            chunk = chunk[cut + 1 :] if cut >= 0 else b""
        first = False
        if not chunk.strip():
            continue
        try:
            table = pacsv.read_csv(
                io.BytesIO(chunk),
                read_options=read_options,
                parse_options=parse_options,
                convert_options=convert_options,
            )
        except pa.ArrowInvalid as exc:
            raise Error(f"{source}: CSV does not match the schema: {redact_arrow_error(str(exc))}") from None
        for field in schema:
            if not field.nullable and table.column(field.name).null_count:
                raise Error(f"{source}: column {field.name!r} is declared not nullable but has empty values")
        table = table.cast(schema)
        yield from table.to_batches()


def decrypt_split_to_batches(
    split: Split,
    config: KmsConfig,
    schema: pa.Schema,
    *,
    header: bool,
    delimiter: str,
    expected_context: Mapping[str, str] | None,
) -> Iterator[pa.RecordBatch]:
    chunks = iter_split_lines(split, config, expected_context)
    yield from csv_batches(
        chunks, schema, skip_header=header and split.first_segment == 0, delimiter=delimiter, source=split.path
    )
