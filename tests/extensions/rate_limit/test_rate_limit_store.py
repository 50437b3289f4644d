"""RateLimiter on a shared Store: same decisions, one atomic update, across processes."""

from __future__ import annotations

import multiprocessing
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from rl_helpers import SECOND, GatedSleep, VirtualClock, hammer, msg

from converge.core.store import Store
from converge.errors import StoreCorruptedError, SyncInEventLoopError, UsageError
from converge.extensions.rate_limit import RateLimiter, TokenBucketConfig
from converge.extensions.storage import FileStore, MemoryStore, SQLiteStore

CONFIGS = {
    "global_config": TokenBucketConfig(8, 5),
    "sender_config": TokenBucketConfig(3, 1.5),
    "topic_config": TokenBucketConfig(2.5, 2),
}

StoreFactory = Callable[[Path], Store]
STORES: dict[str, StoreFactory] = {
    "memory": lambda tmp: MemoryStore(),
    "file": lambda tmp: FileStore(tmp / "files", locking=True),
    "sqlite": lambda tmp: SQLiteStore(tmp / "rl.db"),
}


@pytest.fixture(params=sorted(STORES))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s = STORES[request.param](tmp_path)
    yield s
    s.close()


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.updates: list[list[str]] = []

    async def aupdate(self, keys: Any, fn: Any, *, ttl: float | None = None) -> Any:
        self.updates.append(list(keys))
        return MemoryStore.update(self, keys, fn, ttl=ttl)  # not our counting override

    def update(self, keys: Any, fn: Any, *, ttl: float | None = None) -> Any:
        self.updates.append(list(keys))
        return super().update(keys, fn, ttl=ttl)


def script(seed: int, n: int) -> list[tuple[str, tuple[str, ...], str, float]]:
    rng = random.Random(seed)
    return [
        (
            rng.choice(["a", "b", "c"]),
            tuple(rng.sample(["x", "y", "z"], rng.randint(0, 2))),
            rng.choice(["egress", "ingress"]),
            rng.choice([0, 0, 0, 0.05, 0.3, 1.0]),
        )
        for _ in range(n)
    ]


def test_store_backed_limiter_decides_exactly_like_the_in_memory_one(store: Store) -> None:
    clock = VirtualClock()
    memory = RateLimiter(**CONFIGS, clock=clock)  # type: ignore[arg-type]
    shared = RateLimiter(store=store, **CONFIGS, clock=clock)  # type: ignore[arg-type]
    for sender, topics, direction, gap in script(seed=7, n=80):
        clock.advance(gap)
        message = msg(sender, *topics)
        expected_wait = memory.retry_after(message, direction=direction)
        assert shared.retry_after(message, direction=direction) == expected_wait
        assert shared.allow_message(message, direction=direction) == memory.allow_message(
            message, direction=direction
        )


@pytest.mark.anyio
async def test_async_store_decisions_match_and_take_one_update_each() -> None:
    clock = VirtualClock()
    store = CountingStore()
    memory = RateLimiter(**CONFIGS, clock=clock)  # type: ignore[arg-type]
    shared = RateLimiter(store=store, **CONFIGS, clock=clock)  # type: ignore[arg-type]
    decisions = 0
    for sender, topics, direction, gap in script(seed=11, n=80):
        clock.advance(gap)
        message = msg(sender, *topics)
        got = await shared.aallow_message(message, direction=direction)
        assert got == memory.allow_message(message, direction=direction)
        decisions += 1
        # every bucket of the message in one atomic update
        assert len(store.updates[-1]) == 2 + len(set(topics))
    assert len(store.updates) == decisions


@pytest.mark.anyio
async def test_async_forms_work_on_every_store(store: Store) -> None:
    clock = VirtualClock()
    limiter = RateLimiter(
        store=store, sender_config=TokenBucketConfig(2, 1), clock=clock, sleep=clock.sleep
    )
    message = msg("alice")
    assert await limiter.aallow_message(message, direction="ingress")
    assert await limiter.aallow_message(message, direction="ingress")
    assert not await limiter.aallow_message(message, direction="ingress")
    assert await limiter.aretry_after(message, direction="ingress") == pytest.approx(1.0)
    assert await limiter.acquire_message(message, direction="ingress") == pytest.approx(1.0)
    assert await limiter.acquire_message(message, direction="ingress", timeout=2) == (
        pytest.approx(1.0)
    )


