"""The SQLite key store, the domain key, the replay cache, and persistence across restarts."""

from __future__ import annotations

import base64
import os
import pickle
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from ppml_kms.exceptions import KeyFileError
from ppml_kms.server.replay import MemoryReplayCache
from ppml_kms.server.run import ServerThread
from ppml_kms.server.store import (
    DomainKey,
    KeyStoreError,
    SQLiteKeyStore,
    key_check_matches,
    load_or_create_domain_key,
    open_sqlite_store,
)

from .conftest import FakeClock, enroll


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def new_key(store: SQLiteKeyStore, creator: str = "app-1", material: bytes = b"k" * 32) -> str:
    return store.create_key(
        creator=creator,
        keyspec="EH_AES_GCM_256",
        origin="EH_INTERNAL_KEY",
        keyusage="EH_KEYUSAGE_ENCRYPT_DECRYPT",
        material=material,
        now_ms=1_700_000_000_000,
    ).keyid


def test_persistence_across_restart(tmp_path: Path) -> None:
    data = tmp_path / "kms"
    with ServerThread(data) as first, httpx.Client(verify=first.ssl_context()) as http:
        caller = enroll(http, first.url)
        keyid = caller.create_key()
        sealed = caller.ok("GenerateDataKey", {"keyid": keyid, "keylen": 32, "aad": "test"})
    domain_key = (data / "domain.key").read_bytes()
    cert = (data / "tls" / "cert.pem").read_bytes()
    tls_key = (data / "tls" / "key.pem").read_bytes()

    with ServerThread(data) as second, httpx.Client(verify=second.ssl_context()) as http:
        assert second.port != 0
        caller.http, caller.url = http, second.url
        assert [k["keyid"] for k in caller.ok("ListKey")["list"]] == [keyid]
        opened = caller.ok(
            "Decrypt", {"keyid": keyid, "ciphertext": sealed["ciphertext"], "aad": "test"}
        )
        assert opened["plaintext"] == sealed["plaintext"]
    assert (data / "domain.key").read_bytes() == domain_key
    assert (data / "tls" / "cert.pem").read_bytes() == cert
    assert (data / "tls" / "key.pem").read_bytes() == tls_key


def test_file_modes(tmp_path: Path) -> None:
    data = tmp_path / "fresh" / "kms"
    old = os.umask(0o022)
    try:
        with ServerThread(data):
            pass
    finally:
        os.umask(old)
    assert mode(data) == 0o700
    assert mode(data / "domain.key") == 0o600
    assert mode(data / "kms.sqlite3") == 0o600
    assert mode(data / "tls") == 0o700
    assert mode(data / "tls" / "key.pem") == 0o600


def test_domain_key_created_once(tmp_path: Path) -> None:
    path = tmp_path / "domain.key"
    load_or_create_domain_key(path)
    first = path.read_bytes()
    assert len(first) == 32 and mode(path) == 0o600
    load_or_create_domain_key(path)
    assert path.read_bytes() == first
    assert list(tmp_path.iterdir()) == [path]  # no temporary files left behind


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_domain_key_wrong_size(tmp_path: Path, size: int) -> None:
    path = tmp_path / "domain.key"
    path.write_bytes(b"\x00" * size)
    with pytest.raises(KeyFileError, match="exactly 32 bytes"):
        load_or_create_domain_key(path)
    assert path.read_bytes() == b"\x00" * size  # never overwritten


def test_domain_key_hidden() -> None:
    key = DomainKey(b"\x01" * 32)
    assert "01" not in repr(key) and "\\x01" not in repr(key)
    with pytest.raises(TypeError):
        pickle.dumps(key)
    with pytest.raises(ValueError):
        DomainKey(b"short")


def test_secrets_are_wrapped_at_rest(tmp_path: Path) -> None:
    material = b"M" * 32
    with open_sqlite_store(tmp_path) as store:
        store.add_app("app-1", "APIKEY-SHOULD-NOT-BE-VISIBLE-123", 0)
        keyid = new_key(store, material=material)
        assert store.apikey_for("app-1") == "APIKEY-SHOULD-NOT-BE-VISIBLE-123"
        record = store.get_key(keyid)
        assert record is not None and store.release_key_material(record) == material
        assert "wrapped" not in repr(record) and repr(material) not in repr(record)
    raw = (tmp_path / "kms.sqlite3").read_bytes()
    assert b"APIKEY-SHOULD-NOT-BE-VISIBLE" not in raw and material not in raw


