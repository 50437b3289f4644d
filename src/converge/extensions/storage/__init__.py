"""Storage extension: Store backends for one process, one host, or many machines.

* :class:`MemoryStore`: in this process; no I/O.
* :class:`FileStore`: one file per key in a directory; atomic, durable writes.
* :class:`SQLiteStore`: a SQLite database file, safe for several processes on one host.
* :class:`RedisStore`: a Redis server, shared by processes on many machines (needs the
  ``redis`` extra: ``pip install -e ".[redis]"``).
* :class:`EncryptedStore`: wraps any of them and seals values with AES-256-GCM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from converge.extensions.storage.encrypted import EncryptedStore
from converge.extensions.storage.file import FileStore
from converge.extensions.storage.memory import MemoryStore
from converge.extensions.storage.sqlite import SQLiteStore

if TYPE_CHECKING:
    from converge.extensions.storage.redis import RedisStore

__all__ = ["EncryptedStore", "FileStore", "MemoryStore", "RedisStore", "SQLiteStore"]


def __getattr__(name: str) -> object:
    # RedisStore needs coredis (the "redis" extra); import it only when asked for, so the
    # other backends work without it.
    if name == "RedisStore":
        from converge.extensions.storage.redis import RedisStore

        return RedisStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
