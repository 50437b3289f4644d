"""Retry schedule, status classification and the circuit breaker, on virtual time."""

from __future__ import annotations

import email.utils

import pytest

from converge.errors import ConfigurationError, UsageError
from converge.extensions.connectors import CircuitBreaker, RetrySchedule, WebhookRetryPolicy
from converge.extensions.connectors.outbound.retry import (
    DEFAULT_LEASE_MARGIN_SEC,
    MAX_RETRY_AFTER_SEC,
    classify_status,
    counts_as_breaker_failure,
    lease_margin,
    parse_duration,
    parse_retry_after,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_delay_doubles_from_the_base_and_is_capped() -> None:
    policy = WebhookRetryPolicy(base_delay_sec=0.25, max_delay_sec=10.0, jitter_ratio=0.0)
    delays = [policy.compute_delay(n) for n in range(1, 9)]
    assert delays == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert policy.compute_delay(10_000) == 10.0


def test_jitter_spreads_by_the_ratio_and_never_exceeds_the_cap() -> None:
    policy = WebhookRetryPolicy(base_delay_sec=1.0, max_delay_sec=10.0, jitter_ratio=0.2)
    assert policy.compute_delay(1, rand=lambda: 0.0) == pytest.approx(0.8)
    assert policy.compute_delay(1, rand=lambda: 0.5) == pytest.approx(1.0)
    assert policy.compute_delay(1, rand=lambda: 0.999999) == pytest.approx(1.2, rel=1e-5)
    assert policy.compute_delay(5, rand=lambda: 0.999999) == 10.0
    assert policy.compute_delay(5, rand=lambda: 0.0) == pytest.approx(8.0)
    samples = {policy.compute_delay(2) for _ in range(200)}
    assert len(samples) > 100
    assert all(1.6 <= d <= 2.4 for d in samples)


@pytest.mark.parametrize("attempt", [0, -1, 1.5, True, "1"])
def test_compute_delay_refuses_bad_attempt_numbers(attempt: object) -> None:
    with pytest.raises(UsageError):
        WebhookRetryPolicy().compute_delay(attempt)  # type: ignore[arg-type]


@pytest.mark.parametrize("policy", [WebhookRetryPolicy(), RetrySchedule()])
def test_compute_delay_refuses_a_rand_it_cannot_call(policy: object) -> None:
    with pytest.raises(UsageError, match="rand"):
        policy.compute_delay(1, rand=0.5)  # type: ignore[attr-defined]  # raised TypeError


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, "delivered"),
        (201, "delivered"),
        (204, "delivered"),
        (400, "dead"),
        (401, "dead"),
        (403, "dead"),
        (404, "dead"),
        (405, "dead"),
        (410, "dead"),
        (422, "dead"),
        (301, "retry"),
        (302, "retry"),
        (307, "retry"),
        (408, "retry"),
        (409, "retry"),
        (429, "retry"),
        (500, "retry"),
        (502, "retry"),
        (503, "retry"),
        (504, "retry"),
    ],
)
def test_statuses_are_classified(status: int, verdict: str) -> None:
    assert classify_status(status) == verdict


def test_only_signs_of_an_unwell_target_count_against_the_breaker() -> None:
    assert counts_as_breaker_failure(None)
    assert counts_as_breaker_failure(503)
    assert counts_as_breaker_failure(429)
    assert counts_as_breaker_failure(408)
    assert not counts_as_breaker_failure(404)
    assert not counts_as_breaker_failure(200)


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("7", now=now) == 7.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(date, now=now) == pytest.approx(30.0)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert parse_retry_after("999999999", now=now) == MAX_RETRY_AFTER_SEC
    for junk in (None, "", "soon", "-5", "1.5", "Wed, 99 Foo 2024"):
        assert parse_retry_after(junk, now=now) is None


def test_breaker_keeps_the_seed_signature_and_defaults() -> None:
    breaker = CircuitBreaker()
    assert (breaker.failure_threshold, breaker.recovery_timeout_sec) == (5, 30.0)
    assert (breaker._failures, breaker._opened_at) == (0, None)
    assert CircuitBreaker(3, 1.0, 0, None).failure_threshold == 3


def test_breaker_opens_after_threshold_consecutive_failures() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=3, recovery_timeout_sec=30, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # resets the streak
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.allow_request()
    assert not breaker.is_open
    breaker.record_failure()
    assert breaker.is_open
    assert breaker.state == "open"
    assert not breaker.allow_request()
    assert breaker.retry_at() == 1030.0