def test_rows_cannot_be_swapped(tmp_path: Path) -> None:
    with open_sqlite_store(tmp_path) as store:
        mine, theirs = new_key(store, "app-1", b"A" * 32), new_key(store, "app-2", b"B" * 32)
    with sqlite3.connect(tmp_path / "kms.sqlite3") as db:
        # Move app-2's key blob into app-1's row, and claim app-2's key for app-1.
        blob = db.execute("SELECT key_blob FROM cmks WHERE keyid = ?", (theirs,)).fetchone()[0]
        db.execute("UPDATE cmks SET key_blob = ? WHERE keyid = ?", (blob, mine))
        db.execute("UPDATE cmks SET creator = 'app-1' WHERE keyid = ?", (theirs,))
    db.close()
    with open_sqlite_store(tmp_path) as store:
        for keyid in (mine, theirs):
            record = store.get_key(keyid)
            assert record is not None
            with pytest.raises(KeyStoreError, match="authentication"):
                store.release_key_material(record)


def test_wrong_domain_key_fails_closed(tmp_path: Path) -> None:
    with open_sqlite_store(tmp_path) as store:
        store.add_app("app-1", "apikey", 0)
    with pytest.raises(KeyStoreError, match="does not match"):
        SQLiteKeyStore(tmp_path / "kms.sqlite3", DomainKey(os.urandom(32)))
    # Below the key check, a blob still refuses to unwrap under another key.
    with pytest.raises(KeyStoreError, match="authentication"):
        DomainKey(os.urandom(32)).unwrap(DomainKey(b"k" * 32).wrap(b"secret", b"aad"), b"aad")


# -- the domain key check value --------------------------------------------------------------------


def _meta(data: Path) -> list[tuple[str, bytes]]:
    with sqlite3.connect(data / "kms.sqlite3") as db:
        rows = db.execute("SELECT name, value FROM meta").fetchall()
    db.close()
    return rows


def _populated(data: Path) -> tuple[str, bytes]:
    """A data directory with one app and one key; returns the keyid and the domain key bytes."""
    with open_sqlite_store(data) as store:
        store.add_app("app-1", "A" * 32, 0)
        keyid = new_key(store)
    return keyid, (data / "domain.key").read_bytes()


def test_key_check_value_written_on_first_open(tmp_path: Path) -> None:
    open_sqlite_store(tmp_path).close()
    key = (tmp_path / "domain.key").read_bytes()
    [(name, value)] = _meta(tmp_path)
    assert name == "domain_key_check"
    assert key_check_matches(DomainKey(key), value)
    assert not key_check_matches(DomainKey(os.urandom(32)), value)
    assert not key_check_matches(DomainKey(key), b"garbage")
    assert key not in value and key not in (tmp_path / "kms.sqlite3").read_bytes()
    open_sqlite_store(tmp_path).close()  # verified, not rewritten
    assert _meta(tmp_path) == [(name, value)]


def test_missing_domain_key_beside_data_is_refused(tmp_path: Path) -> None:
    _populated(tmp_path)
    (tmp_path / "domain.key").unlink()
    before = (tmp_path / "kms.sqlite3").read_bytes()
    with pytest.raises(KeyFileError) as caught:
        open_sqlite_store(tmp_path)
    assert caught.value.diagnostics() == (
        f"domain key {tmp_path / 'domain.key'} is missing but {tmp_path / 'kms.sqlite3'} holds "
        "keys; restore the domain key or use a new data directory"
    )
    assert not (tmp_path / "domain.key").exists()  # no new key was created
    assert (tmp_path / "kms.sqlite3").read_bytes() == before


@pytest.mark.parametrize("table", ["apps", "cmks"])
def test_missing_domain_key_refused_for_apps_or_keys_alone(tmp_path: Path, table: str) -> None:
    with open_sqlite_store(tmp_path) as store:
        store.add_app("app-1", "A" * 32, 0)
        new_key(store)
    with sqlite3.connect(tmp_path / "kms.sqlite3") as db:
        db.execute(f"DELETE FROM {'cmks' if table == 'apps' else 'apps'}")
    db.close()
    (tmp_path / "domain.key").unlink()
    with pytest.raises(KeyFileError, match="is missing but"):
        open_sqlite_store(tmp_path)


