"""Benchmark converge's RateLimiter against aiolimiter, limits and pyrate-limiter.

Prints one JSON object per line (``case``, ``impl``, ``ops_per_s``; the memory case adds
``senders`` and ``peak_bytes``) and a table of ratios on stderr. Peers,
measured in the same run, taking turns with converge, all configured so that nothing is
denied (a decision is measured, not a wait):

* ``aiolimiter``: ``await AsyncLimiter.acquire()`` (asyncio only); one limiter per
  bucket for the three-bucket case.
* ``limits``: ``FixedWindowRateLimiter`` / ``MovingWindowRateLimiter`` over
  ``MemoryStorage`` (``hit`` per bucket key); in the async cases its ``limits.aio``
  twins (``await hit``).
* ``pyrate-limiter``: ``Limiter(InMemoryBucket).try_acquire(blocking=False)``.

Cases: ``one_bucket`` is a global bucket; ``three_bucket`` adds the message's sender and
topic (converge takes all three tokens or none; the peers check the three one after the
other). ``*.sync`` is the synchronous decision against the synchronous peers, ``*.async`` the
coroutine against the async peers on asyncio (and ``*.async_trio`` converge on trio):
like against like. ``memory.distinct_senders``: a decision for each of a million
distinct senders (10,000 with ``--quick``) for every implementation (real clock, sender
buckets of 5 refilling at 100/s), with the peak traced memory, measured at that count.

Usage: ``python benchmarks/rate_limit.py [--quick]``.
"""

from __future__ import annotations

import gc
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import anyio
from aiolimiter import AsyncLimiter
from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage as AsyncMemoryStorage
from limits.aio.strategies import FixedWindowRateLimiter as AsyncFixedWindowRateLimiter
from limits.storage import MemoryStorage
from limits.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter
from pyrate_limiter import Duration, InMemoryBucket, Limiter, Rate

from _bench import Results, arg_parser, by_case, print_ratio_table
from converge.core.message import Message
from converge.extensions.rate_limit import RateLimiter, TokenBucketConfig

# Nothing is denied during a run: the rate is far above what Python can decide.
HUGE = 10**9
LOG_LIMIT = 10**7  # log-based peers (moving window, pyrate) keep one entry per hit

MESSAGE = Message(sender="alice", topics=["orders.new"])


def calibrate(seconds: float, rate: float) -> int:
    """How many operations take about ``seconds`` at ``rate`` ops/s (at least 100)."""
    return max(100, int(seconds * rate))


def compare(
    impls: dict[str, Callable[[], object]], seconds: float, repeats: int
) -> dict[str, float]:
    """Operations per second of each implementation: warm up (which also sizes the runs
    to about ``seconds`` each, so slow peers do not dominate the run time), then the best
    of ``repeats`` timed runs, the implementations taking turns so that background noise
    hits them alike."""
    sizes = {}
    for name, fn in impls.items():
        start = time.perf_counter()
        for _ in range(1000):
            fn()
        sizes[name] = calibrate(seconds, 1000 / (time.perf_counter() - start))
    best = dict.fromkeys(impls, 0.0)
    for _ in range(repeats):
        for name, fn in impls.items():
            ops = sizes[name]
            gc.collect()
            start = time.perf_counter()
            for _ in range(ops):
                fn()
            best[name] = max(best[name], ops / (time.perf_counter() - start))
    return best


def compare_async(
    factories: dict[str, Callable[[], Callable[[], Awaitable[object]]]],
    seconds: float,
    repeats: int,
    backend: str = "asyncio",
) -> dict[str, float]:
    """:func:`compare` for coroutine functions, all on one event loop.

    Each implementation is built on the loop (aiolimiter binds to the running loop).
    """

    async def main() -> dict[str, float]:
        impls = {name: make() for name, make in factories.items()}
        sizes = {}
        for name, afn in impls.items():
            start = time.perf_counter()
            for _ in range(1000):
                await afn()
            sizes[name] = calibrate(seconds, 1000 / (time.perf_counter() - start))
        best = dict.fromkeys(impls, 0.0)
        for _ in range(repeats):
            for name, afn in impls.items():
                ops = sizes[name]
                gc.collect()
                start = time.perf_counter()
                for _ in range(ops):
                    await afn()
                best[name] = max(best[name], ops / (time.perf_counter() - start))
        return best

    return anyio.run(main, backend=backend)


# -- the implementations -----------------------------------------------------------------


def converge_limiter(buckets: int) -> RateLimiter:
    config = TokenBucketConfig(HUGE, HUGE)
    if buckets == 1:
        return RateLimiter(global_config=config)
    return RateLimiter(global_config=config, sender_config=config, topic_config=config)


def sync_impls(buckets: int) -> dict[str, Callable[[], object]]:
    limiter = converge_limiter(buckets)
    keys = ["global", "sender:alice", "topic:orders.new"][:buckets]
    fixed = FixedWindowRateLimiter(MemoryStorage())
    moving = MovingWindowRateLimiter(MemoryStorage())
    item = RateLimitItemPerSecond(HUGE)
    log_item = RateLimitItemPerSecond(LOG_LIMIT)
    pyrates = [Limiter(InMemoryBucket([Rate(LOG_LIMIT, Duration.SECOND)])) for _ in keys]

    def limits_all(strategy: Any, it: Any) -> bool:
        return all(strategy.hit(it, key) for key in keys)

    def pyrate_all() -> bool:
        return all(
            lim.try_acquire(key, blocking=False) for lim, key in zip(pyrates, keys, strict=True)
        )

    return {
        "converge": partial(limiter.allow_message, MESSAGE, direction="egress"),
        "limits (fixed window)": partial(limits_all, fixed, item),
        "limits (moving window)": partial(limits_all, moving, log_item),
        "pyrate-limiter": pyrate_all,
    }


