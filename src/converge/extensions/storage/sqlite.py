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

import anyio.lowlevel
import anyio.to_thread

from converge._paths import check_path
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
)
from converge.extensions.storage._codec import (
    SerializerName,
    check_bool,
    check_timeout,
    check_update,
    get_serializer,
    key_bytes,
    key_from_bytes,
    prefix_upper_bound,
)
from converge.extensions.storage._wal import Checkpointer

__all__ = ["SQLiteStore"]

T = TypeVar("T")
R = TypeVar("R")

_TABLE: Final = "converge_kv"
_SCHEMA: Final = (
    # Keys are BLOBs of UTF-8 (surrogatepass) bytes: byte order is code-point order, so
    # ORDER BY key sorts exactly like Python, and every str key round-trips.
    # A rowid table with the key's unique index, not WITHOUT ROWID: in a WITHOUT ROWID
    # table a row over about 1 KB (a webhook event's record) spills into an overflow
    # page, which tripled the file and doubled the CPU per write. Databases created
    # before keep their layout: every statement here works on both.
    f"CREATE TABLE IF NOT EXISTS {_TABLE} ("
    " key BLOB PRIMARY KEY NOT NULL,"
    " value BLOB NOT NULL,"
    " expires_at REAL"
    ")",
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
# By the store's durable flag: sync the WAL on every commit, or only at checkpoints.
_SYNCHRONOUS: Final = {True: "PRAGMA synchronous = FULL", False: "PRAGMA synchronous = NORMAL"}


@functools.lru_cache(maxsize=64)
def _get_many(count: int) -> str:
    """``SELECT key, value`` of ``count`` keys (the live ones), in one statement."""
    marks = ", ".join("?" * count)
    return f"SELECT key, value FROM {_TABLE} WHERE key IN ({marks}) AND {_LIVE}"


# The keys of expired rows, read from the expiry index (NULL, no expiry, never matches).
_EXPIRED: Final = f"SELECT key FROM {_TABLE} WHERE expires_at <= ?"
# A listing reads the key index alone (covering in either layout): the expired keys,
# few because writes purge them, come from the expiry index, not from each row.
_LIST_FROM: Final = f"SELECT key FROM {_TABLE} WHERE key >= ? AND key NOT IN ({_EXPIRED})"
_PURGE: Final = f"DELETE FROM {_TABLE} WHERE key IN ({_EXPIRED} LIMIT 512)"
_PURGE_EVERY: Final = 256  # writes between sweeps of expired rows
# The write-ahead log is cut back to this when it starts over: a burst (a large trim)
# grows it, and without a limit its file keeps that size for good. 64 MiB, as Rails
# sets for SQLite: above what steady writing between checkpoints needs (about 4 MiB).
_WAL_KEPT_BYTES: Final = 64 << 20


# A write, for group commit: ``op(conn, now)`` runs inside the batch's transaction. An
# op raises an ``Exception`` of its own only before its first statement (it validates and
# encodes everything first), so a failed op has written nothing and the batch goes on; a
# ``sqlite3.Error`` or an interrupt fails the whole batch.
_WriteOp = Callable[[sqlite3.Connection, float], Any]


class _Write:
    """One caller's write, queued for the next group commit."""

    __slots__ = ("done", "error", "event", "key", "lead", "op", "result")

    def __init__(self, op: _WriteOp, key: str | None) -> None:
        self.op = op
        self.key = key
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None
        self.event: anyio.Event | None = None  # async writers: set when done or leading
        self.lead = False  # async writers: commit the loop's next batch

    def outcome(self) -> Any:
        """The op's result, or its error raised."""
        if self.error is not None:
            raise self.error
        return self.result


class _LoopWrites:
    """The async writes of one event loop waiting for their group commit."""

    __slots__ = ("leading", "pending")

    def __init__(self) -> None:
        self.pending: builtins.list[_Write] = []
        self.leading = False  # a batch of this loop is being committed


_STORES: weakref.WeakSet[SQLiteStore] = weakref.WeakSet()
_INHERITED: builtins.list[sqlite3.Connection] = []


def _reset_in_child() -> None:
    for store in list(_STORES):
        store._forget_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_in_child)


