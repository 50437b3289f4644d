"""The operator keys of the gateway configuration: logs, admin, event log, forward format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from converge.cli.config import build_gateway, open_store, parse_config
from converge.errors import ConfigurationError
from converge.extensions.storage import MemoryStore, RedisStore

PROVIDER = {"scheme": "github", "secret": "s"}
TARGET = {"url": "http://127.0.0.1:9/x"}


def config(gateway: dict[str, Any] | None = None, **provider: Any) -> dict[str, Any]:
    return {
        "gateway": gateway or {},
        "providers": {"gh": {**PROVIDER, **provider}},
        "targets": {"app": TARGET},
    }


def test_defaults() -> None:
    parsed = parse_config(config())
    assert parsed.log_format == "text"
    assert parsed.admin_token is None
    assert parsed.event_log_max == 10_000
    assert parsed.event_retention_sec == 7 * 24 * 3600
    assert parsed.providers["gh"].forward_format == "envelope"


def test_admin_token_comes_from_the_named_variable() -> None:
    env = {"ADMIN_TOKEN": "a" * 20}
    parsed = parse_config(config({"admin_token_env": "ADMIN_TOKEN"}), env=env)
    assert parsed.admin_token == "a" * 20
    assert parse_config(config({"admin_token_env": "ADMIN_TOKEN"}), env={}).admin_token is None


@pytest.mark.parametrize(
    ("gateway", "provider", "message"),
    [
        ({"log_format": "xml"}, {}, "log_format"),
        ({"admin_token_env": 3}, {}, "admin_token_env"),
        ({"event_log_max": 0}, {}, "event_log_max"),
        ({"event_log_max": True}, {}, "event_log_max"),
        ({"event_retention_sec": -1}, {}, "event_retention_sec"),
        ({}, {"forward_format": "xml"}, "[providers.gh] forward_format"),
        ({}, {"forward_format": "raw"}, 'forward_format = "raw" needs forward_to'),
        ({"store": "postgres://x"}, {}, "redis:// or rediss:// URL"),
    ],
)
def test_bad_operator_settings_are_named(
    gateway: dict[str, Any], provider: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_config(config(gateway, **provider))
    assert message in str(info.value)


def test_a_short_admin_token_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="16 characters"):
        parse_config(config({"admin_token_env": "T"}), env={"T": "short"})


def test_raw_forward_format_reaches_the_connector() -> None:
    parsed = parse_config(config(forward_to="app", forward_format="raw"))
    connector = build_gateway(parsed, MemoryStore()).connector
    assert connector._raw_forward == frozenset({"gh"})


def test_the_memory_stores_of_the_gateway_and_a_default_connector_keep_copies(
    tmp_path: Path,
) -> None:
    # Serialized: retained events are bytes the garbage collector never walks.
    from converge.extensions.connectors import WebhookConnector

    connector = WebhookConnector(provider_profiles={}, secrets={})
    for store in (open_store("memory", tmp_path), connector.store):
        assert isinstance(store, MemoryStore)
        value = {"a": [1]}
        store.put("k", value)
        value["a"].append(2)
        assert store.get("k") == {"a": [1]}


def test_a_redis_store_spec_opens_a_redis_store(tmp_path: Path) -> None:
    store = open_store("redis://redis.example.com:6379/0", tmp_path)  # connects nothing
    assert isinstance(store, RedisStore)


def test_the_admin_app_is_mounted_only_with_a_token() -> None:
    from converge.cli.operations import EventLogTrimmer, with_operations

    for env, mounted in (({"T": "t" * 20}, True), ({}, False)):
        parsed = parse_config(config({"admin_token_env": "T"}), env=env)
        core = build_gateway(parsed, MemoryStore()).asgi_app()
        app = with_operations(core, core, parsed)
        assert (core.admin is not None) is mounted
        assert isinstance(app, EventLogTrimmer)
