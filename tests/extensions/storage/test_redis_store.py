"""RedisStore against a real redis-server: contract, pooling, namespaces, transactions.

Uses ``CONVERGE_TEST_REDIS_URL`` when set (CI runs a server on 127.0.0.1:6399); otherwise
starts a throwaway ``redis-server`` on a free loopback port for the session.
"""

from __future__ import annotations

import os
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
    StoreOutcomeUnknownError,
    StoreUnavailableError,
    SyncInEventLoopError,
    UsageError,
)
from converge.extensions.storage import RedisStore
from converge.extensions.storage.redis import _stripes_held
from converge.extensions.storage.testing import StoreContract
from redis_server import RedisServer, free_port

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("CONVERGE_TEST_REDIS_URL")
    if url:
        yield url
        return
    with RedisServer() as server:
        yield server.url


def unique_namespace() -> str:
    return f"test-{uuid.uuid4().hex}"


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
    pttl = await raw_pttl(redis_url, (store.namespace + ":k").encode())
    assert 0 < pttl <= 250
    assert await store.aput_if_absent("k", 2) is False


async def test_namespaces_isolate_stores(redis_url: str) -> None:
    one = RedisStore(redis_url, namespace=unique_namespace())
    two = RedisStore(redis_url, namespace=unique_namespace())
    await one.aput("shared", 1)
    assert await two.aget("shared") is None
    assert await two.alist() == []
    assert await one.alist() == ["shared"]


async def test_a_namespace_never_sees_another_that_starts_with_its_name(redis_url: str) -> None:
    base = unique_namespace()
    app, app2 = RedisStore(redis_url, namespace=base), RedisStore(redis_url, namespace=base + "2")
    await app2.aput("k", "app2's")
    await app2.aput("2:k", "app2's too")
    assert await app.alist() == []
    assert await app.aget("2:k") is None
    assert await app.aget("k") is None
    await app.aput("2:k", "app's")
    assert await app2.aget("k") == "app2's"
    assert await app2.alist() == ["2:k", "k"]
    assert await app.alist() == ["2:k"]


@pytest.mark.parametrize("namespace", ["app:", "a:b", ":"])
def test_namespace_with_the_delimiter_is_refused(namespace: str) -> None:
    with pytest.raises(UsageError, match="separates the namespace"):
        RedisStore(namespace=namespace)


async def test_keys_are_stored_as_namespace_colon_key(redis_url: str) -> None:
    store = RedisStore(redis_url, namespace=unique_namespace())
    await store.aput("k", 1, ttl=30)
    assert 0 < await raw_pttl(redis_url, f"{store.namespace}:k".encode()) <= 30_000


async def test_atime_is_the_servers_clock_with_microseconds(store: RedisStore) -> None:
    times = [await store.atime() for _ in range(5)]
    assert times == sorted(times)
    assert abs(times[0] - time.time()) < 5  # the same host here
    assert any(t % 1 for t in times)  # a fraction of a second, not whole seconds


@pytest.fixture
def stallable() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


async def _put_if_absent_during_stall(
    server: RedisServer, stall: float, limit: float
) -> tuple[bool | StoreOutcomeUnknownError, float, object]:
    """put_if_absent while the server is frozen for ``stall`` s: (result, seconds, stored)."""
    token = uuid.uuid4().hex
    async with RedisStore(server.url, namespace="stall", timeout=limit) as store:
        await store.aput("warm", 1)  # the pool is connected
        server.pause()
        resume = threading.Timer(stall, server.resume)
        resume.start()
        started = time.monotonic()
        result: bool | StoreOutcomeUnknownError
        try:
            result = await store.aput_if_absent("claim", token, ttl=60)
        except StoreOutcomeUnknownError as exc:
            result = exc
        elapsed = time.monotonic() - started
        resume.join()
    reader = RedisStore(server.url, namespace="stall")
    stored = await reader.aget("claim")
    await reader.adelete("claim")
    return result, elapsed, stored == token


async def test_put_if_absent_through_a_stall_shorter_than_timeout_is_true(
    stallable: RedisServer,
) -> None:
    # A 1.5-2.5 s stall used to make coredis resend SET NX, which found our own value.
    for stall in (1.5, 2.5):
        result, elapsed, ours = await _put_if_absent_during_stall(stallable, stall, limit=3.5)
        assert result is True, result
        assert ours
        assert elapsed < 3.5 + 0.5


async def test_put_if_absent_through_a_longer_stall_says_the_outcome_is_unknown(
    stallable: RedisServer,
) -> None:
    # A 4 s stall: the call ends at its timeout (not 3x it) with a typed error that says
    # the write may have happened, and it did.
    result, elapsed, ours = await _put_if_absent_during_stall(stallable, 4.0, limit=1.5)
    assert isinstance(result, StoreOutcomeUnknownError), result
    assert isinstance(result, StoreUnavailableError)  # callers mapping 503 still work
    assert "may or may not" in str(result)
    assert result.key == "claim"
    assert 1.5 <= elapsed < 1.5 + 1.0  # not 3x the timeout, as it was
    assert ours  # the server ran it after SIGCONT: "unknown" was the truth


async def test_reads_through_a_long_stall_fail_within_the_timeout(stallable: RedisServer) -> None:
    async with RedisStore(stallable.url, namespace="stall", timeout=1.0) as store:
        await store.aput("k", 1)
        stallable.pause()
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailableError) as info:
                await store.aget("k")
            assert not isinstance(info.value, StoreOutcomeUnknownError)
            assert time.monotonic() - started < 2.0  # timeout 1.0, plus a busy machine's slack
            started = time.monotonic()
            # The update stalls at WATCH, before anything is written: a known outcome.
            with pytest.raises(StoreUnavailableError) as info:
                await store.aupdate(["k"], lambda cur: ({"k": cur["k"] + 1}, None))
            assert not isinstance(info.value, StoreOutcomeUnknownError)
            assert time.monotonic() - started < 2.0  # timeout 1.0, plus a busy machine's slack
        finally:
            stallable.resume()