def async_factories(buckets: int) -> dict[str, Callable[[], Callable[[], Awaitable[object]]]]:
    def make_converge() -> Callable[[], Awaitable[object]]:
        return partial(converge_limiter(buckets).aallow_message, MESSAGE, direction="egress")

    def make_aiolimiter() -> Callable[[], Awaitable[object]]:
        limiters = [AsyncLimiter(HUGE, 1) for _ in range(buckets)]
        if buckets == 1:
            return limiters[0].acquire

        async def acquire_all() -> None:
            for lim in limiters:
                await lim.acquire()

        return acquire_all

    def make_limits() -> Callable[[], Awaitable[object]]:
        strategy = AsyncFixedWindowRateLimiter(AsyncMemoryStorage())
        item = RateLimitItemPerSecond(HUGE)
        keys = ["global", "sender:alice", "topic:orders.new"][:buckets]

        async def hit_all() -> bool:
            for key in keys:
                if not await strategy.hit(item, key):
                    return False
            return True

        return hit_all

    return {
        "converge": make_converge,
        "aiolimiter": make_aiolimiter,
        "limits.aio (fixed window)": make_limits,
    }


# -- memory per distinct sender ------------------------------------------------------------


def traced(run: Callable[[], object], n: int) -> tuple[float, int]:
    """Run ``run`` (n decisions) under tracemalloc: ``(decisions/s, peak bytes)``."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        start = time.perf_counter()
        run()
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    return n / seconds, peak


def memory_case(n: int) -> dict[str, tuple[int, float, int]]:
    """``{impl: (senders, decisions/s, peak bytes)}``, every implementation at ``n``."""
    names = [f"sender-{i}" for i in range(n)]
    peer_names = names

    def run_converge() -> None:
        limiter = RateLimiter(sender_config=TokenBucketConfig(5, 100))
        # one message relabelled in place: building a million messages takes longer
        # than deciding on them
        message = Message(sender="x")
        allow = limiter.allow_message
        for name in names:
            object.__setattr__(message, "sender", name)
            allow(message, direction="ingress")

    def run_limits() -> None:
        strategy = FixedWindowRateLimiter(MemoryStorage())
        item = RateLimitItemPerSecond(5)
        for name in peer_names:
            strategy.hit(item, name)

    def run_aiolimiter() -> None:
        async def main() -> None:
            per_sender: dict[str, AsyncLimiter] = {}
            for name in peer_names:
                lim = per_sender.get(name)
                if lim is None:
                    lim = per_sender[name] = AsyncLimiter(5, 0.05)
                await lim.acquire()

        anyio.run(main)

    return {
        "converge": (n, *traced(run_converge, n)),
        "limits (fixed window)": (n, *traced(run_limits, n)),
        "aiolimiter": (n, *traced(run_aiolimiter, n)),
    }


# -- the run ---------------------------------------------------------------------------------


def run(quick: bool) -> list[dict[str, Any]]:
    results = Results()
    emit = results.add_rates
    repeats = 5 if quick else 9
    seconds = 0.04 if quick else 0.3  # per timed run

    for buckets, label in [(1, "one_bucket"), (3, "three_bucket")]:
        emit(f"{label}.sync", compare(sync_impls(buckets), seconds, repeats))
        emit(f"{label}.async", compare_async(async_factories(buckets), seconds, repeats))
        trio_only = {"converge": async_factories(buckets)["converge"]}
        emit(f"{label}.async_trio", compare_async(trio_only, seconds, repeats, backend="trio"))

    memory = memory_case(10_000 if quick else 1_000_000)
    emit(
        "memory.distinct_senders",
        {impl: rate for impl, (_, rate, _) in memory.items()},
        {
            impl: {
                "senders": n,
                "peak_bytes": peak,
            }
            for impl, (n, _, peak) in memory.items()
        },
    )
    return results.rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print_ratio_table(rows, widths=(26, 24, 13, 13))
    cases = by_case(rows)
    # the headline, like for like: the sync decision against the fastest sync peer, the
    # coroutine against the fastest async peer
    print("\nheadline (converge / fastest peer of the same kind)", file=sys.stderr)
    for label in ("one_bucket", "three_bucket"):
        parts = []
        for kind in ("sync", "async"):
            impls = cases[f"{label}.{kind}"]
            ours = impls["converge"]["ops_per_s"]
            name, peer = max(
                ((n, r["ops_per_s"]) for n, r in impls.items() if n != "converge"),
                key=lambda item: item[1],
            )
            parts.append(f"{kind} {ours / peer:.2f}x ({name})")
        print(f"  {label}: " + ", ".join(parts), file=sys.stderr)
    memory = cases.get("memory.distinct_senders", {})
    if memory:
        print("\nmemory (peak traced) after N distinct senders", file=sys.stderr)
        for impl, row in memory.items():
            mib = row["peak_bytes"] / 2**20
            print(f"  {impl:<24}{row['senders']:>10,} senders {mib:>10,.1f} MiB", file=sys.stderr)


def main() -> None:
    args = arg_parser(__doc__).parse_args()
    print_table(run(args.quick))


if __name__ == "__main__":
    main()
