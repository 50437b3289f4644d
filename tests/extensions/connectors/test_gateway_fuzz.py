"""Property-based fuzzing of the whole edge: no client request is ever answered 5xx
(503 only for an unavailable store, with ``Retry-After``), no forgery or replay is ever
accepted, and whatever is accepted can be delivered.

The apps are realistic: the standalone gateway's configuration (events recorded and
acknowledged, GitHub forwarded durably into the outbox, ``/outbound`` enabled), so
nothing fills up and a 503 from a working store is a bug. Requests go to
``/webhook/*``, ``/outbound``, the probes and unknown paths.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anyio.from_thread
import h11
import httpx
import pytest
import standardwebhooks
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from webhook_helpers import (
    GITHUB_SECRET,
    HMAC_SECRET,
    SLACK_SECRET,
    STRIPE_SECRET,
    SW_SECRET,
    TOKEN,
    ServerThread,
    github_request,
    hmac_request,
    slack_request,
    stripe_request,
    sw_request,
)

from converge.core.store import Store
from converge.errors import (
    ClosedError,
    StoreCorruptedError,
    StoreError,
    StoreLockTimeoutError,
    StoreUnavailableError,
)
from converge.extensions.connectors import (
    GatewayApp,
    OutboundTarget,
    ProviderProfile,
    WebhookConnector,
    WebhookGateway,
    WebhookSecurityPolicy,
)
from converge.extensions.storage import MemoryStore

# Every answer a client may get from a working gateway (408: a body too slow, 409: an
# idempotency key reused for another action). No 5xx at all.
ALLOWED = {200, 202, 400, 401, 403, 404, 405, 408, 409, 413, 415}
PROVIDERS = ["gen", "raw", "sw", "stripe", "github", "slack"]
FORM = "application/x-www-form-urlencoded"
TARGET_URL = "http://127.0.0.1:9/app"  # never contacted: no dispatcher runs here
SIGNATURE_HEADERS = [
    "x-webhook-signature",
    "x-webhook-timestamp",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "stripe-signature",
    "x-hub-signature-256",
    "x-github-delivery",
    "x-slack-signature",
    "x-slack-request-timestamp",
    "content-type",
    "content-length",
    "x-forwarded-for",
    "x-ssl-client-verify",
]


def make_gateway(store: Store | None = None, **policy: Any) -> WebhookGateway:
    """The standalone gateway's shape: events recorded, GitHub forwarded, /outbound on."""
    connector = WebhookConnector(
        provider_profiles={
            "gen": ProviderProfile(
                "gen",
                "gen",
                canonicalization="timestamp_body",
                required_payload_fields=("subject",),
            ),
            "raw": ProviderProfile("raw", "gen"),
            "sw": ProviderProfile("sw", "sw", scheme="standard-webhooks"),
            "stripe": ProviderProfile("stripe", "stripe", scheme="stripe"),
            "github": ProviderProfile("github", "github", scheme="github"),
            "slack": ProviderProfile("slack", "slack", scheme="slack"),
        },
        secrets={
            "gen": HMAC_SECRET,
            "sw": SW_SECRET,
            "stripe": STRIPE_SECRET,
            "github": GITHUB_SECRET,
            "slack": SLACK_SECRET,
        },
        security_policy=WebhookSecurityPolicy(max_payload_bytes=4096, **policy),
        store=store or MemoryStore(),
        targets=[OutboundTarget("app", TARGET_URL)],
        inbound_routes={"github": "app"},
        acknowledge_on_accept=True,
    )
    return WebhookGateway(connector, outbound_token=TOKEN, require_dispatcher=False)


def app_of(gateway: WebhookGateway, **kwargs: Any) -> GatewayApp:
    return gateway.asgi_app(run_dispatcher=False, **kwargs)


