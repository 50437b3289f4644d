"""Outbound delivery: persisted before accepted, retried on schedule, never lost."""

from __future__ import annotations

import functools
import gc
import json
import time
from collections import Counter
from pathlib import Path

import anyio
import pytest
import standardwebhooks
from outbound_helpers import FakeClock, Sender, action, dispatching, make
from webhook_helpers import TARGET_SECRET, Receiver, count_outbox_writes

from converge.core.message import Message
from converge.core.store import Store
from converge.errors import IdempotencyConflictError, UsageError
from converge.extensions.connectors import (
    OutboundRequest,
    OutboundResponse,
    OutboundTarget,
    Outbox,
    OutboxRecord,
    WebhookConnector,
    WebhookGateway,
    WebhookRetryPolicy,
)
from converge.extensions.connectors.outbound.schedule import DispatchSchedule
from converge.extensions.storage import FileStore, SQLiteStore
from counting_store import CountingUpdates
from loop_stall import eventually
from loopback import UvicornThread

pytestmark = pytest.mark.anyio


async def test_an_action_is_persisted_before_submit_returns(any_store: Store) -> None:
    c = make(any_store)
    await c.submit_outbound_action(action(1))
    reopened = make(any_store)
    (record_id,) = await reopened.outbox.apending_ids()
    record = await reopened.outbox.aget_pending(record_id)
    assert record is not None
    assert record.action.body == {"n": 1}
    assert record.attempts == 0


async def test_an_action_submitted_to_a_running_dispatcher_costs_two_updates(
    any_store: Store, receiver: tuple[Receiver, str]
) -> None:
    # Added leased to the running dispatcher: its attempt writes no lease of its own.
    # Submitting it again while it is attempted hands nothing over twice.
    recv, url = receiver
    recv.delay = 0.2
    c = make(any_store, targets=[OutboundTarget("app", f"{url}/hook")])
    async with dispatching(c):
        writes = count_outbox_writes(any_store)
        sent = action(1, url=f"{url}/hook", idempotency_key="k1")
        first = await c.enqueue(sent)
        assert first.status == "leased"
        await anyio.sleep(0.05)  # its attempt is under way (the receiver takes 0.2 s)
        assert (await c.enqueue(sent)).id == first.id
        await eventually(lambda: c.dispatcher.backlog == 0)
    assert len(recv.delivered()) == 1
    assert len(writes) == 2  # the add and the delivery
    record = await c.outbox.aget(first.id)
    assert record is not None
    assert (record.status, record.attempt_count) == ("delivered", 1)


async def test_a_receiver_that_fails_then_recovers_gets_it_once_with_one_key() -> None:
    sender = Sender(503, 500, 200)
    c = make(outbound_sender=sender)
    async with dispatching(c):
        await c.submit_outbound_action(action(7))
        await eventually(lambda: len(sender.requests) == 3)
        await eventually(lambda: c.dispatcher.backlog == 0)
    keys = {r.headers["idempotency-key"] for r in sender.requests}
    assert len(keys) == 1
    assert [r.attempt for r in sender.requests] == [1, 2, 3]
    assert await c.apending_count() == 0
    assert await c.alist_dead_letters() == []
    assert c.metrics.get("webhook_outbound_retried_total", labels={"target": "app"}) == 2
    assert c.metrics.get("webhook_outbound_sent_total", labels={"target": "app"}) == 1


async def test_a_given_idempotency_key_is_sent_and_deduplicates_submissions() -> None:
    sender = Sender()
    c = make(outbound_sender=sender)
    first = await c.enqueue(action(1, idempotency_key="order-42"))
    again = await c.enqueue(action(1, idempotency_key="order-42"))
    assert again.id == first.id
    with pytest.raises(IdempotencyConflictError) as caught:
        await c.submit_outbound_action(action(2, idempotency_key="order-42"))
    assert caught.value.existing_id == first.id
    assert await c.apending_count() == 1
    async with dispatching(c):
        await eventually(lambda: len(sender.requests) == 1)
        await eventually(lambda: c.dispatcher.backlog == 0)
    assert sender.requests[0].headers["idempotency-key"] == "order-42"
    # Delivered, the key still names the action while it is kept: no second send.
    assert (await c.enqueue(action(1, idempotency_key="order-42"))).status == "delivered"
    with pytest.raises(IdempotencyConflictError):
        await c.enqueue(action(3, idempotency_key="order-42"))
    assert len(sender.requests) == 1


