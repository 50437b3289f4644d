"""The gateway's ASGI app, in process: routes, streaming limits, relay guard, probes."""

from __future__ import annotations

import gzip
import json
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.routing import Mount
from webhook_helpers import (
    GITHUB_SECRET,
    HMAC_SECRET,
    SLACK_SECRET,
    TOKEN,
    event_body,
    github_request,
    hmac_request,
    slack_request,
)

from converge.errors import ConfigurationError, StoreUnavailableError
from converge.extensions.connectors import (
    GatewayApp,
    OutboundTarget,
    ProviderProfile,
    WebhookConnector,
    WebhookGateway,
    WebhookSecurityPolicy,
)
from converge.extensions.connectors import connector as connector_module
from converge.extensions.storage import MemoryStore
from loop_stall import eventually

pytestmark = pytest.mark.anyio

TARGET = OutboundTarget("crm", "http://127.0.0.1:9/crm")


def gateway(*, token: str | None = TOKEN, store: Any = None, **policy: Any) -> WebhookGateway:
    connector = WebhookConnector(
        provider_profiles={"shop": ProviderProfile("shop", "shop")},
        secrets={"shop": HMAC_SECRET},
        security_policy=WebhookSecurityPolicy(**policy),
        store=store or MemoryStore(),
        targets=[TARGET],
    )
    return WebhookGateway(connector, outbound_token=token)


@asynccontextmanager
async def client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, client=("10.1.2.3", 5555))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
        yield http


async def test_a_signed_webhook_is_accepted_over_asgi() -> None:
    gw = gateway()
    body = event_body()
    async with client(gw.asgi_app()) as http:
        response = await http.post("/webhook/shop", content=body, headers=hmac_request(body))
        assert response.status_code == 202
        assert response.json()["event_id"] == json.loads(body)["event_id"]
        again = await http.post("/webhook/shop", content=body, headers=hmac_request(body))
        assert again.status_code == 200
        assert again.json()["status"] == "duplicate"
        forged = await http.post(
            "/webhook/shop", content=body, headers=hmac_request(body, secret="guess")
        )
        assert forged.status_code == 401
        assert forged.json()["reason"] == "bad_signature"


async def test_unknown_routes_and_methods_are_json_errors() -> None:
    async with client(gateway().asgi_app()) as http:
        missing = await http.get("/nope")
        assert missing.status_code == 404
        assert missing.json()["reason"] == "not_found"
        wrong = await http.get("/webhook/shop")
        assert wrong.status_code == 405
        assert wrong.headers["allow"] == "POST"
        unknown = await http.post(
            "/webhook/ghost", content=b"{}", headers={"content-type": "application/json"}
        )
        assert unknown.status_code == 404
        assert unknown.json()["reason"] == "unknown_provider"
        probe = await http.post("/healthz")
        assert probe.status_code == 405