def genuinely_signed(provider: str, headers: dict[str, str], body: bytes) -> bool:
    """Independent re-verification with reference code (not the gateway's)."""
    h = {k.lower(): v for k, v in headers.items()}

    def mac(secret: str, data: bytes) -> str:
        return hmac.new(secret.encode(), data, hashlib.sha256).hexdigest()

    def any_equal(candidates: list[str], want: str) -> bool:
        return any(hmac.compare_digest(c.strip(), want) for c in candidates)

    if provider == "sw":
        try:
            standardwebhooks.Webhook(SW_SECRET).verify(body, h)
        except Exception:
            return False
        return True
    if provider == "stripe":
        items = [p.split("=", 1) for p in h.get("stripe-signature", "").split(",") if "=" in p]
        t = next((v for k, v in items if k.strip() == "t"), "")
        want = mac(STRIPE_SECRET, f"{t}.".encode("latin-1") + body)
        return any_equal([v for k, v in items if k.strip() == "v1"], want)
    if provider == "github":
        sigs = [
            s.strip().removeprefix("sha256=") for s in h.get("x-hub-signature-256", "").split(",")
        ]
        return any_equal(sigs, mac(GITHUB_SECRET, body))
    if provider == "slack":
        t = h.get("x-slack-request-timestamp", "")
        want = mac(SLACK_SECRET, f"v0:{t}:".encode("latin-1") + body)
        sigs = [s.strip().removeprefix("v0=") for s in h.get("x-slack-signature", "").split(",")]
        return any_equal(sigs, want)
    prefix = b""
    if provider == "gen":
        prefix = h.get("x-webhook-timestamp", "").encode("latin-1") + b"."
    sigs = [s.strip().removeprefix("sha256=") for s in h.get("x-webhook-signature", "").split(",")]
    return any_equal(sigs, mac(HMAC_SECRET, prefix + body))


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: Any


async def call(
    app: GatewayApp,
    method: str,
    path: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    client: tuple[str, int] = ("127.0.0.1", 4000),
) -> Answer:
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
        "client": client,
        "root_path": "",
    }
    await app(scope, receive, send)
    assert sent[0]["type"] == "http.response.start"
    out = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    data = sent[1]["body"]
    parsed = data.decode() if path == "/metrics" else json.loads(data)  # JSON, always
    return Answer(int(sent[0]["status"]), out, parsed)


def raw_headers(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [
        (k.lower().encode("latin-1", "replace"), v.encode("latin-1", "replace"))
        for k, v in headers.items()
    ]


@dataclass
class Setup:
    portal: anyio.from_thread.BlockingPortal
    gateway: WebhookGateway
    app: GatewayApp

    def send(
        self, method: str, path: str, headers: dict[str, str], body: bytes, **kw: Any
    ) -> Answer:
        return self.portal.call(
            lambda: call(self.app, method, path, raw_headers(headers), body, **kw)
        )


@pytest.fixture(scope="module", params=["asyncio", "trio"])
def portal(request: pytest.FixtureRequest) -> Iterator[anyio.from_thread.BlockingPortal]:
    with anyio.from_thread.start_blocking_portal(request.param) as found:
        yield found


@pytest.fixture(scope="module")
def edge(portal: anyio.from_thread.BlockingPortal) -> Setup:
    """One realistic gateway per backend, shared by the examples (ids never repeat)."""
    gateway = make_gateway()
    return Setup(portal, gateway, app_of(gateway))


def sign(
    provider: str, body: bytes, *, delivery: str | None = None, form: bool = False
) -> dict[str, str]:
    if provider == "sw":
        headers = sw_request(body, msg_id=delivery)
    elif provider == "stripe":
        headers = stripe_request(body)
    elif provider == "github":
        headers = github_request(body, delivery=delivery)
    elif provider == "slack":
        headers = slack_request(body)
    else:
        headers = hmac_request(body, timestamp_body=provider == "gen")
    if form:
        headers["content-type"] = FORM
    return headers


# -- strategies ------------------------------------------------------------------------

texts = st.text(max_size=20)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
# Lone surrogates (JSON "\ud800"), which no UTF-8 text can hold, in otherwise valid JSON.
surrogate_texts = st.builds(
    lambda a, s, b: a + s + b,
    st.text(max_size=5),
    st.sampled_from(["\ud800", "\udfff", "\udc00x", "\ud83d"]),
    st.text(max_size=5),
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
    st.builds(lambda v: b"payload=" + urllib.parse.quote(json.dumps(v)).encode(), json_values),
    st.dictionaries(texts, texts, max_size=5).map(lambda d: urllib.parse.urlencode(d).encode()),
)
header_values = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), max_size=80),
    st.sampled_from(
        [
            "application/json",
            FORM,
            "v1,AAAA",
            "t=1,v1=00",
            "sha256=00",
            "v0=00",
            "SUCCESS",
            "10.0.0.1, 192.0.2.1",
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
# Event ids: valid ones of every length up to the limit, too long ones (forwarded ids
# once made 500s) and ones with a final newline (a "$" pattern once let them through).
event_ids = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40),
    st.integers(min_value=200, max_value=400).map(lambda n: "e" * n),
    st.sampled_from(["evt_1\n", "evt 1", "évt", "evt\t"]),
)