def test_replaced_domain_key_is_refused(tmp_path: Path) -> None:
    keyid, original = _populated(tmp_path)
    other = os.urandom(32)
    (tmp_path / "domain.key").write_bytes(other)
    with pytest.raises(KeyStoreError) as caught:
        open_sqlite_store(tmp_path)
    message = caught.value.diagnostics()
    assert message == (
        f"domain key {tmp_path / 'domain.key'} does not match {tmp_path / 'kms.sqlite3'}, which "
        "was initialised with another domain key; restore the original domain key or use a new "
        "data directory"
    )
    assert (tmp_path / "domain.key").read_bytes() == other  # never overwritten
    (tmp_path / "domain.key").write_bytes(original)
    with open_sqlite_store(tmp_path) as store:  # the original key still works
        assert store.apikey_for("app-1") == "A" * 32
        record = store.get_key(keyid)
        assert record is not None and store.release_key_material(record) == b"k" * 32


def test_replaced_domain_key_refused_even_without_data(tmp_path: Path) -> None:
    open_sqlite_store(tmp_path).close()
    (tmp_path / "domain.key").write_bytes(os.urandom(32))
    with pytest.raises(KeyStoreError, match="does not match"):
        open_sqlite_store(tmp_path)


def test_missing_domain_key_without_data_starts_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    open_sqlite_store(tmp_path).close()
    (tmp_path / "domain.key").unlink()
    with open_sqlite_store(tmp_path) as store:
        store.add_app("app-1", "A" * 32, 0)
    key = (tmp_path / "domain.key").read_bytes()
    assert key_check_matches(DomainKey(key), _meta(tmp_path)[0][1])
    assert "it now uses the new domain key" in caplog.text
    with open_sqlite_store(tmp_path) as store:
        assert store.apikey_for("app-1") == "A" * 32


def _drop_check_value(data: Path) -> None:
    """Make ``data`` look like a data directory from before key-check values."""
    with sqlite3.connect(data / "kms.sqlite3") as db:
        db.execute("DROP TABLE meta")
    db.close()