async def test_compressed_bodies_are_415_with_the_codings_accepted_before_being_read() -> None:
    body = gzip.compress(event_body())
    headers = {**hmac_request(body), "content-encoding": "gzip"}
    upload = Upload(chunks=4)
    app = gateway().asgi_app()
    async with client(app) as http:
        response = await http.post("/webhook/shop", content=body, headers=headers)
        assert response.status_code == 415
        assert response.json() == {"status": "rejected", "reason": "unsupported_content_encoding"}
        assert response.headers["accept-encoding"] == "identity"
        auth = {"authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
        outbound = await http.post(
            "/outbound",
            headers={**auth, "content-encoding": "gzip"},
            content=gzip.compress(b'{"target": "crm", "body": {}}'),
        )
        assert outbound.status_code == 415
        assert outbound.headers["accept-encoding"] == "identity"
    raw = [(k.encode(), v.encode()) for k, v in headers.items()]
    status, answer = await call(app, "/webhook/shop", raw, upload)
    assert (status, answer["reason"]) == (415, "unsupported_content_encoding")
    assert upload.read == 0  # refused on its head: the body was never read


class Upload:
    """An ASGI receive() streaming a large body in chunks; counts what was read."""

    def __init__(self, chunks: int, size: int = 65536) -> None:
        self.left = chunks
        self.size = size
        self.read = 0

    async def __call__(self) -> dict[str, Any]:
        self.read += 1
        self.left -= 1
        return {"type": "http.request", "body": b"x" * self.size, "more_body": self.left > 0}


async def call(
    app: GatewayApp,
    path: str,
    headers: list[tuple[bytes, bytes]],
    receive: Any,
    client: tuple[str, int] = ("127.0.0.1", 1),
) -> tuple[int, dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": headers,
        "client": client,
        "root_path": "",
    }
    await app(scope, receive, send)
    return sent[0]["status"], json.loads(sent[1]["body"])


async def test_the_body_is_cut_off_past_the_limit_without_reading_it_all() -> None:
    app = gateway(max_payload_bytes=100_000).asgi_app()
    upload = Upload(chunks=200)  # 13 MB offered
    status, body = await call(
        app, "/webhook/shop", [(b"content-type", b"application/json")], upload
    )
    assert (status, body["reason"]) == (413, "payload_too_large")
    assert upload.read == 2  # 128 KiB read, then it stopped


async def test_a_declared_oversize_body_or_stranger_is_refused_before_reading() -> None:
    app = gateway(max_payload_bytes=1000, ip_allowlist=("127.0.0.0/8",)).asgi_app()
    upload = Upload(chunks=1)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"5000")]
    assert (await call(app, "/webhook/shop", headers, upload))[0] == 413
    status, _ = await call(app, "/webhook/shop", headers, upload, client=("8.8.8.8", 1))
    assert status == 403
    assert upload.read == 0


async def test_outbound_is_disabled_without_a_token() -> None:
    async with client(gateway(token=None).asgi_app()) as http:
        response = await http.post(
            "/outbound",
            json={"target": "crm", "body": {}},
            headers={"authorization": f"Bearer {TOKEN}"},
        )
        assert response.status_code == 403
        assert response.json()["reason"] == "outbound_disabled"


async def test_outbound_requires_the_bearer_token_and_a_configured_target() -> None:
    gw = gateway()
    auth = {"authorization": f"Bearer {TOKEN}"}
    async with client(gw.asgi_app()) as http:
        for headers in (
            {},
            {"authorization": "Bearer wrong-token-000000"},
            {"authorization": TOKEN},
            {"authorization": f"Basic {TOKEN}"},
        ):
            refused = await http.post(
                "/outbound", json={"target": "crm", "body": {}}, headers=headers
            )
            assert refused.status_code == 401
            assert refused.headers["www-authenticate"] == "Bearer"
        unknown = await http.post("/outbound", json={"target": "evil", "body": {}}, headers=auth)
        assert (unknown.status_code, unknown.json()["reason"]) == (400, "unknown_target")
        for url in (
            "http://169.254.169.254/latest",
            "http://127.0.0.1:9/crmX",
            "http://127.0.0.1:9/crm/../admin",
        ):
            outside = await http.post(
                "/outbound", headers=auth, json={"target": "crm", "url": url, "body": {}}
            )
            assert (outside.status_code, outside.json()["reason"]) == (403, "url_not_allowed")
        bad = await http.post("/outbound", headers=auth, json={"target": "crm", "body": []})
        assert (bad.status_code, bad.json()["reason"]) == (400, "invalid_action")
        text = await http.post(
            "/outbound", headers={**auth, "content-type": "text/plain"}, content=b"{}"
        )
        assert text.status_code == 415
        broken = await http.post(
            "/outbound", headers={**auth, "content-type": "application/json"}, content=b"{"
        )
        assert broken.status_code == 400
        ok = await http.post(
            "/outbound",
            headers=auth,
            json={
                "target": "crm",
                "url": "http://127.0.0.1:9/crm/orders",
                "body": {"order": 1},
                "idempotency_key": "o-1",
            },
        )
        assert ok.status_code == 202
        assert ok.json()["status"] == "queued"
    record = await gw.connector.outbox.aget_pending(ok.json()["id"])
    assert record is not None
    assert record.action.body == {"order": 1}
    assert record.action.url == "http://127.0.0.1:9/crm/orders"