async def test_namespaces_keep_api_agent_and_inbound_keys_apart() -> None:
    c = make(outbound_sender=Sender())
    key = "inbound:github:123"
    records = [
        await c.enqueue(action(n, idempotency_key=key), namespace=space)
        for n, space in enumerate(("api", "agent", "inbound"))
    ]
    assert len({r.id for r in records}) == 3
    assert {r.namespace for r in records} == {"api", "agent", "inbound"}
    assert await c.apending_count() == 3
    # A token holder pre-claiming the forward's key in "api" does not stop the forward.
    forward = await c.enqueue(action(2, idempotency_key=key), namespace="inbound")
    assert forward.id == records[2].id
    with pytest.raises(UsageError):
        await c.enqueue(action(4, idempotency_key=key), namespace="other")


async def test_retry_after_is_honoured_on_virtual_time() -> None:
    clock = FakeClock()
    sender = Sender(OutboundResponse(429, {"Retry-After": "120"}))
    c = make(outbound_sender=sender, clock=clock)
    async with dispatching(c):
        await c.submit_outbound_action(action())
        await eventually(lambda: len(sender.requests) == 1)
        await eventually(lambda: c.dispatcher.backlog == 1 and c.dispatcher._schedule.running == 0)
        (record_id,) = await c.outbox.apending_ids()
        record = await c.outbox.aget_pending(record_id)
        assert record is not None
        assert record.due == pytest.approx(clock.now + 120)
        assert (record.attempts, record.last_status) == (1, 429)
        clock.now += 119
        await anyio.sleep(0.05)
        assert len(sender.requests) == 1
        clock.now += 1
        await eventually(lambda: len(sender.requests) == 2)
        await eventually(lambda: c.dispatcher.backlog == 0)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 410, 422])
async def test_permanent_failures_are_dead_lettered_at_once(status: int) -> None:
    sender = Sender(status)
    c = make(outbound_sender=sender)
    async with dispatching(c):
        await c.submit_outbound_action(action())
        await eventually(lambda: c.dispatcher.backlog == 0)
    (letter,) = await c.alist_dead_letters()
    assert (letter.attempts, letter.last_status, letter.reason) == (1, status, f"status {status}")
    assert len(sender.requests) == 1
    assert await c.apending_count() == 0


async def test_dead_letters_are_replayable_with_a_fresh_budget(any_store: Store) -> None:
    sender = Sender(503, 503)
    policy = WebhookRetryPolicy(
        max_attempts=2, base_delay_sec=0.01, max_delay_sec=0.01, jitter_ratio=0.0
    )
    c = make(any_store, outbound_sender=sender, retry_policy=policy)
    async with dispatching(c):
        await c.submit_outbound_action(action(3))
        await eventually(lambda: c.dispatcher.backlog == 0)
        (letter,) = await c.alist_dead_letters()
        assert letter.reason.startswith("max attempts")
        assert letter.attempts == 2
        assert await c.areplay_dead_letter(letter.id)
        assert not await c.areplay_dead_letter(letter.id)
        await eventually(lambda: len(sender.requests) == 3)
        await eventually(lambda: c.dispatcher.backlog == 0)
    assert await c.alist_dead_letters() == []
    assert await c.apending_count() == 0
    assert (
        c.metrics.get(
            "webhook_outbound_dead_lettered_total", labels={"target": "app", "reason": "max"}
        )
        == 1
    )


async def test_a_deadline_ends_retries() -> None:
    clock = FakeClock()
    sender = Sender()
    sender.default = 503
    policy = WebhookRetryPolicy(base_delay_sec=60, max_delay_sec=60, jitter_ratio=0.0)
    c = make(outbound_sender=sender, clock=clock, retry_policy=policy)
    async with dispatching(c):
        await c.submit_outbound_action(action(deadline=clock.now + 30))
        await eventually(lambda: c.dispatcher.backlog == 0)
    (letter,) = await c.alist_dead_letters()
    assert letter.reason.startswith("deadline")
    assert len(sender.requests) == 1


