"""RateLimiter decisions in memory: buckets per direction, sender and topic, all or nothing."""

from __future__ import annotations

import math
import threading
import time

import pytest
from rl_helpers import SECOND, VirtualClock, msg

from converge.errors import ConfigurationError, UsageError
from converge.extensions.rate_limit import RateLimiter, TokenBucketConfig

pytestmark = pytest.mark.anyio


def burst(limiter: RateLimiter, message: object, n: int, direction: str = "egress") -> int:
    return sum(limiter.allow_message(message, direction=direction) for _ in range(n))  # type: ignore[arg-type]


def test_sender_bucket_admits_capacity_then_refills_at_rate() -> None:
    clock = VirtualClock()
    limiter = RateLimiter(sender_config=TokenBucketConfig(3, 2), clock=clock)
    message = msg("alice")
    assert burst(limiter, message, 10) == 3
    clock.advance(0.5)
    assert burst(limiter, message, 10) == 1
    clock.advance(10)
    assert burst(limiter, message, 10) == 3


def test_each_sender_has_its_own_bucket() -> None:
    limiter = RateLimiter(sender_config=TokenBucketConfig(2, 1), clock=VirtualClock())
    assert burst(limiter, msg("alice"), 5) == 2
    assert burst(limiter, msg("bob"), 5) == 2


def test_each_topic_has_its_own_bucket_and_untopical_messages_pass() -> None:
    limiter = RateLimiter(topic_config=TokenBucketConfig(2, 1), clock=VirtualClock())
    assert burst(limiter, msg("a", "orders"), 5) == 2
    assert burst(limiter, msg("b", "orders"), 5) == 0
    assert burst(limiter, msg("a", "billing"), 5) == 2
    assert burst(limiter, msg("a"), 5) == 5


def test_global_bucket_is_shared_by_every_sender() -> None:
    limiter = RateLimiter(global_config=TokenBucketConfig(4, 1), clock=VirtualClock())
    admitted = [limiter.allow_message(msg(f"s{i}"), direction="egress") for i in range(10)]
    assert admitted == [True] * 4 + [False] * 6


def test_directions_have_separate_buckets() -> None:
    limiter = RateLimiter(sender_config=TokenBucketConfig(1, 1), clock=VirtualClock())
    message = msg("alice")
    assert limiter.allow_message(message, direction="egress")
    assert not limiter.allow_message(message, direction="egress")
    assert limiter.allow_message(message, direction="ingress")
    assert not limiter.allow_message(message, direction="ingress")


def test_denied_message_does_not_drain_the_buckets_it_passed() -> None:
    clock = VirtualClock()
    limiter = RateLimiter(
        global_config=TokenBucketConfig(5, 1),
        sender_config=TokenBucketConfig(100, 1),
        topic_config=TokenBucketConfig(1, 1),
        clock=clock,
    )
    assert limiter.allow_message(msg("a", "hot"), direction="egress")
    # the "hot" topic is empty: these are denied and must leave global/sender untouched
    assert burst(limiter, msg("a", "hot"), 50) == 0
    assert burst(limiter, msg("a", "cold"), 1) == 1
    assert burst(limiter, msg("b"), 10) == 3  # 5 global - 2 admitted so far


def test_message_takes_one_token_from_each_distinct_topic() -> None:
    limiter = RateLimiter(topic_config=TokenBucketConfig(2, 1), clock=VirtualClock())
    assert limiter.allow_message(msg("a", "x", "y", "x"), direction="egress")
    assert limiter.allow_message(msg("a", "x"), direction="egress")
    assert not limiter.allow_message(msg("a", "x"), direction="egress")
    assert limiter.allow_message(msg("a", "y"), direction="egress")
    # one of its two topics is empty: nothing taken from the other
    assert not limiter.allow_message(msg("a", "z", "x"), direction="egress")
    assert burst(limiter, msg("a", "z"), 5) == 2


def test_limiter_without_configs_admits_everything() -> None:
    limiter = RateLimiter()
    assert burst(limiter, msg("a", "t"), 1000) == 1000
    assert limiter.retry_after(msg("a"), direction="ingress") == 0.0