@pytest.mark.anyio
async def test_store_acquire_without_timeout_waits_as_long_as_needed() -> None:
    clock = VirtualClock()
    store = MemoryStore()
    limiter = RateLimiter(
        store=store, sender_config=TokenBucketConfig(1, 0.01), clock=clock, sleep=clock.sleep
    )
    await limiter.acquire_message(msg(), direction="egress")
    assert await limiter.acquire_message(msg(), direction="egress") == pytest.approx(100.0)


@pytest.mark.anyio
async def test_cancelled_store_waiter_gives_its_reservation_back() -> None:
    clock = VirtualClock()
    limiter = RateLimiter(
        store=MemoryStore(), sender_config=TokenBucketConfig(1, 1), clock=clock, sleep=GatedSleep()
    )
    await limiter.acquire_message(msg(), direction="egress")
    with anyio.move_on_after(0.01):
        await limiter.acquire_message(msg(), direction="egress")
    assert await limiter.aretry_after(msg(), direction="egress") == pytest.approx(1.0)


def test_bucket_keys_expire_once_full_so_the_store_stays_bounded() -> None:
    store_now = [0.0]
    store = MemoryStore(clock=lambda: store_now[0])
    clock = VirtualClock()
    limiter = RateLimiter(store=store, sender_config=TokenBucketConfig(2, 4), clock=clock)
    for i in range(50):
        assert limiter.allow_message(msg(f"s{i}"), direction="egress")
    assert len(store.list("converge:ratelimit:")) == 50
    store_now[0] += 0.5 + 1.0 + 0.01  # full after 0.5 s (2 tokens at 4/s), plus the margin
    assert store.list("converge:ratelimit:") == []


def test_corrupt_bucket_value_raises_store_corrupted_error() -> None:
    store = MemoryStore()
    limiter = RateLimiter(store=store, sender_config=TokenBucketConfig(2, 1))
    store.put("converge:ratelimit:egress:sender:alice", "not a number")
    with pytest.raises(StoreCorruptedError) as info:
        limiter.allow_message(msg("alice"), direction="egress")
    assert info.value.key == "converge:ratelimit:egress:sender:alice"


def test_key_prefix_separates_limiters_on_one_store() -> None:
    store = MemoryStore()
    config = TokenBucketConfig(1, 0.001)
    first = RateLimiter(store=store, sender_config=config, key_prefix="app1:")
    second = RateLimiter(store=store, sender_config=config, key_prefix="app2:")
    assert first.allow_message(msg(), direction="egress")
    assert not first.allow_message(msg(), direction="egress")
    assert second.allow_message(msg(), direction="egress")


@pytest.mark.anyio
async def test_sync_call_with_a_blocking_store_on_the_loop_names_the_coroutine(
    tmp_path: Path,
) -> None:
    limiter = RateLimiter(store=FileStore(tmp_path), sender_config=TokenBucketConfig(1, 1))
    with pytest.raises(SyncInEventLoopError, match=r"RateLimiter\.aallow_message"):
        limiter.allow_message(msg(), direction="egress")
    assert await limiter.aallow_message(msg(), direction="egress")


def test_limiter_without_buckets_for_a_message_skips_the_store() -> None:
    store = CountingStore()
    limiter = RateLimiter(store=store, topic_config=TokenBucketConfig(1, 1))
    assert limiter.allow_message(msg("no-topics"), direction="egress")
    assert store.updates == []


def test_store_must_be_a_store() -> None:
    with pytest.raises(UsageError):
        RateLimiter(store=object())  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["file", "sqlite"])
def test_four_processes_sharing_a_store_admit_no_more_than_the_bucket(
    kind: str, tmp_path: Path
) -> None:
    path = str(tmp_path / ("files" if kind == "file" else "rl.db"))
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    start = ctx.Barrier(4)  # the children start hammering together
    procs = [ctx.Process(target=hammer, args=(kind, path, start, 0.7, results)) for _ in range(4)]
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
    assert calls > admitted  # the processes really contended