async def test_an_expired_action_is_not_attempted() -> None:
    clock = FakeClock()
    sender = Sender()
    c = make(outbound_sender=sender, clock=clock)
    await c.submit_outbound_action(action(deadline=clock.now - 1))
    async with dispatching(c):
        await eventually(lambda: c.dispatcher.backlog == 0)
    assert sender.requests == []
    assert len(await c.alist_dead_letters()) == 1


def down_target(clock: FakeClock, sender: Sender, max_concurrency: int) -> WebhookConnector:
    """A connector whose target answers 503 (``sender.default``) until told otherwise: its
    circuit opens after 2 failures and admits a probe every 30 s of ``clock``."""
    sender.default = 503
    return make(
        outbound_sender=sender,
        clock=clock,
        retry_policy=WebhookRetryPolicy(
            max_attempts=100, base_delay_sec=1, max_delay_sec=1, jitter_ratio=0.0
        ),
        breaker_failure_threshold=2,
        breaker_recovery_timeout_sec=30,
        targets=[OutboundTarget("app", "http://127.0.0.1:9/hook", max_concurrency=max_concurrency)],
    )


async def test_an_open_circuit_defers_actions_and_a_probe_releases_them() -> None:
    clock = FakeClock()
    sender = Sender()
    c = down_target(clock, sender, max_concurrency=1)
    async with dispatching(c):
        for n in range(5):
            await c.submit_outbound_action(action(n))
        await eventually(lambda: len(sender.requests) == 2)
        await eventually(lambda: c.breaker("app").state == "open")
        clock.now += 5  # retries are due, but the circuit is open: no attempts
        await anyio.sleep(0.1)
        assert len(sender.requests) == 2
        sender.default = 200
        clock.now += 25  # recovery timeout over: one probe, then the rest
        await eventually(lambda: c.dispatcher.backlog == 0)
    assert c.breaker("app").state == "closed"
    assert sorted(json.loads(r.content)["n"] for r in sender.requests[2:]) == [0, 1, 2, 3, 4]
    assert await c.alist_dead_letters() == []


async def test_an_open_circuit_holds_a_backlog_without_taking_each_action_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A target down with 300 actions waiting: each probe interval hands out the probe and
    # the few actions started beside it, not all 300 (each taken, then put back, which
    # cost the event loop seconds per interval with 100,000 waiting).
    started = [0]
    take = DispatchSchedule.take

    def counted(self: DispatchSchedule, now: float) -> list[tuple[str, str]]:
        out = take(self, now)
        started[0] += len(out)
        return out

    monkeypatch.setattr(DispatchSchedule, "take", counted)
    clock = FakeClock()
    sender = Sender()
    c = down_target(clock, sender, max_concurrency=4)
    for n in range(300):
        await c.submit_outbound_action(action(n))
    async with dispatching(c):
        await eventually(lambda: c.breaker("app").state == "open")
        await anyio.sleep(0.1)
        before, sent = started[0], len(sender.requests)
        for probe in range(1, 4):
            clock.now += 30  # one probe per interval, and it fails
            await eventually(lambda probe=probe: len(sender.requests) == sent + probe)
            await eventually(lambda: c.breaker("app").state == "open")
            await anyio.sleep(0.05)
        assert started[0] - before <= 3 * (4 + 1)
        await recovers_with_each_once(c, clock, sender, 300)


async def recovers_with_each_once(
    c: WebhookConnector, clock: FakeClock, sender: Sender, count: int
) -> None:
    """The target of ``down_target`` answers again: after the next probe, each of the
    ``count`` actions arrives once and none is dead."""
    sender.default = 200
    recovered = len(sender.requests)
    clock.now += 30
    await eventually(lambda: c.dispatcher.backlog == 0, within=20)
    delivered = [json.loads(r.content)["n"] for r in sender.requests[recovered:]]
    assert sorted(delivered) == list(range(count))
    assert await c.alist_dead_letters() == []


def _records_in_memory() -> int:
    gc.collect()
    return sum(isinstance(o, OutboxRecord) for o in gc.get_objects())


