"""Key store: enrolled apps and customer master keys (CMKs), wrapped under a domain key.

::

    DIR/domain.key      32 random bytes, mode 0600, created once, never overwritten
    DIR/kms.sqlite3     apps(appid, apikey_blob, ...)  cmks(keyid, creator, ..., key_blob)
                        meta(name, value): the domain key's check value

Every secret in the database is a blob ``0x01 || IV(12) || AES-256-GCM(secret) || tag(16)``
under the domain key, whose AAD binds it to its row:

* an app's apikey is bound to its appid (the server needs the apikey itself to check HMACs);
* a CMK's material is bound to its keyid, creator, keyspec and keyusage, so blobs cannot be moved
  between rows, nor a row's owner or usage edited, without the unwrap failing.

The database also holds a *key-check value*: a fixed label wrapped under the domain key (never
the key itself). It is written when the database is first initialised and verified on every open,
so a server never starts with a domain key other than the one its secrets are wrapped under (a
deleted or replaced ``domain.key`` would otherwise make every request fail, and new enrollments
would mix two keys in one database). :func:`open_sqlite_store` never creates a domain key beside
a database that already holds apps or keys.

:class:`KeyStore` holds everything that does not depend on the database (wrapping, the rules
above) and leaves row access to backends (:class:`SQLiteKeyStore`; a PostgreSQL store later).
:meth:`KeyStore.release_key_material` is the only place where CMK material is unwrapped.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import secrets
import sqlite3
import stat
import threading
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, Self

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ppml_kms._files import atomic_write_bytes
from ppml_kms.exceptions import Error, KeyFileError

__all__ = [
    "CMK_LIFETIME_MS",
    "DOMAIN_KEY_FILE",
    "DOMAIN_KEY_SIZE",
    "MAX_LIST",
    "SQLITE_FILE",
    "DomainKey",
    "KeyRecord",
    "KeyStore",
    "KeyStoreError",
    "SQLiteKeyStore",
    "key_check_matches",
    "make_key_check",
    "load_or_create_domain_key",
    "open_sqlite_store",
]

logger = logging.getLogger(__name__)

DOMAIN_KEY_FILE = "domain.key"
DOMAIN_KEY_SIZE = 32
SQLITE_FILE = "kms.sqlite3"
CMK_LIFETIME_MS = 365 * 24 * 3600 * 1000  # eHSM's CMK_EFFECTIVE_DURATION
MAX_LIST = 10000  # eHSM's ListKey limit

_BLOB_VERSION = b"\x01"
_IV_SIZE = 12
_TAG_SIZE = 16
_KEY_CHECK_LABEL = b"ppml-kms domain key check v1"
_KEY_CHECK_AAD = b'["ppml-kms/key-check/v1"]'
_KEY_CHECK_NAME = "domain_key_check"


class KeyStoreError(Error):
    """The key store failed: database error, a blob that fails authentication, a closed store."""


class DomainKey:
    """The AES-256 key that wraps every secret in the store. It never appears in repr or pickles."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if len(key) != DOMAIN_KEY_SIZE:
            raise ValueError(f"a domain key is {DOMAIN_KEY_SIZE} bytes")
        self._aead = AESGCM(bytes(key))

    def __repr__(self) -> str:
        return "DomainKey(<hidden>)"

    def __reduce__(self) -> NoReturn:
        raise TypeError("DomainKey cannot be pickled")

    def wrap(self, secret: bytes, aad: bytes) -> bytes:
        """Encrypt ``secret`` bound to ``aad``; returns the versioned blob."""
        iv = os.urandom(_IV_SIZE)
        return _BLOB_VERSION + iv + self._aead.encrypt(iv, secret, aad)

    def unwrap(self, blob: bytes, aad: bytes) -> bytes:
        """Decrypt a blob from :meth:`wrap`.

        Raises:
            KeyStoreError: unknown version, truncated, or authentication failed (wrong domain key,
                tampered or moved row).
        """
        if len(blob) < 1 + _IV_SIZE + _TAG_SIZE or blob[:1] != _BLOB_VERSION:
            raise KeyStoreError("a stored key blob is malformed")
        try:
            return self._aead.decrypt(blob[1 : 1 + _IV_SIZE], blob[1 + _IV_SIZE :], aad)
        except InvalidTag:
            raise KeyStoreError(
                "a stored key blob failed authentication (wrong domain key or a modified row)"
            ) from None