def _connect_plain(path: str, timeout: float, pragma: str) -> sqlite3.Connection:
    """A connection to an existing database, with the busy timeout and ``pragma``."""
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        conn.execute(pragma)
    except BaseException:
        conn.close()
        raise
    return conn


class SQLiteStore(Store):
    """A Store in a SQLite database (stdlib ``sqlite3``), driven off the event loop.

    * One table, ``converge_kv``, with a unique index on the key's UTF-8 bytes:
      ``list(prefix)`` is a range of that index (``key >= prefix AND key < next(prefix)``),
      not a scan, and values up to a page (4 KB) stay in the row.
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
    both (every thread sees the same database). A third, on a daemon thread, copies the
    WAL back into the database (``_wal.Checkpointer``), so no commit waits for that.

    The async reads take one worker-thread hop each. The async writes of one event loop
    are queued on the loop and committed in batches, one worker-thread hop per batch (no
    thread per waiting writer). The sync methods run the same code directly and refuse
    to run on an event-loop thread.

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
        location = check_path(path, "path")
        self._path = location if location == ":memory:" else os.path.abspath(location)
        self._serializer = get_serializer(serializer)
        self._timeout = check_timeout(timeout, "timeout")
        self._durable = check_bool(durable, "durable")
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pending: deque[_Write] = deque()
        self._loop_writes: dict[int, _LoopWrites] = {}  # by the thread running the loop
        # Reads use a connection of their own (WAL: they see the last commit and never
        # wait for a batch being committed); a ":memory:" database has only one.
        self._read_lock = threading.Lock()
        self._reader: sqlite3.Connection | None = None
        # WAL checkpoints run on a thread of their own (file databases; started lazily)
        self._checkpointer: Checkpointer | None = None
        _STORES.add(self)
        self._written = 0  # row writes in all
        self._purge_at = _PURGE_EVERY  # the next sweep of expired rows, in row writes
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
            conn.execute(_SYNCHRONOUS[self._durable])
            if self._path != ":memory:":
                conn.execute("PRAGMA wal_autocheckpoint = 0")  # see _wal.Checkpointer
                conn.execute(f"PRAGMA journal_size_limit = {_WAL_KEPT_BYTES}")
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
        return _connect_plain(self._path, self._timeout, "PRAGMA query_only = 1")

    def _start_checkpointer(self) -> Checkpointer:
        """The checkpoint thread; it holds no reference to this store, and stops when the
        store is closed or collected."""
        sync = _SYNCHRONOUS[self._durable]
        connect = functools.partial(_connect_plain, self._path, self._timeout, sync)
        checkpointer = self._checkpointer = Checkpointer(connect, self._lock)
        weakref.finalize(self, checkpointer.stop)
        return checkpointer

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
        self._written += 1
        return int(rowcount)

    # -- group commit ------------------------------------------------------------------

    def _commit(self, write: _Write) -> Any:
        """Run ``write`` in the next group commit and return its result once it is durable.

        Concurrent writers (threads, and the batches of event loops) queue their writes;
        whichever holds the connection lock takes everything queued and runs it in one
        ``BEGIN IMMEDIATE`` transaction with one ``COMMIT``, hence one sync of the WAL
        for the whole batch. A caller returns only after the commit holding its write:
        durability is that of one write per transaction. Batches form by themselves
        while the previous commit syncs; a lone writer commits at once.
        """
        self._pending.append(write)
        with self._lock:
            if not write.done:  # else an earlier lock holder committed it for us
                self._run_batch(self._take_pending())
        return write.outcome()

    async def _acommit(self, write: _Write) -> Any:
        """:meth:`_commit` from an event loop, with one worker-thread hop per batch.

        The loop's writers queue their writes on the loop side; one of them leads: it
        lets the loop's other ready tasks queue theirs (one checkpoint), then takes the
        whole queue to the worker thread in one hop and wakes every writer of the batch.
        Writes queued meanwhile form the next batch, led by the first of them. A
        cancelled caller's write still commits, as a thread hop's would, and the caller
        sees the cancellation once it has: the wait is shielded only after a
        cancellation arrives (a shield around every write cost the loop 6-10 µs),
        and leading a batch is always shielded.
        """
        thread = threading.get_ident()
        writes = self._loop_writes.get(thread)
        if writes is None:
            writes = self._loop_writes[thread] = _LoopWrites()
        write.event = anyio.Event()
        writes.pending.append(write)
        try:
            await self._until_committed(thread, writes, write)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self._until_committed(thread, writes, write)
            raise
        return write.outcome()

    async def _until_committed(self, thread: int, writes: _LoopWrites, write: _Write) -> None:
        assert write.event is not None
        while not write.done:
            if write.lead or not writes.leading:
                await self._lead(thread, writes)
            else:
                await write.event.wait()  # set once done, or once asked to lead

    async def _lead(self, thread: int, writes: _LoopWrites) -> None:
        # Shielded: a batch taken is always committed and its writers woken.
        writes.leading = True
        batch: builtins.list[_Write] = []
        with anyio.CancelScope(shield=True):
            try:
                await anyio.lowlevel.checkpoint()  # the loop's other ready writers join
                batch, writes.pending = writes.pending, []
                await anyio.to_thread.run_sync(self._run_locked_batch, batch)
            finally:
                for write in batch:
                    if not write.done:  # the hop itself failed
                        write.error = StoreError(f"SQLite write to {self._path!r} did not run")
                        write.done = True
                    if write.event is not None:
                        write.event.set()
                if writes.pending:  # the next batch: its first writer leads
                    first = writes.pending[0]
                    first.lead = True
                    if first.event is not None:
                        first.event.set()
                else:  # idle: forget this loop's queue (threads come and go)
                    writes.leading = False
                    self._loop_writes.pop(thread, None)

    def _take_pending(self) -> builtins.list[_Write]:
        batch: builtins.list[_Write] = []
        pending = self._pending
        while pending:
            batch.append(pending.popleft())
        return batch

    def _run_locked_batch(self, batch: builtins.list[_Write]) -> None:
        with self._lock:
            self._run_batch([*self._take_pending(), *batch])

    def _run_batch(self, batch: builtins.list[_Write]) -> None:
        """Commit ``batch`` in one transaction; the caller holds ``self._lock``."""
        try:
            conn = self._conn or self._conn_locked()
            conn.execute("BEGIN IMMEDIATE")
        except BaseException as exc:
            self._fail(batch, exc)
            return
        written = self._written
        try:
            now = time.time()
            for write in batch:
                try:
                    write.result = write.op(conn, now)
                except sqlite3.Error:
                    raise  # the transaction itself is in doubt: fail the whole batch
                except Exception as exc:  # raised before the op's first statement
                    write.error = exc
            if self._written >= self._purge_at:
                self._purge_at = self._written + _PURGE_EVERY
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
        if self._path != ":memory:" and not self._closed:  # count towards a checkpoint
            checkpointer = self._checkpointer or self._start_checkpointer()
            checkpointer.committed(self._written - written)

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

    # Writes: each builds its op (run inside a group commit, encoding there too, off
    # the loop); the sync surface commits it from the calling thread (_commit), the
    # async one from the loop in batches (_acommit).

    def _put_write(self, key: str, value: Any, ttl: float | None) -> _Write:
        def put(conn: sqlite3.Connection, now: float) -> None:
            row = (key_bytes(key), self._encode(key, value), None if ttl is None else now + ttl)
            self._write(conn, _PUT, row)

        return _Write(put, key)

    def _put_if_absent_write(self, key: str, value: Any, ttl: float | None) -> _Write:
        def put_if_absent(conn: sqlite3.Connection, now: float) -> bool:
            expires_at = None if ttl is None else now + ttl
            row = (key_bytes(key), self._encode(key, value), expires_at, now)
            return self._write(conn, _PUT_IF_ABSENT, row) == 1

        return _Write(put_if_absent, key)

    def _delete_write(self, key: str) -> _Write:
        raw_key = key_bytes(key)
        return _Write(lambda conn, now: conn.execute(_DELETE, (raw_key,)), key)

    def _update_write(self, keys: builtins.list[str], fn: UpdateFn[R], ttl: float | None) -> _Write:
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

        return _Write(update, keys[0] if len(keys) == 1 else None)

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
        # First, and outside the locks: the checkpointer's last pass takes the write lock.
        # Closed from now on: a batch still committing starts no checkpointer.
        self._closed = True
        checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None:
            checkpointer.close(self._timeout)
        with self._read_lock, self._lock:
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
        self._loop_writes = {}
        checkpointer, self._checkpointer = self._checkpointer, None  # its thread is gone
        spare = checkpointer.connection if checkpointer is not None else None
        for conn in (self._conn, self._reader, spare):
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
        write = self._put_write(validate_key(key), value, validate_ttl(ttl))
        self._sync("aput", self._commit, write)

    def delete(self, key: str) -> None:
        """Delete a value."""
        self._sync("adelete", self._commit, self._delete_write(validate_key(key)))

    def list(self, prefix: str = "") -> builtins.list[str]:
        """List keys starting with prefix."""
        return self._sync("alist", self._list, validate_prefix(prefix))

    def put_if_absent(self, key: str, value: Any, *, ttl: float | None = None) -> bool:
        """Store value only if key is absent (or expired); atomic across processes.

        Returns:
            True if stored, False if key existed.
        """
        write = self._put_if_absent_write(validate_key(key), value, validate_ttl(ttl))
        return bool(self._sync("aput_if_absent", self._commit, write))

    def update(self, keys: Sequence[str], fn: UpdateFn[R], *, ttl: float | None = None) -> R:
        """Atomic read-modify-write (sync form of :meth:`aupdate`)."""
        write = self._update_write(check_update(keys, fn), fn, validate_ttl(ttl))
        result: R = self._sync("aupdate", self._commit, write)
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
        await self._acommit(self._put_write(validate_key(key), value, validate_ttl(ttl)))

    async def adelete(self, key: str) -> None:
        """Delete ``key``; deleting an absent key is not an error."""
        await self._acommit(self._delete_write(validate_key(key)))

    async def alist(self, prefix: str = "") -> builtins.list[str]:
        """Return the live keys starting with ``prefix``, sorted (an index range scan)."""
        return await anyio.to_thread.run_sync(self._list, validate_prefix(prefix))

    async def aput_if_absent(self, key: str, value: Any, *, ttl: float | None = None) -> bool:
        """Store ``value`` only if ``key`` is absent or expired; one atomic statement."""
        write = self._put_if_absent_write(validate_key(key), value, validate_ttl(ttl))
        return bool(await self._acommit(write))

    async def aupdate(self, keys: Sequence[str], fn: UpdateFn[R], *, ttl: float | None = None) -> R:
        """Atomically read ``keys``, let ``fn`` compute changes, and write them.

        One ``BEGIN IMMEDIATE`` transaction, so atomic across threads and processes, and
        all-or-nothing after a crash; ``fn`` runs in the worker thread.

        Returns:
            The ``result`` part of ``fn``'s return value.
        """
        write = self._update_write(check_update(keys, fn), fn, validate_ttl(ttl))
        result: R = await self._acommit(write)
        return result

    async def aclose(self) -> None:
        """Close the connection; later calls raise ClosedError. Idempotent."""
        await anyio.to_thread.run_sync(self._close)
