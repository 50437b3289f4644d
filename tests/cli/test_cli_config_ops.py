"""The operator keys of the gateway configuration: logs, admin, event log, forward format."""

from __future__ import annotations

import contextlib
import copy
import tomllib
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import EXAMPLE
from hypothesis import given, settings
from hypothesis import strategies as st

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


@pytest.mark.parametrize("fields", ["event_id", 5, True, [1], {"a": 1}])
def test_required_payload_fields_must_be_a_list_of_names(fields: object) -> None:
    # A string was split into one-letter fields, a number raised TypeError.
    with pytest.raises(ConfigurationError, match=r"\[providers\.gh\] .*required_payload_fields"):
        parse_config(config(required_payload_fields=fields))
    parsed = parse_config(config(required_payload_fields=["event_id", "type"]))
    assert parsed.providers["gh"].profile.required_payload_fields == ("event_id", "type")


EXAMPLE_DATA = tomllib.loads(EXAMPLE.read_text())


def _paths(table: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for key, value in table.items():
        found.append((*prefix, key))
        if isinstance(value, dict):
            found += _paths(value, (*prefix, key))
    return found


_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "x", "5s", "-5s", "1d", "memory", "sqlite:", "http://x", "ftp://x"]),
    st.text(max_size=8),
    st.lists(st.one_of(st.integers(), st.text(max_size=4)), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(
    changes=st.lists(
        st.tuples(st.sampled_from(_paths(EXAMPLE_DATA)), st.one_of(st.just(None), _VALUES)),
        min_size=1,
        max_size=3,
    )
)
def test_any_wrong_value_in_the_example_config_is_a_configuration_error(
    changes: list[tuple[tuple[str, ...], object]],
) -> None:
    """The example config with a key or two given another value (None: the key removed)
    either parses or raises ConfigurationError, never anything else."""
    data = copy.deepcopy(EXAMPLE_DATA)
    for path, value in changes:
        node: Any = data
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue  # an earlier change replaced a table on this path
        if value is None:
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
    with contextlib.suppress(ConfigurationError):
        parse_config(data, env={}, warn=False)
