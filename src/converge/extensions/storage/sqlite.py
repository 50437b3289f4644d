"""SQLiteStore: a Store in one SQLite database file, shared by processes on one host."""

from __future__ import annotations

import builtins
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final, TypeVar

import anyio.to_thread

from converge._sync import check_sync_allowed
from converge.core.store import (
    Store,
    UpdateFn,
    check_changes,
    split_change,
    validate_key,
    validate_prefix,
    validate_ttl,
)
from converge.errors import (
    ClosedError,
    StoreCorruptedError,
    StoreError,
    StoreLockTimeoutError,
    StoreUnavailableError,
    UsageError,
)
from converge.extensions.storage._codec import (
    SerializerName,
    check_bool,
    check_keys,
    check_timeout,
    get_serializer,
    key_bytes,
    key_from_bytes,
    prefix_upper_bound,
)

__all__ = ["SQLiteStore"]

T = TypeVar("T")
R = TypeVar("R")

_TABLE: Final = "converge_kv"
_SCHEMA: Final = (
    # Keys are BLOBs of UTF-8 (surrogatepass) bytes: byte order is code-point order, so
    # ORDER BY key sorts exactly like Python, and every str key round-trips.
    f"CREATE TABLE IF NOT EXISTS {_TABLE} ("
    " key BLOB PRIMARY KEY NOT NULL,"
    " value BLOB NOT NULL,"
    " expires_at REAL"
    ") WITHOUT ROWID",
    f"CREATE INDEX IF NOT EXISTS {_TABLE}_expires ON {_TABLE} (expires_at)"
    " WHERE expires_at IS NOT NULL",
)
_LIVE: Final = "(expires_at IS NULL OR expires_at > ?)"
_GET: Final = f"SELECT value FROM {_TABLE} WHERE key = ? AND {_LIVE}"
_PUT: Final = (
    f"INSERT INTO {_TABLE} (key, value, expires_at) VALUES (?, ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at"
)
# One statement, so atomic: insert, or take over a row only if it has expired.
_PUT_IF_ABSENT: Final = (
    f"INSERT INTO {_TABLE} (key, value, expires_at) VALUES (?, ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at "
    f"WHERE {_TABLE}.expires_at IS NOT NULL AND {_TABLE}.expires_at <= ?"
)
_DELETE: Final = f"DELETE FROM {_TABLE} WHERE key = ?"
_LIST_FROM: Final = f"SELECT key FROM {_TABLE} WHERE key >= ? AND {_LIVE}"
_PURGE: Final = (
    f"DELETE FROM {_TABLE} WHERE key IN (SELECT key FROM {_TABLE} "
    "WHERE expires_at IS NOT NULL AND expires_at <= ? LIMIT 512)"
)
_PURGE_EVERY: Final = 256  # writes between sweeps of expired rows


_STORES: weakref.WeakSet[SQLiteStore] = weakref.WeakSet()
_INHERITED: builtins.list[sqlite3.Connection] = []


def _reset_in_child() -> None:
    for store in list(_STORES):
        store._forget_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_in_child)