async def test_outbound_refuses_oversize_bodies() -> None:
    gw = gateway(max_payload_bytes=50)
    async with client(gw.asgi_app()) as http:
        big = await http.post(
            "/outbound",
            headers={"authorization": f"Bearer {TOKEN}"},
            json={"target": "crm", "body": {"x": "y" * 100}},
        )
        assert big.status_code == 413


async def test_health_readiness_and_metrics() -> None:
    gw = gateway()
    async with client(gw.asgi_app()) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        not_ready = await http.get("/readyz")  # targets configured, dispatcher not running
        assert not_ready.status_code == 503
        assert not_ready.json()["dispatcher"] is False
        body = event_body()
        await http.post("/webhook/shop", content=body, headers=hmac_request(body))
        await http.post("/webhook/shop", content=b"{}", headers=hmac_request(b"{}", secret="x"))
        metrics = await http.get("/metrics")
        assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
        head = await http.head("/metrics")
        assert head.content == b""
    families = {f.name: f for f in text_string_to_metric_families(metrics.text)}
    accepted = families["webhook_inbound_accepted"].samples
    assert [(s.labels, s.value) for s in accepted] == [({"provider": "shop"}, 1.0)]
    rejected = families["webhook_inbound_rejected"].samples
    assert rejected[0].labels == {"provider": "shop", "reason": "bad_signature"}


async def test_readiness_follows_the_dispatcher_and_the_store() -> None:
    gw = gateway()
    app = gw.asgi_app()
    async with client(app) as http, anyio.create_task_group() as tg:
        tg.start_soon(gw.connector.run_outbound_dispatcher)
        await eventually(lambda: gw.connector.dispatcher.running)
        ready = await http.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["status"] == "ready"
        gw.connector.stop_dispatcher()

    class Down(MemoryStore):
        async def aput(self, key: str, value: Any, *, ttl: float | None = None) -> None:
            raise StoreUnavailableError("down")

    broken = WebhookGateway(gateway(store=Down()).connector, require_dispatcher=False)
    async with client(broken.asgi_app()) as http:
        response = await http.get("/readyz")
        assert response.status_code == 503
        assert response.json()["store"] is False


async def test_the_lifespan_runs_and_stops_the_dispatcher() -> None:
    gw = gateway()
    app = gw.asgi_app()
    to_app, app_inbox = anyio.create_memory_object_stream[dict[str, Any]](4)
    app_outbox, from_app = anyio.create_memory_object_stream[dict[str, Any]](4)
    async with to_app, app_inbox, app_outbox, from_app, anyio.create_task_group() as tg:
        tg.start_soon(app, {"type": "lifespan"}, app_inbox.receive, app_outbox.send)
        await to_app.send({"type": "lifespan.startup"})
        assert (await from_app.receive())["type"] == "lifespan.startup.complete"
        await eventually(lambda: gw.connector.dispatcher.running)
        assert gw.is_ready()
        await to_app.send({"type": "lifespan.shutdown"})
        assert (await from_app.receive())["type"] == "lifespan.shutdown.complete"
    assert not gw.connector.dispatcher.running


async def test_a_shutdown_right_after_startup_completes() -> None:
    # The dispatcher task had not begun when the shutdown asked it to stop; its run
    # then forgot the stop and the shutdown waited forever.
    gw = gateway()
    app = gw.asgi_app()
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[str] = []

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])

    with anyio.fail_after(5):
        await app({"type": "lifespan"}, receive, send)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert not gw.connector.dispatcher.running


async def test_the_app_mounts_inside_starlette() -> None:
    gw = gateway()
    outer = Starlette(routes=[Mount("/hooks", app=gw.asgi_app(run_dispatcher=False))])
    body = event_body()
    async with client(outer) as http:
        response = await http.post("/hooks/webhook/shop", content=body, headers=hmac_request(body))
        assert response.status_code == 202
        assert (await http.get("/hooks/healthz")).status_code == 200


