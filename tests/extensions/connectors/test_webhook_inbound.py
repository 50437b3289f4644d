"""WebhookConnector inbound: accepted events are handed on exactly once, or not accepted."""

from __future__ import annotations

import builtins
import functools
import json
from typing import Any

import anyio
import pytest
from webhook_helpers import (
    GITHUB_SECRET,
    HMAC_SECRET,
    SLACK_SECRET,
    STRIPE_SECRET,
    event_body,
    github_request,
    hmac_request,
    slack_request,
    stripe_request,
)

from converge.core.message import Message
from converge.core.store import Store
from converge.core.task import Task
from converge.errors import ClosedError, StoreUnavailableError, UsageError
from converge.extensions.connectors import (
    INBOUND_TOPIC,
    OUTBOUND_TOPIC,
    InboundWebhookEvent,
    OutboundTarget,
    ProviderProfile,
    WebhookConnector,
)
from converge.extensions.storage import MemoryStore
from converge.runtime import MessageBus

pytestmark = pytest.mark.anyio

PROFILES = {
    "shop": ProviderProfile("shop", "shop"),
    "jobs": ProviderProfile("jobs", "shop", emit_as="task"),
    "stripe": ProviderProfile("stripe", "stripe", scheme="stripe"),
    "github": ProviderProfile("github", "github", scheme="github"),
    "slack": ProviderProfile("slack", "slack", scheme="slack"),
}
SECRETS = {
    "shop": HMAC_SECRET,
    "stripe": STRIPE_SECRET,
    "github": GITHUB_SECRET,
    "slack": SLACK_SECRET,
}


def connector(**kw: Any) -> WebhookConnector:
    kw.setdefault("store", MemoryStore())
    return WebhookConnector(provider_profiles=PROFILES, secrets=SECRETS, **kw)


async def post(
    c: WebhookConnector, provider: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], dict[str, Any]]:
    headers = headers if headers is not None else hmac_request(body)
    status, out, data = await c.accept_inbound_http(
        provider, method="POST", headers=headers, raw_body=body
    )
    return status, out, json.loads(data)


