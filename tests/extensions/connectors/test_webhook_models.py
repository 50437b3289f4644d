"""Value objects validate their fields and keep the seed's defaults."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from converge.errors import ConfigurationError, UsageError
from converge.extensions.connectors import (
    InboundWebhookEvent,
    OutboundTarget,
    OutboundWebhookAction,
    ProviderProfile,
    WebhookRetryPolicy,
    WebhookSecurityPolicy,
)


def test_seed_defaults_are_kept() -> None:
    p = ProviderProfile("acme", "acme-secret")
    assert (p.signature_header, p.timestamp_header, p.event_id_field) == (
        "X-Webhook-Signature",
        "X-Webhook-Timestamp",
        "event_id",
    )
    assert (p.signature_algorithm, p.canonicalization, p.required_payload_fields) == (
        "sha256",
        "raw_body",
        (),
    )
    assert (p.subject_field, p.source_field, p.emit_as, p.scheme) == (
        "subject",
        "source",
        "message",
        "hmac",
    )
    policy = WebhookSecurityPolicy()
    assert (policy.timestamp_skew_limit_sec, policy.idempotency_ttl_sec) == (300, 3600)
    assert (policy.max_payload_bytes, policy.allowed_content_types) == (
        1048576,
        ("application/json",),
    )
    assert (policy.require_mtls, policy.ip_allowlist, policy.strict_mode) == (False, (), True)
    retry = WebhookRetryPolicy()
    assert (retry.max_attempts, retry.base_delay_sec, retry.max_delay_sec) == (5, 0.25, 10.0)
    assert (retry.jitter_ratio, retry.request_timeout_sec) == (0.2, 5.0)


def test_scheme_is_keyword_only() -> None:
    scheme = next(f for f in dataclasses.fields(ProviderProfile) if f.name == "scheme")
    assert scheme.kw_only


def test_value_objects_are_frozen() -> None:
    p = ProviderProfile("acme", "s")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": ""},
        {"name": "a/b"},
        {"name": "x" * 65},
        {"secret_ref": ""},
        {"scheme": "paypal"},
        {"signature_algorithm": "md5"},
        {"signature_algorithm": "sha1"},
        {"canonicalization": "json"},
        {"emit_as": "event"},
        {"signature_header": "bad header"},
        {"required_payload_fields": "id"},
        {"required_payload_fields": ("",)},
        {"scheme": "stripe", "canonicalization": "timestamp_body"},
        {"scheme": "github", "signature_algorithm": "sha512"},
    ],
)
def test_invalid_profiles_are_refused(kwargs: dict[str, object]) -> None:
    base: dict[str, object] = {"name": "acme", "secret_ref": "s"}
    with pytest.raises(ConfigurationError):
        ProviderProfile(**{**base, **kwargs})  # type: ignore[arg-type]


def test_svix_resolves_to_standard_webhooks() -> None:
    assert ProviderProfile("a", "s", scheme="svix").canonical_scheme == "standard-webhooks"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"timestamp_skew_limit_sec": 0},
        {"timestamp_skew_limit_sec": 1.5},
        {"idempotency_ttl_sec": -1},
        {"max_payload_bytes": True},
        {"allowed_content_types": ()},
        {"allowed_content_types": ("json",)},
        {"allowed_content_types": "application/json"},
        {"ip_allowlist": ("10.0.0.0/33",)},
        {"ip_allowlist": ("example.com",)},
        {"ip_allowlist": "10.0.0.1"},
        {"require_mtls": 1},
    ],
)
def test_invalid_policies_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        WebhookSecurityPolicy(**kwargs)  # type: ignore[arg-type]


def test_replay_ttl_covers_the_whole_skew_window() -> None:
    assert (
        WebhookSecurityPolicy(timestamp_skew_limit_sec=300, idempotency_ttl_sec=60).replay_ttl_sec
        == 600
    )
    assert WebhookSecurityPolicy().replay_ttl_sec == 3600


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"base_delay_sec": -1},
        {"max_delay_sec": float("inf")},
        {"base_delay_sec": 5, "max_delay_sec": 1},
        {"jitter_ratio": 1.5},
        {"request_timeout_sec": 0},
    ],
)
def test_invalid_retry_policies_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        WebhookRetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_action_normalises_method_and_round_trips() -> None:
    action = OutboundWebhookAction("crm", "post", "https://crm.example/hook", {"a": [1, 2.5]})
    assert action.method == "POST"
    assert OutboundWebhookAction.from_dict(action.to_dict()) == action
    assert action.body_bytes() == b'{"a":[1,2.5]}'


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target": ""},
        {"method": "GET"},
        {"url": "ftp://x/y"},
        {"url": "/relative"},
        {"url": "https://user:pw@host/"},
        {"body": []},
        {"body": {"x": float("nan")}},
        {"body": {"x": object()}},
        {"headers": {"Host": "evil"}},
        {"headers": {"Idempotency-Key": "k"}},
        {"headers": {"webhook-signature": "v1,x"}},
        {"headers": {"X-A": "line\r\nInjected: 1"}},
        {"headers": {"bad header": "v"}},
        {"idempotency_key": ""},
        {"idempotency_key": "k" * 256},
        {"idempotency_key": "clé"},
        {"idempotency_key": "k\x7f"},
        {"headers": {"X-A": "é"}},
        {"headers": {"X-A": "a\x01b"}},
        {"headers": {"X-A": "a\x7fb"}},
        {"headers": {"X-A": " leading"}},
        {"headers": {"X-A": "x" * 8193}},
        {"headers": {"X-É": "v"}},
        {"headers": {"X-A\n": "v"}},
        {"headers": {f"X-{i}": "v" for i in range(65)}},
        {"headers": "ab"},
        {"headers": ["x"]},
        {"body": {"x": "\ud800"}},
        {"body": {"\udfff": 1}},
        {"deadline": float("inf")},
        {"deadline": "tomorrow"},
    ],
)
def test_invalid_actions_are_refused(kwargs: dict[str, object]) -> None:
    base: dict[str, object] = {"target": "t", "method": "POST", "url": "http://h/x", "body": {}}
    with pytest.raises(UsageError):
        OutboundWebhookAction(**{**base, **kwargs})  # type: ignore[arg-type]


def test_action_from_dict_refuses_unknown_and_missing_fields() -> None:
    with pytest.raises(UsageError):
        OutboundWebhookAction.from_dict({"target": "t", "url": "http://h/", "body": {}, "x": 1})
    with pytest.raises(UsageError):
        OutboundWebhookAction.from_dict({"target": "t", "body": {}})
    with pytest.raises(UsageError):
        OutboundWebhookAction.from_dict([])  # type: ignore[arg-type]
    for headers in ("ab", 5, ["x"], True):
        with pytest.raises(UsageError, match="headers"):
            OutboundWebhookAction.from_dict(
                {"target": "t", "url": "http://h/", "body": {}, "headers": headers}
            )


def test_valid_header_values_and_keys_pass() -> None:
    action = OutboundWebhookAction(
        "t",
        "POST",
        "http://h/x",
        {"text": "\u00e9\U0001f600"},
        headers={"X-A": "a b\tc", "X-Empty": "", "X-Max": "x" * 8192},
        idempotency_key="order 42/1",
    )
    assert action.body_bytes().decode() == '{"text":"\u00e9\U0001f600"}'


@pytest.mark.parametrize(
    ("make", "value"),
    [
        (lambda v: ProviderProfile(v, "s"), "acme\n"),
        (lambda v: ProviderProfile("a", "s", signature_header=v), "X-Sig\n"),
        (lambda v: OutboundTarget(v, "http://h/"), "crm\n"),
        (lambda v: OutboundWebhookAction(v, "POST", "http://h/", {}), "t\n"),
        (lambda v: OutboundWebhookAction("t", "POST", "http://h/", {}, {v: "1"}), "X-A\n"),
    ],
)
def test_every_pattern_is_a_full_match_a_final_newline_is_refused(
    make: Callable[[str], object], value: str
) -> None:
    make(value.rstrip("\n"))  # fine without the newline
    with pytest.raises(UsageError):  # ConfigurationError is a UsageError
        make(value)


def test_core_name_patterns_refuse_a_final_newline() -> None:
    from converge.core.message import Topic
    from converge.core.metrics import MetricsCollector

    with pytest.raises(UsageError):
        Topic("bridge.webhook\n")
    with pytest.raises(UsageError):
        MetricsCollector().inc("requests_total\n")


def test_a_log_value_with_a_final_newline_is_quoted_not_injected() -> None:
    from converge.extensions.connectors.logs import _field

    assert _field("evt_1") == "evt_1"
    assert _field("evt_1\nlevel=ERROR forged") == '"evt_1\\nlevel=ERROR forged"'
    assert _field("evt_1\n") == '"evt_1\\n"'


def test_target_allows_its_url_and_paths_below_only() -> None:
    t = OutboundTarget("crm", "https://crm.example/hooks")
    assert t.allows("https://crm.example/hooks")
    assert t.allows("https://crm.example/hooks/orders?x=1")
    for url in [
        "https://crm.example/hooksX",
        "https://crm.example/other",
        "http://crm.example/hooks",
        "https://crm.example:8443/hooks",
        "https://evil.example/hooks",
        "https://crm.example.evil/hooks",
        "https://u:p@crm.example/hooks",
        "https://crm.example/hooks/../admin",
        "https://crm.example/hooks/%2e%2e/admin",
        "https://crm.example/hooks/x%2F..%2F..%2Fadmin",
        "https://crm.example/hooks/..;/admin",
        "https://crm.example/hooks/x;jsessionid=1",
        "https://crm.example/hooks/x%3B/admin",
        "https://crm.example/hooks/x\\..\\..\\admin",
        "https://crm.example/hooks/x%5C..%5Cadmin",
        "https://crm.example/hooks/a%00b",
        "not a url",
    ]:
        assert not t.allows(url), url


def test_invalid_targets_are_refused() -> None:
    with pytest.raises(ConfigurationError):
        OutboundTarget("crm", "crm.example")
    with pytest.raises(ConfigurationError):
        OutboundTarget("crm", "https://crm.example", max_concurrency=0)
    with pytest.raises(ConfigurationError):
        OutboundTarget("bad name", "https://crm.example")


def test_inbound_event_round_trips_and_validates() -> None:
    event = InboundWebhookEvent("p", "src", "e1", 1.5, "subj", {"a": 1}, {"h": "v"}, "t" * 32)
    assert InboundWebhookEvent.from_dict(event.to_dict()) == event
    with pytest.raises(UsageError):
        InboundWebhookEvent("p", "src", "", 1.5, "s", {}, {})
    with pytest.raises(UsageError):
        InboundWebhookEvent("p", "src", "e", float("nan"), "s", {}, {})
    with pytest.raises(UsageError):
        InboundWebhookEvent.from_dict({"provider": "p"})