def valid_event_id(event_id: str) -> bool:
    return 1 <= len(event_id) <= 256 and all(33 <= ord(c) <= 126 for c in event_id)


# -- inbound ---------------------------------------------------------------------------

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@SETTINGS
@given(
    provider=st.sampled_from([*PROVIDERS, "nope"]),
    method=st.sampled_from(["POST", "POST", "POST", "GET", "PUT"]),
    body=bodies,
    headers=st.dictionaries(
        st.sampled_from(SIGNATURE_HEADERS) | st.text(min_size=1, max_size=12),
        header_values,
        max_size=8,
    ),
)
def test_random_requests_never_5xx_and_are_never_accepted(
    edge: Setup, provider: str, method: str, body: bytes, headers: dict[str, str]
) -> None:
    answer = edge.send(method, f"/webhook/{provider}", headers, body)
    assert answer.status in ALLOWED, answer.body
    if answer.status == 202:
        assert genuinely_signed(provider, headers, body)


@SETTINGS
@given(
    provider=st.sampled_from(PROVIDERS),
    event_id=event_ids,
    extra=st.one_of(texts, surrogate_texts),
    form=st.booleans(),
    mutation=st.sampled_from(
        ["none", "flip_body", "drop_header", "change_header", "append_body", "shift_time", "new_id"]
    ),
    index=st.integers(min_value=0, max_value=10_000),
    value=header_values,
)
def test_signed_events_are_accepted_once_and_no_mutation_or_replay_is(
    edge: Setup,
    provider: str,
    event_id: str,
    extra: str,
    form: bool,
    mutation: str,
    index: int,
    value: str,
) -> None:
    unique = uuid.uuid4().hex  # the app is shared: events must not repeat
    if valid_event_id(event_id):
        event_id = event_id[: 256 - len(unique)] + unique
    else:
        event_id = unique + event_id
    form = form and provider in ("github", "slack")
    event = {"event_id": event_id, "id": event_id, "subject": "s", "extra": extra}
    delivery = None
    if provider in ("github", "sw"):  # the id is a header
        delivery, event = event_id, {"extra": extra, "nonce": unique}
    if form and provider == "slack":  # a slash command: the trigger_id is the id
        fields = {"command": "/x", "text": extra, "trigger_id": event_id}
        body = urllib.parse.urlencode(fields, errors="surrogatepass").encode()
    elif form:
        body = urllib.parse.urlencode({"payload": json.dumps(event)}).encode()
    else:
        body = json.dumps(event).encode()
    headers = sign(provider, body, delivery=delivery, form=form)
    first = edge.send("POST", f"/webhook/{provider}", headers, body)
    if valid_event_id(event_id):
        assert first.status == 202, first.body
        assert first.body["event_id"] == event_id
    elif event_id.isascii() or delivery is None:
        assert (first.status, first.body["reason"]) == (400, "bad_event_id")
    else:  # a non-ASCII header: signed as UTF-8, sent as Latin-1: no longer the same
        assert first.status in (400, 401)

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
        for name in ("x-webhook-timestamp", "webhook-timestamp", "x-slack-request-timestamp"):
            if name in headers:
                headers[name] = str(int(headers[name]) + 1 + index)
    elif mutation == "new_id":  # what an attacker replaying a capture changes
        for name in ("x-github-delivery", "webhook-id"):
            if name in headers:
                headers[name] = f"{name}-{uuid.uuid4()}"
    again = edge.send("POST", f"/webhook/{provider}", headers, body)
    assert again.status in ALLOWED, again.body
    if again.status == 202:
        # Never a replay of what was accepted, never a forgery; only a genuine body whose
        # first try was refused (e.g. a bad unsigned id header) may pass with another.
        assert first.status != 202, (mutation, again.body)
        assert genuinely_signed(provider, headers, body)
    if mutation in ("none", "new_id") and first.status == 202 and again.status == 200:
        assert again.body["status"] == "duplicate"


