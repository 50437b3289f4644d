"""Property-based fuzzing: no request is ever answered 5xx, and no forgery is ever accepted."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import anyio.from_thread
import httpx
import pytest
import standardwebhooks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from webhook_helpers import (
    HMAC_SECRET,
    STRIPE_SECRET,
    SW_SECRET,
    ServerThread,
    hmac_request,
    stripe_request,
    sw_request,
)

from converge.extensions.connectors import (
    GatewayApp,
    ProviderProfile,
    WebhookConnector,
    WebhookGateway,
    WebhookSecurityPolicy,
)
from converge.extensions.storage import MemoryStore

ALLOWED = {200, 202, 400, 401, 403, 404, 405, 413, 415}
SIGNATURE_HEADERS = [
    "x-webhook-signature",
    "x-webhook-timestamp",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "stripe-signature",
    "content-type",
    "content-length",
]


def make_app() -> GatewayApp:
    connector = WebhookConnector(
        provider_profiles={
            "gen": ProviderProfile(
                "gen",
                "gen",
                canonicalization="timestamp_body",
                required_payload_fields=("subject",),
            ),
            "sw": ProviderProfile("sw", "sw", scheme="standard-webhooks"),
            "stripe": ProviderProfile("stripe", "stripe", scheme="stripe"),
        },
        secrets={"gen": HMAC_SECRET, "sw": SW_SECRET, "stripe": STRIPE_SECRET},
        security_policy=WebhookSecurityPolicy(max_payload_bytes=4096),
        store=MemoryStore(),
        inbound_queue_size=100_000,
    )
    return WebhookGateway(connector).asgi_app(run_dispatcher=False)


def genuinely_signed(provider: str, headers: dict[str, str], body: bytes) -> bool:
    """Independent re-verification with reference code (not the gateway's)."""
    h = {k.lower(): v for k, v in headers.items()}
    if provider == "sw":
        try:
            standardwebhooks.Webhook(SW_SECRET).verify(body, h)
        except Exception:
            return False
        return True
    if provider == "stripe":
        items = [p.split("=", 1) for p in h.get("stripe-signature", "").split(",") if "=" in p]
        t = next((v for k, v in items if k.strip() == "t"), "")
        want = hmac.new(STRIPE_SECRET.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
        return any(k.strip() == "v1" and hmac.compare_digest(v.strip(), want) for k, v in items)
    t = h.get("x-webhook-timestamp", "")
    want = hmac.new(HMAC_SECRET.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return any(
        hmac.compare_digest(s.strip().removeprefix("sha256="), want)
        for s in h.get("x-webhook-signature", "").split(",")
    )


async def call(
    app: GatewayApp, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes
) -> int:
    sent: list[dict[str, Any]] = []
    chunks = [body[i : i + 1000] for i in range(0, len(body), 1000)] or [b""]

    async def receive() -> dict[str, Any]:
        chunk = chunks.pop(0) if chunks else b""
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": headers,
        "client": ("127.0.0.1", 4000),
        "root_path": "",
    }
    await app(scope, receive, send)
    assert sent[0]["type"] == "http.response.start"
    json.loads(sent[1]["body"])  # always a JSON body
    return int(sent[0]["status"])


@pytest.fixture(scope="module", params=["asyncio", "trio"])
def portal(request: pytest.FixtureRequest) -> Iterator[anyio.from_thread.BlockingPortal]:
    with anyio.from_thread.start_blocking_portal(request.param) as found:
        yield found


def signed(provider: str, body: bytes) -> dict[str, str]:
    if provider == "sw":
        return sw_request(body)
    if provider == "stripe":
        return stripe_request(body)
    return hmac_request(body, timestamp_body=True)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
bodies = st.one_of(
    st.binary(max_size=600),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.builds(
        lambda e, s: json.dumps({"event_id": e, "subject": s, "id": e}).encode(),
        st.text(max_size=30),
        st.text(max_size=10),
    ),
    st.just(b"[" * 3000 + b"]" * 3000),
    st.binary(min_size=4097, max_size=6000),
)
header_values = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), max_size=80),
    st.sampled_from(
        [
            "application/json",
            "v1,AAAA",
            "t=1,v1=00",
            "sha256=00",
            "nan",
            "inf",
            "-1",
            "99999999999999999999",
            str(int(time.time())),
            "1e9",
            "",
        ]
    ),
)
mutations = st.sampled_from(
    ["none", "flip_body", "drop_header", "change_header", "append_body", "shift_time"]
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    provider=st.sampled_from(["gen", "sw", "stripe", "nope"]),
    method=st.sampled_from(["POST", "POST", "POST", "GET", "PUT"]),
    body=bodies,
    headers=st.dictionaries(
        st.sampled_from(SIGNATURE_HEADERS) | st.text(min_size=1, max_size=12),
        header_values,
        max_size=8,
    ),
)
def test_random_requests_never_5xx_and_are_never_accepted(
    portal: anyio.from_thread.BlockingPortal,
    provider: str,
    method: str,
    body: bytes,
    headers: dict[str, str],
) -> None:
    app = APP
    raw = [
        (k.encode("latin-1", "replace"), v.encode("latin-1", "replace")) for k, v in headers.items()
    ]
    status = portal.call(call, app, method, f"/webhook/{provider}", raw, body)
    assert status in ALLOWED
    if status == 202:
        assert genuinely_signed(provider, headers, body)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    provider=st.sampled_from(["gen", "sw", "stripe"]),
    event=st.text(
        alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40
    ),
    mutation=mutations,
    index=st.integers(min_value=0, max_value=10_000),
    value=header_values,
)
def test_mutated_signed_requests_are_accepted_only_if_still_genuine(
    portal: anyio.from_thread.BlockingPortal,
    provider: str,
    event: str,
    mutation: str,
    index: int,
    value: str,
) -> None:
    event = f"{event}-{uuid.uuid4().hex}"  # the app is shared: ids must not repeat
    body = json.dumps({"event_id": event, "id": event, "subject": "s"}).encode()
    headers = signed(provider, body)
    names = sorted(headers)
    if mutation == "flip_body":
        i = index % len(body)
        body = body[:i] + bytes([body[i] ^ 0x01]) + body[i + 1 :]
    elif mutation == "append_body":
        body += b" "
    elif mutation == "drop_header":
        del headers[names[index % len(names)]]
    elif mutation == "change_header":
        headers[names[index % len(names)]] = value
    elif mutation == "shift_time":
        for name in ("x-webhook-timestamp", "webhook-timestamp"):
            if name in headers:
                headers[name] = str(int(headers[name]) + 1 + index)
    raw = [(k.encode(), v.encode("latin-1", "replace")) for k, v in headers.items()]
    status = portal.call(call, APP, "POST", f"/webhook/{provider}", raw, body)
    assert status in ALLOWED
    if status == 202:
        assert genuinely_signed(provider, headers, body)
    if mutation == "none":
        assert status == 202


APP = make_app()


@pytest.fixture(scope="module")
def live_url() -> Iterator[str]:
    with ServerThread(make_app()) as server:
        yield server.url


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    provider=st.sampled_from(["gen", "sw", "stripe", "nope"]),
    body=bodies,
    headers=st.dictionaries(
        st.sampled_from(SIGNATURE_HEADERS),
        header_values.filter(lambda v: v == v.strip() and all(32 <= ord(c) < 127 for c in v)),
        max_size=6,
    ),
)
def test_random_requests_over_a_real_socket_never_5xx(
    live_url: str, provider: str, body: bytes, headers: dict[str, str]
) -> None:
    headers.pop("content-length", None)
    response = httpx.post(
        f"{live_url}/webhook/{provider}", content=body, headers=headers, timeout=10
    )
    assert response.status_code in ALLOWED, response.text
    response.json()
    if response.status_code == 202:
        assert genuinely_signed(provider, headers, body)