class SQLiteStore(Store):
    """A Store in a SQLite database (stdlib ``sqlite3``), driven off the event loop.

    * One table, ``converge_kv``, keyed by the key's UTF-8 bytes (``WITHOUT ROWID``, so
      the primary key is the table): ``list(prefix)`` is an index range
      (``key >= prefix AND key < next(prefix)``), not a scan.
    * ``put_if_absent`` is one ``INSERT ... ON CONFLICT DO UPDATE ... WHERE expired``
      statement, hence atomic across threads and processes.
    * TTLs are stored as Unix times (so they hold across processes and restarts); rows
      that expired are skipped by every read and deleted in batches as writes go by.
    * WAL journal (readers never block the writer) and a busy timeout, so several
      processes on one host can share the file. Not for network file systems.

    Connection: a single ``sqlite3`` connection per store and process, opened lazily on
    first use (and reopened in a forked child), with ``check_same_thread=False`` and a
    ``threading.Lock`` around each statement. SQLite serialises writers anyway, each
    statement here takes microseconds, one connection means one page cache and a
    deterministic :meth:`close`, and ``":memory:"`` databases work too (every thread sees
    the same one).

    The async methods take one worker-thread hop per operation; the sync methods run the
    same code directly and refuse to run on an event-loop thread.

    Args:
        path: Database file (created if missing), or ``":memory:"``.
        serializer: ``"pickle"`` (any Python object) or ``"json"`` (JSON values only; the
            safe choice if others can write the database).
        timeout: Seconds to wait for another process's write lock before raising
            :class:`~converge.errors.StoreLockTimeoutError`.
        durable: ``True`` syncs the WAL on every commit (``synchronous=FULL``): a write
            that returned survives a power cut. ``False`` (``synchronous=NORMAL``) is
            faster and still never corrupts, but may lose the last writes on power loss.

    Raises:
        UsageError: If an argument is invalid.
    """

    atomic_put_if_absent = True
    supports_locking = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        serializer: SerializerName = "pickle",
        timeout: float = 10.0,
        durable: bool = True,
    ) -> None:
        if not isinstance(path, str | os.PathLike):
            raise UsageError(f"path must be a path, not {type(path).__name__}")
        location = os.fspath(path)
        if not isinstance(location, str) or not location:
            raise UsageError("path must be a non-empty str path or ':memory:'")
        self._path = location if location == ":memory:" else os.path.abspath(location)
        self._serializer = get_serializer(serializer)
        self._timeout = check_timeout(timeout, "timeout")
        self._durable = check_bool(durable, "durable")
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        _STORES.add(self)
        self._writes = 0
        self._closed = False

    @property
    def path(self) -> str:
        """The database file (absolute), or ``":memory:"``."""
        return self._path

    @property
    def serializer(self) -> SerializerName:
        """``"pickle"`` or ``"json"``."""
        return self._serializer.name

    def __repr__(self) -> str:
        return f"SQLiteStore({self._path!r}, serializer={self._serializer.name!r})"

    # -- connection --------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self._path, timeout=self._timeout, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._timeout * 1000)}")
            # Switching to WAL needs a lock SQLite does not wait for (no busy handler):
            # skip it when another process already did, and retry while it races us.
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                self._retry_while_locked(conn, "PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {'FULL' if self._durable else 'NORMAL'}")
            for statement in _SCHEMA:
                conn.execute(statement)
        except BaseException:
            conn.close()
            raise
        return conn

    def _retry_while_locked(self, conn: sqlite3.Connection, sql: str) -> None:
        deadline = time.monotonic() + self._timeout
        delay = 0.001
        while True:
            try:
                conn.execute(sql)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _conn_locked(self) -> sqlite3.Connection:
        """The connection, opened on first use; the caller holds ``self._lock``."""
        conn = self._conn
        if conn is None:
            if self._closed:
                raise ClosedError(f"{self!r} was closed")
            conn = self._conn = self._connect()
        return conn

    @contextmanager
    def _connection(self, key: str | None = None) -> Iterator[sqlite3.Connection]:
        """Hold the lock and the (lazily opened) connection; map sqlite3 errors."""
        with self._lock:
            try:
                yield self._conn_locked()
            except sqlite3.Error as exc:
                raise self._map_error(exc, key) from exc

    def _map_error(self, exc: sqlite3.Error, key: str | None) -> StoreError:
        message = str(exc)
        where = f"{self._path!r}" + (f" (key {key!r})" if key is not None else "")
        if isinstance(exc, sqlite3.OperationalError) and ("locked" in message or "busy" in message):
            return StoreLockTimeoutError(
                f"SQLite database {where} stayed locked by another writer for "
                f"{self._timeout} s: {message}"
            )
        if isinstance(exc, sqlite3.DatabaseError) and (
            "not a database" in message or "malformed" in message
        ):
            return StoreUnavailableError(f"SQLite database {where} is damaged: {message}")
        if isinstance(exc, sqlite3.OperationalError):
            return StoreUnavailableError(f"SQLite database {where} failed: {message}")
        return StoreError(f"SQLite database {where} failed: {message}")

    def _write(self, conn: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> int:
        rowcount = conn.execute(sql, args).rowcount
        self._writes += 1
        if self._writes % _PURGE_EVERY == 0:
            conn.execute(_PURGE, (time.time(),))
        return rowcount

    def _encode(self, key: str, value: Any) -> bytes:
        return bytes([self._serializer.tag]) + self._serializer.dumps(key, value)

    def _decode(self, key: str, blob: bytes) -> Any:
        if not isinstance(blob, bytes) or not blob:
            raise StoreCorruptedError(key, "stored value is not a tagged blob")
        return self._serializer.loads(key, blob[0], memoryview(blob)[1:])

    # -- the blocking core -------------------------------------------------------------

    # get and put are the hot paths, so they skip the context manager of the others.

    def _get(self, key: str) -> Any | None:
        args = (key_bytes(key), time.time())
        with self._lock:
            try:
                conn = self._conn or self._conn_locked()
                row = conn.execute(_GET, args).fetchone()
            except sqlite3.Error as exc:
                raise self._map_error(exc, key) from exc
        return None if row is None else self._decode(key, row[0])

    def _put(self, key: str, value: Any, ttl: float | None) -> None:
        blob = self._encode(key, value)
        with self._lock:
            expires_at = None if ttl is None else time.time() + ttl
            try:
                conn = self._conn or self._conn_locked()
                self._write(conn, _PUT, (key_bytes(key), blob, expires_at))
            except sqlite3.Error as exc:
                raise self._map_error(exc, key) from exc

    def _put_if_absent(self, key: str, value: Any, ttl: float | None) -> bool:
        blob = self._encode(key, value)
        with self._connection(key) as conn:
            now = time.time()
            expires_at = None if ttl is None else now + ttl
            return self._write(conn, _PUT_IF_ABSENT, (key_bytes(key), blob, expires_at, now)) == 1

    def _delete(self, key: str) -> None:
        with self._connection(key) as conn:
            conn.execute(_DELETE, (key_bytes(key),))

    def _update(self, keys: builtins.list[str], fn: UpdateFn[R], ttl: float | None) -> R:
        with self._connection(keys[0] if len(keys) == 1 else None) as conn:
            # IMMEDIATE takes the write lock up front: no other writer, in any process,
            # can change these keys between our read and our write.
            conn.execute("BEGIN IMMEDIATE")
            try:
                now = time.time()
                current = {}
                for key in keys:
                    row = conn.execute(_GET, (key_bytes(key), now)).fetchone()
                    current[key] = None if row is None else self._decode(key, row[0])
                changes, result = fn(current)
                check_changes(keys, changes)
                for key, change in changes.items():
                    value, key_ttl = split_change(change, ttl)
                    if value is None:
                        conn.execute(_DELETE, (key_bytes(key),))
                    else:
                        blob = self._encode(key, value)
                        expires_at = None if key_ttl is None else now + key_ttl
                        self._write(conn, _PUT, (key_bytes(key), blob, expires_at))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return result

    def _list(self, prefix: str) -> builtins.list[str]:
        low = key_bytes(prefix)
        high = prefix_upper_bound(low)
        with self._connection() as conn:
            if high is None:
                rows = conn.execute(_LIST_FROM + " ORDER BY key", (low, time.time())).fetchall()
            else:
                rows = conn.execute(
                    _LIST_FROM + " AND key < ? ORDER BY key", (low, time.time(), high)
                ).fetchall()
        keys: builtins.list[str] = []
        for (raw,) in rows:
            try:
                keys.append(key_from_bytes(raw))
            except (UnicodeDecodeError, AttributeError):
                continue  # a row some other program wrote; not a converge key
        return keys

    def _close(self) -> None:
        with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

    def _forget_after_fork(self) -> None:
        # A connection must never cross fork(): the child opens its own on first use
        # and leaves the parent's untouched (not even closed, which could disturb the
        # parent's locks), so it is parked where it is never collected.
        self._lock = threading.Lock()
        if self._conn is not None:
            _INHERITED.append(self._conn)
            self._conn = None

    # -- sync surface ------------------------------------------------------------------

    def _sync(self, name: str, func: Callable[..., T], *args: Any) -> T:
        check_sync_allowed(f"SQLiteStore.{name}")
        return func(*args)

    def get(self, key: str) -> Any | None:
        """Retrieve a value."""
        return self._sync("aget", self._get, validate_key(key))

    def put(self, key: str, value: Any, *, ttl: float | None = None) -> None:
        """Store a value."""
        self._sync("aput", self._put, validate_key(key), value, validate_ttl(ttl))

    def delete(self, key: str) -> None:
        """Delete a value."""
        self._sync("adelete", self._delete, validate_key(key))

    def list(self, prefix: str = "") -> builtins.list[str]:
        """List keys starting with prefix."""
        return self._sync("alist", self._list, validate_prefix(prefix))

    def put_if_absent(self, key: str, value: Any, *, ttl: float | None = None) -> bool:
        """Store value only if key is absent (or expired); atomic across processes.

        Returns:
            True if stored, False if key existed.
        """
        return self._sync(
            "aput_if_absent", self._put_if_absent, validate_key(key), value, validate_ttl(ttl)
        )

    def update(self, keys: Sequence[str], fn: UpdateFn[R], *, ttl: float | None = None) -> R:
        """Atomic read-modify-write (sync form of :meth:`aupdate`)."""
        result: R = self._sync("aupdate", self._update, check_keys(keys), fn, validate_ttl(ttl))
        return result

    def close(self) -> None:
        """Close the connection; later calls raise ClosedError. Idempotent."""
        self._sync("aclose", self._close)

    # -- async surface -----------------------------------------------------------------

    async def aget(self, key: str) -> Any | None:
        """Return the value under ``key``, or None if absent or expired."""
        return await anyio.to_thread.run_sync(self._get, validate_key(key))

    async def aput(self, key: str, value: Any, *, ttl: float | None = None) -> None:
        """Store ``value`` under ``key`` (optionally expiring after ``ttl`` seconds)."""
        await anyio.to_thread.run_sync(self._put, validate_key(key), value, validate_ttl(ttl))

    async def adelete(self, key: str) -> None:
        """Delete ``key``; deleting an absent key is not an error."""
        await anyio.to_thread.run_sync(self._delete, validate_key(key))

    async def alist(self, prefix: str = "") -> builtins.list[str]:
        """Return the live keys starting with ``prefix``, sorted (an index range scan)."""
        return await anyio.to_thread.run_sync(self._list, validate_prefix(prefix))

    async def aput_if_absent(self, key: str, value: Any, *, ttl: float | None = None) -> bool:
        """Store ``value`` only if ``key`` is absent or expired; one atomic statement."""
        return await anyio.to_thread.run_sync(
            self._put_if_absent, validate_key(key), value, validate_ttl(ttl)
        )

    async def aupdate(self, keys: Sequence[str], fn: UpdateFn[R], *, ttl: float | None = None) -> R:
        """Atomically read ``keys``, let ``fn`` compute changes, and write them.

        One ``BEGIN IMMEDIATE`` transaction, so atomic across threads and processes, and
        all-or-nothing after a crash; ``fn`` runs in the worker thread.

        Returns:
            The ``result`` part of ``fn``'s return value.
        """
        return await anyio.to_thread.run_sync(self._update, check_keys(keys), fn, validate_ttl(ttl))

    async def aclose(self) -> None:
        """Close the connection; later calls raise ClosedError. Idempotent."""
        await anyio.to_thread.run_sync(self._close)
