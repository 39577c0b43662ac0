"""One timed encrypt or decrypt of a file, run in a child process by ``format_bench.py``.

Usage: ``python _runner.py MODE SRC DST KEY_FILE [--segment-size N]`` with MODE one of
``ppml-encrypt``, ``ppml-decrypt``, ``fernet-encrypt``, ``fernet-decrypt``. Prints one JSON line:
``{"seconds": ..., "setup_seconds": ..., "plaintext_bytes": ...}``. ``seconds`` covers the work
only (opening, streaming, publishing the output); ``setup_seconds`` the imports and set-up before
it. Interpreter start-up is in neither: the parent times the whole process as well.

The key is read from ``KEY_FILE`` (32 random bytes), not from the command line or environment.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

_T0 = time.perf_counter()


def _ppml(
    mode: str, src: Path, dst: Path, key: bytes, segment_size: int | None
) -> tuple[int, float]:
    from ppml_kms import envelope
    from ppml_kms.kms.base import DataKey, KeyManagementService

    class FixedKeyKms(KeyManagementService):
        """Stands in for a real KMS: "unwraps" to the benchmark's fixed data key, no network."""

        kind = "bench"

        def create_primary_key(self) -> str:
            return "bench-primary"

        def generate_data_key(
            self, primary_key: str, length: int = 32, aad: bytes = b""
        ) -> DataKey:
            return DataKey(key, b"bench-wrapped")

        def generate_wrapped_data_key(
            self, primary_key: str, length: int = 32, aad: bytes = b""
        ) -> bytes:
            return b"bench-wrapped"

        def unwrap_data_key(self, primary_key: str, wrapped: bytes, aad: bytes = b"") -> bytes:
            return key

    kms = FixedKeyKms()
    if mode == "ppml-encrypt":
        options = {} if segment_size is None else {"segment_size": segment_size}
        encryptor = envelope.FileEncryptor.from_kms(
            kms, "bench-primary", b"bench-wrapped", cache=envelope.DataKeyCache(), **options
        )
        start = time.perf_counter()
        size = encryptor.encrypt_file(src, dst)
    else:
        start = time.perf_counter()
        size = envelope.decrypt_file(src, dst, kms, cache=envelope.DataKeyCache())
    return size, time.perf_counter() - start


def _fernet(mode: str, src: Path, dst: Path, key: bytes) -> tuple[int, float]:
    """What BigDL PPML did: the whole file in memory, one Fernet token for all of it."""
    import base64

    from cryptography.fernet import Fernet

    fernet = Fernet(base64.urlsafe_b64encode(key))
    start = time.perf_counter()
    data = src.read_bytes()
    out = fernet.encrypt(data) if mode == "fernet-encrypt" else fernet.decrypt(data)
    del data
    dst.write_bytes(out)
    size = len(out) if mode == "fernet-decrypt" else src.stat().st_size
    return size, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "mode", choices=["ppml-encrypt", "ppml-decrypt", "fernet-encrypt", "fernet-decrypt"]
    )
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("key_file", type=Path)
    parser.add_argument("--segment-size", type=int)
    args = parser.parse_args()
    key = args.key_file.read_bytes()
    if args.mode.startswith("ppml"):
        size, seconds = _ppml(args.mode, args.src, args.dst, key, args.segment_size)
    else:
        size, seconds = _fernet(args.mode, args.src, args.dst, key)
    total = time.perf_counter() - _T0
    report = {"seconds": seconds, "setup_seconds": total - seconds, "plaintext_bytes": size}
    report["self_peak_rss_kib"] = _peak_rss_kib()
    print(json.dumps(report))


def _peak_rss_kib() -> int | None:
    """This process's own high-water RSS (VmHWM), a cross-check of the parent's measurement."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


if __name__ == "__main__":
    main()