def test_every_accepted_forward_can_be_delivered(edge: Setup) -> None:
    """After the fuzzing above: each forwarded event in the outbox has a sendable body."""

    async def bodies_ok() -> int:
        outbox = edge.gateway.connector.outbox
        count = 0
        for record_id in await outbox.apending_ids():
            record = await outbox.aget_pending(record_id)
            assert record is not None
            assert sendable(record.action.method, record.action.url, record.action.headers)
            record.action.body_bytes().decode("utf-8")
            count += 1
        return count

    body = b'{"text": "a\\ud800b"}'
    assert edge.send("POST", "/webhook/github", sign("github", body), body).status == 202
    assert edge.portal.call(bodies_ok) >= 1


# -- outbound --------------------------------------------------------------------------


def sendable(method: str, url: str, headers: dict[str, str]) -> bool:
    """Whether h11 (the HTTP/1.1 library under httpx's transport) can write the request."""
    parsed = httpx.URL(url)
    try:
        h11.Connection(h11.CLIENT).send(
            h11.Request(
                method=method,
                target=parsed.raw_path,
                headers=[
                    ("host", parsed.netloc.decode()),
                    *headers.items(),
                    ("content-length", "0"),
                ],
            )
        )
    except (h11.LocalProtocolError, UnicodeError, ValueError):
        return False
    return True


outbound_urls = st.one_of(
    st.none(),
    st.just(TARGET_URL),
    st.sampled_from(
        [
            TARGET_URL + "/orders",
            TARGET_URL + "/..;/admin",
            TARGET_URL + "/x;a=b",
            TARGET_URL + "/x\\..\\..\\admin",
            TARGET_URL + "/%2e%2e/admin",
            TARGET_URL + "/x%5C..",
            "http://127.0.0.1:9/appX",
            "http://169.254.169.254/latest",
            "https://127.0.0.1:9/app",
        ]
    ),
    st.text(max_size=30),
    st.integers(),
)
outbound_headers = st.one_of(
    st.dictionaries(
        st.text(max_size=12) | st.sampled_from(["X-A", "Host", "Idempotency-Key", "X-É"]),
        st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=300), max_size=20)
        | st.integers(),
        max_size=4,
    ),
    st.text(max_size=5),
    st.integers(),
    st.lists(st.text(max_size=3), max_size=2),
)
outbound_payloads = st.fixed_dictionaries(
    {},
    optional={
        "target": st.sampled_from(["app", "app", "nope"]) | st.integers(),
        "url": outbound_urls,
        "body": json_values | st.dictionaries(texts, json_values | surrogate_texts, max_size=3),
        "headers": outbound_headers,
        "idempotency_key": st.none() | texts | st.integers(),
        "method": st.sampled_from(["POST", "put", "GET", ""]) | st.integers(),
        "deadline": st.none() | st.floats() | texts,
        "other": st.integers(),
    },
)


@example(  # what is queued is checked too: at least this one is
    payload={"target": "app", "body": {"t": "\u00e9"}, "headers": {"X-A": "b c"}},
    raw=None,
    authorized=True,
    media="application/json",
)
@SETTINGS
@given(
    payload=outbound_payloads,
    raw=st.none() | st.binary(max_size=200),
    authorized=st.sampled_from([True, True, True, False]),
    media=st.sampled_from(["application/json", "application/json", "text/plain", FORM]),
)
def test_outbound_never_5xx_and_what_it_queues_can_be_sent(
    edge: Setup, payload: dict[str, Any], raw: bytes | None, authorized: bool, media: str
) -> None:
    body = raw if raw is not None else json.dumps(payload).encode()
    headers = {"content-type": media}
    if authorized:
        headers["authorization"] = f"Bearer {TOKEN}"
    answer = edge.send("POST", "/outbound", headers, body)
    assert answer.status in ALLOWED, answer.body
    assert answer.body["status"] in ("queued", "rejected")
    if answer.status != 202:
        return

    async def stored() -> Any:
        return await edge.gateway.connector.outbox.aget_pending(answer.body["id"])

    record = edge.portal.call(stored)
    assert record is not None
    action = record.action
    assert sendable(action.method, action.url, action.headers)
    assert action.idempotency_key is None or sendable(
        "POST", action.url, {"idempotency-key": action.idempotency_key}
    )
    action.body_bytes().decode("utf-8")


