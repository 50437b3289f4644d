"""The retry policy: the sans-I/O schedule, Retry-After parsing and the anyio driver."""

from __future__ import annotations

import email.utils
from typing import Any

import anyio
import pytest
from llm_helpers import FakeTime

from converge.errors import (
    ConfigurationError,
    ProviderConnectionError,
    ProviderResponseError,
    ProviderTimeoutError,
    UsageError,
)
from converge.extensions.llm import RetryPolicy
from converge.extensions.llm._retry import Failure, acall_with_retry, parse_retry_after

NOW = 1_700_000_000.0


# -- schedule --------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap() -> None:
    policy = RetryPolicy(initial_delay=0.5, max_delay=3.0, jitter=0.0)
    assert [policy.backoff(n, 0.0) for n in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_jitter_only_shortens_the_delay_within_its_fraction() -> None:
    policy = RetryPolicy(initial_delay=1.0, max_delay=8.0, jitter=0.2)
    assert policy.backoff(0, 0.0) == 1.0
    assert policy.backoff(0, 0.999999) == pytest.approx(0.8, abs=1e-5)
    assert policy.backoff(3, 0.5) == pytest.approx(7.2)


def test_huge_retry_numbers_do_not_overflow() -> None:
    assert RetryPolicy(jitter=0).backoff(10_000, 0.0) == 8.0


@pytest.mark.parametrize(
    "kwargs",
    [{"retry": None}, {"retry": -1}, {"rand": 2}, {"rand": "0.5"}, {"elapsed": 10**400}],
)
def test_bad_schedule_arguments_are_usage_errors(kwargs: dict[str, Any]) -> None:
    call = {"retry": 0, "retryable": True, "retry_after": None, "elapsed": 0.0, "rand": 0.5}
    with pytest.raises(UsageError):  # TypeError or OverflowError
        RetryPolicy().next_delay(**{**call, **kwargs})


def test_non_retryable_failures_are_not_retried() -> None:
    policy = RetryPolicy()
    assert policy.next_delay(0, retryable=False, retry_after=None, elapsed=0, rand=0) is None


def test_retries_stop_after_max_retries() -> None:
    policy = RetryPolicy(max_retries=2, jitter=0)
    delays = [
        policy.next_delay(n, retryable=True, retry_after=None, elapsed=0, rand=0) for n in range(3)
    ]
    assert delays == [0.5, 1.0, None]


def test_retry_after_replaces_backoff_without_jitter() -> None:
    policy = RetryPolicy(jitter=0.5)
    assert policy.next_delay(0, retryable=True, retry_after=1.0, elapsed=0, rand=0.9) == 1.0


def test_retry_after_above_the_cap_gives_up() -> None:
    policy = RetryPolicy(max_retry_after=30)
    assert policy.next_delay(0, retryable=True, retry_after=30, elapsed=0, rand=0) == 30
    assert policy.next_delay(0, retryable=True, retry_after=31, elapsed=0, rand=0) is None


def test_no_retry_that_would_end_past_the_deadline() -> None:
    policy = RetryPolicy(deadline=10, jitter=0)
    assert policy.next_delay(0, retryable=True, retry_after=None, elapsed=9.0, rand=0) == 0.5
    assert policy.next_delay(0, retryable=True, retry_after=None, elapsed=9.5, rand=0) is None
    assert policy.next_delay(0, retryable=True, retry_after=5, elapsed=6, rand=0) is None


def test_no_deadline_means_only_max_retries_bounds_retrying() -> None:
    policy = RetryPolicy(deadline=None, jitter=0)
    assert policy.next_delay(0, retryable=True, retry_after=None, elapsed=1e9, rand=0) == 0.5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_retries": -1},
        {"max_retries": 1.5},
        {"max_retries": True},
        {"initial_delay": -1},
        {"initial_delay": float("inf")},
        {"initial_delay": 9, "max_delay": 8},
        {"jitter": 1.5},
        {"jitter": float("nan")},
        {"max_retry_after": -1},
        {"deadline": 0},
        {"deadline": "soon"},
        {"sleep": 5},
        {"clock": None},
    ],
)
def test_invalid_policy_raises_configuration_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        RetryPolicy(**kwargs)


