"""The outbox on the durable queue: inspectable records, fenced leases, a true backlog."""

from __future__ import annotations

import contextlib
import functools
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from outbound_helpers import FakeClock, Sender, action, dispatching, make

from converge.core.store import Store
from converge.errors import UsageError
from converge.extensions.connectors import OutboundRequest, OutboundTarget, Outbox, RetrySchedule
from converge.extensions.connectors.outbound import outbox as outbox_module
from converge.extensions.storage import MemoryStore, RedisStore, SQLiteStore
from counting_store import CountingUpdates
from loop_stall import BetweenTurns, eventually
from redis_server import shared_redis_url

pytestmark = pytest.mark.anyio


async def test_a_delivered_action_stays_inspectable_with_each_attempt(any_store: Store) -> None:
    sender = Sender(503, 200)
    c = make(any_store, outbound_sender=sender)
    async with dispatching(c):
        record = await c.enqueue(action(1, idempotency_key="k-1"))
        await eventually(lambda: len(sender.requests) == 2)
        await eventually(lambda: c.dispatcher.backlog == 0)
    found = await c.outbox.aget(record.id)
    assert found is not None
    assert (found.kind, found.status, found.key) == ("outbound", "delivered", "app")
    assert found.data["action"]["body"] == {"n": 1}
    assert found.data["namespace"] == "api"
    first, second = found.attempts
    assert (first.status_code, first.error, first.outcome) == (503, "status 503", "retry")
    assert (second.status_code, second.error, second.outcome) == (200, None, "delivered")
    assert all(a.latency_ms is not None and a.latency_ms >= 0 for a in found.attempts)
    assert first.at <= second.at
    assert [r.id for r in await c.outbox.alist(status="delivered")] == [record.id]
    assert await c.outbox.alist(status="delivered", key="elsewhere") == []
    assert await c.apending_count() == 0


async def test_done_records_expire_after_the_retention(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "db.sqlite3")
    c = make(store, outbound_sender=Sender(200, 404), dead_letter_ttl_sec=0.3)
    async with dispatching(c):
        ok = await c.enqueue(action(1))
        dead = await c.enqueue(action(2))
        await eventually(lambda: c.dispatcher.backlog == 0)
    assert (await c.outbox.aget(ok.id)) is not None
    assert (await c.outbox.aget(dead.id)) is not None
    await anyio.sleep(0.5)
    assert await c.outbox.aget(ok.id) is None  # swept by the store's TTL, no scan
    assert await c.outbox.aget(dead.id) is None
    await store.aclose()


async def test_replay_sends_a_delivered_or_dead_action_again_and_purge_forgets_it() -> None:
    sender = Sender(404)
    c = make(outbound_sender=sender)
    async with dispatching(c):
        dead = await c.enqueue(action(2))
        await eventually(lambda: len(sender.requests) == 1 and c.dispatcher.backlog == 0)
        ok = await c.enqueue(action(1))
        await eventually(lambda: len(sender.requests) == 2 and c.dispatcher.backlog == 0)
        assert (await c.outbox.aget(dead.id)).status == "dead"  # type: ignore[union-attr]
        for record_id in (ok.id, dead.id):
            replayed = await c.outbox.areplay(record_id)
            assert replayed is not None
            assert replayed.status == "pending"
        await eventually(lambda: len(sender.requests) == 4 and c.dispatcher.backlog == 0)
    keys = [r.headers["idempotency-key"] for r in sender.requests]
    assert sorted(keys[2:]) == sorted(keys[:2])  # the same keys: receivers deduplicate
    for record_id in (ok.id, dead.id):
        record = await c.outbox.aget(record_id)
        assert record is not None
        assert record.status == "delivered"
        assert record.attempt_count == 2
        assert record.budget_used == 1
        assert (await c.outbox.apurge(record_id)) is not None
        assert await c.outbox.aget(record_id) is None
    assert await c.outbox.areplay("nothing-here") is None


