"""WebhookSecurity: each check's status, the order of checks, rotation, replay defence."""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import pytest
from webhook_helpers import (
    GITHUB_SECRET,
    HMAC_SECRET,
    SLACK_SECRET,
    STRIPE_SECRET,
    SW_SECRET,
    event_body,
    github_request,
    hmac_request,
    slack_request,
    stripe_request,
    sw_request,
)

from converge.core.store import Store
from converge.errors import (
    ConfigurationError,
    DuplicateEventError,
    SyncInEventLoopError,
    UsageError,
    WebhookSecurityError,
)
from converge.extensions.connectors import (
    ProviderProfile,
    WebhookSecurity,
    WebhookSecurityPolicy,
)
from converge.extensions.connectors.inbound.security import FORM_MEDIA_TYPE, parse_json_object
from converge.extensions.storage import MemoryStore, SQLiteStore

NOW = 1_700_000_000.0

PROFILES = {
    "gen": ProviderProfile("gen", "gen", required_payload_fields=("subject",)),
    "ts": ProviderProfile("ts", "gen", canonicalization="timestamp_body"),
    "sw": ProviderProfile("sw", "sw", scheme="standard-webhooks"),
    "stripe": ProviderProfile("stripe", "stripe", scheme="stripe"),
    "github": ProviderProfile("github", "github", scheme="github"),
    "slack": ProviderProfile("slack", "slack", scheme="slack"),
}
SECRETS = {
    "gen": HMAC_SECRET,
    "sw": SW_SECRET,
    "stripe": STRIPE_SECRET,
    "github": GITHUB_SECRET,
    "slack": SLACK_SECRET,
}


def security(**policy: object) -> WebhookSecurity:
    return WebhookSecurity(
        WebhookSecurityPolicy(**policy),  # type: ignore[arg-type]
        PROFILES,
        SECRETS,
        store=MemoryStore(),
        clock=lambda: NOW,
    )


def rejected(
    sec: WebhookSecurity, provider: str, headers: dict[str, str], body: bytes, **kw: object
) -> tuple[int, str]:
    with pytest.raises(WebhookSecurityError) as info:
        sec.verify(
            provider, method=str(kw.pop("method", "POST")), headers=headers, raw_body=body, **kw
        )  # type: ignore[arg-type]
    return info.value.status, info.value.reason


def test_every_scheme_accepts_a_correctly_signed_request() -> None:
    sec = security()
    ts = int(NOW)
    body = json.dumps({"event_id": "e-1", "id": "evt_1", "subject": "s"}).encode()
    cases = {
        "gen": hmac_request(body, ts=ts),
        "ts": hmac_request(body, ts=ts, timestamp_body=True),
        "sw": sw_request(body, msg_id="msg_1", ts=ts),
        "stripe": stripe_request(body, ts=ts),
        "github": github_request(body, delivery="gh-1"),
        "slack": slack_request(body, ts=ts),
    }
    ids = {
        "gen": "e-1",
        "ts": "e-1",
        "sw": "msg_1",
        "stripe": "evt_1",
        "github": "gh-1",
        "slack": "e-1",
    }
    for provider, headers in cases.items():
        verified = sec.verify(provider, method="POST", headers=headers, raw_body=body)
        assert verified.event_id == ids[provider], provider
        assert verified.payload["subject"] == "s"
        assert verified.timestamp == NOW


def test_signature_with_the_wrong_secret_is_401() -> None:
    body = event_body()
    sec = security()
    assert rejected(sec, "gen", hmac_request(body, ts=int(NOW), secret="nope"), body) == (
        401,
        "bad_signature",
    )
    assert rejected(sec, "stripe", stripe_request(body, ts=int(NOW), secret="nope"), body) == (
        401,
        "bad_signature",
    )


def test_a_rotated_secret_accepts_old_and_new_values() -> None:
    sec = WebhookSecurity(
        WebhookSecurityPolicy(),
        {"gen": PROFILES["gen"]},
        {"gen": ["new-secret", "old-secret"]},
        store=MemoryStore(),
        clock=lambda: NOW,
    )
    for secret in ("new-secret", "old-secret"):
        body = event_body()
        assert sec.verify(
            "gen",
            method="POST",
            raw_body=body,
            headers=hmac_request(body, ts=int(NOW), secret=secret),
        )
    body = event_body()
    assert rejected(sec, "gen", hmac_request(body, ts=int(NOW), secret="retired"), body)[0] == 401