async def test_an_accepted_event_becomes_a_message_on_the_inbound_topic() -> None:
    c = connector()
    body = event_body(subject="order.paid", source="shop-eu", amount=12.5)
    headers = {**hmac_request(body), "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}
    status, out, data = await post(c, "shop", body, headers)
    assert status == 202
    assert out["content-type"] == "application/json"
    assert data["status"] == "accepted"
    message = await c.receive_inbound()
    assert isinstance(message, Message)
    assert [t.name for t in message.topics] == [INBOUND_TOPIC]
    event = message.to_dict()["payload"]
    assert event["provider"] == "shop"
    assert event["event_id"] == data["event_id"]
    assert (event["subject"], event["source"]) == ("order.paid", "shop-eu")
    assert event["payload"]["amount"] == 12.5
    assert event["trace_id"] == "a" * 32
    assert InboundWebhookEvent.from_dict(event).to_dict() == event  # the model's own form
    assert message.sender == "webhook-connector"


async def test_a_duplicate_is_answered_200_and_not_handed_on_again() -> None:
    c = connector()
    body = event_body()
    headers = hmac_request(body)
    assert (await post(c, "shop", body, headers))[0] == 202
    status, _, data = await post(c, "shop", body, headers)
    assert (status, data["status"]) == (200, "duplicate")
    assert await c.inbox.apending_count() == 1
    assert await c.aack_inbound(await c.receive_inbound())
    assert await c.inbox.apending_count() == 0
    assert (await post(c, "shop", body, headers))[0] == 200  # still a duplicate once done
    assert c.metrics.get("webhook_inbound_duplicates_total", labels={"provider": "shop"}) == 2


async def test_fifty_concurrent_duplicates_yield_exactly_one_acceptance(any_store: Store) -> None:
    c = connector(store=any_store)
    body = event_body()
    headers = hmac_request(body)
    statuses: list[int] = []

    async def one() -> None:
        statuses.append((await post(c, "shop", body, headers))[0])

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(one)
    assert sorted(statuses) == [200] * 49 + [202]
    assert await c.inbox.apending_count() == 1
    assert len(await c.inbox.alist()) == 1


async def test_a_full_inbox_answers_503_and_stores_nothing(any_store: Store) -> None:
    c = connector(store=any_store, max_pending=1)
    first, second = event_body(), event_body()
    assert (await post(c, "shop", first))[0] == 202
    headers = hmac_request(second)
    status, out, data = await post(c, "shop", second, headers)
    assert (status, data["reason"], out["retry-after"]) == (503, "inbox_full", "1")
    assert await c.inbox.apending_count() == 1
    # Received is not enough: the slot frees when the consumer acknowledges.
    item = await c.receive_inbound()
    assert (await post(c, "shop", second, headers))[0] == 503
    assert await c.aack_inbound(item)
    status, _, _ = await post(c, "shop", second, headers)  # the sender's retry
    assert status == 202
    message = await c.receive_inbound()
    assert message.to_dict()["payload"]["event_id"] == json.loads(second)["event_id"]


async def test_task_profiles_emit_tasks() -> None:
    c = connector()
    body = event_body(subject="reindex")
    assert (await post(c, "jobs", body))[0] == 202
    task = await c.receive_inbound()
    assert isinstance(task, Task)
    assert task.inputs["subject"] == "reindex"
    assert "reindex" in task.objective


async def test_events_go_to_an_attached_bus() -> None:
    async with MessageBus() as bus:
        c = connector(bus=bus)
        sub = bus.subscribe(topics=[INBOUND_TOPIC])
        body = event_body()
        assert (await post(c, "shop", body))[0] == 202
        message = sub.receive_nowait()
        assert message.to_dict()["payload"]["event_id"] == json.loads(body)["event_id"]
        assert (await post(c, "jobs", event_body()))[0] == 202
        carried = sub.receive_nowait()
        assert carried.task_id == carried.to_dict()["payload"]["task"]["id"]


async def test_a_detached_connector_takes_no_more_outbound_messages_from_the_bus() -> None:
    async with MessageBus() as bus:
        c = connector(targets=[OutboundTarget("app", "http://127.0.0.1:9/events")])
        reply = {"target": "app", "body": {"n": 1}}
        c.attach_bus(bus)
        c.attach_bus(bus)  # again: still one hand-off per message
        assert await bus.publish(Message(sender="a", topics=[OUTBOUND_TOPIC], payload=reply)) == 1
        assert await c.apending_count() == 1
        c.attach_bus(None)
        assert await bus.publish(Message(sender="a", topics=[OUTBOUND_TOPIC], payload=reply)) == 0
        assert await c.apending_count() == 1


async def test_a_full_bus_inbox_keeps_the_event_and_publishes_it_later() -> None:
    async with MessageBus() as bus:
        c = connector()
        c.attach_bus(bus)
        sub = bus.subscribe(topics=["bridge.webhook.#"], inbox_size=1)
        assert (await post(c, "shop", event_body()))[0] == 202
        body = event_body()
        assert (await post(c, "shop", body))[0] == 202  # stored: accepted
        assert await c.inbox.apending_count() == 1
        sub.receive_nowait()
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(c.run_inbox, poll_interval_sec=0.05))
            with anyio.fail_after(5):
                message = await sub.receive()
            tg.cancel_scope.cancel()
        assert message.to_dict()["payload"]["event_id"] == json.loads(body)["event_id"]
        assert await c.inbox.apending_count() == 0


async def test_a_bus_without_subscribers_does_not_accept() -> None:
    async with MessageBus() as bus:
        c = connector(bus=bus)
        body = event_body()
        headers = hmac_request(body)
        status, _, data = await post(c, "shop", body, headers)
        assert (status, data["reason"]) == (503, "no_consumer")
        bus.subscribe(topics=[INBOUND_TOPIC])
        assert (await post(c, "shop", body, headers))[0] == 202


async def test_a_forwarded_event_is_in_the_outbox_before_the_202(any_store: Store) -> None:
    target = OutboundTarget("app", "http://127.0.0.1:9/events")
    c = connector(store=any_store, targets=[target], inbound_routes={"shop": "app"})
    body = event_body()
    assert (await post(c, "shop", body))[0] == 202
    assert await c.apending_count() == 1
    records = [await c.outbox.aget_pending(i) for i in await c.outbox.apending_ids()]
    assert records[0] is not None
    assert records[0].action.body["event_id"] == json.loads(body)["event_id"]
    # The replayed delivery finds the same outbox record: still one.
    assert (await post(c, "shop", body))[0] == 200
    assert await c.apending_count() == 1


