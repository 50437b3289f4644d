"""Retry schedule, status classification and the circuit breaker, on virtual time."""

from __future__ import annotations

import email.utils

import pytest

from converge.errors import ConfigurationError, UsageError
from converge.extensions.connectors import CircuitBreaker, WebhookRetryPolicy
from converge.extensions.connectors.retry import (
    MAX_RETRY_AFTER_SEC,
    classify_status,
    counts_as_breaker_failure,
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
    ],
)
def test_breaker_refuses_bad_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        CircuitBreaker(**kwargs)  # type: ignore[arg-type]
