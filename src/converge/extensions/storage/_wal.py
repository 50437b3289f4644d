"""SQLiteStore's WAL checkpoints, on a thread of their own instead of inside a commit.

SQLite's automatic checkpoint runs in the commit that grows the write-ahead log past
1,000 pages: every writer of that batch then waits while pages are copied into the
database file and the file is synced (about a third of the SQLite gateway's p99 here).
With automatic checkpoints off on the writing connection, commits only count their
writes; past a threshold they wake a :class:`Checkpointer`, whose thread runs ``PASSIVE``
checkpoints on a connection of its own: they copy what is committed without blocking a
writer or a reader. A commit that begins once everything in the log is copied starts the
log over from its beginning; under steady load some batch is always committing while a
pass copies, so a second pass copies what those committed under the store's write lock,
held for that short tail only, and the next commit starts the log over.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable
from typing import Final

__all__ = ["CHECKPOINT_EVERY", "Checkpointer"]

_log = logging.getLogger("converge.storage")

#: Row writes between checkpoints: about SQLite's own 1,000 pages of log.
CHECKPOINT_EVERY: Final = 256


class Checkpointer:
    """Runs ``PASSIVE`` WAL checkpoints of one database on a daemon thread.

    Args:
        connect: Opens the thread's connection (busy timeout and sync level set).
        write_lock: The store's write lock (the last pass of each checkpoint holds it).
    """

    def __init__(
        self, connect: Callable[[], sqlite3.Connection], write_lock: threading.Lock
    ) -> None:
        self._connect = connect
        self._write_lock = write_lock
        self._wake = threading.Event()
        self._stopping = False
        self._writes = 0
        self._failing = False
        self.connection: sqlite3.Connection | None = None  # the thread's own
        self._thread = threading.Thread(
            target=self._run, name="converge-sqlite-checkpoint", daemon=True
        )
        self._thread.start()

    def committed(self, writes: int) -> None:
        """Count ``writes`` just committed; wake the thread every :data:`CHECKPOINT_EVERY`.

        Called with the store's write lock held, so the count needs no lock of its own.
        """
        self._writes += writes
        if self._writes >= CHECKPOINT_EVERY:
            self._writes = 0
            self._wake.set()

    def stop(self) -> None:
        """Ask the thread to close its connection and end (after a pass it is running)."""
        self._stopping = True
        self._wake.set()

    def close(self, timeout: float) -> None:
        """:meth:`stop`, and wait up to ``timeout`` seconds for the thread to end."""
        self.stop()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopping:
                break
            try:
                self._checkpoint()
            except sqlite3.Error as exc:
                # The log keeps growing until a pass succeeds; the next wake-up retries.
                if not self._failing:
                    _log.warning("SQLite WAL checkpoint failed (will retry): %s", exc)
                self._failing = True
                self._close_connection()
            else:
                self._failing = False
        self._close_connection()

    def _checkpoint(self) -> None:
        if self.connection is None:
            self.connection = self._connect()
        conn = self.connection
        # Statements run to completion (fetchall): one left open would hold a snapshot
        # of the log, which then could never start over.
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()  # the bulk, unlocked
        with self._write_lock:  # the commits made meanwhile; the next one restarts the log
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _close_connection(self) -> None:
        conn, self.connection = self.connection, None
        if conn is not None:
            conn.close()