# -- probes and paths ------------------------------------------------------------------


@SETTINGS
@given(
    path=st.sampled_from(["/healthz", "/readyz", "/metrics", "/outbound", "/webhook/", "/", "/x"])
    | st.text(max_size=20).map(lambda t: "/" + t),
    method=st.sampled_from(["GET", "HEAD", "POST", "DELETE", "OPTIONS"]),
    body=st.binary(max_size=50),
)
def test_probes_and_unknown_paths_never_5xx(
    edge: Setup, path: str, method: str, body: bytes
) -> None:
    answer = edge.portal.call(lambda: call_lenient(edge.app, method, path, body))
    assert answer in ALLOWED, (method, path)


async def call_lenient(app: GatewayApp, method: str, path: str, body: bytes) -> int:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [],
        "client": ("127.0.0.1", 1),
    }
    await app(scope, receive, send)
    return int(sent[0]["status"])


# -- a failing store -------------------------------------------------------------------

FAILURES: list[type[Exception]] = [
    StoreUnavailableError,
    StoreCorruptedError,
    StoreLockTimeoutError,
    StoreError,
]


class FlakyStore(MemoryStore):
    """A MemoryStore whose next operations fail as ``plan`` says (True: raise)."""

    def __init__(self) -> None:
        super().__init__()
        self.plan: list[bool] = []
        self.error: type[Exception] = StoreUnavailableError

    def _maybe_fail(self) -> None:
        if self.plan and self.plan.pop(0):
            if self.error is StoreCorruptedError:
                raise StoreCorruptedError("some-key", "a flipped bit")
            raise self.error("the backend failed")

    async def aget(self, key: str) -> Any:
        self._maybe_fail()
        return await super().aget(key)

    async def aput(self, key: str, value: Any, *, ttl: float | None = None) -> None:
        self._maybe_fail()
        await super().aput(key, value, ttl=ttl)

    async def aput_if_absent(self, key: str, value: Any, *, ttl: float | None = None) -> bool:
        self._maybe_fail()
        return await super().aput_if_absent(key, value, ttl=ttl)

    async def aupdate(self, keys: Any, fn: Any, *, ttl: float | None = None) -> Any:
        self._maybe_fail()
        return await super().aupdate(keys, fn, ttl=ttl)

    async def adelete(self, key: str) -> None:
        self._maybe_fail()
        await super().adelete(key)

    async def alist(self, prefix: str = "") -> list[str]:
        self._maybe_fail()
        return await super().alist(prefix)


@pytest.fixture(scope="module")
def flaky(portal: anyio.from_thread.BlockingPortal) -> tuple[Setup, FlakyStore]:
    store = FlakyStore()
    gateway = make_gateway(store)
    return Setup(portal, gateway, app_of(gateway)), store


@SETTINGS
@given(
    route=st.sampled_from(["webhook", "webhook", "outbound", "readyz"]),
    provider=st.sampled_from(PROVIDERS),
    plan=st.lists(st.booleans(), min_size=1, max_size=6),
    error=st.sampled_from(FAILURES),
)
def test_a_failing_store_answers_503_with_retry_after_never_500(
    flaky: tuple[Setup, FlakyStore],
    route: str,
    provider: str,
    plan: list[bool],
    error: type[Exception],
) -> None:
    setup, store = flaky
    store.plan, store.error = list(plan), error
    setup.gateway._ready_checked = None  # probe the store on this request
    if route == "webhook":
        event_id = uuid.uuid4().hex
        event = {"event_id": event_id, "id": event_id, "subject": "s"}
        body = json.dumps(event).encode()
        answer = setup.send("POST", f"/webhook/{provider}", sign(provider, body), body)
    elif route == "outbound":
        body = json.dumps({"target": "app", "body": {"n": uuid.uuid4().hex}}).encode()
        headers = {"content-type": "application/json", "authorization": f"Bearer {TOKEN}"}
        answer = setup.send("POST", "/outbound", headers, body)
    else:
        answer = setup.send("GET", "/readyz", {}, b"")
    store.plan = []
    assert answer.status in ALLOWED | {503}, answer.body
    if answer.status == 503 and route != "readyz":
        assert answer.body["reason"] == "store_unavailable"
        assert int(answer.headers["retry-after"]) >= 1
    if route == "webhook" and not any(plan):
        assert answer.status == 202


