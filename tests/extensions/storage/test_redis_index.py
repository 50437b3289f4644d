"""RedisStore's prefix index: a listed prefix is read without scanning the database.

Each test runs its own ``redis-server`` (the SCAN counts must be this test's alone) and
writes behind the store's back with a raw coredis client where a test needs keys the
index was not told about.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import coredis
import pytest

from converge.errors import StoreError, UsageError
from converge.extensions.storage import RedisStore, _redis_index
from redis_server import RedisServer

pytestmark = pytest.mark.anyio

OPEN = "q:open:"


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as running:
        yield running


@pytest.fixture
async def raw(server: RedisServer) -> AsyncIterator[coredis.Redis[bytes]]:
    client: coredis.Redis[bytes] = coredis.Redis(host="127.0.0.1", port=server.port)
    async with client:
        yield client


@pytest.fixture
async def store(server: RedisServer) -> AsyncIterator[RedisStore]:
    async with RedisStore(server.url, namespace="ns", serializer="json") as opened:
        yield opened


async def scans(raw: coredis.Redis[bytes]) -> int:
    stats: Any = await raw.info("commandstats")
    return int((stats.get("cmdstat_scan") or {}).get("calls", 0))


async def test_a_listed_prefix_is_read_from_its_index_without_scanning(
    store: RedisStore, raw: coredis.Redis[bytes]
) -> None:
    for i in range(300):  # what a SCAN would have to walk past
        await store.aput(f"q:done:{i}", {"i": i})
    await store.aput(OPEN + "a", 1)
    assert await store.alist(OPEN) == [OPEN + "a"]  # the first listing scans, and indexes
    await raw.config_resetstat()

    await store.aput(OPEN + "b", 2)
    assert await store.aput_if_absent(OPEN + "c", 3, ttl=60)
    assert not await store.aput_if_absent(OPEN + "c", 4)
    await store.aupdate(
        [OPEN + "a", OPEN + "d"], lambda cur: ({OPEN + "a": None, OPEN + "d": 5}, 0)
    )
    await store.adelete(OPEN + "b")
    assert await store.alist(OPEN) == [OPEN + "c", OPEN + "d"]
    assert await store.alist(OPEN + "c") == [OPEN + "c"]  # a narrower prefix: its own index
    await store.aput(OPEN + "cc", 6)
    assert await store.alist(OPEN) == [OPEN + "c", OPEN + "cc", OPEN + "d"]
    assert await scans(raw) == 1  # only the narrower prefix's first listing
    # The index's own keys are never listed, not even by a scan of every key.
    assert len(await store.alist()) == 303


async def test_keys_written_before_a_prefix_was_listed_are_found_and_kept(
    store: RedisStore, raw: coredis.Redis[bytes]
) -> None:
    await raw.set(b"ns:" + OPEN.encode() + b"old", b"J1")  # as an older converge wrote it
    await raw.set(b"ns:" + OPEN.encode() + b"brief", b"J2", px=1000)
    assert await store.alist(OPEN) == [OPEN + "brief", OPEN + "old"]
    await raw.config_resetstat()
    assert await store.alist(OPEN) == [OPEN + "brief", OPEN + "old"]
    await anyio.sleep(1.1)  # the brief one expires
    assert await store.alist(OPEN) == [OPEN + "old"]
    assert await scans(raw) == 0


async def test_keys_expired_or_deleted_behind_the_stores_back_are_not_listed(
    store: RedisStore, raw: coredis.Redis[bytes]
) -> None:
    await store.aput(OPEN + "brief", 1, ttl=1.0)
    await store.aput(OPEN + "gone", 2)
    await store.aput(OPEN + "kept", 3)
    assert await store.alist(OPEN) == [OPEN + "brief", OPEN + "gone", OPEN + "kept"]
    await raw.delete([b"ns:" + OPEN.encode() + b"gone"])
    await anyio.sleep(1.1)
    assert await store.alist(OPEN) == [OPEN + "kept"]


async def test_script_writes_are_indexed(store: RedisStore, raw: coredis.Redis[bytes]) -> None:
    await store.aput(OPEN + "x", 1)
    assert await store.alist(OPEN) == [OPEN + "x"]
    await raw.config_resetstat()
    source = "redis.call('SET', KEYS[1], ARGV[1]) redis.call('DEL', KEYS[2]) return 7"
    assert await store.arun_script(source, [OPEN + "y", OPEN + "x"], ["J2"]) == 7
    assert await store.alist(OPEN) == [OPEN + "y"]
    flagged = "#!lua flags=no-writes\nreturn redis.call('GET', KEYS[1])"
    assert await store.arun_script(flagged, [OPEN + "y"]) == b"J2"
    assert await scans(raw) == 0
    # Each raised AttributeError or TypeError, or (one str key) ran on its characters.
    for args in ((7, [OPEN + "y"]), (source, OPEN + "y"), (source, [OPEN + "y"], [None])):
        with pytest.raises(UsageError):
            await store.arun_script(*args)  # type: ignore[arg-type]
    assert await store.aget(OPEN + "y") == 2  # as the script stored it


async def test_a_lost_index_is_rebuilt(store: RedisStore, raw: coredis.Redis[bytes]) -> None:
    await store.aput(OPEN + "a", 1)
    assert await store.alist(OPEN) == [OPEN + "a"]
    await raw.delete([b"ns:\xffidx:" + OPEN.encode()])  # evicted, say
    await raw.set(b"ns:" + OPEN.encode() + b"b", b"J2")  # and a write it missed
    assert await store.alist(OPEN) == [OPEN + "a", OPEN + "b"]
    await raw.config_resetstat()
    assert await store.alist(OPEN) == [OPEN + "a", OPEN + "b"]
    assert await scans(raw) == 0


async def test_the_lost_index_of_an_empty_prefix_is_rebuilt_once(
    store: RedisStore, raw: coredis.Redis[bytes]
) -> None:
    assert await store.alist(OPEN) == []
    await raw.delete([b"ns:\xffidx:" + OPEN.encode()])
    await raw.config_resetstat()
    assert await store.alist(OPEN) == []  # scans, and marks the index built again
    assert await store.alist(OPEN) == []
    assert await scans(raw) == 1


async def test_the_periodic_check_finds_writes_the_index_missed(
    store: RedisStore, raw: coredis.Redis[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.aput(OPEN + "a", 1)
    assert await store.alist(OPEN) == [OPEN + "a"]
    await raw.set(b"ns:" + OPEN.encode() + b"b", b"J2")  # a writer that keeps no index
    assert await store.alist(OPEN) == [OPEN + "a"]  # within the hour: not seen yet
    monkeypatch.setattr(_redis_index, "REFRESH_MS", 0)
    await anyio.sleep(0.01)
    assert await store.alist(OPEN) == [OPEN + "a", OPEN + "b"]


async def test_prefixes_past_the_watch_limit_are_scanned_and_still_exact(
    store: RedisStore, raw: coredis.Redis[bytes]
) -> None:
    prefixes = [f"p{i}:" for i in range(_redis_index.WATCH_LIMIT + 5)]
    for prefix in prefixes:
        await store.aput(prefix + "k", 1)
    for _ in range(2):
        for prefix in prefixes:
            assert await store.alist(prefix) == [prefix + "k"]
    assert await raw.hlen(b"ns:\xffwatch") == _redis_index.WATCH_LIMIT


async def test_every_replica_keeps_the_index_of_the_others(server: RedisServer) -> None:
    namespace = f"n{uuid.uuid4().hex[:8]}"
    async with (
        RedisStore(server.url, namespace=namespace) as first,
        RedisStore(server.url, namespace=namespace) as second,
    ):
        assert await first.alist(OPEN) == []
        await second.aput(OPEN + "from-second", 1)
        assert await second.aput_if_absent(OPEN + "claimed", 2, ttl=60)
        assert await first.alist(OPEN) == [OPEN + "claimed", OPEN + "from-second"]


async def test_writes_racing_the_first_listing_are_all_indexed(
    store: RedisStore, raw: coredis.Redis[bytes]
) -> None:
    async with raw.pipeline(transaction=False) as pipe:  # a long scan for the build
        for i in range(20_000):
            pipe.set(f"ns:q:done:{i}".encode(), b"J0")
    live: set[str] = set()

    async def writer(n: int) -> None:
        for i in range(60):
            key = f"{OPEN}{n}-{i}"
            await store.aput(key, i)
            live.add(key)
            if i % 3 == 0:
                await store.adelete(key)
                live.discard(key)

    async with anyio.create_task_group() as tg:
        for n in range(4):
            tg.start_soon(writer, n)
        tg.start_soon(store.alist, OPEN)  # scans and builds while the writers write
    await raw.config_resetstat()
    assert await store.alist(OPEN) == sorted(live)
    assert await scans(raw) == 0


async def test_a_listing_read_in_pages_returns_every_key_that_stayed(
    store: RedisStore, raw: coredis.Redis[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    staying = [f"{OPEN}{i:03d}" for i in range(0, 120, 2)]
    leaving = [f"{OPEN}{i:03d}" for i in range(1, 120, 2)]
    for key in staying + leaving:
        await store.aput(key, 1)
    assert len(await store.alist(OPEN)) == 120
    monkeypatch.setattr(_redis_index, "PAGE", 7)  # 18 pages, writes between them
    await raw.config_resetstat()

    async def churn() -> None:
        for i, key in enumerate(leaving):
            await store.adelete(key)
            await store.aput(f"{OPEN}new{i:03d}", 1)

    listed: list[str] = []

    async def listing() -> None:
        listed.extend(await store.alist(OPEN))

    async with anyio.create_task_group() as tg:
        tg.start_soon(churn)
        tg.start_soon(listing)
    assert set(staying) <= set(listed)
    assert listed == sorted(set(listed))
    assert await scans(raw) == 0
    assert await store.alist(OPEN) == sorted(staying + [f"{OPEN}new{i:03d}" for i in range(60)])


async def test_a_failing_script_keeps_its_writes_indexed(store: RedisStore) -> None:
    assert await store.alist(OPEN) == []
    source = "redis.call('SET', KEYS[1], 'J1') return redis.call('INCR', KEYS[1])"
    with pytest.raises(StoreError, match="not an integer"):
        await store.arun_script(source, [OPEN + "half"])
    assert await store.alist(OPEN) == [OPEN + "half"]


async def test_an_index_lists_prefixes_literally_and_any_key(store: RedisStore) -> None:
    keys = ["a*b", "a?c", "a[x]", "a\\y", "ab", "aXc", "é:1", "é:2", "\ud800:lone"]
    for key in keys:
        await store.aput(key, 1)
    for prefix in ["a*", "a?", "a[", "a\\", "a", "é:", "\ud800"]:
        expected = [k for k in sorted(keys) if k.startswith(prefix)]
        assert await store.alist(prefix) == expected  # scanned
        assert await store.alist(prefix) == expected  # from the index