async def test_a_lease_taken_over_fences_out_its_old_holder() -> None:
    clock = FakeClock()
    store = MemoryStore()
    one = Outbox(store, prefix="p", clock=clock, dead_letter_ttl_sec=60)
    two = Outbox(store, prefix="p", clock=clock, dead_letter_ttl_sec=60)
    record = await one.aadd(action(1, idempotency_key="x"))
    mine = await one.alease(record.id, "one", 10.0)
    assert not isinstance(mine, float)
    assert mine is not None
    held = await two.alease(record.id, "two", 10.0)
    assert held == pytest.approx(10.0)  # seconds until one's lease ends
    clock.now += 10.5  # one stalls past its lease (a paused process, a slow write)
    theirs = await two.alease(record.id, "two", 10.0)
    assert not isinstance(theirs, float)
    assert theirs is not None
    assert theirs.lease_token > mine.lease_token
    # Every transition of the old holder is refused and changes nothing.
    assert not await one.acomplete(mine)
    assert await one.areschedule(mine, delay=1, attempt=_attempt(clock)) is None
    assert await one.abury(mine, reason="late") is None
    assert not await one.arelease(mine)
    current = await one.aget(record.id)
    assert current is not None
    assert (current.status, current.lease_owner, current.attempts) == ("leased", "two", ())
    assert await two.acomplete(theirs)
    assert (await one.aget(record.id)).status == "delivered"  # type: ignore[union-attr]


async def test_wrong_arguments_are_usage_errors_and_change_nothing() -> None:
    clock = FakeClock()
    box = Outbox(MemoryStore(), prefix="p", clock=clock, dead_letter_ttl_sec=60)
    record = await box.aadd(action(1))
    held = await box.alease(record.id, "me", 10.0)
    assert held is not None
    assert not isinstance(held, float)
    with pytest.raises(UsageError, match="OutboundWebhookAction"):
        await box.aadd({"target": "t"})  # type: ignore[arg-type]  # raised AttributeError
    for call in (box.arelease, box.acomplete, functools.partial(box.abury, reason="x")):
        with pytest.raises(UsageError, match="OutboxRecord"):
            await call(held.id)  # type: ignore[operator]  # raised AttributeError
    # A NaN delay made the action due at NaN: never due again, so never sent.
    for delay in (float("nan"), -1, "1"):
        with pytest.raises(UsageError, match="delay"):
            await box.areschedule(held, delay=delay, attempt=_attempt(clock))  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="Attempt"):
        await box.areschedule(held, delay=1, attempt="503")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="due"):
        await box.queue.arelease(held.id, held.lease_token, due=float("nan"))
    current = await box.aget(record.id)
    assert current is not None
    assert (current.status, current.attempts) == ("leased", ())
    assert await box.arelease(held)


def _attempt(clock: FakeClock):  # type: ignore[no-untyped-def]
    from converge.durable import Attempt

    return Attempt(at=clock.now, status_code=503, error="status 503")


class SkewedStore(SQLiteStore):
    """A store whose clock runs 1000 s ahead of this host's."""

    async def atime(self) -> float:
        return time.time() + 1000.0


