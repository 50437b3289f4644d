"""End to end over real sockets: senders -> gateway (uvicorn / hypercorn+trio) -> receiver."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import standardwebhooks
from prometheus_client.parser import text_string_to_metric_families
from webhook_helpers import (
    GITHUB_SECRET,
    HMAC_SECRET,
    SLACK_SECRET,
    STRIPE_SECRET,
    SW_SECRET,
    TARGET_SECRET,
    TOKEN,
    Receiver,
    ServerThread,
    github_request,
    hmac_request,
    slack_request,
    stripe_request,
    sw_request,
)

from converge.extensions.connectors import (
    OutboundTarget,
    ProviderProfile,
    WebhookConnector,
    WebhookGateway,
    WebhookRetryPolicy,
)
from converge.extensions.connectors.inbound.inbox import event_uid, forward_key
from converge.extensions.storage import MemoryStore, SQLiteStore
from loop_stall import eventually

pytestmark = pytest.mark.anyio

PROFILES = {
    "generic": ProviderProfile("generic", "generic", canonicalization="timestamp_body"),
    "sw": ProviderProfile("sw", "sw", scheme="standard-webhooks"),
    "svix": ProviderProfile("svix", "sw", scheme="svix"),
    "stripe": ProviderProfile("stripe", "stripe", scheme="stripe"),
    "github": ProviderProfile("github", "github", scheme="github"),
    "slack": ProviderProfile("slack", "slack", scheme="slack"),
}
SECRETS = {
    "generic": HMAC_SECRET,
    "sw": SW_SECRET,
    "stripe": STRIPE_SECRET,
    "github": GITHUB_SECRET,
    "slack": SLACK_SECRET,
}
FAST = WebhookRetryPolicy(
    base_delay_sec=0.02, max_delay_sec=0.05, jitter_ratio=0.0, request_timeout_sec=2.0
)


def build(receiver_url: str, store: Any) -> WebhookGateway:
    connector = WebhookConnector(
        provider_profiles=PROFILES,
        secrets=SECRETS,
        store=store,
        retry_policy=FAST,
        targets=[OutboundTarget("app", f"{receiver_url}/events", signing_secret=TARGET_SECRET)],
        inbound_routes=dict.fromkeys(PROFILES, "app"),
    )
    return WebhookGateway(connector, outbound_token=TOKEN)


@pytest.fixture(scope="module")
def gateway_url(
    receiver_server: tuple[Receiver, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    _, receiver_url = receiver_server
    path: Path = tmp_path_factory.mktemp("gw") / "gateway.sqlite3"
    gateway = build(receiver_url, SQLiteStore(path))
    with ServerThread(gateway.asgi_app(poll_interval_sec=0.05)) as server:
        yield server.url


def forwarded(recv: Receiver, event_id: str) -> list[Any]:
    found = []
    for request in recv.delivered():
        body = json.loads(request.body)
        if body.get("event_id") == event_id:
            found.append((request, body))
    return found


def requests_for(provider: str) -> tuple[bytes, dict[str, str], str]:
    event_id = f"evt_{uuid.uuid4().hex}"
    if provider == "generic":
        body = json.dumps({"event_id": event_id, "subject": "order.paid"}).encode()
        return body, hmac_request(body, timestamp_body=True), event_id
    if provider == "sw":
        body = json.dumps({"type": "user.created", "data": {}}).encode()
        return body, sw_request(body, msg_id=event_id), event_id
    if provider == "svix":
        body = json.dumps({"type": "user.created"}).encode()
        headers = sw_request(body, msg_id=event_id)
        return body, {k.replace("webhook-", "svix-"): v for k, v in headers.items()}, event_id
    if provider == "stripe":
        body = json.dumps({"id": event_id, "object": "event", "type": "charge.succeeded"}).encode()
        return body, stripe_request(body), event_id
    if provider == "github":
        # GitHub replays are refused by body digest too: each event has its own body.
        body = json.dumps({"action": "opened", "number": 1, "hook_id": event_id}).encode()
        return body, github_request(body, delivery=event_id), event_id
    body = json.dumps(
        {"type": "event_callback", "event_id": event_id, "event": {"type": "message"}}
    ).encode()
    return body, slack_request(body), event_id


@pytest.mark.parametrize("provider", list(PROFILES))
async def test_each_sender_format_is_verified_accepted_and_forwarded(
    provider: str, gateway_url: str, receiver: tuple[Receiver, str]
) -> None:
    recv, _ = receiver
    body, headers, event_id = requests_for(provider)
    async with httpx.AsyncClient(base_url=gateway_url) as http:
        response = await http.post(f"/webhook/{provider}", content=body, headers=headers)
        assert response.status_code == 202, response.text
        assert response.json() == {"status": "accepted", "event_id": event_id}
        tampered = await http.post(f"/webhook/{provider}", content=body + b" ", headers=headers)
        assert tampered.status_code == 401
    await eventually(lambda: len(forwarded(recv, event_id)) == 1)
    request, event = forwarded(recv, event_id)[0]
    assert event["provider"] == provider
    assert event["payload"] == json.loads(body)
    assert standardwebhooks.Webhook(TARGET_SECRET).verify(request.body, request.headers)
    assert request.headers["idempotency-key"] == forward_key(event_uid(provider, event_id))


async def test_fifty_concurrent_duplicates_over_http_give_one_202_and_one_delivery(
    gateway_url: str, receiver: tuple[Receiver, str]
) -> None:
    recv, _ = receiver
    body, headers, event_id = requests_for("stripe")
    statuses: list[int] = []
    async with httpx.AsyncClient(
        base_url=gateway_url, limits=httpx.Limits(max_connections=50)
    ) as http:

        async def one() -> None:
            statuses.append(
                (await http.post("/webhook/stripe", content=body, headers=headers)).status_code
            )

        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(one)
    assert sorted(statuses) == [200] * 49 + [202]
    await eventually(lambda: len(forwarded(recv, event_id)) == 1)
    await anyio.sleep(0.2)
    assert len(forwarded(recv, event_id)) == 1


async def test_a_receiver_that_fails_then_recovers_gets_every_event(
    gateway_url: str, receiver: tuple[Receiver, str]
) -> None:
    recv, _ = receiver
    recv.fail_next = 4
    ids = []
    async with httpx.AsyncClient(base_url=gateway_url) as http:
        for _ in range(3):
            body, headers, event_id = requests_for("sw")
            assert (
                await http.post("/webhook/sw", content=body, headers=headers)
            ).status_code == 202
            ids.append(event_id)
    await eventually(lambda: all(any(r.status == 200 for r, _ in forwarded(recv, i)) for i in ids))
    attempts = sum(len(forwarded(recv, i)) for i in ids)
    assert attempts == 3 + 4  # every failure was retried, with the same key
    for event_id in ids:
        assert len({r.headers["idempotency-key"] for r, _ in forwarded(recv, event_id)}) == 1


async def test_outbound_relay_delivers_to_the_configured_target(
    gateway_url: str, receiver: tuple[Receiver, str]
) -> None:
    recv, _ = receiver
    marker = uuid.uuid4().hex
    async with httpx.AsyncClient(base_url=gateway_url) as http:
        refused = await http.post("/outbound", json={"target": "app", "body": {"m": marker}})
        assert refused.status_code == 401
        sent = await http.post(
            "/outbound",
            headers={"authorization": f"Bearer {TOKEN}"},
            json={"target": "app", "body": {"event_id": marker}},
        )
        assert sent.status_code == 202
    await eventually(lambda: len(forwarded(recv, marker)) == 1)
    request, _ = forwarded(recv, marker)[0]
    assert request.path == "/events"
    assert request.headers["idempotency-key"] == sent.json()["id"]


async def test_probes_and_prometheus_metrics_over_http(gateway_url: str) -> None:
    async with httpx.AsyncClient(base_url=gateway_url) as http:
        body, headers, _ = requests_for("github")
        await http.post("/webhook/github", content=body, headers=headers)
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        ready = await http.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["dispatcher"] is True
        text = (await http.get("/metrics")).text
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {
        "webhook_inbound_accepted",
        "webhook_outbound_submitted",
        "webhook_outbound_backlog",
    } <= names


async def test_the_app_serves_on_trio_under_hypercorn(receiver: tuple[Receiver, str]) -> None:
    recv, receiver_url = receiver
    gateway = build(receiver_url, MemoryStore())
    with ServerThread(gateway.asgi_app(poll_interval_sec=0.05), server="hypercorn") as server:
        async with httpx.AsyncClient(base_url=server.url) as http:
            body, headers, event_id = requests_for("slack")
            response = await http.post("/webhook/slack", content=body, headers=headers)
            assert response.status_code == 202
            await eventually(lambda: gateway.connector.dispatcher.running)
            assert (await http.get("/readyz")).status_code == 200
            await eventually(lambda: len(forwarded(recv, event_id)) == 1)


HANDSHAKE = {
    "connection": "Upgrade",
    "upgrade": "websocket",
    "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
    "sec-websocket-version": "13",
}


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
@pytest.mark.parametrize("path", ["/webhook/github", "/nowhere"])
async def test_a_websocket_handshake_gets_a_403_with_a_json_reason(
    receiver: tuple[Receiver, str], server: str, path: str
) -> None:
    _, receiver_url = receiver
    gateway = build(receiver_url, MemoryStore())
    with ServerThread(gateway.asgi_app(run_dispatcher=False), server=server) as served:
        async with httpx.AsyncClient(base_url=served.url) as http:
            response = await http.get(path, headers=HANDSHAKE)
            assert response.status_code == 403
            assert response.headers["content-type"] == "application/json"
            assert response.json() == {"status": "rejected", "reason": "websocket_not_supported"}
            assert response.headers["connection"] == "close"
            assert (await http.get("/healthz")).json() == {"status": "ok"}


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
async def test_a_request_with_two_lengths_is_refused_and_its_connection_closed(
    receiver: tuple[Receiver, str], server: str
) -> None:
    # Content-Length and Transfer-Encoding both: a proxy reading the other length would
    # see the GET below as a second request of its own (request smuggling).
    _, receiver_url = receiver
    gateway = build(receiver_url, MemoryStore())
    body, headers, _ = requests_for("github")
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    carrier = (
        f"POST /webhook/github HTTP/1.1\r\nHost: x\r\n{head}Content-Length: {len(body)}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode() + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    smuggled = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with ServerThread(gateway.asgi_app(run_dispatcher=False), server=server) as served:
        port = int(served.url.rsplit(":", 1)[1])
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(carrier + smuggled)
            answer = b""
            with anyio.fail_after(5):
                try:
                    while True:
                        answer += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    pass  # closed by the server
    assert answer.count(b"HTTP/1.1 ") <= 1  # the smuggled GET got no answer
    if server == "uvicorn":
        assert answer.startswith(b"HTTP/1.1 400 ")
        assert answer.endswith(b'{"status":"rejected","reason":"malformed_request"}')
    else:  # hypercorn closes with the GET unread: the reset can overtake the answer
        assert answer == b"" or answer.startswith(b"HTTP/1.1 400 ")
    assert gateway.connector.metrics.get("webhook_inbound_accepted") in (None, 0)