async def test_actions_waiting_behind_an_open_circuit_are_not_kept_in_memory() -> None:
    # An action submitted to a running dispatcher is added leased to it and kept in
    # memory for its first attempt. Behind an open circuit that attempt waits past the
    # lease, so every action of an outage stayed in memory, payload and all.
    clock = FakeClock()
    sender = Sender()
    c = down_target(clock, sender, max_concurrency=4)
    async with dispatching(c):
        for n in range(2):
            await c.submit_outbound_action(action(n))
        await eventually(lambda: c.breaker("app").state == "open")
        for n in range(2, 300):
            await c.submit_outbound_action(action(n))
        assert _records_in_memory() <= 10
        await recovers_with_each_once(c, clock, sender, 300)


async def test_an_action_is_kept_in_memory_only_while_its_first_lease_lasts() -> None:
    # One slow attempt holds the only slot: the 300 actions behind it are kept in memory
    # for their first attempt until their lease could no longer cover one.
    clock = FakeClock()
    gate = anyio.Event()

    slow: list[OutboundRequest] = []

    async def sender(request: OutboundRequest) -> int:
        if request.url.endswith("/slow"):
            slow.append(request)
            await gate.wait()
        return 200

    c = make(
        outbound_sender=sender,
        clock=clock,
        max_in_flight=1,
        retry_policy=WebhookRetryPolicy(request_timeout_sec=60),  # the slow one is not cut
        targets=[
            OutboundTarget("app", "http://127.0.0.1:9/hook"),
            OutboundTarget("slow", "http://127.0.0.1:9/slow"),
        ],
    )
    received: list[int] = []
    async with dispatching(c):
        await c.submit_outbound_action(action(-1, target="slow", url="http://127.0.0.1:9/slow"))
        await eventually(lambda: len(slow) == 1)
        for n in range(300):
            await c.submit_outbound_action(action(n))
        assert _records_in_memory() >= 300
        clock.now += c.dispatcher.lease_sec - 1  # less than a request timeout left
        await eventually(lambda: _records_in_memory() <= 10)
        gate.set()
        clock.now += 1  # their leases over: each attempt leases its action anew
        await eventually(lambda: c.dispatcher.backlog == 0, within=20)
    for record in await c.outbox.alist(key="app", limit=1000):
        assert (record.status, len(record.attempts)) == ("delivered", 1)
        received.append(record.data["action"]["body"]["n"])
    assert sorted(received) == list(range(300))


async def test_concurrency_limits_hold_per_target_and_overall() -> None:
    running: Counter[str] = Counter()
    peak: Counter[str] = Counter()
    total = [0, 0]
    gate = anyio.Event()

    async def sender(request: OutboundRequest) -> int:
        target = request.url.rsplit("/", 1)[-1]
        running[target] += 1
        total[0] += 1
        peak[target] = max(peak[target], running[target])
        total[1] = max(total[1], total[0])
        await gate.wait()
        running[target] -= 1
        total[0] -= 1
        return 200

    targets = [
        OutboundTarget("a", "http://127.0.0.1:9/a", max_concurrency=2),
        OutboundTarget("b", "http://127.0.0.1:9/b", max_concurrency=3),
    ]
    c = make(outbound_sender=sender, targets=targets, max_in_flight=4)
    async with dispatching(c):
        for n in range(6):
            await c.submit_outbound_action(action(n, target="a", url="http://127.0.0.1:9/a"))
            await c.submit_outbound_action(action(n, target="b", url="http://127.0.0.1:9/b"))
        await eventually(lambda: total[0] == 4)
        await anyio.sleep(0.05)
        assert peak["a"] <= 2
        assert peak["b"] <= 3
        assert total[1] == 4
        gate.set()
        await eventually(lambda: c.dispatcher.backlog == 0)


async def test_signed_targets_send_standard_webhooks_headers() -> None:
    sender = Sender()
    targets = [
        OutboundTarget("app", "http://127.0.0.1:9/hook", signing_secret=TARGET_SECRET),
        OutboundTarget("plain", "http://127.0.0.1:9/plain"),
    ]
    c = make(outbound_sender=sender, targets=targets)
    async with dispatching(c):
        await c.submit_outbound_action(action(1))
        await c.submit_outbound_action(action(2, target="plain", url="http://127.0.0.1:9/plain"))
        await eventually(lambda: len(sender.requests) == 2)
    signed = next(r for r in sender.requests if r.url.endswith("/hook"))
    plain = next(r for r in sender.requests if r.url.endswith("/plain"))
    assert standardwebhooks.Webhook(TARGET_SECRET).verify(signed.content, signed.headers) == {
        "n": 1
    }
    assert signed.headers["webhook-id"] == signed.action_id
    assert "webhook-signature" not in plain.headers