@pytest.mark.parametrize("offset", [-301, 301, -10_000, 10_000])
def test_timestamps_outside_the_skew_window_are_401(offset: int) -> None:
    body = event_body()
    headers = hmac_request(body, ts=int(NOW) + offset)
    assert rejected(security(), "gen", headers, body) == (401, "stale_timestamp")


@pytest.mark.parametrize("offset", [-300, 0, 300])
def test_timestamps_inside_the_skew_window_pass(offset: int) -> None:
    body = event_body()
    security().verify(
        "gen", method="POST", headers=hmac_request(body, ts=int(NOW) + offset), raw_body=body
    )


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e9", "garbage", "", "17e8"])
def test_non_numeric_timestamps_are_400(value: str) -> None:
    body = event_body()
    headers = {**hmac_request(body, ts=int(NOW)), "x-webhook-timestamp": value}
    assert rejected(security(), "gen", headers, body) == (400, "bad_timestamp")


def test_strict_mode_requires_the_generic_timestamp_header() -> None:
    body = event_body()
    headers = hmac_request(body)
    del headers["x-webhook-timestamp"]
    assert rejected(security(), "gen", headers, body) == (400, "missing_header")
    loose = security(strict_mode=False)
    assert loose.verify("gen", method="POST", headers=headers, raw_body=body).timestamp == NOW


def test_loose_mode_derives_a_missing_event_id_from_the_body() -> None:
    body = json.dumps({"subject": "s"}).encode()
    headers = hmac_request(body, ts=int(NOW))
    assert rejected(security(), "gen", headers, body) == (400, "missing_event_id")
    verified = security(strict_mode=False).verify(
        "gen", method="POST", headers=headers, raw_body=body
    )
    assert verified.event_id.startswith("sha256:")


@pytest.mark.parametrize(
    ("content_type", "ok"),
    [
        ("application/json", True),
        ("Application/JSON; charset=utf-8", True),
        ("application/json;charset=UTF-8", True),
        ("application/jsonx", False),
        ("application/json-patch+json", False),
        ("text/json", False),
        ("text/plain", False),
        ("", False),
    ],
)
def test_media_type_must_match_exactly(content_type: str, ok: bool) -> None:
    body = event_body()
    headers = {**hmac_request(body, ts=int(NOW)), "content-type": content_type}
    if ok:
        security().verify("gen", method="POST", headers=headers, raw_body=body)
    else:
        assert rejected(security(), "gen", headers, body) == (415, "unsupported_media_type")


@pytest.mark.parametrize(
    ("coding", "ok"),
    [
        ("identity", True),
        (" Identity ", True),
        ("", True),
        ("gzip", False),
        ("br", False),
        ("gzip, identity", False),
    ],
)
def test_a_compressed_body_is_415_naming_the_content_encoding(coding: str, ok: bool) -> None:
    # Signed over the bytes as sent, a gzip body used to fail as bad_signature or
    # malformed_json, which named the wrong cause.
    body = event_body()
    headers = {**hmac_request(body, ts=int(NOW)), "content-encoding": coding}
    if ok:
        security().verify("gen", method="POST", headers=headers, raw_body=body)
    else:
        assert rejected(security(), "gen", headers, body) == (415, "unsupported_content_encoding")


def test_a_missing_content_type_is_415() -> None:
    body = event_body()
    headers = hmac_request(body, ts=int(NOW))
    del headers["content-type"]
    assert rejected(security(), "gen", headers, body)[0] == 415


def test_bodies_over_the_limit_are_413_even_when_declared_honestly() -> None:
    body = event_body(pad="x" * 200)
    sec = security(max_payload_bytes=100)
    headers = hmac_request(body, ts=int(NOW))
    assert rejected(sec, "gen", headers, body) == (413, "payload_too_large")
    headers["content-length"] = str(len(body))
    with pytest.raises(WebhookSecurityError) as info:
        sec.check_request("gen", method="POST", headers=headers)
    assert info.value.status == 413
    headers["content-length"] = "12abc"
    assert rejected(sec, "gen", headers, body) == (400, "bad_content_length")