def test_a_closed_store_answers_503_too() -> None:
    class Closed(MemoryStore):
        async def aupdate(self, keys: Any, fn: Any, *, ttl: float | None = None) -> Any:
            raise ClosedError("this store was closed")

    async def run() -> Answer:
        gateway = make_gateway(Closed())
        body = json.dumps({"event_id": "e-closed", "subject": "s"}).encode()
        return await call(
            gateway.asgi_app(run_dispatcher=False),
            "POST",
            "/webhook/gen",
            raw_headers(sign("gen", body)),
            body,
        )

    answer = anyio.run(run)
    assert answer.status == 503
    assert answer.headers["retry-after"] == "1"


# -- proxies ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def proxied(portal: anyio.from_thread.BlockingPortal) -> Setup:
    gateway = make_gateway(require_mtls=True, ip_allowlist=("192.0.2.0/24",))
    app = app_of(gateway, client_cert_header="X-SSL-Client-Verify", trusted_proxies=["10.0.0.0/8"])
    return Setup(portal, gateway, app)


@SETTINGS
@given(
    peer=st.sampled_from(
        ["10.1.1.1", "10.200.0.9", "192.0.2.9", "203.0.113.5", "127.0.0.1", "::ffff:10.0.0.1"]
    ),
    forwarded=st.none()
    | st.lists(
        st.sampled_from(["192.0.2.7", "203.0.113.1", "10.0.0.2", "garbage", " "]), max_size=3
    ).map(", ".join),
    verify=st.sampled_from(["SUCCESS", "FAILED", " SUCCESS ", "success", None]),
)
def test_client_certificates_and_forwarded_addresses_count_only_from_trusted_proxies(
    proxied: Setup, peer: str, forwarded: str | None, verify: str | None
) -> None:
    body = json.dumps({"event_id": uuid.uuid4().hex, "subject": "s"}).encode()
    headers = sign("gen", body)
    if forwarded is not None:
        headers["x-forwarded-for"] = forwarded
    if verify is not None:
        headers["x-ssl-client-verify"] = verify
    answer = proxied.send("POST", "/webhook/gen", headers, body, client=(peer, 1))
    assert answer.status in ALLOWED
    trusted_peer = peer.startswith("10.") or peer == "::ffff:10.0.0.1"
    if not trusted_peer or verify is None or verify.strip() != "SUCCESS":
        assert answer.status == 403  # the header is nobody's word but a trusted proxy's
    if answer.status == 202:
        entries = [e.strip() for e in (forwarded or "").split(",")]
        untrusted = [e for e in entries if not e.startswith("10.")]
        assert untrusted[-1:] == ["192.0.2.7"]


# -- over a real socket ----------------------------------------------------------------


@pytest.fixture(scope="module")
def live_url() -> Iterator[str]:
    with ServerThread(app_of(make_gateway())) as server:
        yield server.url


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    path=st.sampled_from(
        [f"/webhook/{p}" for p in [*PROVIDERS, "nope"]] + ["/outbound", "/readyz"]
    ),
    body=bodies,
    headers=st.dictionaries(
        st.sampled_from(SIGNATURE_HEADERS),
        header_values.filter(lambda v: v == v.strip() and all(32 <= ord(c) < 127 for c in v)),
        max_size=6,
    ),
    authorized=st.booleans(),
)
def test_random_requests_over_a_real_socket_never_5xx(
    live_url: str, path: str, body: bytes, headers: dict[str, str], authorized: bool
) -> None:
    headers.pop("content-length", None)
    if authorized:
        headers["authorization"] = f"Bearer {TOKEN}"
    response = httpx.post(f"{live_url}{path}", content=body, headers=headers, timeout=10)
    assert response.status_code in ALLOWED, response.text
    response.json()
    if response.status_code == 202 and path.startswith("/webhook/"):
        assert genuinely_signed(path.rsplit("/", 1)[1], headers, body)