async def test_leases_are_measured_on_the_stores_clock(tmp_path: Path) -> None:
    store = SkewedStore(tmp_path / "db.sqlite3")
    schedule = RetrySchedule(request_timeout_sec=2, lease_margin_sec=3)
    c = make(store, retry_policy=schedule)
    assert c.dispatcher.lease_sec == 5
    record = await c.enqueue(action(1))
    leased = await c.outbox.alease(record.id, "me", c.dispatcher.lease_sec)
    assert not isinstance(leased, float)
    assert leased is not None
    assert leased.lease_until == pytest.approx(time.time() + 1005, abs=1)
    await store.aclose()


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """One real redis-server for the module."""
    yield from shared_redis_url()


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_two_replicas_on_one_store_report_the_true_backlog_and_send_once(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    gate = anyio.Event()
    sent: list[str] = []

    async def sender(request: OutboundRequest) -> int:
        await gate.wait()
        sent.append(request.headers["idempotency-key"])
        await anyio.sleep(0.002)
        return 200

    def open_store() -> Store:
        if kind == "sqlite":
            return SQLiteStore(tmp_path / "shared.sqlite3")
        return RedisStore(request.getfixturevalue("redis_url"), namespace=namespace)

    namespace = f"outbox-{uuid.uuid4().hex}"
    stores = [open_store() for _ in range(2)]
    async with contextlib.AsyncExitStack() as stack:
        for store in stores:
            await stack.enter_async_context(store)
        replicas = [
            make(s, outbound_sender=sender, connector_id="gw", max_in_flight=4) for s in stores
        ]
        for n in range(60):
            await replicas[n % 2].submit_outbound_action(action(n, idempotency_key=f"k{n}"))
        samples: list[float] = []

        def gauges() -> list[float]:
            return [r.metrics.get("webhook_outbound_backlog") for r in replicas]

        async with anyio.create_task_group() as tg:
            for replica in replicas:
                run = functools.partial(replica.run_outbound_dispatcher, poll_interval_sec=0.02)
                tg.start_soon(run)
            # Both see the whole shared backlog, not their own share of it.
            await eventually(lambda: gauges() == [60, 60])
            gate.set()
            while len(sent) < 60:
                samples.extend(gauges())
                await anyio.sleep(0.005)
            await eventually(lambda: gauges() == [0, 0], within=2)
            for replica in replicas:
                replica.stop_dispatcher()
        assert max(samples) <= 60
        assert sorted(sent) == sorted(f"k{n}" for n in range(60))  # each exactly once
        assert await replicas[0].apending_count() == 0


# A lease of 0.4 s: request timeout 0.3 s plus a margin of 0.1 s.
SHORT_LEASE = RetrySchedule(delays_sec=(0.05,), request_timeout_sec=0.3, lease_margin_sec=0.1)


async def test_a_replica_leaves_the_actions_another_holds_alone() -> None:
    # B starts while A holds 20 actions (leased to A since they were added) and reads
    # them leased. A delivers them; B never tries to lease them when A's leases end
    # (that cost one store update per action before).
    store = CountingUpdates()
    gate = anyio.Event()
    sent: list[str] = []

    async def sender(request: OutboundRequest) -> int:
        await gate.wait()
        sent.append(request.headers["idempotency-key"])
        return 200

    targets = [OutboundTarget("app", "http://127.0.0.1:9/hook", max_concurrency=32)]
    a, b = (
        make(
            store,
            outbound_sender=sender,
            connector_id="gw",
            retry_policy=SHORT_LEASE,
            targets=targets,
            max_in_flight=32,
        )
        for _ in range(2)
    )
    async with dispatching(a, poll=0.02):
        for n in range(20):
            assert (await a.enqueue(action(n, idempotency_key=f"k{n}"))).status == "leased"
        async with dispatching(b, poll=0.02):
            await anyio.sleep(0.1)  # B's first scans read A's 20, leased
            assert b.dispatcher.backlog == 0
            gate.set()
            await eventually(lambda: len(sent) == 20 and a.dispatcher.backlog == 0)
            quiet = store.writes
            await anyio.sleep(0.7)  # past every lease of A, with many scans of B
            assert store.writes == quiet
    assert sorted(sent) == sorted(f"k{n}" for n in range(20))


async def test_the_actions_of_a_dead_replica_are_taken_over_when_its_leases_end() -> None:
    # Added leased to a dispatcher that died at once. The live one reads them leased,
    # leaves them alone until the leases end (0.4 s), then delivers each once, within
    # one poll interval although its idle rescans back off to 16 intervals.
    sender = Sender()
    c = make(outbound_sender=sender, retry_policy=SHORT_LEASE, max_in_flight=8)
    started = anyio.current_time()
    for n in range(10):
        await c.outbox.aadd(action(n, idempotency_key=f"k{n}"), lease=("dead", 0.4))
    async with dispatching(c, poll=0.05):
        await anyio.sleep(max(0.0, started + 0.3 - anyio.current_time()))
        assert sender.requests == []
        assert {r.lease_owner for r in await c.outbox.alist_actions()} == {"dead"}
        await eventually(lambda: len(sender.requests) == 10, within=5)
        taken_over = anyio.current_time() - started
        await eventually(lambda: c.dispatcher.backlog == 0)
    assert taken_over < 0.4 + 0.05 + 0.15
    assert sorted(r.headers["idempotency-key"] for r in sender.requests) == [
        f"k{n}" for n in range(10)
    ]
    assert await c.apending_count() == 0


async def test_actions_stored_before_the_durable_outbox_are_moved_into_it() -> None:
    store = MemoryStore()
    prefix = "converge:webhook:webhook-connector"
    legacy = action(5).to_dict()
    await store.aput(
        f"{prefix}:outbox:abc123",
        {"v": 1, "id": "abc123", "action": legacy, "attempts": 2, "due": 0.0, "created": 0.0},
    )
    await store.aput(
        f"{prefix}:dead:dead123",
        {"v": 1, "id": "dead123", "action": legacy, "attempts": 5, "reason": "status 404"},
    )
    sender = Sender()
    c = make(store, outbound_sender=sender)
    async with dispatching(c):
        await eventually(lambda: len(sender.requests) == 1)
        await eventually(lambda: c.dispatcher.backlog == 0)
    assert json.loads(sender.requests[0].content) == {"n": 5}
    assert sender.requests[0].action_id == "abc123"
    (letter,) = await c.alist_dead_letters()
    assert (letter.id, letter.reason) == ("dead123", "status 404")
    assert await store.alist(f"{prefix}:outbox:") == []


async def test_the_single_counter_of_earlier_versions_is_replaced_at_start() -> None:
    store = MemoryStore()
    c = make(store, outbound_sender=Sender())
    keys = c.outbox.queue.keys
    for n in range(3):
        await c.outbox.aadd(action(n), lease=("gone", 600.0))
    for counter in keys.counts:
        await store.adelete(counter)
    await store.aput(keys.count, 7)  # an earlier version's counter, off by a crash
    assert await c.apending_count() == 7
    async with dispatching(c):
        await eventually(lambda: c.dispatcher.running)
        assert await c.apending_count() == 3
    assert await store.aget(keys.count) is None


async def test_the_names_before_the_a_prefix_still_work_and_say_they_are_deprecated() -> None:
    outbox = Outbox(MemoryStore(), prefix="t", clock=time.time, dead_letter_ttl_sec=60.0)
    said = r"Outbox\.add\(\) is deprecated; await Outbox\.aadd\(\) instead"
    with pytest.warns(DeprecationWarning, match=said):
        record = await outbox.add(action(1))
    with pytest.warns(DeprecationWarning, match="aget_pending"):
        assert await outbox.get(record.id) == record
    with pytest.warns(DeprecationWarning, match="apending_ids"):
        assert await outbox.pending_ids() == [record.id]
    with pytest.warns(DeprecationWarning, match="alease"):
        leased = await outbox.lease(record.id, "me", 30.0)
    assert leased is not None
    assert not isinstance(leased, float)
    with pytest.warns(DeprecationWarning, match="abury"):
        assert await outbox.bury(leased, reason="gone") is not None
    with pytest.warns(DeprecationWarning, match="alist_dead_letters"):
        assert [d.id for d in await outbox.dead_letters()] == [record.id]
    with pytest.warns(DeprecationWarning, match="adiscard_dead_letter"):
        await outbox.discard(record.id)
    assert await outbox.alist_dead_letters() == []
    for old in ("pending", "release", "complete", "reschedule", "replay"):
        assert getattr(Outbox, old).__doc__.startswith("Deprecated: await")


async def test_many_dead_letters_are_read_between_turns_of_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each record read into a dead letter costs about 10 us: 20,000 of them read at once
    # held the event loop for 250-290 ms.
    clock = FakeClock()
    outbox = Outbox(MemoryStore(), prefix="p", clock=clock, dead_letter_ttl_sec=3600)
    leased = []
    for n in range(1_000):
        clock.now += 1  # created in order of n
        leased.append(await outbox.aadd(action(n), lease=("me", 600.0)))
    for n, record in enumerate(leased):
        clock.now = 1_800_000_000.0 + (999 - n) // 10  # dead in reverse, ten at a time
        assert await outbox.abury(record, reason="gave up") is not None
    read = BetweenTurns()  # records read into views
    view = outbox_module._view

    def counted(record: Any) -> Any:
        read.count()
        return view(record)

    monkeypatch.setattr(outbox_module, "_view", counted)
    letters = await read.during(outbox.alist_dead_letters())
    assert read.most <= 2 * 256  # trio may run the other task's turn late: two can meet
    # Oldest death first; the ten that died at once in the listing's order (newest
    # created first).
    assert [letter.action.body["n"] for letter in letters] == list(range(999, -1, -1))
    assert {letter.reason for letter in letters} == {"gave up"}