@pytest.mark.parametrize(
    ("allow", "addr", "ok"),
    [
        (("10.0.0.0/8",), "10.1.2.3", True),
        (("10.0.0.0/8",), "11.0.0.1", False),
        (("192.0.2.7",), "192.0.2.7", True),
        (("192.0.2.7",), "192.0.2.8", False),
        (("2001:db8::/32",), "2001:db8::1", True),
        (("2001:db8::/32",), "2001:db9::1", False),
        (("::1",), "::1", True),
        (("127.0.0.1",), "::ffff:127.0.0.1", True),
        (("10.0.0.0/8",), "::1", False),
        (("10.0.0.0/8",), None, False),
        (("10.0.0.0/8",), "not-an-ip", False),
        ((), None, True),
    ],
)
def test_ip_allowlist_handles_networks_addresses_and_both_families(
    allow: tuple[str, ...], addr: str | None, ok: bool
) -> None:
    body = event_body()
    headers = hmac_request(body, ts=int(NOW))
    sec = security(ip_allowlist=allow)
    if ok:
        sec.verify("gen", method="POST", headers=headers, raw_body=body, remote_addr=addr)
    else:
        assert rejected(sec, "gen", headers, body, remote_addr=addr) == (403, "ip_not_allowed")


def test_mtls_is_required_when_configured() -> None:
    body = event_body()
    headers = hmac_request(body, ts=int(NOW))
    sec = security(require_mtls=True)
    assert rejected(sec, "gen", headers, body) == (403, "mtls_required")
    sec.verify("gen", method="POST", headers=headers, raw_body=body, client_cert_present=True)


def test_checks_run_cheapest_first() -> None:
    good = event_body()
    signed = hmac_request(good, ts=int(NOW))
    sec = security(ip_allowlist=("10.0.0.0/8",), max_payload_bytes=2000)
    inside = {"remote_addr": "10.0.0.1"}
    # IP beats everything, even an unknown provider and a wrong method.
    assert rejected(sec, "nope", {}, b"x", method="GET", remote_addr="8.8.8.8")[0] == 403
    # Unknown provider beats the method.
    assert rejected(sec, "nope", {}, b"x", method="GET", **inside)[0] == 404
    # Method beats media type.
    assert rejected(sec, "gen", {}, b"x", method="GET", **inside)[0] == 405
    # Media type beats size.
    assert rejected(sec, "gen", {"content-type": "text/plain"}, b"x" * 5000, **inside)[0] == 415
    # Size beats a missing signature.
    assert (
        rejected(sec, "gen", {"content-type": "application/json"}, b"x" * 5000, **inside)[0] == 413
    )
    # A missing signature beats a bad timestamp and bad JSON.
    headers = {"content-type": "application/json", "x-webhook-timestamp": "nan"}
    assert rejected(sec, "gen", headers, b"[", **inside) == (401, "missing_signature")
    # A bad timestamp beats a bad signature.
    headers = {**signed, "x-webhook-timestamp": "nan", "x-webhook-signature": "sha256=00"}
    assert rejected(sec, "gen", headers, good, **inside) == (400, "bad_timestamp")
    # A stale timestamp beats a bad signature.
    headers = {**signed, "x-webhook-timestamp": "1", "x-webhook-signature": "sha256=00"}
    assert rejected(sec, "gen", headers, good, **inside) == (401, "stale_timestamp")
    # A bad signature beats malformed JSON: no parsing for forgeries.
    assert rejected(sec, "gen", signed, b"{not json", **inside) == (401, "bad_signature")
    # Malformed JSON (signed) beats missing fields.
    bad = b"{not json"
    assert (
        rejected(sec, "gen", hmac_request(bad, ts=int(NOW)), bad, **inside)[1] == "malformed_json"
    )


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"[]", "not_an_object"),
        (b'"text"', "not_an_object"),
        (b"{", "malformed_json"),
        (b'{"a": NaN}', "malformed_json"),
        (b'{"a": Infinity}', "malformed_json"),
        (b'{"a": 1e999}', "malformed_json"),
        (b"\xff\xfe{}", "malformed_json"),
        (b'{"a":' * 40 + b"1" + b"}" * 40, "too_deep"),
        (b"[" * 100_000 + b"]" * 100_000, "too_deep"),
        (b'{"subject": "s"}', "missing_event_id"),
        (b'{"event_id": "e"}', "missing_field"),
        (b'{"event_id": "", "subject": "s"}', "bad_event_id"),
        (b'{"event_id": "has space", "subject": "s"}', "bad_event_id"),
        (b'{"event_id": true, "subject": "s"}', "bad_event_id"),
        (b'{"event_id": ["e"], "subject": "s"}', "bad_event_id"),
        (b'{"event_id": "' + b"e" * 257 + b'", "subject": "s"}', "bad_event_id"),
    ],
)
def test_signed_but_malformed_payloads_are_400(body: bytes, reason: str) -> None:
    sec = security()
    assert rejected(sec, "gen", hmac_request(body, ts=int(NOW)), body) == (400, reason)


