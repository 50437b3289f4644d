"""RedisStore and RedisStreamsBridge warn when their Redis may lose keys without an error:
evicted to free memory (``maxmemory-policy`` other than ``noeviction``), or forgotten in a
crash or restart (``appendonly no``)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import coredis
import pytest

from converge.errors import StoreUnavailableError
from converge.extensions.storage import RedisStore
from converge.runtime import MessageBus
from converge.runtime.redis_streams import RedisStreamsBridge
from redis_server import RedisServer

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis that keeps what it is told: ``appendonly yes``, ``noeviction``."""
    files = tmp_path_factory.mktemp("redis")
    with RedisServer("--appendonly", "yes", "--dir", str(files)) as server:
        yield server


@pytest.fixture
def policy(request: pytest.FixtureRequest, server: RedisServer) -> Iterator[str]:
    """Sets the server's ``maxmemory-policy`` for one test (``noeviction`` after it)."""
    policy: str = request.param

    async def set_policy(value: str) -> None:
        async with coredis.Redis.from_url(server.url) as client:
            await client.config_set({"maxmemory-policy": value})

    anyio.run(set_policy, policy)
    yield policy
    anyio.run(set_policy, "noeviction")


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "converge.redis"]


async def bridge_warning(url: str, caplog: pytest.LogCaptureFixture) -> str:
    """The one warning a bridge logs when it opens on the Redis at ``url``."""
    async with RedisStreamsBridge(MessageBus(), url, export_topics=["work"]):
        pass
    (message,) = warnings_of(caplog)
    return message


def namespace() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-ttl"], indirect=True)
async def test_a_store_on_a_redis_that_evicts_warns_once_naming_the_policy(
    server: RedisServer, policy: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "converge.redis")
    async with RedisStore(server.url, namespace=namespace()) as store:
        await store.aput("k", 1)
        async with store:  # a nested scope shares the pool: no second look
            assert await store.aget("k") == 1
    (message,) = warnings_of(caplog)
    assert f"maxmemory-policy {policy}" in message
    assert "set maxmemory-policy noeviction" in message.lower()
    assert repr(server.url) in message


@pytest.mark.parametrize("policy", ["allkeys-random"], indirect=True)
def test_the_sync_methods_warn_too(
    server: RedisServer, policy: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "converge.redis")
    store = RedisStore(server.url, namespace=namespace())
    try:
        store.put("k", 1)
        assert store.get("k") == 1
    finally:
        store.close()
    (message,) = warnings_of(caplog)
    assert "allkeys-random" in message


@pytest.mark.parametrize("policy", ["allkeys-lfu"], indirect=True)
async def test_a_bridge_on_a_redis_that_evicts_warns(
    server: RedisServer, policy: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "converge.redis")
    message = await bridge_warning(server.url, caplog)
    assert "allkeys-lfu" in message
    assert "stream entries" in message


async def test_noeviction_warns_nothing(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "converge.redis")
    async with RedisStore(server.url, namespace=namespace()) as store:
        await store.aput("k", 1)
    async with RedisStreamsBridge(MessageBus(), server.url, import_topics=["work"], group="w"):
        pass
    assert warnings_of(caplog) == []


async def test_a_redis_without_an_append_only_file_warns_once_with_its_snapshots(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "converge.redis")
    with RedisServer("--save", "60 10000", "--dir", str(tmp_path)) as forgetful:
        async with RedisStore(forgetful.url, namespace=namespace()) as store:
            await store.aput("k", 1)
            async with store:
                assert await store.aget("k") == 1
        (message,) = warnings_of(caplog)
        assert "appendonly no, save '60 10000'" in message
        assert "RedisStore keys" in message
        assert "set appendonly yes" in message.lower()
        caplog.clear()
        message = await bridge_warning(forgetful.url, caplog)
    assert "appendonly no" in message
    assert "stream entries" in message


async def test_a_redis_that_refuses_config_is_used_without_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Managed services and ACLs often refuse CONFIG: the policy is unknown, which is no
    # reason to refuse the store.
    caplog.set_level(logging.WARNING, "converge.redis")
    with RedisServer("--rename-command", "CONFIG", "") as bare:
        async with RedisStore(bare.url, namespace=namespace()) as store:
            await store.aput("k", 1)
            assert await store.aget("k") == 1
        async with RedisStreamsBridge(MessageBus(), bare.url, export_topics=["work"]):
            pass
    assert warnings_of(caplog) == []


async def test_a_stalled_redis_holds_the_look_no_longer_than_the_timeout(
    server: RedisServer,
) -> None:
    server.pause()
    try:
        started = time.monotonic()
        async with RedisStore(server.url, namespace=namespace(), timeout=0.5) as store:
            assert time.monotonic() - started < 1.0
            with pytest.raises(StoreUnavailableError):
                await store.aget("k")
    finally:
        server.resume()
