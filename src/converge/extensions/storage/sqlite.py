"""SQLiteStore: a Store in one SQLite database file, shared by processes on one host."""

from __future__ import annotations

import builtins
import functools
import os
import sqlite3
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
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


@functools.lru_cache(maxsize=64)
def _get_many(count: int) -> str:
    """``SELECT key, value`` of ``count`` keys (the live ones), in one statement."""
    marks = ", ".join("?" * count)
    return f"SELECT key, value FROM {_TABLE} WHERE key IN ({marks}) AND {_LIVE}"


_LIST_FROM: Final = f"SELECT key FROM {_TABLE} WHERE key >= ? AND {_LIVE}"
_PURGE: Final = (
    f"DELETE FROM {_TABLE} WHERE key IN (SELECT key FROM {_TABLE} "
    "WHERE expires_at IS NOT NULL AND expires_at <= ? LIMIT 512)"
)
_PURGE_EVERY: Final = 256  # writes between sweeps of expired rows


# A write, for group commit: ``op(conn, now)`` runs inside the batch's transaction.
_WriteOp = Callable[[sqlite3.Connection, float], Any]


class _Write:
    """One caller's write, queued for the next group commit."""

    __slots__ = ("done", "error", "isolated", "key", "op", "result")

    def __init__(self, op: _WriteOp, key: str | None, isolated: bool) -> None:
        self.op = op
        self.key = key
        self.isolated = isolated  # runs in a savepoint: its own failure undoes only it
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None


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

    Connections: two ``sqlite3`` connections per store and process, opened lazily on
    first use (and reopened in a forked child), with ``check_same_thread=False`` and a
    ``threading.Lock`` each. Writes go through one, in group commits: concurrent writers
    share one transaction and one sync per batch, and each returns once the commit
    holding its write is done. Reads go through the other and, in WAL mode, never wait
    for a batch being committed. A ``":memory:"`` database uses one connection for
    both (every thread sees the same database).

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
        self._pending: deque[_Write] = deque()
        # Reads use a connection of their own (WAL: they see the last commit and never
        # wait for a batch being committed); a ":memory:" database has only one.
        self._read_lock = threading.Lock()
        self._reader: sqlite3.Connection | None = None
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
    def _reading(self, key: str | None = None) -> Iterator[sqlite3.Connection]:
        """Hold the read connection (opened on first use); map sqlite3 errors."""
        if self._path == ":memory:":
            with self._connection(key) as conn:
                yield conn
            return
        with self._read_lock:
            try:
                reader = self._reader
                if reader is None:
                    if self._conn is None:  # the writer's connection creates the schema
                        with self._lock:
                            self._conn_locked()
                    reader = self._reader = self._connect_reader()
                yield reader
            except sqlite3.Error as exc:
                raise self._map_error(exc, key) from exc

    def _connect_reader(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self._path, timeout=self._timeout, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._timeout * 1000)}")
            conn.execute("PRAGMA query_only = 1")
        except BaseException:
            conn.close()
            raise
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
        return int(rowcount)

    # -- group commit ------------------------------------------------------------------

    def _commit(self, op: _WriteOp, key: str | None = None, *, isolated: bool = False) -> Any:
        """Run ``op`` in the next group commit and return its result once it is durable.

        Concurrent writers (threads, and the worker threads of async calls) queue their
        writes; whichever holds the connection lock takes everything queued and runs it
        in one ``BEGIN IMMEDIATE`` transaction with one ``COMMIT``, hence one sync of
        the WAL for the whole batch. A caller returns only after the commit holding its
        write: durability is that of one write per transaction. Batches form by
        themselves while the previous commit syncs; a lone writer commits at once.
        """
        write = _Write(op, key, isolated)
        self._pending.append(write)
        with self._lock:
            if not write.done:  # else an earlier lock holder committed it for us
                self._run_batch()
        if write.error is not None:
            raise write.error
        return write.result

    def _run_batch(self) -> None:
        """Commit everything queued in one transaction; the caller holds ``self._lock``."""
        batch: builtins.list[_Write] = []
        pending = self._pending
        while pending:
            batch.append(pending.popleft())
        try:
            conn = self._conn or self._conn_locked()
            conn.execute("BEGIN IMMEDIATE")
        except BaseException as exc:
            self._fail(batch, exc)
            return
        try:
            now = time.time()
            for write in batch:
                if write.isolated:
                    conn.execute("SAVEPOINT converge_write")
                try:
                    write.result = write.op(conn, now)
                except sqlite3.Error:
                    raise  # the transaction itself is in doubt: fail the whole batch
                except BaseException as exc:
                    write.error = exc
                    if write.isolated:
                        conn.execute("ROLLBACK TO converge_write")
                if write.isolated:
                    conn.execute("RELEASE converge_write")
            if self._writes >= _PURGE_EVERY:
                self._writes = 0
                conn.execute(_PURGE, (now,))
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                with suppress(sqlite3.Error):  # the original error says more
                    conn.execute("ROLLBACK")
            self._fail(batch, exc)
            return
        for write in batch:
            write.done = True

    def _fail(self, batch: builtins.list[_Write], exc: BaseException) -> None:
        """Every write of a batch that could not commit fails with ``exc``, mapped."""
        for write in batch:
            if isinstance(exc, sqlite3.Error):
                write.error = self._map_error(exc, write.key)
            elif isinstance(exc, Exception):
                write.error = exc
            else:  # KeyboardInterrupt and the like: the others get a plain failure
                write.error = StoreError(f"SQLite write to {self._path!r} was interrupted")
            write.done = True

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
        conn = self._reader
        if conn is None:
            with self._reading(key) as conn:
                row = conn.execute(_GET, args).fetchone()
        else:
            with self._read_lock:
                try:
                    if self._reader is None:
                        raise ClosedError(f"{self!r} was closed")
                    row = conn.execute(_GET, args).fetchone()
                except sqlite3.Error as exc:
                    raise self._map_error(exc, key) from exc
        return None if row is None else self._decode(key, row[0])

    def _put(self, key: str, value: Any, ttl: float | None) -> None:
        row = (key_bytes(key), self._encode(key, value))

        def put(conn: sqlite3.Connection, now: float) -> None:
            self._write(conn, _PUT, (*row, None if ttl is None else now + ttl))

        self._commit(put, key)

    def _put_if_absent(self, key: str, value: Any, ttl: float | None) -> bool:
        row = (key_bytes(key), self._encode(key, value))

        def put_if_absent(conn: sqlite3.Connection, now: float) -> bool:
            expires_at = None if ttl is None else now + ttl
            return self._write(conn, _PUT_IF_ABSENT, (*row, expires_at, now)) == 1

        return bool(self._commit(put_if_absent, key))

    def _delete(self, key: str) -> None:
        raw_key = key_bytes(key)
        self._commit(lambda conn, now: conn.execute(_DELETE, (raw_key,)), key)

    def _update(self, keys: builtins.list[str], fn: UpdateFn[R], ttl: float | None) -> R:
        def update(conn: sqlite3.Connection, now: float) -> R:
            # Inside the batch's BEGIN IMMEDIATE transaction: no other writer, in any
            # process, can change these keys between our read and our write.
            # One statement reads every key (an update reads up to 7: perf, issue 17.2).
            raw_keys = [key_bytes(key) for key in keys]
            found = dict(conn.execute(_get_many(len(raw_keys)), (*raw_keys, now)).fetchall())
            current = {}
            for key, raw_key in zip(keys, raw_keys, strict=True):
                blob = found.get(raw_key)
                current[key] = None if blob is None else self._decode(key, blob)
            changes, result = fn(current)
            check_changes(keys, changes)
            # Encode everything first: a value that does not serialize changes nothing.
            rows = []
            for key, change in changes.items():
                value, key_ttl = split_change(change, ttl)
                blob = None if value is None else self._encode(key, value)
                rows.append((key_bytes(key), blob, None if key_ttl is None else now + key_ttl))
            for raw_key, blob, expires_at in rows:
                if blob is None:
                    conn.execute(_DELETE, (raw_key,))
                else:
                    self._write(conn, _PUT, (raw_key, blob, expires_at))
            return result

        result: R = self._commit(update, keys[0] if len(keys) == 1 else None, isolated=True)
        return result

    def _list(self, prefix: str) -> builtins.list[str]:
        low = key_bytes(prefix)
        high = prefix_upper_bound(low)
        with self._reading() as conn:
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
        with self._read_lock, self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
            reader, self._reader = self._reader, None
            for each in (reader, conn):
                if each is not None:
                    each.close()

    def _forget_after_fork(self) -> None:
        # A connection must never cross fork(): the child opens its own on first use
        # and leaves the parent's untouched (not even closed, which could disturb the
        # parent's locks), so it is parked where it is never collected.
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._pending = deque()
        for conn in (self._conn, self._reader):
            if conn is not None:
                _INHERITED.append(conn)
        self._conn = self._reader = None

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