def test_integer_event_ids_are_accepted_as_text() -> None:
    body = b'{"event_id": 42, "subject": "s"}'
    verified = security().verify(
        "gen", method="POST", headers=hmac_request(body, ts=int(NOW)), raw_body=body
    )
    assert verified.event_id == "42"


def test_credentials_are_not_kept_in_event_headers() -> None:
    body = event_body()
    headers = {**hmac_request(body, ts=int(NOW)), "Authorization": "Bearer x", "Cookie": "c=1"}
    verified = security().verify("gen", method="POST", headers=headers, raw_body=body)
    assert "authorization" not in verified.headers
    assert "cookie" not in verified.headers
    assert verified.headers["x-webhook-timestamp"] == str(int(NOW))


def test_slack_url_verification_returns_the_challenge_without_an_event_id() -> None:
    body = json.dumps({"token": "t", "challenge": "abc123", "type": "url_verification"}).encode()
    verified = security().verify(
        "slack", method="POST", headers=slack_request(body, ts=int(NOW)), raw_body=body
    )
    assert verified.challenge == "abc123"


def test_configuration_errors_are_reported_at_construction() -> None:
    policy = WebhookSecurityPolicy()
    with pytest.raises(ConfigurationError):
        WebhookSecurity(policy, {"gen": PROFILES["gen"]}, {}, store=MemoryStore())
    with pytest.raises(ConfigurationError):
        WebhookSecurity(policy, {"other": PROFILES["gen"]}, SECRETS, store=MemoryStore())
    with pytest.raises(ConfigurationError):
        WebhookSecurity(policy, {"sw": PROFILES["sw"]}, {"sw": "not base64 !"}, store=MemoryStore())
    with pytest.raises(ConfigurationError):
        WebhookSecurity(policy, {"gen": PROFILES["gen"]}, {"gen": []}, store=MemoryStore())
    with pytest.raises(ConfigurationError):
        WebhookSecurity("strict", PROFILES, SECRETS)  # type: ignore[arg-type]


def test_wrongly_typed_arguments_raise_usage_errors() -> None:
    sec = security()
    with pytest.raises(UsageError):
        sec.verify("gen", method="POST", headers={"a": 1}, raw_body=b"")  # type: ignore[dict-item]
    with pytest.raises(UsageError):
        sec.verify("gen", method="POST", headers={}, raw_body="text")  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_an_event_id_is_claimed_once_per_window(any_store: Store) -> None:
    sec = WebhookSecurity(
        WebhookSecurityPolicy(), PROFILES, SECRETS, store=any_store, clock=lambda: NOW
    )
    body = event_body()
    headers = hmac_request(body, ts=int(NOW))
    profile, payload, event_id, ts = await sec.avalidate_and_extract(
        "gen", method="POST", headers=headers, raw_body=body
    )
    assert (profile.name, payload["event_id"], event_id, ts) == ("gen", event_id, event_id, NOW)
    with pytest.raises(DuplicateEventError) as info:
        await sec.avalidate_and_extract("gen", method="POST", headers=headers, raw_body=body)
    assert isinstance(info.value, WebhookSecurityError)
    assert info.value.status == 200