def load_or_create_domain_key(path: Path) -> DomainKey:
    """Load the domain key at ``path``, creating it (mode 0600, atomically) if it does not exist.

    An existing file is never overwritten, even by a concurrent first start. This function knows
    nothing about the database: the server opens its store with :func:`open_sqlite_store`, which
    refuses to create a key beside a database that already holds secrets.

    Raises:
        KeyFileError: the file exists but does not hold exactly 32 bytes, or cannot be read.
    """
    return _load_or_create_domain_key(Path(path))[0]


def _load_or_create_domain_key(path: Path) -> tuple[DomainKey, bool]:
    """The domain key at ``path`` and whether this call created it."""
    created = False
    if not path.exists():
        try:
            atomic_write_bytes(path, secrets.token_bytes(DOMAIN_KEY_SIZE), mode=0o600)
            logger.info("created a new domain key at %s", path)
            created = True
        except FileExistsError:
            pass  # another process created it first: use theirs
    try:
        with open(path, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            data = handle.read(DOMAIN_KEY_SIZE + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read the domain key {path}: {exc.strerror}") from exc
    if len(data) != DOMAIN_KEY_SIZE:
        raise KeyFileError(
            f"the domain key {path} must hold exactly {DOMAIN_KEY_SIZE} bytes; "
            f"it holds {'more' if len(data) > DOMAIN_KEY_SIZE else len(data)}"
        )
    if stat.S_IMODE(mode) & 0o077:
        logger.warning("the domain key %s is readable by other users (mode %o)", path, mode & 0o777)
    return DomainKey(data), created


def make_key_check(domain_key: DomainKey) -> bytes:
    """The key-check value of ``domain_key``: a fixed label wrapped under it (never the key)."""
    return domain_key.wrap(_KEY_CHECK_LABEL, _KEY_CHECK_AAD)


def key_check_matches(domain_key: DomainKey, check: bytes) -> bool:
    """Whether ``check`` (from :func:`make_key_check`) was made with ``domain_key``."""
    try:
        return domain_key.unwrap(check, _KEY_CHECK_AAD) == _KEY_CHECK_LABEL
    except KeyStoreError:
        return False


@dataclass(frozen=True)
class KeyRecord:
    """A CMK row. ``wrapped_material`` is ciphertext; only the store can open it."""

    keyid: str
    creator: str
    keyspec: str
    origin: str
    keyusage: str
    creation_date: int
    expire_time: int
    key_state: int
    alias: str = ""
    wrapped_material: bytes = field(default=b"", repr=False)

    def listing(self) -> dict[str, Any]:
        """The ListKey entry for this key, with eHSM's field names."""
        return {
            "keyid": self.keyid,
            "creationDate": self.creation_date,
            "expireTime": self.expire_time,
            "alias": self.alias,
            "keyspec": self.keyspec,
            "keyState": self.key_state,
        }


def _app_aad(appid: str) -> bytes:
    return json.dumps(["ppml-kms/apikey/v1", appid]).encode()


def _key_aad(keyid: str, creator: str, keyspec: str, keyusage: str) -> bytes:
    return json.dumps(["ppml-kms/cmk/v1", keyid, creator, keyspec, keyusage]).encode()


class KeyStore(ABC):
    """Apps and CMKs, with secrets wrapped under a :class:`DomainKey`.

    Public methods are safe to call from several threads. Backends implement the ``_`` hooks, which
    only move rows and blobs; they never see a secret in clear.
    """

    def __init__(self, domain_key: DomainKey) -> None:
        self._domain_key = domain_key

    # -- apps ---------------------------------------------------------------------------------

    def add_app(self, appid: str, apikey: str, now_ms: int) -> None:
        """Enroll ``appid``; its apikey is stored wrapped."""
        self._insert_app(appid, self._domain_key.wrap(apikey.encode(), _app_aad(appid)), now_ms)

    def apikey_for(self, appid: str) -> str | None:
        """The apikey of ``appid``, or ``None`` if it is not enrolled.

        Raises:
            KeyStoreError: the database failed or the stored blob does not authenticate.
        """
        blob = self._select_app(appid)
        if blob is None:
            return None
        return self._domain_key.unwrap(blob, _app_aad(appid)).decode()

    # -- CMKs ---------------------------------------------------------------------------------

    def create_key(
        self,
        *,
        creator: str,
        keyspec: str,
        origin: str,
        keyusage: str,
        material: bytes,
        now_ms: int,
    ) -> KeyRecord:
        """Store new key material under a fresh keyid (uuid4) and return its record."""
        keyid = str(uuid.uuid4())
        record = KeyRecord(
            keyid=keyid,
            creator=creator,
            keyspec=keyspec,
            origin=origin,
            keyusage=keyusage,
            creation_date=now_ms,
            expire_time=now_ms + CMK_LIFETIME_MS,
            key_state=1,
            wrapped_material=self._domain_key.wrap(
                material, _key_aad(keyid, creator, keyspec, keyusage)
            ),
        )
        self._insert_key(record)
        return record

    def release_key_material(self, record: KeyRecord) -> bytes:
        """Unwrap a CMK's material: the single key-release path of the server.

        Callers have already checked ownership, state and expiry. A policy check (e.g. remote
        attestation of the caller) belongs here, so that no other path can reach key bytes.

        Raises:
            KeyStoreError: the blob does not authenticate against the record's metadata.
        """
        aad = _key_aad(record.keyid, record.creator, record.keyspec, record.keyusage)
        return self._domain_key.unwrap(record.wrapped_material, aad)

    @abstractmethod
    def get_key(self, keyid: str) -> KeyRecord | None:
        """The record of ``keyid`` whoever owns it, or ``None``."""

    @abstractmethod
    def list_keys(self, creator: str, limit: int = MAX_LIST) -> list[KeyRecord]:
        """Keys created by ``creator``, oldest first, at most ``limit``."""

    @abstractmethod
    def delete_key(self, keyid: str, creator: str) -> bool:
        """Delete ``keyid`` if ``creator`` owns it; whether a key was deleted."""

    @abstractmethod
    def delete_all_keys(self, creator: str) -> int:
        """Delete every key of ``creator``; how many were deleted."""

    @abstractmethod
    def set_key_state(self, keyid: str, creator: str, state: int) -> bool:
        """Set ``keyState`` (1 enabled, 0 disabled) of a key ``creator`` owns; whether it exists."""

    @abstractmethod
    def close(self) -> None:
        """Release the database; later calls raise :class:`KeyStoreError`."""

    @abstractmethod
    def _insert_app(self, appid: str, apikey_blob: bytes, now_ms: int) -> None: ...

    @abstractmethod
    def _select_app(self, appid: str) -> bytes | None: ...

    @abstractmethod
    def _insert_key(self, record: KeyRecord) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS apps (
    appid       TEXT PRIMARY KEY,
    apikey_blob BLOB NOT NULL,
    created_ms  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS cmks (
    keyid         TEXT PRIMARY KEY,
    creator       TEXT NOT NULL,
    keyspec       TEXT NOT NULL,
    origin        TEXT NOT NULL,
    keyusage      TEXT NOT NULL,
    creation_date INTEGER NOT NULL,
    expire_time   INTEGER NOT NULL,
    key_state     INTEGER NOT NULL,
    alias         TEXT NOT NULL DEFAULT '',
    key_blob      BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS cmks_by_creator ON cmks (creator, creation_date);
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
"""
_KEY_COLUMNS = (
    "keyid, creator, keyspec, origin, keyusage, creation_date, expire_time, key_state, alias, "
    "key_blob"
)


def _record(row: tuple[Any, ...]) -> KeyRecord:
    keyid, creator, keyspec, origin, keyusage, created, expires, state, alias, blob = row
    return KeyRecord(
        keyid=keyid,
        creator=creator,
        keyspec=keyspec,
        origin=origin,
        keyusage=keyusage,
        creation_date=created,
        expire_time=expires,
        key_state=state,
        alias=alias,
        wrapped_material=bytes(blob),
    )


class SQLiteKeyStore(KeyStore):
    """:class:`KeyStore` over one SQLite file (WAL mode, synchronous=FULL).

    One connection serves all threads, serialised by a lock: every operation is a single short
    statement. Several server processes may share the file (``busy_timeout`` 5 s).

    Opening verifies ``domain_key`` against the database's key-check value (see the module
    docstring): a new database gets one; a database from before key-check values gets one once at
    least one stored secret unwraps under ``domain_key``.

    Args:
        path: the SQLite file (created 0600 if missing).
        domain_key: the key every secret is wrapped under.
        key_file: where ``domain_key`` came from, for error messages.
        new_domain_key: ``domain_key`` was just created; a database that holds no apps or keys but
            was initialised with another key is then re-initialised for it.

    Raises:
        KeyStoreError: the database cannot be opened, or it was initialised with another domain key
            (or, for an older database, none of its secrets unwraps under ``domain_key``).
    """

    def __init__(
        self,
        path: Path,
        domain_key: DomainKey,
        *,
        key_file: Path | None = None,
        new_domain_key: bool = False,
    ) -> None:
        super().__init__(domain_key)
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            if not self.path.exists():
                # Create it private; SQLite gives its -wal/-shm files the same mode.
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=5.0
            )
        except (OSError, sqlite3.Error) as exc:
            raise KeyStoreError(f"cannot open the key database {self.path}: {exc}") from exc
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > _SCHEMA_VERSION:
                raise KeyStoreError(
                    f"the key database {self.path} has schema version {version}; "
                    f"this ppml-kms reads up to {_SCHEMA_VERSION}"
                )
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            self._check_domain_key(conn, key_file, new_domain_key)
        except sqlite3.Error as exc:
            conn.close()
            raise KeyStoreError(f"cannot use the key database {self.path}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        self._conn: sqlite3.Connection | None = conn

    def _check_domain_key(
        self, conn: sqlite3.Connection, key_file: Path | None, new_domain_key: bool
    ) -> None:
        """Verify the domain key against the key-check value, writing one if there is none."""
        key_name = f"domain key {key_file}" if key_file is not None else "the domain key"
        advice = "restore the original domain key or use a new data directory"
        conn.execute("BEGIN IMMEDIATE")  # two first starts must not both write a check value
        try:
            row = conn.execute(
                "SELECT value FROM meta WHERE name = ?", (_KEY_CHECK_NAME,)
            ).fetchone()
            stored = row[0] if row is not None and isinstance(row[0], bytes) else b""
            if row is not None and key_check_matches(self._domain_key, stored):
                conn.execute("COMMIT")
                return
            holds_secrets = _holds_secrets(conn)
            if row is not None:
                if holds_secrets or not new_domain_key:
                    raise KeyStoreError(
                        f"{key_name} does not match {self.path}, which was initialised with "
                        f"another domain key; {advice}"
                    )
                logger.info(
                    "the key database %s holds no apps or keys; it now uses the new domain key",
                    self.path,
                )
            elif holds_secrets:
                unwrapped, failed = self._count_unwrappable(conn)
                if unwrapped == 0:
                    raise KeyStoreError(
                        f"{key_name} does not unwrap any secret stored in {self.path}; {advice}"
                    )
                if failed:
                    logger.warning(
                        "%d of the secrets in %s do not unwrap under the domain key "
                        "(wrapped under another key, or modified rows)",
                        failed,
                        self.path,
                    )
                logger.info("added a domain key check value to the key database %s", self.path)
            conn.execute(
                "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)",
                (_KEY_CHECK_NAME, make_key_check(self._domain_key)),
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _count_unwrappable(self, conn: sqlite3.Connection) -> tuple[int, int]:
        """How many stored secrets unwrap under the domain key, and how many do not."""
        unwrapped = failed = 0
        apps = (
            (bytes(blob), _app_aad(appid))
            for appid, blob in conn.execute("SELECT appid, apikey_blob FROM apps")
        )
        cmks = (
            (bytes(blob), _key_aad(keyid, creator, keyspec, keyusage))
            for keyid, creator, keyspec, keyusage, blob in conn.execute(
                "SELECT keyid, creator, keyspec, keyusage, key_blob FROM cmks"
            )
        )
        for blob, aad in itertools.chain(apps, cmks):
            try:
                self._domain_key.unwrap(blob, aad)
            except KeyStoreError:
                failed += 1
            else:
                unwrapped += 1
        return unwrapped, failed

    def _execute(self, sql: str, params: tuple[Any, ...]) -> tuple[list[tuple[Any, ...]], int]:
        """Run one statement; return its rows and its change count."""
        with self._lock:
            if self._conn is None:
                raise KeyStoreError("the key store is closed")
            try:
                cursor = self._conn.execute(sql, params)
                return cursor.fetchall(), cursor.rowcount
            except sqlite3.Error as exc:
                raise KeyStoreError(f"key database error: {exc}") from exc

    def _rows(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return self._execute(sql, params)[0]

    def _changes(self, sql: str, params: tuple[Any, ...]) -> int:
        return self._execute(sql, params)[1]

    def _insert_app(self, appid: str, apikey_blob: bytes, now_ms: int) -> None:
        self._changes(
            "INSERT INTO apps (appid, apikey_blob, created_ms) VALUES (?, ?, ?)",
            (appid, apikey_blob, now_ms),
        )

    def _select_app(self, appid: str) -> bytes | None:
        rows = self._rows("SELECT apikey_blob FROM apps WHERE appid = ?", (appid,))
        return bytes(rows[0][0]) if rows else None

    def _insert_key(self, record: KeyRecord) -> None:
        self._changes(
            f"INSERT INTO cmks ({_KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.keyid,
                record.creator,
                record.keyspec,
                record.origin,
                record.keyusage,
                record.creation_date,
                record.expire_time,
                record.key_state,
                record.alias,
                record.wrapped_material,
            ),
        )

    def get_key(self, keyid: str) -> KeyRecord | None:
        rows = self._rows(f"SELECT {_KEY_COLUMNS} FROM cmks WHERE keyid = ?", (keyid,))
        return _record(rows[0]) if rows else None

    def list_keys(self, creator: str, limit: int = MAX_LIST) -> list[KeyRecord]:
        rows = self._rows(
            f"SELECT {_KEY_COLUMNS} FROM cmks WHERE creator = ? "
            "ORDER BY creation_date, keyid LIMIT ?",
            (creator, limit),
        )
        return [_record(row) for row in rows]

    def delete_key(self, keyid: str, creator: str) -> bool:
        return (
            self._changes("DELETE FROM cmks WHERE keyid = ? AND creator = ?", (keyid, creator)) > 0
        )

    def delete_all_keys(self, creator: str) -> int:
        return self._changes("DELETE FROM cmks WHERE creator = ?", (creator,))

    def set_key_state(self, keyid: str, creator: str, state: int) -> bool:
        return (
            self._changes(
                "UPDATE cmks SET key_state = ? WHERE keyid = ? AND creator = ?",
                (state, keyid, creator),
            )
            > 0
        )

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _holds_secrets(conn: sqlite3.Connection) -> bool:
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM apps) OR EXISTS (SELECT 1 FROM cmks)"
    ).fetchone()
    return bool(row[0])


def _database_holds_secrets(path: Path) -> bool:
    """Whether the SQLite file at ``path`` exists and holds apps or keys (read only)."""
    if not path.exists():
        return False
    try:
        conn = sqlite3.connect(path, timeout=5.0)
        try:
            listed = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            tables = {name for (name,) in listed}
            return any(
                conn.execute(f"SELECT EXISTS (SELECT 1 FROM {table})").fetchone()[0]
                for table in ("apps", "cmks")
                if table in tables
            )
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise KeyStoreError(f"cannot read the key database {path}: {exc}") from exc


def open_sqlite_store(data_dir: Path) -> SQLiteKeyStore:
    """Open (creating on first use) the domain key and SQLite store in ``data_dir``.

    A domain key is created only when the database holds no apps or keys; otherwise a missing
    ``domain.key`` is an error, never a reason to start over with a new key.

    Raises:
        KeyFileError: the domain key file is malformed, or missing beside a database that holds
            apps or keys.
        KeyStoreError: the database cannot be opened, or the domain key does not match it.
    """
    data_dir = Path(data_dir)
    key_path, db_path = data_dir / DOMAIN_KEY_FILE, data_dir / SQLITE_FILE
    if not key_path.exists() and _database_holds_secrets(db_path):
        raise KeyFileError(
            f"domain key {key_path} is missing but {db_path} holds keys; "
            "restore the domain key or use a new data directory"
        )
    domain_key, created = _load_or_create_domain_key(key_path)
    return SQLiteKeyStore(db_path, domain_key, key_file=key_path, new_domain_key=created)
