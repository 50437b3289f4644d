"""acquire_message: exact sleeps, first come first served, typed timeouts, cancellation."""

from __future__ import annotations

import math
from functools import partial

import anyio
import pytest
from rl_helpers import SECOND, GatedSleep, VirtualClock, msg

from converge.errors import RateLimitError, RateLimitTimeoutError, UsageError
from converge.extensions.rate_limit import RateLimiter, TokenBucketConfig

pytestmark = pytest.mark.anyio


def limiter(clock: VirtualClock, capacity: float = 1, rate: float = 2, **kw: object) -> RateLimiter:
    return RateLimiter(
        sender_config=TokenBucketConfig(capacity, rate),
        clock=clock,
        sleep=clock.sleep,
        **kw,  # type: ignore[arg-type]
    )


async def test_acquire_admits_at_once_when_tokens_are_there() -> None:
    clock = VirtualClock()
    lim = limiter(clock, capacity=2)
    assert await lim.acquire_message(msg(), direction="egress") == 0.0
    assert await lim.acquire_message(msg(), direction="egress") == 0.0
    assert clock.sleeps == []


async def test_acquire_sleeps_exactly_until_a_token_is_due() -> None:
    clock = VirtualClock()
    lim = limiter(clock, capacity=1, rate=4)
    await lim.acquire_message(msg(), direction="egress")
    clock.advance(0.1)
    waited = await lim.acquire_message(msg(), direction="egress")
    assert waited == pytest.approx(0.15)
    assert clock.sleeps == [pytest.approx(0.15)]  # one sleep, no polling


async def test_concurrent_waiters_are_served_first_come_first_served() -> None:
    clock, sleep = VirtualClock(), GatedSleep()
    lim = RateLimiter(sender_config=TokenBucketConfig(1, 1), clock=clock, sleep=sleep)
    admitted: list[int] = []

    async def waiter(i: int) -> None:
        await lim.acquire_message(msg(), direction="egress")
        admitted.append(i)

    async with anyio.create_task_group() as tg:
        for i in range(5):
            tg.start_soon(waiter, i)
            await anyio.wait_all_tasks_blocked()
        # all arrived at the same instant; each reserved the next slot, in arrival order
        assert admitted == [0]
        assert sleep.sleeps == [1.0, 2.0, 3.0, 4.0]
        sleep.open()
    assert sorted(admitted) == [0, 1, 2, 3, 4]


async def test_a_later_caller_does_not_overtake_waiters() -> None:
    clock, sleep = VirtualClock(), GatedSleep()
    lim = RateLimiter(sender_config=TokenBucketConfig(1, 1), clock=clock, sleep=sleep)
    await lim.acquire_message(msg(), direction="egress")
    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(lim.acquire_message, msg(), direction="egress"))
        await anyio.wait_all_tasks_blocked()
        # the waiter holds the next token: an instant check must not steal it
        assert not lim.allow_message(msg(), direction="egress")
        assert lim.retry_after(msg(), direction="egress") == pytest.approx(2.0)
        tg.cancel_scope.cancel()


async def test_timeout_shorter_than_the_wait_fails_at_once_and_takes_nothing() -> None:
    clock = VirtualClock()
    lim = limiter(clock, capacity=1, rate=1)
    await lim.acquire_message(msg(), direction="egress")
    with pytest.raises(RateLimitTimeoutError) as info:
        await lim.acquire_message(msg(), direction="egress", timeout=0.5)
    assert info.value.retry_after == pytest.approx(1.0)
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value, RateLimitError)
    assert clock.sleeps == []
    assert lim.retry_after(msg(), direction="egress") == pytest.approx(1.0)


async def test_timeout_long_enough_waits() -> None:
    clock = VirtualClock()
    lim = limiter(clock, capacity=1, rate=1)
    await lim.acquire_message(msg(), direction="egress")
    assert await lim.acquire_message(msg(), direction="egress", timeout=1.0) == pytest.approx(1.0)


async def test_message_that_can_never_pass_fails_at_once_even_without_timeout() -> None:
    clock = VirtualClock()
    lim = limiter(clock, capacity=0.5)
    with pytest.raises(RateLimitTimeoutError) as info:
        await lim.acquire_message(msg(), direction="egress")
    assert info.value.retry_after == math.inf


async def test_cancelled_waiter_gives_its_reservation_back() -> None:
    clock = VirtualClock()
    lim = RateLimiter(sender_config=TokenBucketConfig(1, 1), clock=clock, sleep=GatedSleep())
    await lim.acquire_message(msg(), direction="egress")
    with anyio.move_on_after(0.01):
        await lim.acquire_message(msg(), direction="egress")
    # back to one token's wait, not two
    assert lim.retry_after(msg(), direction="egress") == pytest.approx(1.0)


async def test_cancelled_waiter_keeps_reservation_when_a_later_one_depends_on_it() -> None:
    clock = VirtualClock()
    lim = RateLimiter(sender_config=TokenBucketConfig(1, 1), clock=clock, sleep=GatedSleep())
    await lim.acquire_message(msg(), direction="egress")
    scopes = [anyio.CancelScope(), anyio.CancelScope()]

    async def waiter(scope: anyio.CancelScope) -> None:
        with scope:
            await lim.acquire_message(msg(), direction="egress")

    async with anyio.create_task_group() as tg:
        for scope in scopes:
            tg.start_soon(waiter, scope)
            await anyio.wait_all_tasks_blocked()
        assert lim.retry_after(msg(), direction="egress") == pytest.approx(3.0)
        scopes[0].cancel()  # not the last reservation: kept (the second was timed on it)
        await anyio.wait_all_tasks_blocked()
        assert lim.retry_after(msg(), direction="egress") == pytest.approx(3.0)
        scopes[1].cancel()  # the last one: given back
    assert lim.retry_after(msg(), direction="egress") == pytest.approx(2.0)


async def test_long_schedule_on_virtual_time_never_exceeds_the_rate() -> None:
    clock = VirtualClock()
    lim = RateLimiter(
        global_config=TokenBucketConfig(10, 100),
        sender_config=TokenBucketConfig(5, 30),
        clock=clock,
        sleep=clock.sleep,
    )
    start = clock.now
    for i in range(3000):  # 100 s of virtual time for the slower sender bucket
        await lim.acquire_message(msg(f"s{i % 3}"), direction="egress")
    elapsed = (clock.now - start) / SECOND
    # three senders at 30/s each = 90/s under the 100/s global bucket
    assert elapsed == pytest.approx((3000 - 15) / 90, rel=0.01)


@pytest.mark.parametrize("bad", [-1, math.nan, "1", True])
async def test_invalid_timeout_is_a_usage_error(bad: object) -> None:
    lim = limiter(VirtualClock())
    with pytest.raises(UsageError, match="timeout"):
        await lim.acquire_message(msg(), direction="egress", timeout=bad)  # type: ignore[arg-type]


async def test_acquire_with_the_real_clock_and_sleep_admits() -> None:
    lim = RateLimiter(sender_config=TokenBucketConfig(1, 200))
    await lim.acquire_message(msg(), direction="egress")
    waited = await lim.acquire_message(msg(), direction="egress", timeout=1)
    assert 0 < waited <= 0.005