@pytest.mark.anyio
async def test_releasing_a_claim_lets_the_retry_through_but_only_with_its_token(
    any_store: Store,
) -> None:
    sec = WebhookSecurity(
        WebhookSecurityPolicy(), PROFILES, SECRETS, store=any_store, clock=lambda: NOW
    )
    body = event_body()
    verified = sec.verify(
        "gen", method="POST", headers=hmac_request(body, ts=int(NOW)), raw_body=body
    )
    token = await sec.aclaim(verified)
    await sec.arelease(verified, "someone-else")
    with pytest.raises(DuplicateEventError):
        await sec.aclaim(verified)
    await sec.arelease(verified, token)
    assert await sec.aclaim(verified)
    # What is not a VerifiedWebhook or a token raised AttributeError.
    with pytest.raises(UsageError, match="VerifiedWebhook"):
        await sec.aclaim({"event_id": "e1"})  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="token"):
        await sec.arelease(verified, 7)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="VerifiedWebhook"):
        sec.claim_record("e1", token)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_claims_expire_after_the_replay_ttl() -> None:
    clock = [0.0]
    store = MemoryStore(clock=lambda: clock[0])
    sec = WebhookSecurity(
        WebhookSecurityPolicy(timestamp_skew_limit_sec=10, idempotency_ttl_sec=5),
        PROFILES,
        SECRETS,
        store=store,
        clock=lambda: NOW,
    )
    body = event_body()
    verified = sec.verify(
        "gen", method="POST", headers=hmac_request(body, ts=int(NOW)), raw_body=body
    )
    await sec.aclaim(verified)
    clock[0] = 19.0  # the TTL is 2 x skew = 20 s, not the 5 s idempotency TTL
    with pytest.raises(DuplicateEventError):
        await sec.aclaim(verified)
    clock[0] = 21.0
    assert await sec.aclaim(verified)


@pytest.mark.anyio
async def test_the_sync_form_refuses_to_run_on_the_event_loop() -> None:
    body = event_body()
    with pytest.raises(SyncInEventLoopError, match="avalidate_and_extract"):
        security().validate_and_extract(
            "gen", method="POST", raw_body=body, headers=hmac_request(body, ts=int(NOW))
        )


def test_the_sync_form_works_from_plain_code_and_threads() -> None:
    sec = security()
    body = event_body()
    headers = hmac_request(body, ts=int(NOW))
    assert (
        sec.validate_and_extract("gen", method="POST", headers=headers, raw_body=body)[0].name
        == "gen"
    )
    errors: list[BaseException] = []

    def again() -> None:
        try:
            sec.validate_and_extract("gen", method="POST", headers=headers, raw_body=body)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=again)
    thread.start()
    thread.join()
    assert len(errors) == 1
    assert isinstance(errors[0], DuplicateEventError)


