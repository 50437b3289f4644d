"""Fixtures for the durable-queue tests: every Store backend, Redis included."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from converge.core.store import Store
from converge.extensions.storage import FileStore, MemoryStore, RedisStore, SQLiteStore
from redis_server import shared_redis_url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """One redis-server for the session."""
    yield from shared_redis_url()


@pytest.fixture(params=["memory", "file", "sqlite", "redis"])
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path, redis_url: str
) -> AsyncIterator[Store]:
    """A fresh, empty store of each backend."""
    store: Store
    if request.param == "memory":
        store = MemoryStore()
    elif request.param == "file":
        store = FileStore(str(tmp_path / "files"), locking=True)
    elif request.param == "sqlite":
        store = SQLiteStore(tmp_path / "db.sqlite3")
    else:
        store = RedisStore(redis_url, namespace=f"test-{uuid.uuid4().hex}")
    yield store
    await store.aclose()
