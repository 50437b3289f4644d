"""The gateway TOML's outbound keys: [retry] schedule or policy, [breaker], [dead_letters]."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from converge.cli.config import (
    DEFAULT_RETENTION_SEC,
    GatewayConfig,
    build_gateway,
    load_config,
    parse_config,
)
from converge.errors import ConfigurationError
from converge.extensions.connectors import RetrySchedule, WebhookRetryPolicy
from converge.extensions.connectors.outbound.retry import SVIX_DELAYS_SEC
from converge.extensions.storage import MemoryStore

EXAMPLE = Path(__file__).parents[2] / "examples" / "gateway.toml"


def test_the_defaults_are_svixs_schedule_a_breaker_and_a_week_of_retention() -> None:
    config = parse_config({})
    assert config.retry == RetrySchedule()
    assert config.retry.delays_sec == SVIX_DELAYS_SEC
    assert (config.breaker_failure_threshold, config.breaker_recovery_timeout_sec) == (5, 30.0)
    assert config.dead_letter_retention_sec == DEFAULT_RETENTION_SEC == 7 * 86400
    assert GatewayConfig().retry == config.retry


def test_the_example_spells_out_the_defaults() -> None:
    config = load_config(EXAMPLE, env={}, warn=False)
    assert config.retry == RetrySchedule()
    assert config.dead_letter_retention_sec == DEFAULT_RETENTION_SEC


def test_a_schedule_takes_durations_and_reaches_the_connector() -> None:
    data: dict[str, Any] = {
        "retry": {
            "schedule": ["250ms", 1, "1m"],
            "jitter_ratio": 0,
            "request_timeout_sec": "2s",
            "lease_margin_sec": 1.5,
        },
        "breaker": {"failure_threshold": 3, "recovery_timeout_sec": "2m"},
        "dead_letters": {"retention_sec": "1d"},
    }
    config = parse_config(data)
    assert config.retry == RetrySchedule((0.25, 1.0, 60.0), 0.0, 2.0, 1.5)
    connector = build_gateway(config, MemoryStore()).connector
    assert connector.retry_policy == config.retry
    assert connector.dispatcher.lease_sec == 3.5
    breaker = connector.breaker("any")
    assert (breaker.failure_threshold, breaker.recovery_timeout_sec) == (3, 120.0)
    assert connector.outbox.queue.transitions.dead_retention_sec == 86400.0


def test_the_exponential_keys_give_the_seed_policy() -> None:
    config = parse_config({"retry": {"max_attempts": 3, "base_delay_sec": 1}})
    assert config.retry == WebhookRetryPolicy(max_attempts=3, base_delay_sec=1)


@pytest.mark.parametrize(
    "data",
    [
        {"retry": {"schedule": []}},
        {"retry": {"schedule": "5s"}},
        {"retry": {"schedule": ["soon"]}},
        {"retry": {"schedule": ["5s"], "max_attempts": 3}},
        {"retry": {"max_attempts": 3, "lease_margin_sec": 1}},
        {"retry": {"jitter_ratio": 3}},
        {"retry": {"nope": 1}},
        {"breaker": {"failure_threshold": 0}},
        {"breaker": {"recovery_timeout_sec": "forever"}},
        {"breaker": {"extra": 1}},
        {"dead_letters": {"retention_sec": 0}},
        {"dead_letters": {"ttl": 1}},
        {"breaker": 5},
    ],
)
def test_bad_outbound_settings_are_refused_with_the_section_named(data: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError) as caught:
        parse_config(data)
    assert next(iter(data)) in str(caught.value) or "schedule" in str(caught.value)