async def test_a_proxy_client_certificate_header_counts_only_from_trusted_proxies() -> None:
    gw = gateway(require_mtls=True)
    body = event_body()
    headers = {**hmac_request(body), "x-ssl-client-verify": "SUCCESS"}
    async with client(gw.asgi_app()) as http:
        assert (await http.post("/webhook/shop", content=body, headers=headers)).status_code == 403
    with pytest.raises(ConfigurationError, match="trusted_proxies"):
        gw.asgi_app(client_cert_header="X-SSL-Client-Verify")
    # The peer (10.1.2.3) is not the proxy: the header is the client's own claim.
    app = gw.asgi_app(client_cert_header="X-SSL-Client-Verify", trusted_proxies=["10.9.0.0/16"])
    async with client(app) as http:
        assert (await http.post("/webhook/shop", content=body, headers=headers)).status_code == 403
    app = gw.asgi_app(client_cert_header="X-SSL-Client-Verify", trusted_proxies=["10.1.2.3"])
    async with client(app) as http:
        assert (await http.post("/webhook/shop", content=body, headers=headers)).status_code == 202


async def test_x_forwarded_for_is_read_only_from_trusted_proxies() -> None:
    gw = gateway(ip_allowlist=("192.0.2.0/24",))
    forwarded = {"x-forwarded-for": "192.0.2.7"}

    async def post(app: Any) -> int:
        body = event_body()
        async with client(app) as http:
            response = await http.post(
                "/webhook/shop", content=body, headers={**hmac_request(body), **forwarded}
            )
            return response.status_code

    assert await post(gw.asgi_app()) == 403  # peer 10.1.2.3, the header ignored
    assert await post(gw.asgi_app(trusted_proxies=["10.0.0.0/8"])) == 202
    # A client cannot prepend its way in: the rightmost untrusted address counts.
    forwarded = {"x-forwarded-for": "192.0.2.7, 203.0.113.9"}
    assert await post(gw.asgi_app(trusted_proxies=["10.0.0.0/8"])) == 403
    forwarded = {"x-forwarded-for": "203.0.113.9, 192.0.2.7, 10.0.0.5"}
    assert await post(gw.asgi_app(trusted_proxies=["10.0.0.0/8"])) == 202
    forwarded = {"x-forwarded-for": "not-an-address"}
    assert await post(gw.asgi_app(trusted_proxies=["10.0.0.0/8"])) == 403
    with pytest.raises(ConfigurationError):
        gw.asgi_app(trusted_proxies=["10.0.0.300"])


def test_bad_gateway_settings_are_refused() -> None:
    connector = gateway().connector
    with pytest.raises(ConfigurationError):
        WebhookGateway(connector, outbound_token="short")
    with pytest.raises(ConfigurationError):
        WebhookGateway("connector")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        GatewayApp(WebhookGateway(connector), poll_interval_sec=0)


async def test_a_closed_gateway_answers_503_not_500() -> None:
    gw = gateway()
    await gw.connector.aclose()
    body = event_body()
    async with client(gw.asgi_app()) as http:
        response = await http.post("/webhook/shop", content=body, headers=hmac_request(body))
        assert (response.status_code, response.json()["reason"]) == (503, "closed")
        assert (await http.get("/healthz")).status_code == 503


async def test_outbound_validates_the_whole_body_and_answers_400_with_a_reason() -> None:
    gw = gateway()
    auth = {"authorization": f"Bearer {TOKEN}"}
    async with client(gw.asgi_app()) as http:
        bad_requests: list[dict[str, Any]] = [
            {"headers": "ab"},
            {"headers": 5},
            {"headers": ["x"]},
            {"headers": {"X-A": "é"}},
            {"headers": {"X-A": "a\x01b"}},
            {"headers": {"X-A": "a\x7fb"}},
            {"headers": {"X\x01": "v"}},
            {"idempotency_key": "clé"},
            {"url": None},
            {"url": 5},
            {"method": ["POST"]},
            {"deadline": "soon"},
            {"deadline": 10**400},  # an int no float holds (a 500 before)
        ]
        for extra in bad_requests:
            response = await http.post(
                "/outbound", headers=auth, json={"target": "crm", "body": {}, **extra}
            )
            assert response.status_code == 400, extra
            answer = response.json()
            assert answer["reason"] == "invalid_action", extra
            assert answer["detail"], extra
        # A lone surrogate can never be sent as UTF-8: refused, not queued.
        surrogate = await http.post(
            "/outbound",
            headers={**auth, "content-type": "application/json"},
            content=b'{"target": "crm", "body": {"text": "\\ud800"}}',
        )
        assert (surrogate.status_code, surrogate.json()["reason"]) == (400, "lone_surrogate")
        pair = await http.post(
            "/outbound",
            headers={**auth, "content-type": "application/json"},
            content=b'{"target": "crm", "body": {"text": "\\ud83d\\ude00"}}',
        )
        assert pair.status_code == 202
    assert await gw.connector.apending_count() == 1