async def test_a_sender_that_raises_counts_as_no_answer() -> None:
    calls = []

    async def sender(request: OutboundRequest) -> int:
        calls.append(request)
        if len(calls) == 1:
            raise ConnectionResetError("peer went away")
        return 204

    c = make(outbound_sender=sender)
    async with dispatching(c):
        await c.submit_outbound_action(action())
        await eventually(lambda: len(calls) == 2 and c.dispatcher.backlog == 0)
    assert await c.alist_dead_letters() == []


async def test_actions_submitted_by_another_process_are_found_by_polling(tmp_path: Path) -> None:
    sender = Sender()
    store = SQLiteStore(tmp_path / "shared.sqlite3")
    other = SQLiteStore(tmp_path / "shared.sqlite3")
    c = make(store, outbound_sender=sender)
    async with dispatching(c, poll=0.02):
        await make(other).submit_outbound_action(action(9))
        await eventually(lambda: len(sender.requests) == 1)
    await store.aclose()
    await other.aclose()


async def test_a_dispatcher_started_over_a_backlog_reads_it_in_batches() -> None:
    # Restarted after an outage with 600 actions waiting: the first scan reads them 256
    # per store call (one read per action before), then delivers each once.
    store = CountingUpdates()
    sender = Sender()
    c = make(store, outbound_sender=sender)
    for n in range(600):
        await c.submit_outbound_action(action(n))
    store.got.clear()
    async with dispatching(c):
        await eventually(lambda: len(sender.requests) == 600, within=20)
        await eventually(lambda: c.dispatcher.backlog == 0)
    assert [key for key in store.got if ":open:" in key] == []  # no action read alone
    assert sorted(json.loads(r.content)["n"] for r in sender.requests) == list(range(600))


