"""Fixtures for the connectors tests: every Store backend, a receiver on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from webhook_helpers import Receiver, ServerThread

from converge.core.store import Store
from converge.extensions.storage import FileStore, MemoryStore, SQLiteStore


@pytest.fixture(params=["memory", "sqlite", "file"])
async def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """Each embedded backend (claims and the outbox must work on all of them)."""
    store: Store
    if request.param == "memory":
        store = MemoryStore()
    elif request.param == "sqlite":
        store = SQLiteStore(tmp_path / "db.sqlite3")
    else:
        store = FileStore(str(tmp_path / "files"), locking=True)
    yield store
    await store.aclose()


@pytest.fixture(scope="module")
def receiver_server() -> Iterator[tuple[Receiver, str]]:
    """One receiver on 127.0.0.1 for the module; reset per test with ``receiver``."""
    receiver = Receiver()
    with ServerThread(receiver) as server:
        yield receiver, server.url


@pytest.fixture
def receiver(receiver_server: tuple[Receiver, str]) -> tuple[Receiver, str]:
    found, url = receiver_server
    found.__init__()  # type: ignore[misc]
    return found, url