async def test_unreachable_server_raises_store_unavailable(redis_url: str) -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", connect_timeout=0.5)
    with pytest.raises(StoreUnavailableError, match="unreachable"):
        await store.aget("k")
    # Refused: nothing was sent, so the outcome of this write is known.
    with pytest.raises(StoreUnavailableError) as info:
        await store.aput("k", 1)
    assert not isinstance(info.value, StoreOutcomeUnknownError)
    async with store:
        with pytest.raises(StoreUnavailableError) as info:
            await store.aput("k", 1)
        assert not isinstance(info.value, StoreOutcomeUnknownError)


def test_unreachable_server_raises_store_unavailable_from_sync_code() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", connect_timeout=0.5)
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
    assert 0 < await raw_pttl(redis_url, (store.namespace + ":new").encode()) <= 30_000


async def test_json_store_never_unpickles(redis_url: str) -> None:
    namespace = unique_namespace()
    await RedisStore(redis_url, namespace=namespace).aput("k", {1, 2})
    with pytest.raises(StoreCorruptedError, match="never unpickles"):
        await RedisStore(redis_url, namespace=namespace, serializer="json").aget("k")


async def test_foreign_value_reads_as_corrupt(store: RedisStore, redis_url: str) -> None:
    async with coredis.Redis.from_url(redis_url) as client:
        await client.set((store.namespace + ":k").encode(), b"plain text")
    with pytest.raises(StoreCorruptedError):
        await store.aget("k")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"url": "http://localhost"},
        {"url": 5},
        {"url": "redis://localhost:notaport/0"},
        {"url": "redis://:notaport"},  # no host: failed in the first call, AssertionError
        {"url": "redis://"},
        {"url": "rediss://"},
        {"url": "redis://[::1"},
        {"url": "redis://localhost:6379/zero"},  # read as unreachable before
        {"url": "redis://localhost:6379/0/1"},
        {"url": "unix://"},
        {"namespace": 3},
        {"serializer": "marshal"},
        {"timeout": 0},
    ],
)
def test_invalid_arguments_raise_usage_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        RedisStore(**kwargs)


@pytest.mark.parametrize(
    "url", ["redis://app:s3cret@:notaport/0", "redis://app:s3cret@localhost/x", "http://u:s3cret@h"]
)
def test_an_invalid_url_is_refused_without_its_password(url: str) -> None:
    with pytest.raises(UsageError) as caught:
        RedisStore(url)
    assert "s3cret" not in str(caught.value)
    assert ":***@" in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost",
        "redis://localhost:6379/",
        "rediss://[::1]:6380/15",
        "unix:///tmp/r.sock",
    ],
)
def test_valid_urls_are_accepted_without_connecting(url: str) -> None:
    RedisStore(url).close()


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
    assert "[redis]" in out.stdout


async def test_update_of_no_keys_just_calls_the_function(store: RedisStore) -> None:
    assert await store.aupdate([], lambda current: ({}, current)) == {}


async def test_update_locks_are_made_on_demand_and_dropped_once_free() -> None:
    # 64 shared stripes made unrelated updates of one loop wait for each other (a
    # gateway's p99 was 89 ms); a stripe's lock now exists only while it is used.
    locks: dict[int, anyio.Lock] = {}
    order: list[str] = []
    first_in = anyio.Event()
    release = anyio.Event()

    async def hold(stripe: int, name: str) -> None:
        async with _stripes_held(locks, [stripe]):
            order.append(f"{name} in")
            first_in.set()
            await release.wait()
            order.append(f"{name} out")

    async def other(stripe: int, name: str) -> None:
        async with _stripes_held(locks, [stripe]):
            order.append(f"{name} in")

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold, 1, "a")
        await first_in.wait()
        tg.start_soon(other, 1, "same")
        tg.start_soon(other, 2, "other")
        await anyio.wait_all_tasks_blocked()
        assert order == ["a in", "other in"]  # another stripe does not wait
        assert set(locks) == {1}
        release.set()
    assert order == ["a in", "other in", "a out", "same in"]
    assert locks == {}


async def test_concurrent_updates_leave_no_lock_behind(store: RedisStore) -> None:
    def bump(current: dict[str, Any]) -> tuple[dict[str, Any], None]:
        return {"n": (current["n"] or 0) + 1}, None

    async with store:
        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(store.aupdate, ["n", f"k{i}"], bump)
        assert await store.aget("n") == 200
        assert store._update_locks.get() == {}


async def test_an_update_cancelled_while_it_waits_gives_back_what_it_took() -> None:
    locks: dict[int, anyio.Lock] = {}
    holding = anyio.Event()
    release = anyio.Event()

    async def hold() -> None:
        async with _stripes_held(locks, [1, 2]):
            holding.set()
            await release.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold)
        await holding.wait()
        with anyio.move_on_after(0.05) as waited:
            async with _stripes_held(locks, [2, 3]):
                pytest.fail("stripe 2 is held")
        assert waited.cancelled_caught
        assert set(locks) == {1, 2}  # stripe 3, taken while waiting for 2, is given back
        async with _stripes_held(locks, [3]):
            assert set(locks) == {1, 2, 3}
        release.set()
    assert locks == {}
