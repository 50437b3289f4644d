"""Durable queues filled with records in every state, for the event log tests."""

from __future__ import annotations

from dataclasses import dataclass

from converge.core.store import Store
from converge.durable import Attempt, DurableQueue
from converge.extensions.connectors.server import EventLog

SIGNED_HEADERS = {
    "content-type": "application/json",
    "webhook-id": "msg_1",
    "webhook-signature": "v1,c2VjcmV0LXNpZ25hdHVyZQ==",
    "x-github-event": "push",
}


@dataclass
class Filled:
    log: EventLog
    events: DurableQueue
    deliveries: DurableQueue


async def fill(store: Store, *, max_records: int = 10_000) -> Filled:
    """Events: evt_ok (acknowledged, stripe), evt_dead (dead, github), evt_open (pending,
    stripe). Deliveries: dlv_ok (delivered, billing), dlv_dead (dead after 2 attempts, crm)."""
    events = DurableQueue(store, prefix="test:inbox", kind="inbound")
    deliveries = DurableQueue(store, prefix="test:outbox", kind="outbound")
    now = await events.anow()

    async def leased(queue: DurableQueue, record_id: str, key: str, data: dict) -> int:
        record = await queue.aadd(
            data, id=record_id, key=key, status="leased", lease_owner="t", lease_sec=30
        )
        return record.lease_token

    token = await leased(
        events, "evt_ok", "stripe", {"event": {"id": "evt_ok"}, "headers": SIGNED_HEADERS}
    )
    await events.aack("evt_ok", token, attempt=Attempt(now, None, None, 1.5, "acknowledged"))
    token = await leased(events, "evt_dead", "github", {"headers": SIGNED_HEADERS})
    await events.abury(
        "evt_dead", token, "consumer failed", Attempt(now, None, "boom", 2.0, "dead")
    )
    await events.aadd({"event": {"id": "evt_open"}}, id="evt_open", key="stripe")

    token = await leased(deliveries, "dlv_ok", "billing", {"body": {"order": 1}})
    await deliveries.aack("dlv_ok", token, attempt=Attempt(now, 200, None, 12.0, "delivered"))
    token = await leased(deliveries, "dlv_dead", "crm", {"body": {"order": 2}})
    await deliveries.aretry("dlv_dead", token, now, Attempt(now, 503, "status 503", 8.0, "retry"))
    again = await deliveries.alease_id("dlv_dead", "t", lease_sec=30)
    assert again is not None
    await deliveries.abury(
        "dlv_dead", again.lease_token, "status 404", Attempt(now, 404, "status 404", 5.0, "dead")
    )
    log = EventLog(events=events, deliveries=deliveries, max_records=max_records)
    return Filled(log, events, deliveries)
