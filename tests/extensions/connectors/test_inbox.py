"""The durable inbox: nothing accepted is lost, across consumers, crashes and restarts."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from inbox_child import LEASE_SEC, PROFILES, SECRETS, connector, open_store
from outbound_helpers import dispatching
from webhook_helpers import (
    GITHUB_SECRET,
    Receiver,
    count_outbox_writes,
    event_body,
    github_request,
    hmac_request,
)

from converge.core import Agent, Identity, SendMessage, Task
from converge.core.message import Message
from converge.core.store import Store
from converge.extensions.connectors import (
    INBOUND_TOPIC,
    OutboundTarget,
    ProviderProfile,
    WebhookConnector,
    WebhookRetryPolicy,
)
from converge.extensions.connectors import connector as connector_module
from converge.extensions.connectors.connector import OUTBOUND_TOPIC
from converge.extensions.connectors.inbound.inbox import event_uid, forward_key
from converge.extensions.storage import MemoryStore, RedisStore, SQLiteStore
from converge.runtime import AgentRunner, MessageBus
from counting_store import CountingUpdates
from loop_stall import eventually
from redis_server import shared_redis_url

pytestmark = pytest.mark.anyio

HERE = Path(__file__).parent


def child_env() -> dict[str, str]:
    paths = [os.environ.get("PYTHONPATH", ""), str(HERE.parent.parent), str(HERE)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def child(mode: str, backend: str, path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(HERE / "inbox_child.py"), mode, backend, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )


@pytest.fixture
def killed() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


async def post(
    c: WebhookConnector, provider: str, body: bytes, headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    status, _, data = await c.accept_inbound_http(
        provider, method="POST", headers=headers, raw_body=body
    )
    return status, json.loads(data)


def github_event() -> tuple[bytes, dict[str, str], str]:
    delivery = str(uuid.uuid4())
    body = event_body(action="opened", n=delivery)
    return body, github_request(body, delivery=delivery), delivery


# -- kill -9 after the 202, before anything consumed the event -------------------------


@pytest.mark.parametrize("backend", ["sqlite", "file"])
async def test_an_event_accepted_by_a_killed_process_reaches_the_next_one(
    backend: str, tmp_path: Path, killed: list[subprocess.Popen[str]]
) -> None:
    proc = child("serve", backend, tmp_path)
    killed.append(proc)
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    body, headers, delivery = github_event()
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{url}/webhook/github", content=body, headers=headers)
    assert response.status_code == 202, response.text
    proc.kill()
    proc.wait(10)
    # A new process on the same store: the sender resends nothing.
    store = open_store(backend, str(tmp_path))
    try:
        c = connector(store)
        with anyio.fail_after(10):
            item = await c.receive_inbound()
        assert isinstance(item, Message)
        assert item.id == event_uid("github", delivery)
        assert item.to_dict()["payload"]["event_id"] == delivery
        record = await c.inbox.aget(item.id)
        assert record is not None
        assert record.lease_token == 2  # born leased to the dead process, then taken over
        assert await c.aack_inbound(item)
        done = await c.inbox.aget(item.id)
        assert done is not None
        assert done.status == "acknowledged"
        # The sender's retry, had it sent one, is still a duplicate.
        status, _ = await post(c, "github", body, headers)
        assert status == 200
    finally:
        await store.aclose()


async def test_a_killed_processs_event_reaches_a_bus_subscriber_of_the_next_one(
    tmp_path: Path, killed: list[subprocess.Popen[str]]
) -> None:
    proc = child("serve", "sqlite", tmp_path)
    killed.append(proc)
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    bodies = [event_body() for _ in range(3)]
    async with httpx.AsyncClient() as http:
        for body in bodies:
            response = await http.post(
                f"{url}/webhook/shop", content=body, headers=hmac_request(body)
            )
            assert response.status_code == 202
    proc.kill()
    proc.wait(10)
    store = open_store("sqlite", str(tmp_path))
    async with MessageBus() as bus:
        sub = bus.subscribe(topics=[INBOUND_TOPIC], ack=True, consumer="agent")
        c = connector(store, bus=bus)
        got: list[Message] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: c.run_inbox(poll_interval_sec=0.1))
            with anyio.fail_after(10):
                for _ in bodies:
                    message = await sub.receive()
                    got.append(message)
                    await bus.aack(message, "agent")
            tg.cancel_scope.cancel()
        ids = {json.loads(b)["event_id"] for b in bodies}
        assert {m.to_dict()["payload"]["event_id"] for m in got} == ids
        assert {m.id for m in got} == {event_uid("shop", i) for i in ids}
        assert await c.inbox.apending_count() == 0
        assert {r.status for r in await c.inbox.alist()} == {"acknowledged"}
    await store.aclose()


@pytest.mark.parametrize("backend", ["sqlite", "file"])
async def test_a_kill_mid_flood_never_leaves_a_claim_without_its_record(
    backend: str, tmp_path: Path, killed: list[subprocess.Popen[str]]
) -> None:
    proc = child("flood", backend, tmp_path)
    killed.append(proc)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "started"
    await anyio.sleep(random.uniform(0.2, 0.6))
    proc.kill()
    proc.wait(10)
    store = open_store(backend, str(tmp_path))
    try:
        c = connector(store)
        claims = await store.alist("converge:webhook:webhook-connector:seen:")
        assert claims
        events = set()
        for key in claims:
            claim = await store.aget(key)
            assert claim is not None
            provider = "github" if ":seen:github:" in key else "shop"
            events.add((provider, claim["event_id"]))
        for provider, event_id in events:
            record = await c.inbox.aget(event_uid(provider, event_id))
            assert record is not None, f"claim of {event_id} without its record"
        # ... and the counter agrees with the records. FileStore writes a multi-key
        # update key by key: a kill between the record and the counter leaves an
        # undercount, which arecount() repairs.
        # A kill there can also leave a record without its claims (never the reverse):
        # at most one per writer task.
        open_ids = await c.inbox.aopen_ids()
        assert await c.inbox.arecount() == len(open_ids)
        if backend == "sqlite":
            assert await c.inbox.apending_count() == len(open_ids) == len(events)
        else:
            assert len(events) <= len(open_ids) <= len(events) + 8
    finally:
        await store.aclose()


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    yield from shared_redis_url()


async def test_on_redis_a_second_replica_takes_over_what_the_first_left(redis_url: str) -> None:
    namespace = f"inbox-{uuid.uuid4().hex}"
    async with (
        RedisStore(redis_url, namespace=namespace) as first_store,
        RedisStore(redis_url, namespace=namespace) as second_store,
    ):
        first, second = connector(first_store), connector(second_store)
        body = event_body()
        headers = hmac_request(body)
        assert (await post(first, "shop", body, headers))[0] == 202
        assert (await post(second, "shop", body, headers))[0] == 200  # one claim for both
        held = await first.receive_inbound()  # ... and the first replica dies with it
        with anyio.fail_after(10):
            taken = await second.receive_inbound()
        assert taken.id == held.id == event_uid("shop", json.loads(body)["event_id"])
        assert not await first.aack_inbound(held)  # fenced: its lease token is stale
        assert await second.aack_inbound(taken)
        record = await second.inbox.aget(taken.id)
        assert record is not None
        assert (record.status, record.lease_token) == ("acknowledged", 2)


class ListingStore(SQLiteStore):
    """Runs ``during`` once, right after its first listing of ``watched``: what another
    replica does while this one lists."""

    def __init__(self, path: Path, watched: str, during: Callable[[], Awaitable[None]]):
        super().__init__(path)
        self.watched, self.during = watched, during
        self.fired, self.done = False, anyio.Event()

    async def alist(self, prefix: str = "") -> list[str]:
        keys = await super().alist(prefix)
        if prefix == self.watched and not self.fired:
            self.fired = True
            await self.during()
            self.done.set()
        return keys


async def test_a_replica_starting_beside_a_busy_one_keeps_the_inbox_count_exact(
    tmp_path: Path,
) -> None:
    # The inbox pump recounted the open records at every start: it listed them, then
    # wrote the counters. An event another replica accepted in between was not counted,
    # and the inbox's bound and backlog gauge stayed off from then on.
    async with SQLiteStore(tmp_path / "db.sqlite3") as busy_store:
        busy = connector(busy_store)
        bodies = [event_body() for _ in range(4)]
        for body in bodies[:3]:
            assert (await post(busy, "shop", body, hmac_request(body)))[0] == 202

        async def accept() -> None:
            assert (await post(busy, "shop", bodies[3], hmac_request(bodies[3])))[0] == 202

        watched = busy.inbox.keys.open_prefix
        async with ListingStore(tmp_path / "db.sqlite3", watched, accept) as starting_store:
            starting = connector(starting_store)
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: starting.run_inbox(poll_interval_sec=60))
                with anyio.fail_after(10):
                    await starting_store.done.wait()
                tg.cancel_scope.cancel()
            assert len(await starting.inbox.aopen_ids()) == 4
            assert await starting.inbox.apending_count() == 4


# -- consumers: receive_inbound, bus acknowledgements, forward_to -----------------------


async def test_an_unacknowledged_item_comes_back_after_its_lease_with_the_same_id() -> None:
    c = connector(MemoryStore())
    body = event_body()
    assert (await post(c, "shop", body, hmac_request(body)))[0] == 202
    first = await c.receive_inbound()
    with anyio.fail_after(5):
        again = await c.receive_inbound()  # the consumer "died": no ack within the lease
    assert again.id == first.id
    assert await c.aack_inbound(again)
    assert not await c.aack_inbound(first)  # done already
    assert await c.inbox.apending_count() == 0


async def test_released_items_wait_for_their_delay_and_record_the_error() -> None:
    c = connector(MemoryStore())
    body = event_body()
    assert (await post(c, "shop", body, hmac_request(body)))[0] == 202
    item = await c.receive_inbound()
    assert await c.arelease_inbound(item, delay_sec=0.3, error="database busy")
    assert not await c.aack_inbound(item)  # released: no longer held
    record = await c.inbox.aget(item.id)
    assert record is not None
    assert (record.status, record.last_error, record.attempt_count) == (
        "pending",
        "database busy",
        1,
    )
    with anyio.fail_after(5):
        again = await c.receive_inbound()
    assert again.id == item.id
    assert await c.aack_inbound(again)


async def test_receivers_list_the_store_once_per_poll_interval_not_once_per_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Listing the open records costs O(open records), and O(every key) on Redis: a
    # trickle of events, each received as it arrives, must not cost a listing apiece.
    monkeypatch.setattr(connector_module, "_RECEIVE_POLL_SEC", 60.0)
    store = CountingUpdates()
    c = connector(store)
    received: list[str] = []

    async def consume() -> None:
        while len(received) < 20:
            item = await c.receive_inbound()
            received.append(item.id)
            assert await c.aack_inbound(item)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            for _ in range(20):
                await anyio.sleep(0.01)  # the consumer waits for each event
                body = event_body()
                assert (await post(c, "shop", body, hmac_request(body)))[0] == 202
    assert len(set(received)) == 20
    # The first receive looked for records to take over; the events came from accepts.
    assert store.listings[c.inbox.keys.open_prefix] == 1


@pytest.mark.parametrize("delay", [0.0, 0.2])
async def test_a_released_item_comes_back_when_due_without_waiting_for_the_poll(
    monkeypatch: pytest.MonkeyPatch, delay: float
) -> None:
    monkeypatch.setattr(connector_module, "_RECEIVE_POLL_SEC", 60.0)
    c = connector(MemoryStore())
    body = event_body()
    assert (await post(c, "shop", body, hmac_request(body)))[0] == 202
    item = await c.receive_inbound()
    assert await c.arelease_inbound(item, delay_sec=delay)
    with anyio.fail_after(5):  # the poll interval is 60 s
        again = await c.receive_inbound()
    assert again.id == item.id
    assert await c.aack_inbound(again)


async def test_inbound_events_iterates_until_the_connector_closes() -> None:
    c = connector(MemoryStore())
    bodies = [event_body() for _ in range(3)]
    for body in bodies:
        assert (await post(c, "shop", body, hmac_request(body)))[0] == 202
    seen = []
    async with anyio.create_task_group() as tg:

        async def consume() -> None:
            async for item in c.inbound_events:
                seen.append(item.to_dict()["payload"]["event_id"])
                await c.aack_inbound(item)
                if len(seen) == 3:
                    await c.aclose()

        tg.start_soon(consume)
    assert seen == [json.loads(b)["event_id"] for b in bodies]


async def test_a_backlog_left_in_the_inbox_is_handed_on_without_waiting_between_batches() -> None:
    # The inbox pump takes 64 records per pass. It slept a poll interval after every
    # pass, so 10,000 events replayed by an operator took 91 s to go out again.
    store = MemoryStore()
    first = connector(store)  # nobody consumes: its events stay leased for a second
    bodies = [event_body() for _ in range(300)]
    for body in bodies:
        assert (await post(first, "shop", body, hmac_request(body)))[0] == 202
    await anyio.sleep(LEASE_SEC + 0.2)
    async with MessageBus() as bus:
        sub = bus.subscribe(topics=[INBOUND_TOPIC])
        second = connector(store, bus=bus)
        got: list[str] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: second.run_inbox(poll_interval_sec=60))
            with anyio.fail_after(20):  # the second pass would come after a minute
                while len(got) < len(bodies):
                    got.append((await sub.receive()).to_dict()["payload"]["event_id"])
            tg.cancel_scope.cancel()
    assert sorted(got) == sorted(json.loads(b)["event_id"] for b in bodies)
    assert await second.inbox.apending_count() == 0


async def test_bus_acknowledgements_settle_and_dead_letters_bury_inbox_records() -> None:
    async with MessageBus() as bus:
        sub = bus.subscribe(topics=[INBOUND_TOPIC], ack=True, consumer="agent")
        c = connector(MemoryStore(), bus=bus)
        ok, bad = event_body(), event_body()
        assert (await post(c, "shop", ok, hmac_request(ok)))[0] == 202
        assert (await post(c, "shop", bad, hmac_request(bad)))[0] == 202
        first, second = sub.receive_nowait(), sub.receive_nowait()
        assert await c.inbox.apending_count() == 2
        await bus.aack(first, "agent")
        await bus.adead_letter(second, "agent", "model kept failing")
        settled, dead = await c.inbox.aget(first.id), await c.inbox.aget(second.id)
        assert settled is not None
        assert settled.status == "acknowledged"
        assert dead is not None
        assert (dead.status, dead.last_error) == ("dead", "agent: model kept failing")
        assert await c.inbox.apending_count() == 0
        # An inbound dead letter is replayable: published again, same id.
        assert await c.inbox.areplay(second.id) is not None
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: c.run_inbox(poll_interval_sec=0.05))
            with anyio.fail_after(5):
                replayed = await sub.receive()
            tg.cancel_scope.cancel()
        assert replayed.id == second.id


async def test_a_bus_without_acking_subscribers_settles_on_publish() -> None:
    async with MessageBus() as bus:
        sub = bus.subscribe(topics=[INBOUND_TOPIC])
        c = connector(MemoryStore(), bus=bus)
        body = event_body()
        assert (await post(c, "shop", body, hmac_request(body)))[0] == 202
        assert sub.receive_nowait().to_dict()["payload"]["event_id"] == json.loads(body)["event_id"]
        assert await c.inbox.apending_count() == 0


async def test_a_bus_sink_puts_outbound_messages_in_the_outbox() -> None:
    async with MessageBus() as bus:
        target = OutboundTarget("app", "http://127.0.0.1:9/events")
        c = WebhookConnector(provider_profiles=PROFILES, secrets=SECRETS, targets=[target], bus=bus)
        message = Message(
            sender="agent",
            topics=["bridge.webhook.outbound"],
            payload={"target": "app", "body": {"n": 1}},
        )
        await bus.publish(message)
        assert await c.apending_count() == 1


FORWARD = {"github": ProviderProfile("github", "github", scheme="github")}


def forwarding(store: Store, url: str, **target: Any) -> WebhookConnector:
    return WebhookConnector(
        provider_profiles=FORWARD,
        secrets={"github": GITHUB_SECRET},
        store=store,
        targets=[OutboundTarget("app", f"{url}/events", **target)],
        inbound_routes={"github": "app"},
        retry_policy=WebhookRetryPolicy(base_delay_sec=0.01, jitter_ratio=0.0),
    )


@pytest.mark.parametrize("length", [250, 300])
async def test_long_github_delivery_ids_on_a_forwarding_provider_never_5xx(
    length: int, any_store: Store, receiver: tuple[Receiver, str]
) -> None:
    recv, url = receiver
    c = forwarding(any_store, url)
    delivery = "d" * length
    body = event_body(action="opened")
    status, data = await post(c, "github", body, github_request(body, delivery=delivery))
    assert status < 500, data
    if length > 256:  # beyond the documented id limit: a clean 400
        assert (status, data["reason"]) == (400, "bad_event_id")
        return
    assert status == 202
    uid = event_uid("github", delivery)
    record = await c.inbox.aget(uid)
    assert record is not None
    assert record.status == "acknowledged"  # the durable forward acknowledged it
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: c.run_outbound_dispatcher(poll_interval_sec=0.05))
        await eventually(lambda: bool(recv.delivered()))
        c.stop_dispatcher()
    assert recv.keys() == {forward_key(uid)}
    assert len(forward_key(uid)) < 64


async def test_a_forwarded_event_costs_one_store_update_before_its_202(
    any_store: Store, receiver: tuple[Receiver, str]
) -> None:
    # The inbox record (acknowledged: the outbox has the forward), its claims and the
    # outbox action are one atomic update; the event is delivered exactly once.
    recv, url = receiver
    c = forwarding(any_store, url)
    writes = count_outbox_writes(any_store)
    body, headers, delivery = github_event()
    assert (await post(c, "github", body, headers))[0] == 202
    assert len(writes) == 1
    assert (await post(c, "github", body, headers))[0] == 200  # a replay changes nothing
    assert len(writes) == 1
    uid = event_uid("github", delivery)
    record = await c.inbox.aget(uid)
    assert record is not None
    assert record.status == "acknowledged"
    assert await c.inbox.apending_count() == 0
    assert await c.outbox.apending_count() == 1
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: c.run_outbound_dispatcher(poll_interval_sec=0.05))
        await eventually(lambda: bool(recv.delivered()))
        await anyio.sleep(0.2)
        c.stop_dispatcher()
    assert recv.keys() == {forward_key(uid)}
    assert len(recv.delivered()) == 1
    (delivered,) = recv.delivered()
    assert json.loads(delivered.body)["event_id"] == delivery
    assert await c.outbox.apending_count() == 0


async def test_a_running_dispatcher_delivers_a_forward_without_a_lease_write(
    any_store: Store, receiver: tuple[Receiver, str]
) -> None:
    # The forward is added leased to the running dispatcher in the accept's update, so
    # the whole event costs two updates: the accept and the delivery's completion.
    recv, url = receiver
    c = forwarding(any_store, url)
    async with dispatching(c):
        writes = count_outbox_writes(any_store)
        body, headers, delivery = github_event()
        assert (await post(c, "github", body, headers))[0] == 202
        await eventually(lambda: c.dispatcher.backlog == 0)
    uid = event_uid("github", delivery)
    assert recv.keys() == {forward_key(uid)}
    assert len(writes) == 2
    assert await c.outbox.apending_count() == 0


async def test_a_stopping_dispatcher_gives_back_the_forwards_it_did_not_start(
    any_store: Store, receiver: tuple[Receiver, str]
) -> None:
    # One attempt at a time: the second forward waits, leased to this dispatcher since
    # its accept. A graceful stop releases it, so the next run delivers it at once
    # instead of after its lease (10 s here).
    recv, url = receiver
    recv.delay = 1.0  # the first attempt outlasts both accepts, even on a slow machine
    c = forwarding(any_store, url, max_concurrency=1)
    events = [github_event() for _ in range(2)]
    async with dispatching(c):
        for body, headers, _ in events:
            assert (await post(c, "github", body, headers))[0] == 202
        assert await c.outbox.apending_count() == 2
    assert len(recv.delivered()) == 1
    (waiting,) = [r for r in await c.outbox.alist_actions() if r.status != "delivered"]
    assert (waiting.status, waiting.lease_owner) == ("pending", None)
    async with dispatching(c):
        await eventually(lambda: len(recv.delivered()) == 2, within=3.0)
    keys = {forward_key(event_uid("github", delivery)) for _, _, delivery in events}
    assert recv.keys() == keys


async def test_acknowledge_on_accept_records_every_event_and_never_sheds_load() -> None:
    c = connector(MemoryStore(), max_pending=5, acknowledge_on_accept=True)
    seen = []
    c.add_inbound_listener(seen.append)
    for _ in range(30):
        body = event_body()
        assert (await post(c, "shop", body, hmac_request(body)))[0] == 202
    assert await c.inbox.apending_count() == 0
    records = await c.inbox.alist(limit=100)
    assert len(records) == len(seen) == 30
    assert {r.status for r in records} == {"acknowledged"}


@pytest.mark.parametrize("consumer", ["record", "forward"])
async def test_the_event_log_trim_reads_none_of_the_events_accepted_here(
    consumer: str, receiver: tuple[Receiver, str]
) -> None:
    # An event recorded at accept (acknowledged, or with its forward) is stamped as it
    # is written: the gateway's trim deletes the oldest without reading a record.
    store = CountingUpdates()
    if consumer == "record":
        c = connector(store, acknowledge_on_accept=True)
    else:
        c = forwarding(store, receiver[1])
    assert await c.inbox.atrim_finished(100) == 0  # the gateway's trimmer starts with it
    uids = []
    for _ in range(12):
        if consumer == "record":
            body = event_body()
            status, _ = await post(c, "shop", body, hmac_request(body))
            uids.append(event_uid("shop", json.loads(body)["event_id"]))
        else:
            body, headers, delivery = github_event()
            status, _ = await post(c, "github", body, headers)
            uids.append(event_uid("github", delivery))
        assert status == 202
    store.updates = 0
    assert await c.inbox.atrim_finished(2) == 10
    assert store.updates == 1  # the delete alone
    kept = {r.id for r in await c.inbox.alist(limit=100)}
    assert len(kept) == 2
    assert kept <= set(uids)


async def test_a_recorded_event_holds_exactly_the_message_a_consumer_gets() -> None:
    # The hot path writes the record's item without building the Message: it must be
    # what Message.to_dict() gives, for the recorded, queued and forwarded paths alike.
    for record_only in (True, False):
        c = connector(MemoryStore(), acknowledge_on_accept=record_only)
        body = event_body(nested={"a": [1, {"b": 2.5}], "c": None})
        assert (await post(c, "shop", body, hmac_request(body)))[0] == 202
        (record,) = await c.inbox.alist(limit=10)
        item = record.data["item"]
        message = Message.from_dict(item)
        assert message.to_dict() == item
        assert message.topics[0].name == INBOUND_TOPIC
        assert item["payload"]["payload"]["nested"] == {"a": [1, {"b": 2.5}], "c": None}
        if not record_only:
            received = await c.receive_inbound()
            assert isinstance(received, Message)
            assert received.to_dict() == item
        await c.aclose()


async def test_the_inbox_is_full_at_max_pending_and_a_failed_add_claims_nothing() -> None:
    store = MemoryStore()
    c = connector(store, max_pending=2)
    for _ in range(2):
        body = event_body()
        assert (await post(c, "shop", body, hmac_request(body)))[0] == 202
    body = event_body()
    headers = hmac_request(body)
    status, data = await post(c, "shop", body, headers)
    assert (status, data["reason"]) == (503, "inbox_full")
    claims = await store.alist("converge:webhook:webhook-connector:seen:")
    claimed = {(await store.aget(k))["event_id"] for k in claims}
    assert json.loads(body)["event_id"] not in claimed
    assert len(claimed) == 2
    assert await c.aack_inbound(await c.receive_inbound())
    assert (await post(c, "shop", body, headers))[0] == 202  # the sender's retry


async def test_replaying_a_forwarded_event_delivers_it_again_under_a_new_key(
    receiver: tuple[Receiver, str],
) -> None:
    recv, url = receiver
    c = WebhookConnector(
        provider_profiles=FORWARD,
        secrets={"github": GITHUB_SECRET},
        targets=[OutboundTarget("app", f"{url}/events")],
        inbound_routes={"github": "app"},
    )
    body, headers, delivery = github_event()
    assert (await post(c, "github", body, headers))[0] == 202
    uid = event_uid("github", delivery)
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: c.run_outbound_dispatcher(poll_interval_sec=0.05))
        await eventually(lambda: len(recv.delivered()) == 1)
        replayed = await c.inbox.areplay(uid)  # an operator: "deliver that one again"
        assert replayed is not None
        assert replayed.replays == 1
        await eventually(lambda: len(recv.delivered()) == 2)
        c.stop_dispatcher()
    assert recv.keys() == {forward_key(uid), forward_key(uid, 1)}
    record = await c.inbox.aget(uid)
    assert record is not None
    assert record.status == "acknowledged"


class Forwarder(Agent):
    """Answers each inbound event with one outbound message to the target ``app``."""

    def __init__(self) -> None:
        super().__init__(Identity(), name="forwarder")
        self.seen: list[str] = []

    async def adecide(self, messages: list[Message], tasks: list[Task], **kw: Any) -> Any:
        decisions = []
        for message in messages:
            self.seen.append(message.id)
            event = message.to_dict()["payload"]
            reply = Message(
                sender=self.id,
                topics=[OUTBOUND_TOPIC],
                payload={"target": "app", "body": {"handled": event["event_id"]}},
            )
            decisions.append(SendMessage(reply))
        return decisions


async def test_webhook_to_agent_to_outbox_acknowledges_the_inbox_record(
    receiver: tuple[Receiver, str],
) -> None:
    recv, url = receiver
    async with MessageBus() as bus:
        agent = Forwarder()
        c = connector(MemoryStore(), bus=bus, targets=[OutboundTarget("app", f"{url}/events")])
        async with (
            AgentRunner(bus, [agent], topics={"forwarder": [INBOUND_TOPIC]}),
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(lambda: c.run_outbound_dispatcher(poll_interval_sec=0.05))
            body = event_body()
            assert (await post(c, "shop", body, hmac_request(body)))[0] == 202
            await eventually(lambda: len(recv.delivered()) == 1)
            c.stop_dispatcher()
        [delivery] = recv.delivered()
        assert json.loads(delivery.body) == {"handled": json.loads(body)["event_id"]}
        [message_id] = agent.seen
        record = await c.inbox.aget(message_id)
        assert record is not None
        assert record.status == "acknowledged"  # acked by the runner after the outbox write