def test_the_sync_form_uses_no_event_loop_and_the_stores_sync_claim(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Every check and the claim run on the calling thread: no loop is built or used.
    def no_loop(*args: object, **kwargs: object) -> None:
        raise AssertionError("validate_and_extract went through an event loop")

    monkeypatch.setattr("converge._sync.run", no_loop)
    for store in (MemoryStore(), SQLiteStore(tmp_path / "claims.sqlite3")):
        sec = security()
        sec.store = store
        body = event_body()
        headers = hmac_request(body, ts=int(NOW))
        profile, payload, event_id, _ = sec.validate_and_extract(
            "gen", method="POST", headers=headers, raw_body=body
        )
        assert (profile.name, payload["event_id"], event_id) == ("gen", event_id, event_id)
        assert store.list("") != []
        with pytest.raises(DuplicateEventError):
            sec.validate_and_extract("gen", method="POST", headers=headers, raw_body=body)
        store.close()


@pytest.mark.anyio
async def test_a_github_request_replayed_with_a_new_delivery_id_is_a_duplicate(
    any_store: Store,
) -> None:
    sec = WebhookSecurity(
        WebhookSecurityPolicy(), PROFILES, SECRETS, store=any_store, clock=lambda: NOW
    )
    body = json.dumps({"action": "opened", "number": 1}).encode()
    headers = github_request(body)
    assert await sec.avalidate_and_extract("github", method="POST", headers=headers, raw_body=body)
    for _ in range(3):  # the delivery and event headers are not signed: change them
        forged = {**headers, "x-github-delivery": f"d-{uuid.uuid4()}", "x-github-event": "x"}
        with pytest.raises(DuplicateEventError):
            await sec.avalidate_and_extract("github", method="POST", headers=forged, raw_body=body)


@pytest.mark.anyio
@pytest.mark.parametrize("json_first", [True, False], ids=["json_first", "form_first"])
@pytest.mark.parametrize("provider", ["slack", "ts"])
async def test_signed_bytes_resent_with_the_other_content_type_are_a_duplicate(
    provider: str, json_first: bool
) -> None:
    # Content-Type is not signed, and it decides whether the body is read as JSON (the
    # id in the body) or as a form (Slack's trigger_id, or the body's digest): the same
    # signed bytes must not be accepted once under each reading.
    body = json.dumps({"event_id": f"e-{uuid.uuid4()}", "subject": "s"}).encode()
    if provider == "slack":  # Slack's forms are taken as they are
        sec = security()
        headers = slack_request(body, ts=int(NOW))
    else:  # a generic profile takes forms when told to, and one without an id if lenient
        sec = security(
            allowed_content_types=("application/json", FORM_MEDIA_TYPE), strict_mode=False
        )
        headers = hmac_request(body, ts=int(NOW), timestamp_body=True)
    as_form = {**headers, "content-type": FORM_MEDIA_TYPE}
    first, again = (headers, as_form) if json_first else (as_form, headers)
    _, _, event_id, _ = await sec.avalidate_and_extract(
        provider, method="POST", headers=first, raw_body=body
    )
    assert event_id.startswith("e-") is json_first
    with pytest.raises(DuplicateEventError):
        await sec.avalidate_and_extract(provider, method="POST", headers=again, raw_body=body)


@pytest.mark.anyio
async def test_an_hmac_raw_body_claim_covers_the_signed_bytes_and_releases_whole() -> None:
    sec = security()
    body = event_body()
    first = sec.verify("gen", method="POST", headers=hmac_request(body, ts=int(NOW)), raw_body=body)
    keys = sec.claim_keys(first)
    assert len(set(keys)) == len(keys) == 2
    assert sec.claim_ttl_sec == WebhookSecurityPolicy().replay_ttl_sec
    token = await sec.aclaim(first)
    assert None not in [await sec.store.aget(k) for k in keys]
    await sec.arelease(first, token)
    assert [await sec.store.aget(k) for k in keys] == [None, None]
    # Signed timestamps and header ids covered by the signature need only the id key.
    ts_body = event_body()
    signed = sec.verify(
        "ts",
        method="POST",
        headers=hmac_request(ts_body, ts=int(NOW), timestamp_body=True),
        raw_body=ts_body,
    )
    assert len(sec.claim_keys(signed)) == 1
    sw = sec.verify("sw", method="POST", headers=sw_request(ts_body, ts=int(NOW)), raw_body=ts_body)
    assert len(sec.claim_keys(sw)) == 1


@pytest.mark.parametrize("event_id", ["evt_1\n", "evt 1", "evt_1\t", "é", "x" * 257])
def test_a_signed_event_id_must_match_in_full(event_id: str) -> None:
    body = json.dumps({"event_id": event_id, "subject": "s"}).encode()
    headers = hmac_request(body, ts=int(NOW))
    assert rejected(security(), "gen", headers, body) == (400, "bad_event_id")


def test_a_lone_surrogate_escape_becomes_u_fffd_and_the_bytes_stay_verified() -> None:
    body = b'{"event_id": "e-1", "subject": "s\\ud800", "n": {"\\udc00k": ["\\ud83d\\ude00"]}}'
    verified = security().verify(
        "gen", method="POST", headers=hmac_request(body, ts=int(NOW)), raw_body=body
    )
    assert verified.payload == {"event_id": "e-1", "subject": "s\ufffd", "n": {"\ufffdk": ["😀"]}}
    assert verified.body == body
    json.dumps(verified.payload, ensure_ascii=False).encode()  # has a UTF-8 form


def test_parse_json_object_can_refuse_lone_surrogates() -> None:
    assert parse_json_object(b'{"a": "\\\\ud800"}', lone_surrogates="reject") == {"a": "\\ud800"}
    with pytest.raises(WebhookSecurityError) as info:
        parse_json_object(b'{"a": "\\ud800"}', lone_surrogates="reject")
    assert (info.value.status, info.value.reason) == (400, "lone_surrogate")
    with pytest.raises(UsageError):
        parse_json_object(b"{}", lone_surrogates="keep")
