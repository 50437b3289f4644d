"""Outbound deliveries ride out receiver outages; unsendable actions never hurt a target."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import httpx
import pytest
from outbound_helpers import FakeClock, Sender, action, dispatching, make
from webhook_helpers import Receiver

from converge.cli.config import GatewayConfig
from converge.extensions.connectors import (
    OutboundRequest,
    OutboundTarget,
    OutboundWebhookAction,
    RetrySchedule,
    WebhookConnector,
    WebhookRetryPolicy,
)
from converge.extensions.storage import SQLiteStore
from loop_stall import eventually
from loopback import UvicornThread

pytestmark = pytest.mark.anyio


class DownSender(Sender):
    """A receiver that refuses connections while ``down``."""

    def __init__(self) -> None:
        super().__init__()
        self.down = True
        self.accepted: list[OutboundRequest] = []

    async def __call__(self, request: OutboundRequest) -> int:
        self.requests.append(request)
        await anyio.lowlevel.checkpoint()
        if self.down:
            raise httpx.ConnectError("connection refused")
        self.accepted.append(request)
        return 200


async def _advance(c: WebhookConnector, clock: FakeClock, seconds: float, step: float) -> None:
    """Move virtual time on by ``seconds`` in ``step``s; after each step, wait (real
    time) until the dispatcher has started and finished every attempt due by then, so
    that virtual time never runs ahead of a slow machine."""
    schedule = c.dispatcher._schedule

    def settled() -> bool:
        due = schedule.next_due()
        return not schedule.running and (due is None or due > clock.now)

    end = clock.now + seconds
    while clock.now < end:
        clock.now = min(end, clock.now + step)
        await anyio.lowlevel.checkpoint()
        await eventually(settled)


async def test_gateway_defaults_dead_letter_nothing_in_an_hour_long_outage() -> None:
    defaults = GatewayConfig()
    assert isinstance(defaults.retry, RetrySchedule)
    clock = FakeClock()
    sender = DownSender()
    c = make(
        outbound_sender=sender,
        clock=clock,
        retry_policy=defaults.retry,
        breaker_failure_threshold=defaults.breaker_failure_threshold,
        breaker_recovery_timeout_sec=defaults.breaker_recovery_timeout_sec,
    )
    async with dispatching(c):
        for n in range(3):  # accepted as the outage starts
            await c.submit_outbound_action(action(n))
        for minute in range(60):  # and one a minute while it lasts
            await c.submit_outbound_action(action(100 + minute))
            await _advance(c, clock, 60, step=20)
            assert await c.alist_dead_letters() == []
        assert c.breaker("app").state != "closed"
        records = {r.id: r for r in await c.outbox.alist_actions(limit=1000)}
        assert len(records) == 63
        budget = defaults.retry.max_attempts
        assert max(r.attempts for r in records.values()) < budget
        # Probes during the outage are kept in the history, marked as not counted.
        outcomes = {a.outcome for r in records.values() for a in r.history}
        assert "outage" in outcomes
        sender.down = False
        recovered = clock.now
        # Within one breaker recovery period plus one backoff step, everything arrives.
        limit = defaults.breaker_recovery_timeout_sec + defaults.retry.delays_sec[0]
        while await c.apending_count() and clock.now - recovered <= limit:
            await _advance(c, clock, 1, step=1)
        assert await c.apending_count() == 0
        assert clock.now - recovered <= limit
    assert await c.alist_dead_letters() == []
    delivered = await c.outbox.alist_actions(status="delivered", limit=1000)
    assert len(delivered) == 63
    assert all(r.history[-1].outcome == "delivered" for r in delivered)
    # Each accepted once after recovery (a probe in flight as the outage ended counts).
    assert sorted(r.action_id for r in sender.accepted) == sorted(r.id for r in delivered)


async def test_the_seed_policy_does_not_dead_letter_the_first_action_of_an_outage() -> None:
    clock = FakeClock()
    sender = DownSender()
    c = make(
        outbound_sender=sender,
        clock=clock,
        retry_policy=WebhookRetryPolicy(),  # the seed's defaults: 5 attempts in ~4 s
        breaker_failure_threshold=5,
        breaker_recovery_timeout_sec=30,
    )
    async with dispatching(c):
        await c.submit_outbound_action(action(1))
        await _advance(c, clock, 600, step=1)
        assert await c.alist_dead_letters() == []
        (record,) = await c.outbox.alist_actions()
        assert record.attempts == 4  # the fifth failure opened the circuit: not counted
        assert len(sender.requests) > 10  # probed every recovery period meanwhile
        sender.down = False
        await _advance(c, clock, 31, step=1)
        await eventually(lambda: c.dispatcher.backlog == 0)
    assert await c.alist_dead_letters() == []
    assert (await c.outbox.aget(record.id)).status == "delivered"  # type: ignore[union-attr]


async def test_a_real_receiver_down_then_back_gets_everything_and_nothing_is_dead(
    tmp_path: Path,
) -> None:
    receiver = Receiver()
    server = UvicornThread(receiver, name="receiver").start()
    port = int(server.url.rsplit(":", 1)[1])
    url = f"{server.url}/events"
    schedule = RetrySchedule(
        delays_sec=(0.05, 0.1, 0.2), jitter_ratio=0, request_timeout_sec=1, lease_margin_sec=1
    )
    store = SQLiteStore(tmp_path / "outbox.sqlite3")
    c = make(
        store,
        retry_policy=schedule,
        targets=[OutboundTarget("app", url)],
        breaker_failure_threshold=2,
        breaker_recovery_timeout_sec=0.1,
    )
    try:
        async with dispatching(c):
            await c.submit_outbound_action(action(0, url=url))
            await eventually(lambda: len(receiver.delivered()) == 1)
            server.stop()  # the receiver goes down: connections are refused
            for n in range(1, 4):
                await c.submit_outbound_action(action(n, url=url))
            # 1.5 s of outage: four times the whole schedule (0.35 s), a probe every
            # 0.1 s (more than the 4-attempt budget of each action), and nothing died.
            await anyio.sleep(1.5)
            assert await c.alist_dead_letters() == []
            assert await c.apending_count() == 3
            assert c.breaker("app").state != "closed"
            server = UvicornThread(receiver, name="receiver", port=port).start()
            back = anyio.current_time()
            await eventually(lambda: len(receiver.delivered()) == 4, within=5)
            took = anyio.current_time() - back
            await eventually(lambda: c.dispatcher.backlog == 0)
        assert took <= 0.1 + 0.2 + 1.5  # recovery period + one backoff step + slack (load)
        assert await c.alist_dead_letters() == []
        assert await c.apending_count() == 0
        # Each action once, or, when an answer outlived the request timeout on a loaded
        # machine, again under its one idempotency key (at least once: the receiver
        # drops the repeat).
        keys: dict[int, set[str]] = {}
        for r in receiver.delivered():
            keys.setdefault(json.loads(r.body)["n"], set()).add(r.headers["idempotency-key"])
        assert sorted(keys) == list(range(4))
        assert all(len(k) == 1 for k in keys.values()), keys
    finally:
        server.stop()
        await store.aclose()


@pytest.mark.parametrize(
    "headers",
    [{"x-note": "caf\u00e9"}, {"x-note": "a\x01b"}, {"x-note": "a\x7fb"}],
    ids=["non-ascii", "control", "del"],
)
async def test_unsendable_headers_are_dead_at_once_and_never_trip_the_breaker(
    headers: dict[str, str], receiver: tuple[Receiver, str]
) -> None:
    recv, url = receiver
    c = make(
        targets=[OutboundTarget("app", f"{url}/events")],
        breaker_failure_threshold=2,
        breaker_recovery_timeout_sec=60,
    )
    bad = action(0, url=f"{url}/events")
    object.__setattr__(bad, "headers", headers)  # as if the edge had let it through
    async with dispatching(c):
        for _ in range(5):
            await c.submit_outbound_action(bad)
        await c.submit_outbound_action(action(1, url=f"{url}/events"))
        await eventually(lambda: len(recv.delivered()) == 1)
        await eventually(lambda: c.dispatcher.backlog == 0)
    letters = await c.alist_dead_letters()
    assert len(letters) == 5
    assert all(d.reason.startswith("unsendable action") and d.attempts == 1 for d in letters)
    assert c.breaker("app").state == "closed"
    assert (
        c.metrics.get(
            "webhook_outbound_dead_lettered_total", labels={"target": "app", "reason": "unsendable"}
        )
        == 5
    )


async def test_an_unsendable_probe_gives_the_probe_slot_back() -> None:
    clock = FakeClock()
    sender = DownSender()
    c = make(
        outbound_sender=sender,
        clock=clock,
        breaker_failure_threshold=1,
        breaker_recovery_timeout_sec=30,
    )
    async with dispatching(c):
        await c.submit_outbound_action(action(1))
        await eventually(lambda: len(sender.requests) == 1)
        assert c.breaker("app").state == "open"
        bad = OutboundWebhookAction(target="app", method="POST", url=action().url, body={})
        object.__setattr__(bad, "body", {"s": "\ud800"})  # never encodes
        await c.submit_outbound_action(bad)
        sender.down = False
        clock.now += 30
        await eventually(lambda: c.dispatcher.backlog == 0)
    (letter,) = await c.alist_dead_letters()
    assert letter.reason.startswith("unsendable action")
    assert c.breaker("app").state == "closed"
