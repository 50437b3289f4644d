"""RedisStore against a real redis-server: contract, pooling, namespaces, transactions.

Uses ``CONVERGE_TEST_REDIS_URL`` when set (CI runs a server on 127.0.0.1:6399); otherwise
starts a throwaway ``redis-server`` on a free loopback port for the session.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import coredis
import pytest

from converge.errors import (
    ClosedError,
    StoreCorruptedError,
    StoreUnavailableError,
    SyncInEventLoopError,
    UsageError,
)
from converge.extensions.storage import RedisStore
from converge.extensions.storage.testing import StoreContract

pytestmark = pytest.mark.anyio


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("CONVERGE_TEST_REDIS_URL")
    if url:
        yield url
        return
    server = shutil.which("redis-server")
    assert server, "redis-server is needed (apt install redis-server) or CONVERGE_TEST_REDIS_URL"
    port = _free_port()
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert proc.poll() is None, "redis-server exited"
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()


def unique_namespace() -> str:
    return f"test-{uuid.uuid4().hex}:"


class TestRedisStoreContract(StoreContract):
    @pytest.fixture
    def store(self, redis_url: str) -> Iterator[RedisStore]:
        store = RedisStore(redis_url, namespace=unique_namespace())
        yield store
        store.close()


@pytest.fixture
def store(redis_url: str) -> Iterator[RedisStore]:
    store = RedisStore(redis_url, namespace=unique_namespace())
    yield store
    store.close()


async def raw_pttl(url: str, key: bytes) -> int:
    async with coredis.Redis.from_url(url) as client:
        return int(await client.pttl(key))


def test_flags_say_atomic_and_multi_process() -> None:
    assert RedisStore.atomic_put_if_absent is True
    assert RedisStore.supports_locking is True


async def test_entered_store_shares_one_pool_among_many_tasks(redis_url: str) -> None:
    async with RedisStore(redis_url, namespace=unique_namespace()) as store:

        async def work(i: int) -> None:
            await store.aput(f"k{i}", i)
            assert await store.aget(f"k{i}") == i

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(work, i)
        assert len(await store.alist("k")) == 50
        async with store:  # nested scopes are fine
            assert await store.aget("k7") == 7
        assert await store.aget("k8") == 8  # the inner exit did not close the store
    with pytest.raises(ClosedError):
        await store.aget("k1")


async def test_put_if_absent_uses_set_nx_px(store: RedisStore, redis_url: str) -> None:
    assert await store.aput_if_absent("k", 1, ttl=0.25) is True
    pttl = await raw_pttl(redis_url, (store.namespace + "k").encode())
    assert 0 < pttl <= 250
    assert await store.aput_if_absent("k", 2) is False


async def test_namespaces_isolate_stores(redis_url: str) -> None:
    one = RedisStore(redis_url, namespace=unique_namespace())
    two = RedisStore(redis_url, namespace=unique_namespace())
    await one.aput("shared", 1)
    assert await two.aget("shared") is None
    assert await two.alist() == []
    assert await one.alist() == ["shared"]


async def test_unreachable_server_raises_store_unavailable(redis_url: str) -> None:
    store = RedisStore(f"redis://127.0.0.1:{_free_port()}/0", connect_timeout=0.5)
    with pytest.raises(StoreUnavailableError, match="unreachable"):
        await store.aget("k")
    async with store:
        with pytest.raises(StoreUnavailableError):
            await store.aput("k", 1)


def test_unreachable_server_raises_store_unavailable_from_sync_code() -> None:
    store = RedisStore(f"redis://127.0.0.1:{_free_port()}/0", connect_timeout=0.5)
    try:
        with pytest.raises(StoreUnavailableError):
            store.put("k", 1)
    finally:
        store.close()


def test_sync_calls_from_many_threads_share_the_portal_pool(store: RedisStore) -> None:
    def work(i: int) -> None:
        for j in range(10):
            store.put(f"t{i}/{j}", j)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.list("t")) == 60
    assert store._keeper is not None
    assert store._keeper.is_alive()
    keeper = store._keeper
    store.close()
    assert not keeper.is_alive()
    with pytest.raises(ClosedError):
        store.get("t0/0")


def test_update_is_atomic_across_independent_clients(redis_url: str) -> None:
    namespace = unique_namespace()
    stores = [RedisStore(redis_url, namespace=namespace) for _ in range(4)]

    def bump(current: dict[str, Any]) -> tuple[dict[str, Any], None]:
        return {"n": (current["n"] or 0) + 1}, None

    def work(store: RedisStore) -> None:
        for _ in range(15):
            store.update(["n"], bump)

    threads = [threading.Thread(target=work, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stores[0].get("n") == 60
    for s in stores:
        s.close()


async def test_update_writes_ttl_and_deletes(store: RedisStore, redis_url: str) -> None:
    await store.aput("gone", 1)

    def change(current: dict[str, Any]) -> tuple[dict[str, Any], str]:
        return {"gone": None, "new": 5}, "done"

    assert await store.aupdate(["gone", "new"], change, ttl=30) == "done"
    assert await store.aget("gone") is None
    assert 0 < await raw_pttl(redis_url, (store.namespace + "new").encode()) <= 30_000


async def test_json_store_never_unpickles(redis_url: str) -> None:
    namespace = unique_namespace()
    await RedisStore(redis_url, namespace=namespace).aput("k", {1, 2})
    with pytest.raises(StoreCorruptedError, match="never unpickles"):
        await RedisStore(redis_url, namespace=namespace, serializer="json").aget("k")


async def test_foreign_value_reads_as_corrupt(store: RedisStore, redis_url: str) -> None:
    async with coredis.Redis.from_url(redis_url) as client:
        await client.set((store.namespace + "k").encode(), b"plain text")
    with pytest.raises(StoreCorruptedError):
        await store.aget("k")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"url": "http://localhost"},
        {"url": 5},
        {"url": "redis://localhost:notaport/0"},
        {"namespace": 3},
        {"serializer": "marshal"},
        {"timeout": 0},
    ],
)
def test_invalid_arguments_raise_usage_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        RedisStore(**kwargs)


def test_repr_hides_the_password() -> None:
    store = RedisStore("redis://user:s3cret@localhost:6379/0")
    assert "s3cret" not in repr(store)
    store.close()


async def test_sync_call_on_event_loop_names_the_coroutine(store: RedisStore) -> None:
    with pytest.raises(SyncInEventLoopError, match=r"RedisStore\.aget"):
        store.get("k")


def test_missing_coredis_names_the_redis_extra() -> None:
    code = (
        "import sys; sys.modules['coredis'] = None\n"
        "import converge.extensions.storage as s\n"
        "s.MemoryStore()\n"
        "try:\n"
        "    s.RedisStore\n"
        "except ImportError as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("MissingDependencyError")
    assert "converge[redis]" in out.stdout


async def test_update_of_no_keys_just_calls_the_function(store: RedisStore) -> None:
    assert await store.aupdate([], lambda current: ({}, current)) == {}