@pytest.mark.parametrize("kind", ["sqlite", "file"])
async def test_a_connector_restarted_mid_flight_loses_nothing(
    kind: str, tmp_path: Path, receiver: tuple[Receiver, str]
) -> None:
    recv, url = receiver
    recv.delay = 0.02

    def open_store() -> Store:
        if kind == "sqlite":
            return SQLiteStore(tmp_path / "outbox.sqlite3")
        return FileStore(str(tmp_path / "outbox"), locking=True)

    targets = [OutboundTarget("app", f"{url}/events", max_concurrency=4)]
    first_store = open_store()
    first = make(first_store, targets=targets)
    for n in range(30):
        await first.submit_outbound_action(action(n, url=f"{url}/events"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(first.run_outbound_dispatcher, poll_interval_sec=0.01))
        await eventually(lambda: len(recv.requests) >= 5)
        tg.cancel_scope.cancel()  # the process "dies" with attempts in flight
    await first.aclose()
    await first_store.aclose()
    assert len(recv.keys()) < 30

    second_store = open_store()
    second = make(second_store, targets=targets)
    async with dispatching(second):
        await eventually(lambda: len(recv.keys()) == 30, within=20)
        await eventually(lambda: second.dispatcher.backlog == 0)
    assert await second.apending_count() == 0
    assert await second.alist_dead_letters() == []
    # A request cut off by the "death" reaches the receiver without its body: skip those.
    bodies = {json.loads(r.body)["n"] for r in recv.delivered() if r.body}
    assert bodies == set(range(30))
    await second_store.aclose()


async def test_a_receiver_that_closes_idle_connections_sooner_gets_each_action_at_once() -> None:
    # uvicorn here keeps an idle connection 0.2 s, ours 5 s: httpcore2 2.17 finds the
    # close only as the next request is about to go out. That request goes on a new
    # connection, in the same attempt; it used to fail the attempt, as a breaker failure.
    recv = Receiver()
    server = UvicornThread(recv, timeout_keep_alive=0.2).start()
    try:
        c = make(
            targets=[OutboundTarget("app", f"{server.url}/hook")],
            retry_policy=WebhookRetryPolicy(
                max_attempts=5, base_delay_sec=30, max_delay_sec=30, jitter_ratio=0.0
            ),
        )
        async with dispatching(c):
            sent = []
            for n in range(2):
                if n:
                    await anyio.sleep(0.4)  # the receiver closes the kept connection
                sent.append(await c.enqueue(action(n, url=f"{server.url}/hook")))
                await eventually(lambda: c.dispatcher.backlog == 0)
        for record in sent:
            found = await c.outbox.aget(record.id)
            assert found is not None
            assert (found.status, found.attempt_count) == ("delivered", 1)
        assert c.breaker("app").state == "closed"
        assert len(recv.delivered()) == 2
    finally:
        server.stop()


async def test_redirects_are_not_followed(receiver: tuple[Receiver, str]) -> None:
    recv, url = receiver
    recv.status_for = lambda r: 302 if r.path == "/moved" else 200
    c = make(
        targets=[OutboundTarget("app", f"{url}/moved")],
        retry_policy=WebhookRetryPolicy(
            max_attempts=2, base_delay_sec=0.01, max_delay_sec=0.01, jitter_ratio=0
        ),
    )
    async with dispatching(c):
        await c.submit_outbound_action(action(url=f"{url}/moved"))
        await eventually(lambda: c.dispatcher.backlog == 0)
    assert [r.path for r in recv.delivered()] == ["/moved", "/moved"]
    (letter,) = await c.alist_dead_letters()
    assert letter.last_status == 302


async def test_a_slow_receiver_hits_the_per_attempt_timeout(receiver: tuple[Receiver, str]) -> None:
    recv, url = receiver
    recv.delay = 0.3
    policy = WebhookRetryPolicy(max_attempts=1, request_timeout_sec=0.1)
    c = make(targets=[OutboundTarget("app", f"{url}/slow")], retry_policy=policy)
    async with dispatching(c):
        await c.submit_outbound_action(action(url=f"{url}/slow"))
        await eventually(lambda: c.dispatcher.backlog == 0)
    (letter,) = await c.alist_dead_letters()
    assert "timeout" in letter.reason
    # The receiver records the request once its delay is over: let that happen here,
    # not during the next test that shares this receiver.
    await eventually(lambda: len(recv.delivered()) == 1)


async def test_real_http_delivery_carries_key_and_verifiable_signature(
    receiver: tuple[Receiver, str],
) -> None:
    recv, url = receiver
    recv.fail_next = 2
    c = make(targets=[OutboundTarget("app", f"{url}/events", signing_secret=TARGET_SECRET)])
    async with dispatching(c):
        await c.submit_outbound_action(action(5, url=f"{url}/events"))
        await eventually(lambda: len(recv.requests) == 3 and c.dispatcher.backlog == 0)
    requests = recv.delivered()
    assert len({r.headers["idempotency-key"] for r in requests}) == 1
    for r in requests:
        assert standardwebhooks.Webhook(TARGET_SECRET).verify(r.body, r.headers) == {"n": 5}


async def test_real_http_delivery_sends_each_header_once_and_never_a_cookie_back(
    receiver: tuple[Receiver, str],
) -> None:
    # Requests are built without the client's merge step: its usual headers are still
    # sent, the action's own win whatever their case, and a target's cookie stays there.
    recv, url = receiver
    recv.set_cookie = "session=abc; Path=/"
    c = make(targets=[OutboundTarget("app", f"{url}/events")])
    async with dispatching(c):
        for n in range(2):
            sent = action(n, url=f"{url}/events", headers={"Accept": "a/b"})
            await c.submit_outbound_action(sent)
            await eventually(lambda: c.dispatcher.backlog == 0)
    for r in recv.delivered():
        assert sorted(r.names) == sorted(set(r.names))
        assert r.headers["accept"] == "a/b"
        assert r.headers["accept-encoding"] == "gzip, deflate"
        assert r.headers["user-agent"].startswith("converge-webhook/")
        assert "cookie" not in r.headers
    assert len(recv.delivered()) == 2


async def test_submit_outbound_message_maps_target_body_and_key() -> None:
    sender = Sender()
    c = make(outbound_sender=sender)
    explicit = Message(sender="agent", payload={"target": "app", "body": {"x": 1}})
    whole = Message(sender="agent", recipient="app", payload={"y": 2})
    await c.submit_outbound_message(explicit)
    await c.submit_outbound_message(whole)
    async with dispatching(c):
        await eventually(lambda: len(sender.requests) == 2)
    by_key = {r.headers["idempotency-key"]: json.loads(r.content) for r in sender.requests}
    assert by_key[explicit.id] == {"x": 1}
    assert by_key[whole.id]["payload"] == {"y": 2}
    assert by_key[whole.id]["id"] == whole.id
    with pytest.raises(UsageError):
        await c.submit_outbound_message(Message(sender="a", recipient="nowhere", payload={}))
    with pytest.raises(UsageError):
        await c.submit_outbound_message(Message(sender="a", payload={"target": "app", "body": 3}))


async def test_dispatch_outbound_action_makes_one_attempt() -> None:
    sender = Sender(503, 200)
    c = make(outbound_sender=sender)
    assert not await c.dispatch_outbound_action(action())
    assert await c.dispatch_outbound_action(action())
    assert len(sender.requests) == 2
    assert await c.apending_count() == 0
    with pytest.raises(UsageError):
        await c.dispatch_outbound_action({"target": "app"})  # type: ignore[arg-type]


async def test_the_dispatcher_refuses_a_second_run_and_bad_intervals() -> None:
    c = make(outbound_sender=Sender())
    with pytest.raises(UsageError):
        await c.run_outbound_dispatcher(poll_interval_sec=0)
    async with dispatching(c):
        with pytest.raises(UsageError):
            await c.run_outbound_dispatcher()


async def test_a_stop_asked_before_the_run_begins_is_kept() -> None:
    sender = Sender()
    c = make(outbound_sender=sender)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(c.run_outbound_dispatcher)
            c.stop_dispatcher()  # the run has not started yet
    assert not c.dispatcher.running
    await c.submit_outbound_action(action(1))
    async with dispatching(c):  # the stop was used up: the next run delivers
        await eventually(lambda: len(sender.requests) == 1)


async def test_submitting_while_the_dispatcher_stops_keeps_the_action_for_the_next_run() -> None:
    gate = anyio.Event()
    sent: list[OutboundRequest] = []

    async def sender(request: OutboundRequest) -> int:
        sent.append(request)
        await gate.wait()
        return 200

    c = make(outbound_sender=sender)
    async with anyio.create_task_group() as tg:
        tg.start_soon(c.run_outbound_dispatcher)
        await eventually(lambda: c.dispatcher.running)
        await c.submit_outbound_action(action(1))
        await eventually(lambda: len(sent) == 1)
        c.stop_dispatcher()  # waits for the attempt in flight
        await c.submit_outbound_action(action(2))
        gate.set()
    assert await c.apending_count() == 1
    async with dispatching(c):
        await eventually(lambda: len(sent) == 2)
    assert json.loads(sent[1].content) == {"n": 2}


async def test_outbound_answers_the_original_id_for_a_repeat_and_409_for_a_conflict() -> None:
    c = make(outbound_sender=Sender())
    gateway = WebhookGateway(c, outbound_token="t" * 32)
    payload = {"target": "app", "body": {"n": 1}, "idempotency_key": "order-7"}
    status, body = await gateway.handle_outbound_payload(dict(payload))
    assert status == 202
    first = json.loads(body)["id"]
    assert await gateway.handle_outbound_payload(dict(payload)) == (202, body)
    status, body = await gateway.handle_outbound_payload({**payload, "body": {"n": 2}})
    assert status == 409
    assert json.loads(body) == {
        "status": "rejected",
        "reason": "idempotency_conflict",
        "id": first,
    }
    assert await c.apending_count() == 1


async def test_a_full_outbox_answers_503_not_500() -> None:
    c = make(outbound_sender=Sender())
    c.outbox = Outbox(
        c.store, prefix="full", clock=time.time, dead_letter_ttl_sec=60, max_pending=1
    )
    gateway = WebhookGateway(c, outbound_token="t" * 32)
    assert (await gateway.handle_outbound_payload({"target": "app", "body": {}}))[0] == 202
    status, body = await gateway.handle_outbound_payload({"target": "app", "body": {}})
    assert (status, json.loads(body)["reason"]) == (503, "outbox_full")
