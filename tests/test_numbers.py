"""Numbers at public entry points: an int too large for a float (``10**400``, which JSON
and TOML both parse) is refused with a converge error, never an ``OverflowError``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

from converge._numbers import finite_float, positive_float, wait_seconds
from converge.core import MetricsCollector
from converge.durable.records import Record
from converge.errors import ConvergeError, FormatError
from converge.extensions.connectors import (
    CircuitBreaker,
    OutboundWebhookAction,
    RetrySchedule,
    WebhookRetryPolicy,
)
from converge.extensions.llm import OpenAIProvider, RetryPolicy
from converge.extensions.llm.limits import LimitedProvider
from converge.extensions.llm.testing import ScriptedProvider
from converge.extensions.rate_limit import TokenBucketConfig
from converge.extensions.storage import MemoryStore, RedisStore
from converge.runtime import AgentRetry

HUGE = 10**400

NUMBERS = [
    (1, 1.0, 1.0, 1.0),
    (0.5, 0.5, 0.5, 0.5),
    (0, 0.0, None, 0.0),
    (-2, -2.0, None, None),
    (math.inf, None, None, math.inf),
    (-math.inf, None, None, None),
    (math.nan, None, None, None),
    (HUGE, None, None, math.inf),
    (-HUGE, None, None, None),
    (True, None, None, None),
    ("1", None, None, None),
    (None, None, None, None),
]


@pytest.mark.parametrize(("value", "finite", "positive", "wait"), NUMBERS)
def test_the_number_helpers(value: Any, finite: Any, positive: Any, wait: Any) -> None:
    assert finite_float(value) == finite
    assert positive_float(value) == positive
    assert wait_seconds(value) == wait


CALLS: dict[str, Callable[[], Any]] = {
    "WebhookRetryPolicy.request_timeout_sec": lambda: WebhookRetryPolicy(request_timeout_sec=HUGE),
    "RetrySchedule.lease_margin_sec": lambda: RetrySchedule(lease_margin_sec=HUGE),
    "RetrySchedule.delays_sec": lambda: RetrySchedule(delays_sec=(1, HUGE)),
    "CircuitBreaker.recovery_timeout_sec": lambda: CircuitBreaker(recovery_timeout_sec=HUGE),
    "OutboundWebhookAction.deadline": lambda: OutboundWebhookAction(
        target="t", url="https://example.com/x", method="POST", body={}, deadline=HUGE
    ),
    "RetryPolicy.max_delay": lambda: RetryPolicy(max_delay=HUGE),
    "RetryPolicy.deadline": lambda: RetryPolicy(deadline=HUGE),
    "OpenAIProvider.timeout": lambda: OpenAIProvider(api_key="k", timeout=HUGE),
    "LimitedProvider.tokens_per_minute": lambda: LimitedProvider(
        ScriptedProvider([]), tokens_per_minute=HUGE
    ),
    "TokenBucketConfig.capacity": lambda: TokenBucketConfig(capacity=HUGE, refill_tokens_per_sec=1),
    "RedisStore.timeout": lambda: RedisStore("redis://127.0.0.1:1/0", timeout=HUGE),
    "AgentRetry.backoff": lambda: AgentRetry(backoff=HUGE),
    "MemoryStore.put ttl": lambda: MemoryStore().put("k", 1, ttl=HUGE),
    "MetricsCollector.inc": lambda: MetricsCollector().inc("n", HUGE),
    "MetricsCollector.observe buckets": lambda: MetricsCollector().observe(
        "h", 1.0, buckets=[1, HUGE]
    ),
}


@pytest.mark.parametrize("call", list(CALLS.values()), ids=list(CALLS))
def test_an_int_no_float_holds_is_refused_with_a_converge_error(call: Callable[[], Any]) -> None:
    with pytest.raises(ConvergeError):
        call()


def test_a_stored_record_with_such_a_time_is_a_format_error() -> None:
    record = Record(
        id="r1", kind="inbound", status="pending", key="k", data={}, created=1, updated=1
    )
    data = record.to_dict()
    with pytest.raises(FormatError):
        Record.from_dict({**data, "created": HUGE})


def test_an_unbounded_wait_is_no_limit() -> None:
    provider = LimitedProvider(ScriptedProvider([]), max_wait=HUGE)
    assert provider.max_wait is None
    assert LimitedProvider(ScriptedProvider([]), max_wait=math.inf).max_wait is None