def test_retry_after_names_the_wait_and_takes_nothing() -> None:
    clock = VirtualClock()
    limiter = RateLimiter(
        sender_config=TokenBucketConfig(1, 4), global_config=TokenBucketConfig(10, 1), clock=clock
    )
    message = msg("alice")
    assert limiter.retry_after(message, direction="egress") == 0.0
    assert limiter.allow_message(message, direction="egress")
    assert limiter.retry_after(message, direction="egress") == pytest.approx(0.25)
    assert limiter.retry_after(message, direction="egress") == pytest.approx(0.25)
    clock.advance(0.25)
    assert limiter.retry_after(message, direction="egress") == 0.0
    assert limiter.allow_message(message, direction="egress")


def test_retry_after_is_infinite_when_a_bucket_can_never_admit() -> None:
    tiny = RateLimiter(sender_config=TokenBucketConfig(0.5, 10), clock=VirtualClock())
    assert not tiny.allow_message(msg(), direction="egress")
    assert tiny.retry_after(msg(), direction="egress") == math.inf
    quota = RateLimiter(global_config=TokenBucketConfig(2, 0), clock=VirtualClock())
    assert burst(quota, msg(), 5) == 2
    assert quota.retry_after(msg(), direction="egress") == math.inf


async def test_async_forms_share_the_same_buckets() -> None:
    limiter = RateLimiter(sender_config=TokenBucketConfig(2, 1), clock=VirtualClock())
    message = msg("alice")
    assert await limiter.aallow_message(message, direction="egress")
    assert limiter.allow_message(message, direction="egress")
    assert not await limiter.aallow_message(message, direction="egress")
    assert await limiter.aretry_after(message, direction="egress") == pytest.approx(1.0)


async def test_sync_form_is_allowed_on_the_event_loop_in_memory() -> None:
    limiter = RateLimiter(sender_config=TokenBucketConfig(1, 1))
    assert limiter.allow_message(msg(), direction="ingress")


@pytest.mark.parametrize("direction", ["EGRESS", "out", "", None, 1, ["egress"]])
def test_unknown_direction_is_a_usage_error(direction: object) -> None:
    limiter = RateLimiter(sender_config=TokenBucketConfig(1, 1))
    with pytest.raises(UsageError, match="direction"):
        limiter.allow_message(msg(), direction=direction)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="direction"):
        limiter.retry_after(msg(), direction=direction)  # type: ignore[arg-type]


async def test_unknown_direction_is_a_usage_error_in_async_forms() -> None:
    limiter = RateLimiter(sender_config=TokenBucketConfig(1, 1))
    with pytest.raises(UsageError, match="direction"):
        await limiter.aallow_message(msg(), direction="sideways")
    with pytest.raises(UsageError, match="direction"):
        await limiter.acquire_message(msg(), direction="sideways")


@pytest.mark.parametrize("message", [None, "hello", {"sender": "a"}])
def test_non_message_is_a_usage_error(message: object) -> None:
    limiter = RateLimiter(sender_config=TokenBucketConfig(1, 1))
    with pytest.raises(UsageError, match="Message"):
        limiter.allow_message(message, direction="egress")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"global_config": (5, 1)},
        {"sender_config": {"capacity": 1, "refill_tokens_per_sec": 1}},
        {"topic_config": 3},
    ],
)
def test_config_that_is_not_a_token_bucket_config_is_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        RateLimiter(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [{"store": {}}, {"clock": 5}, {"sleep": "soon"}, {"key_prefix": ""}, {"key_prefix": 3}],
)
def test_invalid_limiter_arguments_are_usage_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        RateLimiter(**kwargs)  # type: ignore[arg-type]


def test_threads_hammering_one_limiter_never_exceed_the_bucket() -> None:
    # real clock: the lock must make each read-compute-write atomic across threads
    limiter = RateLimiter(sender_config=TokenBucketConfig(50, 100))
    message = msg("shared")
    admitted = [0] * 8
    start = time.monotonic()

    def hammer(slot: int) -> None:
        for _ in range(4000):
            admitted[slot] += limiter.allow_message(message, direction="egress")

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    assert 50 <= sum(admitted) <= 50 + 100 * elapsed


def test_clock_is_called_once_per_decision_in_integer_nanoseconds() -> None:
    calls: list[int] = []

    def clock() -> int:
        calls.append(1)
        return 42 * SECOND

    limiter = RateLimiter(
        global_config=TokenBucketConfig(5, 1),
        sender_config=TokenBucketConfig(5, 1),
        topic_config=TokenBucketConfig(5, 1),
        clock=clock,
    )
    limiter.allow_message(msg("a", "t1", "t2"), direction="egress")
    assert len(calls) == 1