async def test_a_signed_body_with_a_lone_surrogate_is_accepted_and_delivered(
    receiver: tuple[Any, str],
) -> None:
    recv, url = receiver
    connector = WebhookConnector(
        provider_profiles={"shop": ProviderProfile("shop", "shop")},
        secrets={"shop": HMAC_SECRET},
        targets=[OutboundTarget("app", f"{url}/events")],
        inbound_routes={"shop": "app"},
    )
    body = b'{"event_id": "evt_surrogate", "subject": "s", "text": "a\\ud800b"}'
    async with (
        client(WebhookGateway(connector).asgi_app()) as http,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(connector.run_outbound_dispatcher)
        response = await http.post("/webhook/shop", content=body, headers=hmac_request(body))
        assert response.status_code == 202
        await eventually(lambda: len(recv.delivered()) == 1)
        connector.stop_dispatcher()
    forwarded = json.loads(recv.delivered()[0].body)
    assert forwarded["payload"]["text"] == "a\ufffdb"
    assert await connector.alist_dead_letters() == []


class DownStore(MemoryStore):
    """Every operation fails the way a lost backend does."""

    async def aget(self, key: str) -> Any:
        raise StoreUnavailableError("down")

    async def aput(self, key: str, value: Any, *, ttl: float | None = None) -> None:
        raise StoreUnavailableError("down")

    async def aput_if_absent(self, key: str, value: Any, *, ttl: float | None = None) -> bool:
        raise StoreUnavailableError("down")

    async def aupdate(self, keys: Any, fn: Any, *, ttl: float | None = None) -> Any:
        raise StoreUnavailableError("down")

    async def alist(self, prefix: str = "") -> list[str]:
        raise StoreUnavailableError("down")


async def test_a_failing_store_answers_503_with_retry_after_on_every_route() -> None:
    gw = gateway(store=DownStore())
    auth = {"authorization": f"Bearer {TOKEN}"}
    async with client(gw.asgi_app()) as http:
        body = event_body()
        hook = await http.post("/webhook/shop", content=body, headers=hmac_request(body))
        assert hook.status_code == 503
        assert hook.headers["retry-after"]
        assert hook.json()["reason"] == "store_unavailable"
        out = await http.post("/outbound", headers=auth, json={"target": "crm", "body": {}})
        assert (out.status_code, out.json()["reason"]) == (503, "store_unavailable")
        assert (await http.get("/readyz")).status_code == 503


async def test_store_errors_escaping_the_connector_become_503_not_500() -> None:
    gw = gateway()

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailableError("lost")

    gw.connector._accept_checked = broken  # type: ignore[method-assign]
    async with client(gw.asgi_app()) as http:
        body = event_body()
        response = await http.post("/webhook/shop", content=body, headers=hmac_request(body))
    assert (response.status_code, response.headers["retry-after"]) == (503, "1")


async def test_readyz_probes_the_store_at_most_once_per_interval() -> None:
    writes = []

    class Counting(MemoryStore):
        async def aput(self, key: str, value: Any, *, ttl: float | None = None) -> None:
            writes.append(key)
            await super().aput(key, value, ttl=ttl)

    gw = WebhookGateway(gateway(store=Counting()).connector, require_dispatcher=False)
    async with client(gw.asgi_app()) as http:
        for _ in range(50):
            assert (await http.get("/readyz")).status_code == 200
    assert len(writes) == 1
    fresh = WebhookGateway(gw.connector, require_dispatcher=False, ready_check_interval_sec=0)
    await fresh.acheck_ready()
    await fresh.acheck_ready()
    assert len(writes) == 3


async def test_a_body_slower_than_the_body_timeout_is_answered_408() -> None:
    app = gateway().asgi_app(body_timeout_sec=0.2)
    calls = 0

    async def trickle() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls > 1:
            await anyio.sleep(30)  # the rest of the body never comes
        return {"type": "http.request", "body": b'{"event_id"', "more_body": True}

    with anyio.fail_after(5):
        status, body = await call(
            app, "/webhook/shop", [(b"content-type", b"application/json")], trickle
        )
    assert (status, body["reason"]) == (408, "body_timeout")


async def test_slack_slash_commands_and_github_forms_are_accepted_over_asgi() -> None:
    connector = WebhookConnector(
        provider_profiles={
            "slack": ProviderProfile("slack", "slack", scheme="slack"),
            "github": ProviderProfile("github", "github", scheme="github"),
        },
        secrets={"slack": SLACK_SECRET, "github": GITHUB_SECRET},
    )
    form = {"content-type": "application/x-www-form-urlencoded"}
    command = b"command=%2Fdeploy&text=prod&user_id=U1&trigger_id=1.2.abc"
    event = {"action": "opened", "number": 3}
    github_body = b"payload=" + urllib.parse.quote(json.dumps(event)).encode()
    async with client(WebhookGateway(connector).asgi_app()) as http:
        slack = await http.post(
            "/webhook/slack", content=command, headers={**slack_request(command), **form}
        )
        assert (slack.status_code, slack.json()["event_id"]) == (202, "1.2.abc")
        again = await http.post(
            "/webhook/slack", content=command, headers={**slack_request(command), **form}
        )
        assert again.json()["status"] == "duplicate"
        hub = await http.post(
            "/webhook/github", content=github_body, headers={**github_request(github_body), **form}
        )
        assert hub.status_code == 202
    first = (await connector.receive_inbound()).to_dict()["payload"]
    assert first["subject"] == "/deploy"
    assert first["payload"] == {
        "command": "/deploy",
        "text": "prod",
        "user_id": "U1",
        "trigger_id": "1.2.abc",
    }
    second = (await connector.receive_inbound()).to_dict()["payload"]
    assert (second["payload"], second["subject"]) == (event, "push")


async def test_readiness_fails_while_accepted_events_cannot_be_stored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A full disk: the readiness probe's small overwrite still fits, the inbox record of a
    # new event does not. /readyz said "ready" while every event got 503.
    class Full(MemoryStore):
        full = False

        async def aupdate(self, keys: Any, fn: Any, *, ttl: float | None = None) -> Any:
            if self.full:
                raise StoreUnavailableError("database or disk is full")
            return await super().aupdate(keys, fn, ttl=ttl)

    store = Full()
    gw = WebhookGateway(
        gateway(store=store).connector, outbound_token=TOKEN, require_dispatcher=False
    )
    action = {"target": "crm", "body": {"n": 1}}
    auth = {"authorization": f"Bearer {TOKEN}"}

    async def accept(expected: int) -> None:
        body = event_body()
        response = await http.post("/webhook/shop", content=body, headers=hmac_request(body))
        assert response.status_code == expected

    async def readiness() -> tuple[int, Any]:
        response = await http.get("/readyz")
        return response.status_code, response.json()["store"]

    async with client(gw.asgi_app(run_dispatcher=False)) as http:
        await accept(202)
        assert await readiness() == (200, True)
        store.full = True
        await accept(503)
        assert await readiness() == (503, False)
        store.full = False
        await accept(202)  # one stored event is proof enough
        assert await readiness() == (200, True)
        store.full = True
        queued = await http.post("/outbound", json=action, headers=auth)
        assert queued.json()["reason"] == "store_unavailable"
        assert await readiness() == (503, False)
        store.full = False
        assert (await http.post("/outbound", json=action, headers=auth)).status_code == 202
        assert await readiness() == (200, True)
        # Out of rotation, nothing arrives to prove the store works again: the failure
        # stops counting after a while, and the next events tell.
        monkeypatch.setattr(connector_module, "_STORE_FAILURE_HOLD_SEC", 0.05)
        store.full = True
        await accept(503)
        assert await readiness() == (503, False)
        await anyio.sleep(0.1)
        assert await readiness() == (200, True)
