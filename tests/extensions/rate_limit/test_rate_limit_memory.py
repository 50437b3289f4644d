"""Memory stays bounded however many distinct senders and topics pass through."""

from __future__ import annotations

import itertools
import sys
import tracemalloc

import pytest
from rl_helpers import SECOND, VirtualClock, msg, relabel

from converge.extensions.rate_limit import RateLimiter, TokenBucketConfig

MiB = 1024 * 1024


def run_distinct(limiter: RateLimiter, clock: VirtualClock, start: int, n: int, kind: str) -> int:
    message = msg("seed", "seed")
    admitted = 0
    allow = limiter.allow_message
    for i in range(start, start + n):
        relabel(message, **{kind: f"k{i}"})
        admitted += allow(message, direction="ingress")
        clock.now += 100_000  # 0.1 ms per message: a bucket is full again 10 ms later
    return admitted


def limiter_for(kind: str, clock: VirtualClock) -> RateLimiter:
    config = TokenBucketConfig(5, 100)
    return RateLimiter(**{f"{kind}_config": config}, clock=clock)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kind", "n"), [("sender", 100_000), ("topic", 50_000)])
def test_traced_memory_does_not_grow_with_distinct_keys(kind: str, n: int) -> None:
    clock = VirtualClock()
    limiter = limiter_for(kind, clock)
    run_distinct(limiter, clock, 0, 10_000, kind)  # warm up: caches, first sweeps
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        admitted = run_distinct(limiter, clock, 10_000, n, kind)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert admitted == n  # every key is new, so every message is admitted
    # Keeping every bucket would cost ~100 bytes per key (>= 5 MiB here).
    assert peak - before < 1 * MiB


def deep_size(obj: object, seen: set[int] | None = None) -> int:
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        size += sum(deep_size(k, seen) + deep_size(v, seen) for k, v in obj.items())
    elif isinstance(obj, list | tuple):
        size += sum(deep_size(v, seen) for v in obj)
    elif hasattr(obj, "__slots__"):
        size += sum(deep_size(getattr(obj, s), seen) for s in obj.__slots__ if hasattr(obj, s))
    return size


def test_a_million_distinct_senders_leave_the_limiter_small() -> None:
    # tracemalloc makes a million calls too slow for the suite; measure the state itself.
    clock = VirtualClock()
    limiter = limiter_for("sender", clock)
    assert run_distinct(limiter, clock, 0, 1_000_000, "sender") == 1_000_000
    assert deep_size(vars(limiter)) < 1 * MiB


def test_buckets_that_still_hold_information_are_kept() -> None:
    # A drained bucket is not full, so the sweep must not forget it.
    clock = VirtualClock()
    limiter = RateLimiter(sender_config=TokenBucketConfig(1, 0.001), clock=clock)
    hog = msg("hog")
    assert limiter.allow_message(hog, direction="egress")
    run_distinct(limiter, clock, 0, 20_000, "sender")  # many sweeps happen meanwhile
    assert not limiter.allow_message(hog, direction="egress")


def test_a_decision_sweeps_one_small_table_at_most() -> None:
    # A sweep went through every bucket in one decision (half a million: 15 ms on the
    # loop), and one dict held them all (700,000 took 30-38 ms to grow). The buckets
    # live in 64 dicts by the key's hash now; a decision sweeps one of them at most.
    clock = VirtualClock()
    limiter = limiter_for("sender", clock)
    senders = limiter._lanes["ingress"].senders
    message = msg("seed")
    sizes = []
    for i in range(20_000):
        relabel(message, sender=f"k{i}")
        assert limiter.allow_message(message, direction="ingress")
        sizes.append(len(senders))
        if i == 9_999:
            clock.now += SECOND  # every bucket so far is full again: forgettable
    assert max(before - after for before, after in itertools.pairwise(sizes)) < 1_000
    assert max(len(shard) for shard in senders.shards) < 1_000
    assert len(senders) < 12_000  # the 10,000 full ones are (nearly all) forgotten


@pytest.mark.anyio
async def test_acquire_with_many_distinct_senders_also_forgets_full_buckets() -> None:
    clock = VirtualClock()
    limiter = RateLimiter(sender_config=TokenBucketConfig(5, 100), clock=clock, sleep=clock.sleep)
    message = msg("seed")
    for i in range(20_000):
        relabel(message, sender=f"k{i}")
        await limiter.acquire_message(message, direction="egress")
        clock.now += 100_000
    assert deep_size(vars(limiter)) < 1 * MiB
