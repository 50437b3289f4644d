"""Signature schemes follow each sender's documented format, byte for byte."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import urllib.parse
from datetime import UTC, datetime

import pytest
import standardwebhooks
from webhook_helpers import SW_SECRET

from converge.errors import ConfigurationError, UsageError, WebhookSecurityError
from converge.extensions.connectors import (
    ProviderProfile,
    WebhookSecurity,
    WebhookSecurityPolicy,
    sign_webhook,
)
from converge.extensions.connectors.inbound.schemes import (
    decode_secret,
    hmac_state,
    parse_signed_parts,
    parse_timestamp,
    signature_matches,
)

# Published test vectors.
SLACK_DOC_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
SLACK_DOC_TS = "1531420618"
SLACK_DOC_BODY = (
    b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&"
    b"channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&"
    b"command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2F"
    b"commands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&"
    b"trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c"
)
SLACK_DOC_SIG = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"
GITHUB_DOC_SECRET = "It's a Secret to Everybody"
GITHUB_DOC_SIG = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"


def profile(scheme: str, **kw: object) -> ProviderProfile:
    return ProviderProfile(name="p", secret_ref="s", scheme=scheme, **kw)  # type: ignore[arg-type]


def verifies(p: ProviderProfile, secret: str, headers: dict[str, str], body: bytes) -> bool:
    parts = parse_signed_parts(p, {k.lower(): v for k, v in headers.items()})
    key = decode_secret(p.scheme, secret)
    return signature_matches([hmac_state(key, p.signature_algorithm)], parts, body)


def test_slack_documented_example_verifies() -> None:
    headers = {"X-Slack-Signature": SLACK_DOC_SIG, "X-Slack-Request-Timestamp": SLACK_DOC_TS}
    assert verifies(profile("slack"), SLACK_DOC_SECRET, headers, SLACK_DOC_BODY)
    assert not verifies(profile("slack"), SLACK_DOC_SECRET, headers, SLACK_DOC_BODY + b" ")


def test_slack_timestamp_is_part_of_the_signed_bytes() -> None:
    headers = {"X-Slack-Signature": SLACK_DOC_SIG, "X-Slack-Request-Timestamp": "1531420619"}
    assert not verifies(profile("slack"), SLACK_DOC_SECRET, headers, SLACK_DOC_BODY)


def test_github_documented_example_verifies() -> None:
    headers = {"X-Hub-Signature-256": GITHUB_DOC_SIG, "X-GitHub-Delivery": "d1"}
    assert verifies(profile("github"), GITHUB_DOC_SECRET, headers, b"Hello, World!")
    assert not verifies(profile("github"), GITHUB_DOC_SECRET, headers, b"Hello, World?")


def test_github_event_id_comes_from_the_delivery_header() -> None:
    headers = {"x-hub-signature-256": GITHUB_DOC_SIG, "x-github-delivery": "72d3162e-cc78"}
    assert parse_signed_parts(profile("github"), headers).event_id == "72d3162e-cc78"


def test_stripe_signs_timestamp_dot_body_and_accepts_any_v1() -> None:
    secret, body, t = "whsec_abc", b'{"id":"evt_1"}', 1700000000
    good = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    header = f"t={t},v1={'0' * 64},v1={good},v0={'1' * 64}"
    assert verifies(profile("stripe"), secret, {"Stripe-Signature": header}, body)
    assert not verifies(
        profile("stripe"), secret, {"Stripe-Signature": f"t={t + 1},v1={good}"}, body
    )
    assert not verifies(profile("stripe"), secret, {"Stripe-Signature": f"t={t},v0={good}"}, body)


def test_standard_webhooks_reference_signatures_verify() -> None:
    body = b'{"type":"x"}'
    when = datetime.fromtimestamp(1700000000, tz=UTC)
    sig = standardwebhooks.Webhook(SW_SECRET).sign("msg_1", when, body.decode())
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": "1700000000",
        "webhook-signature": f"v1a,AAAA v1,{'A' * 44} {sig}",
    }
    assert verifies(profile("standard-webhooks"), SW_SECRET, headers, body)
    headers["webhook-id"] = "msg_2"
    assert not verifies(profile("standard-webhooks"), SW_SECRET, headers, body)


def test_svix_alias_reads_svix_headers_and_standard_ones() -> None:
    body = b"{}"
    signed = sign_webhook("standard-webhooks", SW_SECRET, body, timestamp=1700000000)
    svix = {k.replace("webhook-", "svix-"): v for k, v in signed.items()}
    assert verifies(profile("svix"), SW_SECRET, svix, body)
    assert verifies(profile("svix"), SW_SECRET, signed, body)
    with pytest.raises(WebhookSecurityError) as info:
        verifies(profile("standard-webhooks"), SW_SECRET, svix, body)
    assert info.value.status == 401


def test_sign_webhook_output_verifies_with_the_reference_library() -> None:
    body = b'{"hello":"world"}'
    headers = sign_webhook("standard-webhooks", SW_SECRET, body, event_id="msg_x")
    assert standardwebhooks.Webhook(SW_SECRET).verify(body, headers) == {"hello": "world"}


def test_standard_webhooks_secret_without_prefix_is_the_same_key() -> None:
    bare = SW_SECRET.removeprefix("whsec_")
    assert decode_secret("standard-webhooks", bare) == decode_secret("svix", SW_SECRET)


@pytest.mark.parametrize(
    "scheme", ["hmac", "standard-webhooks", "svix", "stripe", "github", "slack"]
)
def test_sign_webhook_round_trips_through_verification(scheme: str) -> None:
    secret = SW_SECRET if scheme in ("standard-webhooks", "svix") else "s3cret"
    body = b'{"event_id":"e","id":"evt"}'
    headers = sign_webhook(scheme, secret, body, timestamp=1700000000)
    assert verifies(profile(scheme), secret, headers, body)
    assert not verifies(
        profile(scheme),
        secret + "x"
        if scheme not in ("standard-webhooks", "svix")
        else "whsec_" + base64.b64encode(b"other").decode(),
        headers,
        body,
    )


@pytest.mark.parametrize("algorithm", ["sha256", "sha384", "sha512"])
def test_generic_scheme_uses_the_profile_algorithm_and_prefix(algorithm: str) -> None:
    p = profile("hmac", signature_algorithm=algorithm, canonicalization="timestamp_body")
    headers = sign_webhook(p, "k", b"{}", timestamp=5)
    assert headers["X-Webhook-Signature"].startswith(f"{algorithm}=")
    assert verifies(p, "k", headers, b"{}")
    headers["X-Webhook-Timestamp"] = "6"  # the timestamp is signed with timestamp_body
    assert not verifies(p, "k", headers, b"{}")


def test_generic_raw_body_leaves_the_timestamp_unsigned() -> None:
    p = profile("hmac")
    headers = sign_webhook(p, "k", b"{}", timestamp=5)
    headers["X-Webhook-Timestamp"] = "6"
    assert verifies(p, "k", headers, b"{}")


def test_generic_scheme_accepts_bare_hex_and_several_signatures() -> None:
    p = profile("hmac")
    digest = hmac.new(b"k", b"{}", hashlib.sha256).hexdigest()
    assert verifies(p, "k", {"X-Webhook-Signature": digest, "X-Webhook-Timestamp": "1"}, b"{}")
    both = f"sha256={'f' * 64}, sha256={digest.upper()}"
    assert verifies(p, "k", {"X-Webhook-Signature": both, "X-Webhook-Timestamp": "1"}, b"{}")


def test_malformed_signature_values_never_match() -> None:
    p = profile("hmac")
    for value in ["", "sha256=", "sha256=zz", "sha256=" + "0" * 63, "v1,abc", "\x00" * 64]:
        assert not verifies(p, "k", {"X-Webhook-Signature": value, "X-Webhook-Timestamp": "1"}, b"")


def test_missing_signature_header_is_401_and_other_headers_400() -> None:
    with pytest.raises(WebhookSecurityError) as info:
        parse_signed_parts(profile("stripe"), {})
    assert (info.value.status, info.value.reason) == (401, "missing_signature")
    with pytest.raises(WebhookSecurityError) as info:
        parse_signed_parts(profile("slack"), {"x-slack-signature": "v0=00"})
    assert (info.value.status, info.value.reason) == (400, "missing_header")
    with pytest.raises(WebhookSecurityError) as info:
        parse_signed_parts(profile("github"), {"x-hub-signature-256": "sha256=00"})
    assert info.value.reason == "missing_header"
    with pytest.raises(WebhookSecurityError) as info:
        parse_signed_parts(profile("stripe"), {"stripe-signature": "v1=00"})
    assert info.value.reason == "bad_timestamp"


@pytest.mark.parametrize(
    "text",
    ["nan", "NaN", "inf", "-1", "+5", "1e9", " 5", "5 ", "0x10", "1_000", "", "1.", "١٢", "5\n"],
)
def test_timestamps_other_than_plain_digits_are_rejected(text: str) -> None:
    with pytest.raises(WebhookSecurityError) as info:
        parse_timestamp(text)
    assert (info.value.status, info.value.reason) == (400, "bad_timestamp")


def test_plain_and_fractional_timestamps_parse() -> None:
    assert parse_timestamp("1700000000") == 1700000000.0
    assert parse_timestamp("1700000000.25") == 1700000000.25


def test_bad_secrets_and_arguments_are_refused() -> None:
    with pytest.raises(ConfigurationError):
        decode_secret("standard-webhooks", "whsec_not base64!")
    with pytest.raises(ConfigurationError):
        decode_secret("stripe", "")
    with pytest.raises(UsageError):
        sign_webhook("nope", "s", b"{}")
    with pytest.raises(UsageError):
        sign_webhook("github", "s", "text")  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        sign_webhook("github", "s", b"{}", timestamp=-1)
    for event_id in ("id\udcff", "", "has space", "x" * 257, 5):  # the first: UnicodeEncodeError
        with pytest.raises(UsageError, match="event_id"):
            sign_webhook("standard-webhooks", "whsec_" + "QUJD" * 8, b"{}", event_id=event_id)  # type: ignore[arg-type]


FORM = "application/x-www-form-urlencoded"


def form_security(clock: float, **policy: object) -> WebhookSecurity:
    return WebhookSecurity(
        WebhookSecurityPolicy(**policy),  # type: ignore[arg-type]
        {
            "slack": profile_named("slack", "slack"),
            "github": profile_named("github", "github"),
            "stripe": profile_named("stripe", "stripe"),
            "gen": profile_named("gen", "hmac"),
        },
        {"slack": SLACK_DOC_SECRET, "github": GITHUB_DOC_SECRET, "stripe": "s", "gen": "g"},
        clock=lambda: clock,
    )


def profile_named(name: str, scheme: str) -> ProviderProfile:
    return ProviderProfile(name=name, secret_ref=name, scheme=scheme)


def test_a_slack_slash_command_form_verifies_over_the_raw_body_and_decodes() -> None:
    sec = form_security(float(SLACK_DOC_TS))
    headers = {
        "content-type": FORM,
        "x-slack-signature": SLACK_DOC_SIG,
        "x-slack-request-timestamp": SLACK_DOC_TS,
    }
    verified = sec.verify("slack", method="POST", headers=headers, raw_body=SLACK_DOC_BODY)
    assert verified.payload["command"] == "/webhook-collect"
    assert verified.payload["text"] == ""
    assert verified.payload["response_url"].startswith("https://hooks.slack.com/commands/")
    assert verified.event_id == "398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c"
    assert verified.body == SLACK_DOC_BODY
    with pytest.raises(WebhookSecurityError) as info:
        sec.verify("slack", method="POST", headers=headers, raw_body=SLACK_DOC_BODY + b"&x=1")
    assert info.value.reason == "bad_signature"


def slack_signed(body: bytes, ts: int) -> dict[str, str]:
    sig = hmac.new(SLACK_DOC_SECRET.encode(), f"v0:{ts}:".encode() + body, hashlib.sha256)
    return {
        "content-type": FORM,
        "x-slack-signature": "v0=" + sig.hexdigest(),
        "x-slack-request-timestamp": str(ts),
    }


def test_a_slack_interactive_payload_is_the_json_in_the_payload_field() -> None:
    ts = 1_700_000_000
    sec = form_security(float(ts))
    action = {"type": "block_actions", "trigger_id": "13345224609.738474920.8088930838d88f00"}
    body = urllib.parse.urlencode({"payload": json.dumps(action)}).encode()
    verified = sec.verify("slack", method="POST", headers=slack_signed(body, ts), raw_body=body)
    assert verified.payload == action
    assert verified.event_id == action["trigger_id"]
    # Without a trigger_id (e.g. block_suggestion) the id is the digest of the body.
    body = urllib.parse.urlencode({"payload": '{"type": "block_suggestion"}'}).encode()
    verified = sec.verify("slack", method="POST", headers=slack_signed(body, ts), raw_body=body)
    assert verified.event_id == "sha256:" + hashlib.sha256(body).hexdigest()
    for bad, reason in ((b"payload=%7B", "malformed_json"), (b"payload=%5B1%5D", "not_an_object")):
        with pytest.raises(WebhookSecurityError) as info:
            sec.verify("slack", method="POST", headers=slack_signed(bad, ts), raw_body=bad)
        assert info.value.reason == reason


def test_github_form_content_type_is_verified_and_the_payload_field_decoded() -> None:
    sec = form_security(1_700_000_000.0)
    event = {"action": "opened", "number": 7}
    body = urllib.parse.urlencode({"payload": json.dumps(event)}).encode()
    sig = hmac.new(GITHUB_DOC_SECRET.encode(), body, hashlib.sha256).hexdigest()
    headers = {
        "content-type": FORM,
        "x-hub-signature-256": f"sha256={sig}",
        "x-github-delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
        "x-github-event": "pull_request",
    }
    verified = sec.verify("github", method="POST", headers=headers, raw_body=body)
    assert (verified.payload, verified.event_id) == (event, headers["x-github-delivery"])
    assert verified.body_digest == hashlib.sha256(body).hexdigest()


def test_forms_are_accepted_only_from_form_senders_unless_configured() -> None:
    headers = {"content-type": FORM}
    with pytest.raises(WebhookSecurityError) as info:
        form_security(0.0).check_request("stripe", method="POST", headers=headers)
    assert info.value.status == 415
    sec = form_security(1_700_000_000.0, allowed_content_types=("application/json", FORM))
    body = b"event_id=e-1&tag=a&tag=b&note=caf%C3%A9"
    sig = hmac.new(b"g", body, hashlib.sha256).hexdigest()
    verified = sec.verify(
        "gen",
        method="POST",
        headers={
            "content-type": f"{FORM}; charset=utf-8",
            "x-webhook-signature": sig,
            "x-webhook-timestamp": "1700000000",
        },
        raw_body=body,
    )
    assert verified.payload == {"event_id": "e-1", "tag": ["a", "b"], "note": "café"}
    assert verified.event_id == "e-1"


def test_a_keyed_hmac_state_is_reused_unchanged_across_requests() -> None:
    # signature_matches copies each state: a state updated in place would make every
    # later request hash the earlier bodies too and fail.
    p = profile("github")
    keyed = [hmac_state(GITHUB_DOC_SECRET.encode()), hmac_state(b"another secret")]
    headers = {"x-hub-signature-256": GITHUB_DOC_SIG, "x-github-delivery": "d1"}
    parts = parse_signed_parts(p, headers)
    for _ in range(3):
        assert signature_matches(keyed, parts, b"Hello, World!")
        assert not signature_matches(keyed, parts, b"Hello, World?")
