"""RateLimiter on RedisStore: one Lua script per decision, on the server's clock."""

from __future__ import annotations

import multiprocessing
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import coredis
import pytest
from rl_helpers import SECOND, VirtualClock, hammer, msg

from converge.errors import RateLimitTimeoutError, StoreCorruptedError
from converge.extensions.rate_limit import RateLimiter, TokenBucketConfig
from converge.extensions.storage import RedisStore
from redis_server import RedisServer

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
async def store(redis: RedisServer) -> AsyncIterator[RedisStore]:
    async with RedisStore(redis.url, namespace=uuid.uuid4().hex) as store:
        yield store


async def command_calls(url: str) -> dict[str, int]:
    async with coredis.Redis.from_url(url, decode_responses=True) as client:
        stats: dict[str, Any] = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


async def test_a_decision_is_one_evalsha_and_no_transaction(
    store: RedisStore, redis: RedisServer
) -> None:
    limiter = RateLimiter(
        store=store,
        global_config=TokenBucketConfig(3, 1),
        sender_config=TokenBucketConfig(2, 1),
        topic_config=TokenBucketConfig(10, 10),
    )
    await limiter.aallow_message(msg("warm"), direction="egress")  # loads the script
    before = await command_calls(redis.url)
    results = [await limiter.aallow_message(msg("a", "t"), direction="egress") for _ in range(4)]
    after = await command_calls(redis.url)
    assert results == [True, True, False, False]  # a's bucket holds 2
    assert after.get("evalsha", 0) - before.get("evalsha", 0) == 4
    # (commandstats counts the GET and SET the script runs inside the server too)
    for command in ("watch", "multi", "exec", "eval", "time"):
        assert after.get(command, 0) - before.get(command, 0) == (4 if command == "time" else 0)


async def test_burst_then_refill_on_the_servers_clock(store: RedisStore) -> None:
    limiter = RateLimiter(store=store, sender_config=TokenBucketConfig(3, 10))
    message = msg("a")
    assert [await limiter.aallow_message(message, direction="egress") for _ in range(4)] == [
        True,
        True,
        True,
        False,
    ]
    wait = await limiter.aretry_after(message, direction="egress")
    assert 0 < wait <= 0.1
    assert await limiter.aretry_after(msg("b"), direction="egress") == 0.0
    await anyio.sleep(wait + 0.01)
    assert await limiter.aallow_message(message, direction="egress") is True
    # directions are separate buckets
    assert await limiter.aallow_message(message, direction="ingress") is True


async def test_script_is_loaded_again_after_script_flush(
    store: RedisStore, redis: RedisServer
) -> None:
    limiter = RateLimiter(store=store, sender_config=TokenBucketConfig(5, 1))
    assert await limiter.aallow_message(msg("a"), direction="egress")
    async with coredis.Redis.from_url(redis.url) as client:
        await client.script_flush()
    assert await limiter.aallow_message(msg("a"), direction="egress")


async def test_buckets_read_as_integers_and_expire_once_full(store: RedisStore) -> None:
    limiter = RateLimiter(store=store, sender_config=TokenBucketConfig(1, 5))
    assert await limiter.aallow_message(msg("a"), direction="egress")
    [key] = await store.alist("converge:ratelimit:egress:sender:")
    assert isinstance(await store.aget(key), int)  # microseconds, stored as JSON
    await anyio.sleep(0.2 + 1.0 + 0.3)  # full again after 0.2 s, plus the TTL margin
    assert await store.alist("converge:ratelimit:") == []


async def test_a_corrupt_bucket_raises_store_corrupted_error(store: RedisStore) -> None:
    await store.aput("converge:ratelimit:egress:sender:a", "not a timestamp")
    limiter = RateLimiter(store=store, sender_config=TokenBucketConfig(1, 1))
    with pytest.raises(StoreCorruptedError) as info:
        await limiter.aallow_message(msg("a"), direction="egress")
    assert info.value.key == "converge:ratelimit:egress:sender:a"


async def test_acquire_waits_and_a_cancelled_waiter_gives_its_slot_back(
    store: RedisStore,
) -> None:
    limiter = RateLimiter(store=store, sender_config=TokenBucketConfig(1, 4))
    message = msg("a")
    assert await limiter.acquire_message(message, direction="egress") == 0.0
    waited = await limiter.acquire_message(message, direction="egress", timeout=1)
    assert 0.2 <= waited <= 0.26
    with pytest.raises(RateLimitTimeoutError):
        await limiter.acquire_message(message, direction="egress", timeout=0.01)
    with anyio.move_on_after(0.05):
        await limiter.acquire_message(message, direction="egress")  # reserves, cancelled
    # the cancelled reservation was given back: the next waiter is not pushed back
    waited = await limiter.acquire_message(message, direction="egress", timeout=1)
    assert waited <= 0.26


def test_sync_decisions_use_the_script_too(redis: RedisServer) -> None:
    store = RedisStore(redis.url, namespace=uuid.uuid4().hex)
    try:
        limiter = RateLimiter(store=store, sender_config=TokenBucketConfig(2, 1))
        assert [limiter.allow_message(msg("a"), direction="egress") for _ in range(3)] == [
            True,
            True,
            False,
        ]
        assert 0 < limiter.retry_after(msg("a"), direction="egress") <= 1
    finally:
        store.close()


async def test_a_custom_clock_keeps_the_update_path(store: RedisStore, redis: RedisServer) -> None:
    clock = VirtualClock()
    limiter = RateLimiter(store=store, sender_config=TokenBucketConfig(1, 1), clock=clock)
    before = await command_calls(redis.url)
    assert await limiter.aallow_message(msg("a"), direction="egress")
    assert not await limiter.aallow_message(msg("a"), direction="egress")
    clock.advance(1)
    assert await limiter.aallow_message(msg("a"), direction="egress")
    after = await command_calls(redis.url)
    # the generic update: one read per decision, one compare-and-set per admitted one
    # (no limiter script)
    assert after["mget"] - before.get("mget", 0) == 3
    assert after.get("evalsha", 0) - before.get("evalsha", 0) == 2


def test_four_processes_on_one_redis_never_over_admit(redis: RedisServer) -> None:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    start = ctx.Barrier(4)
    where = f"{redis.url} {uuid.uuid4().hex}"
    procs = [
        ctx.Process(target=hammer, args=("redis", where, start, 1.0, results)) for _ in range(4)
    ]
    for p in procs:
        p.start()
    reports = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert [r for r in reports if r[0] == "error"] == []
    admitted = sum(r[0] for r in reports)
    calls = sum(r[1] for r in reports)
    elapsed = (max(r[3] for r in reports) - min(r[2] for r in reports)) / SECOND
    # global bucket: capacity 5, 20 tokens/s, shared by all four processes
    assert admitted <= 5 + 20 * elapsed
    assert admitted >= 5  # the burst, at least, got through
    assert calls > 4 * admitted  # the processes really contended