def test_older_database_gets_a_check_value(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    _, key = _populated(tmp_path)
    _drop_check_value(tmp_path)
    with open_sqlite_store(tmp_path) as store:
        assert store.apikey_for("app-1") == "A" * 32
    assert key_check_matches(DomainKey(key), _meta(tmp_path)[0][1])
    assert "added a domain key check value" in caplog.text
    assert "do not unwrap" not in caplog.text


def test_older_database_with_a_foreign_key_is_refused(tmp_path: Path) -> None:
    _populated(tmp_path)
    _drop_check_value(tmp_path)
    (tmp_path / "domain.key").write_bytes(os.urandom(32))
    with pytest.raises(KeyStoreError, match="does not unwrap any secret stored in"):
        open_sqlite_store(tmp_path)
    assert _meta(tmp_path) == []  # nothing was recorded for the wrong key


def test_older_database_with_mixed_keys_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _populated(tmp_path)
    _drop_check_value(tmp_path)
    foreign = DomainKey(os.urandom(32))
    with sqlite3.connect(tmp_path / "kms.sqlite3") as db:  # an app enrolled under another key
        blob = foreign.wrap(b"B" * 32, b'["ppml-kms/apikey/v1", "app-2"]')
        db.execute("INSERT INTO apps VALUES ('app-2', ?, 0)", (blob,))
    db.close()
    with open_sqlite_store(tmp_path) as store:
        assert store.apikey_for("app-1") == "A" * 32
    assert "1 of the secrets" in caplog.text and "do not unwrap" in caplog.text


def test_server_refuses_a_missing_domain_key(tmp_path: Path) -> None:
    data = tmp_path / "kms"
    with ServerThread(data) as server, httpx.Client(verify=server.ssl_context()) as http:
        enroll(http, server.url)
    (data / "domain.key").unlink()
    with pytest.raises(KeyFileError, match="is missing but"):
        ServerThread(data).start()
    assert not (data / "domain.key").exists()


def _server_cli(data: Path) -> subprocess.CompletedProcess[str]:
    """``ppml-kms server --data-dir DATA`` as a real process (expected to refuse to start)."""
    return subprocess.run(
        [sys.executable, "-m", "ppml_kms.cli", "server", "--data-dir", str(data), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_reports_a_replaced_domain_key_in_one_line(tmp_path: Path) -> None:
    data = tmp_path / "kms"
    _populated(data)
    (data / "domain.key").write_bytes(os.urandom(32))
    result = _server_cli(data)
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"ppml-kms: error: domain key {data / 'domain.key'} does not")
    (data / "domain.key").unlink()
    result = _server_cli(data)
    assert result.returncode == 1, result.stderr
    assert result.stderr == (
        f"ppml-kms: error: domain key {data / 'domain.key'} is missing but "
        f"{data / 'kms.sqlite3'} holds keys; restore the domain key or use a new data directory\n"
    )


def test_store_operations(tmp_path: Path) -> None:
    with open_sqlite_store(tmp_path) as store:
        assert store.apikey_for("nobody") is None
        assert store.get_key("00000000-0000-4000-8000-000000000000") is None
        a, b = new_key(store), new_key(store)
        new_key(store, "app-2")
        assert [k.keyid for k in store.list_keys("app-1")] == sorted([a, b])  # same creation time
        assert len(store.list_keys("app-1", limit=1)) == 1
        assert not store.set_key_state(a, "app-2", 0)
        assert store.set_key_state(a, "app-1", 0)
        assert store.get_key(a).key_state == 0  # type: ignore[union-attr]
        assert not store.delete_key(a, "app-2")
        assert store.delete_key(a, "app-1")
        assert store.delete_all_keys("app-1") == 1
        assert store.list_keys("app-1") == [] and len(store.list_keys("app-2")) == 1
    with pytest.raises(KeyStoreError, match="closed"):
        store.list_keys("app-1")
    store.close()  # twice is fine


def test_store_is_thread_safe(tmp_path: Path) -> None:
    with open_sqlite_store(tmp_path) as store:
        errors: list[BaseException] = []

        def work() -> None:
            try:
                for _ in range(20):
                    record = store.get_key(new_key(store))
                    assert record is not None and store.release_key_material(record) == b"k" * 32
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and len(store.list_keys("app-1")) == 160


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "kms.sqlite3") as db:
        db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(KeyStoreError, match="schema version 99"):
        open_sqlite_store(tmp_path)


class TestReplayCache:
    def test_rule(self) -> None:
        cache = MemoryReplayCache(clock=FakeClock())
        assert cache.record("a", "n1", "t1") and cache.record("a", "n2", "t2")
        assert cache.seen("a", "n1", "t2") and not cache.record("a", "n1", "t2")
        assert not cache.seen("a", "n1", "t3") and not cache.seen("a", "n3", "t1")
        assert not cache.seen("b", "n1", "t1")

    def test_absent_nonce(self) -> None:
        cache = MemoryReplayCache(clock=FakeClock())
        assert cache.record("a", None, "t1")
        assert cache.seen("a", None, "t1")
        assert not cache.seen("a", "", "t1")  # an empty nonce is not an absent one

    def test_entries_expire_after_20_minutes(self) -> None:
        clock = FakeClock()
        cache = MemoryReplayCache(clock=clock)
        assert cache.record("a", "n", "t")
        clock.advance(20 * 60 - 1)
        assert cache.seen("a", "n", "t")
        clock.advance(2)
        assert not cache.seen("a", "n", "t")
        assert cache.record("a", "n", "t")

    def test_idle_apps_are_swept(self) -> None:
        clock = FakeClock()
        cache = MemoryReplayCache(clock=clock)
        for i in range(100):
            cache.record(f"app-{i}", "n", "t")
        clock.advance(21 * 60)
        cache.seen("other", "n", "t")
        assert cache._apps == {}

    def test_record_is_atomic(self) -> None:
        cache = MemoryReplayCache()
        results: list[bool] = []
        barrier = threading.Barrier(16)

        def go() -> None:
            barrier.wait()
            results.append(cache.record("a", "n", "t"))

        threads = [threading.Thread(target=go) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results.count(True) == 1


def test_apikey_never_in_database_file_or_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    with (
        ServerThread(tmp_path / "kms") as server,
        httpx.Client(verify=server.ssl_context()) as http,
    ):
        caller = enroll(http, server.url)
        keyid = caller.create_key()
        dk = caller.ok("GenerateDataKey", {"keyid": keyid, "keylen": 32})["plaintext"]
        caller.call("ListKey", apikey="wrong")
        caller.call("Decrypt", {"keyid": keyid, "ciphertext": base64.b64encode(bytes(40)).decode()})
        material = server.store.release_key_material(server.store.get_key(keyid))  # type: ignore[arg-type]
    text = caplog.text
    for secret in (caller.apikey, dk, base64.b64encode(material).decode(), material.hex()):
        assert secret not in text
    raw = b"".join(p.read_bytes() for p in (tmp_path / "kms").glob("kms.sqlite3*"))
    assert caller.apikey.encode() not in raw and material not in raw
