"""The SQLite key store, the domain key, the replay cache, and persistence across restarts."""

from __future__ import annotations

import base64
import os
import pickle
import sqlite3
import stat
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
    with SQLiteKeyStore(tmp_path / "kms.sqlite3", DomainKey(os.urandom(32))) as other:
        with pytest.raises(KeyStoreError):
            other.apikey_for("app-1")


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