class BrokenStore(MemoryStore):
    """A store whose backend has gone away."""

    async def aput_if_absent(self, key: str, value: Any, *, ttl: float | None = None) -> bool:
        raise StoreUnavailableError("backend down")

    async def aput(self, key: str, value: Any, *, ttl: float | None = None) -> None:
        raise StoreUnavailableError("backend down")

    async def alist(self, prefix: str = "") -> builtins.list[str]:
        raise StoreUnavailableError("backend down")

    async def aupdate(self, keys: Any, fn: Any, *, ttl: float | None = None) -> Any:
        raise StoreUnavailableError("backend down")


async def test_a_failing_store_answers_503_without_exception_text() -> None:
    c = connector(store=BrokenStore())
    status, out, data = await post(c, "shop", event_body())
    assert (status, data, out["retry-after"]) == (
        503,
        {"status": "unavailable", "reason": "store_unavailable"},
        "1",
    )


async def test_rejections_are_json_with_a_reason_and_counted() -> None:
    c = connector()
    body = event_body()
    status, out, data = await post(c, "shop", body, {**hmac_request(body, secret="x")})
    assert (status, data) == (401, {"status": "rejected", "reason": "bad_signature"})
    status, out, data = await c.accept_inbound_http("shop", method="GET", headers={}, raw_body=b"")  # type: ignore[assignment]
    assert status == 405
    assert out["allow"] == "POST"
    status, _, _ = await post(c, "who?" * 30, body)
    assert status == 404
    assert (
        c.metrics.get(
            "webhook_inbound_rejected_total", labels={"provider": "shop", "reason": "bad_signature"}
        )
        == 1
    )
    assert (
        c.metrics.get(
            "webhook_inbound_rejected_total",
            labels={"provider": "_unknown", "reason": "unknown_provider"},
        )
        == 1
    )
    # Called with anything else, these raised AttributeError or TypeError.
    with pytest.raises(UsageError, match="WebhookSecurityError"):
        c.rejection("shop", ValueError("no"))  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="target name"):
        c.breaker(["app"])  # type: ignore[arg-type]


async def test_preset_subjects_come_from_the_senders_event_type() -> None:
    c = connector()
    stripe = json.dumps({"id": "evt_1", "type": "invoice.paid"}).encode()
    assert (await post(c, "stripe", stripe, stripe_request(stripe)))[0] == 202
    github = json.dumps({"ref": "main"}).encode()
    assert (await post(c, "github", github, github_request(github)))[0] == 202
    slack = json.dumps(
        {"type": "event_callback", "event_id": "Ev1", "event": {"type": "app_mention"}}
    ).encode()
    assert (await post(c, "slack", slack, slack_request(slack)))[0] == 202
    subjects = [(await c.receive_inbound()).to_dict()["payload"]["subject"] for _ in range(3)]
    assert subjects == ["invoice.paid", "push", "app_mention"]


async def test_slack_url_verification_echoes_the_challenge_and_emits_nothing() -> None:
    c = connector()
    body = json.dumps({"type": "url_verification", "challenge": "xyz", "token": "t"}).encode()
    for _ in range(2):  # Slack may retry: never "duplicate"
        status, _, data = await post(c, "slack", body, slack_request(body))
        assert (status, data) == (200, {"challenge": "xyz"})
    assert await c.inbox.alist() == []


async def test_programming_errors_raise_usage_errors() -> None:
    c = connector()
    with pytest.raises(UsageError):
        await c.accept_inbound_http("shop", method="POST", headers={}, raw_body="x")  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        c.attach_bus(object())  # type: ignore[arg-type]


async def test_large_bodies_are_verified_off_the_loop_with_the_same_result() -> None:
    c = connector()
    body = event_body(blob="x" * 200_000)
    assert (await post(c, "shop", body))[0] == 202
    forged = event_body(blob="y" * 200_000)
    status, _, data = await post(c, "shop", forged, hmac_request(forged, secret="nope"))
    assert (status, data["reason"]) == (401, "bad_signature")


async def test_a_closed_connector_refuses_to_work() -> None:
    c = connector()
    await c.aclose()
    await c.aclose()  # idempotent
    with pytest.raises(ClosedError):
        await post(c, "shop", event_body())