def test_half_open_admits_exactly_one_probe() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, recovery_timeout_sec=30, clock=clock)
    breaker.record_failure()
    clock.now += 29.9
    assert not breaker.allow_request()
    clock.now += 0.1
    assert breaker.state == "half_open"
    assert breaker.allow_request()
    assert not breaker.allow_request()
    assert not breaker.allow_request()
    breaker.record_success()
    assert breaker.state == "closed"
    assert breaker.allow_request()
    assert breaker.allow_request()


def test_a_failed_probe_reopens_for_another_timeout() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, recovery_timeout_sec=10, clock=clock)
    breaker.record_failure()
    clock.now += 10
    assert breaker.allow_request()
    breaker.record_failure()
    assert breaker.state == "open"
    assert not breaker.allow_request()
    clock.now += 10
    assert breaker.allow_request()


def test_a_lost_probe_is_replaced_after_the_timeout() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, recovery_timeout_sec=10, clock=clock)
    breaker.record_failure()
    clock.now += 10
    assert breaker.allow_request()
    clock.now += 9
    assert not breaker.allow_request()
    clock.now += 1
    assert breaker.allow_request()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"failure_threshold": 0},
        {"failure_threshold": 1.5},
        {"recovery_timeout_sec": -1},
        {"recovery_timeout_sec": float("nan")},
        # The seed's signature takes a saved state too; these were taken as they came.
        {"_failures": -1},
        {"_failures": float("nan")},
        {"_opened_at": float("nan")},
        {"_opened_at": "yesterday"},
    ],
)
def test_breaker_refuses_bad_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        CircuitBreaker(**kwargs)  # type: ignore[arg-type]


def test_a_breaker_can_start_in_a_saved_state() -> None:
    clock = Clock()
    breaker = CircuitBreaker(2, 10.0, _failures=1, _opened_at=clock.now, clock=clock)
    assert breaker.state == "open"
    clock.now += 10
    assert breaker.allow_request()  # the probe
    assert not breaker.allow_request()


def test_the_default_schedule_is_svixs() -> None:
    schedule = RetrySchedule(jitter_ratio=0)
    assert schedule.delays_sec == (5, 300, 1800, 7200, 18000, 36000, 36000)
    assert schedule.max_attempts == 8
    delays = [schedule.compute_delay(n) for n in range(1, 10)]
    assert delays == [5, 300, 1800, 7200, 18000, 36000, 36000, 36000, 36000]
    assert sum(schedule.delays_sec) / 3600 == pytest.approx(27.58, abs=0.01)


def test_a_schedule_spreads_each_wait_by_its_jitter() -> None:
    schedule = RetrySchedule(delays_sec=(10.0, 100.0), jitter_ratio=0.5)
    assert schedule.compute_delay(1, rand=lambda: 0.0) == 5.0
    assert schedule.compute_delay(2, rand=lambda: 0.999999) == pytest.approx(150.0, rel=1e-5)
    with pytest.raises(UsageError):
        schedule.compute_delay(0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"delays_sec": ()},
        {"delays_sec": "5s"},
        {"delays_sec": (1, -1)},
        {"delays_sec": (float("inf"),)},
        {"jitter_ratio": 2},
        {"request_timeout_sec": 0},
        {"lease_margin_sec": 0},
        {"lease_margin_sec": True},
    ],
)
def test_schedule_refuses_bad_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        RetrySchedule(**kwargs)  # type: ignore[arg-type]


def test_the_seed_policy_keeps_its_documented_defaults_and_lease_margin() -> None:
    assert WebhookRetryPolicy() == WebhookRetryPolicy(5, 0.25, 10.0, 0.2, 5.0)
    assert lease_margin(WebhookRetryPolicy()) == DEFAULT_LEASE_MARGIN_SEC == 5.0
    assert lease_margin(RetrySchedule(lease_margin_sec=2)) == 2


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (5, 5.0),
        (0.5, 0.5),
        ("250ms", 0.25),
        ("5s", 5),
        ("5m", 300),
        ("30min", 1800),
        ("2h", 7200),
        ("1d", 86400),
        (" 1.5h ", 5400),
    ],
)
def test_durations_read_seconds_and_units(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5", "5 x", "-1s", "1h2m", True, -1, float("nan"), None])
def test_durations_refuse_anything_else(text: object) -> None:
    with pytest.raises(ConfigurationError):
        parse_duration(text)


def test_cancelling_a_probe_admits_another_at_once() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, 10.0, clock=clock)
    breaker.record_failure()
    clock.now += 10
    assert breaker.allow_request()
    assert not breaker.allow_request()
    breaker.cancel_probe()
    assert breaker.allow_request()