def test_policies_compare_by_their_numbers_not_their_testing_switches() -> None:
    assert RetryPolicy() == RetryPolicy(sleep=FakeTime().sleep)
    assert RetryPolicy() != RetryPolicy(max_retries=5)


# -- Retry-After -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"Retry-After": "1"}, 1.0),
        ({"retry-after": " 2.5 "}, 2.5),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"retry-after-ms": "junk", "retry-after": "9"}, 9.0),
        ({"retry-after-ms": "-5"}, None),
        ({"retry-after": "-1"}, None),
        ({"retry-after": "nan"}, None),
        ({"retry-after": "inf"}, None),
        ({"retry-after": "soon"}, None),
        ({"retry-after": email.utils.formatdate(NOW + 30, usegmt=True)}, 30.0),
        ({"retry-after": email.utils.formatdate(NOW - 30, usegmt=True)}, 0.0),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:00"}, None),  # no zone: ambiguous
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers, NOW) == expected


# -- driver ----------------------------------------------------------------------------


class Flaky:
    """Fails with the given exceptions in turn, then returns "ok"."""

    def __init__(self, *failures: Exception) -> None:
        self.failures = list(failures)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "ok"


def classify(exc: Exception, now: float) -> Failure | None:
    if isinstance(exc, ConnectionError):
        return Failure(ProviderConnectionError("down", provider="t"), True)
    if isinstance(exc, LookupError):
        return Failure(ProviderResponseError("bad", provider="t", status_code=400), False)
    if isinstance(exc, ValueError):
        return Failure(ProviderResponseError("busy", provider="t", status_code=503), True, 2.0)
    return None


@pytest.mark.anyio
async def test_driver_retries_with_backoff_then_succeeds(fake_time: FakeTime) -> None:
    attempt = Flaky(ConnectionError(), ConnectionError())
    policy = fake_time.policy(max_retries=2)
    assert await acall_with_retry(policy, attempt, classify, provider="t") == "ok"
    assert attempt.calls == 3
    assert fake_time.sleeps == [0.5, 1.0]


@pytest.mark.anyio
async def test_driver_honours_the_failures_retry_after(fake_time: FakeTime) -> None:
    attempt = Flaky(ValueError())
    assert await acall_with_retry(fake_time.policy(), attempt, classify, provider="t") == "ok"
    assert fake_time.sleeps == [2.0]


@pytest.mark.anyio
async def test_driver_raises_the_typed_error_from_the_original(fake_time: FakeTime) -> None:
    original = LookupError("nope")
    with pytest.raises(ProviderResponseError) as info:
        await acall_with_retry(fake_time.policy(), Flaky(original), classify, provider="t")
    assert info.value.__cause__ is original
    assert fake_time.sleeps == []


@pytest.mark.anyio
async def test_driver_reports_the_attempt_count_when_it_gives_up(fake_time: FakeTime) -> None:
    attempt = Flaky(*[ConnectionError()] * 3)
    with pytest.raises(ProviderConnectionError, match="after 2 attempts"):
        await acall_with_retry(fake_time.policy(max_retries=1), attempt, classify, provider="t")


@pytest.mark.anyio
async def test_driver_lets_unclassified_exceptions_through_unchanged(
    fake_time: FakeTime,
) -> None:
    with pytest.raises(RuntimeError):
        await acall_with_retry(fake_time.policy(), Flaky(RuntimeError("x")), classify, provider="t")


@pytest.mark.anyio
async def test_driver_gives_up_when_the_deadline_has_passed(fake_time: FakeTime) -> None:
    fake_time.now = 0.0
    policy = fake_time.policy(deadline=1.0, max_retries=5)

    async def slow_failure() -> str:
        fake_time.now += 0.9  # this attempt used most of the budget
        raise ConnectionError

    with pytest.raises(ProviderConnectionError):
        await acall_with_retry(policy, slow_failure, classify, provider="t")
    assert fake_time.sleeps == []  # 0.9 + 0.5 would end past the deadline


@pytest.mark.anyio
async def test_driver_times_out_an_attempt_at_the_deadline() -> None:
    async def hang() -> str:
        await anyio.sleep(10)
        return "late"

    with anyio.fail_after(5), pytest.raises(ProviderTimeoutError, match="overall deadline"):
        await acall_with_retry(RetryPolicy(deadline=0.05), hang, classify, provider="t")
