"""EventLog: listings, lookups, replay, dead-letter purge and the count bound."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from eventlog_helpers import SIGNED_HEADERS, fill

from converge import _sorting
from converge.durable import DurableQueue
from converge.errors import UsageError
from converge.extensions.connectors.server import EventLog, parse_since, record_view
from converge.extensions.storage import MemoryStore, SQLiteStore
from counting_store import CountingUpdates
from loop_stall import BetweenTurns, ticks_during

pytestmark = pytest.mark.anyio


@pytest.fixture
async def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    store = SQLiteStore(tmp_path / "log.sqlite3", serializer="json")
    yield store
    await store.aclose()


async def test_sections_list_newest_first_with_filters(store: SQLiteStore) -> None:
    filled = await fill(store)
    log = filled.log
    assert [r.id for r in await log.alist("events")] == ["evt_open", "evt_dead", "evt_ok"]
    assert [r.id for r in await log.alist("events", key="stripe")] == ["evt_open", "evt_ok"]
    assert [r.id for r in await log.alist("events", status="acknowledged")] == ["evt_ok"]
    assert [r.id for r in await log.alist("deliveries", status="delivered")] == ["dlv_ok"]
    dead = await log.alist("dead-letters")
    assert sorted(r.id for r in dead) == ["dlv_dead", "evt_dead"]
    assert [r.id for r in await log.alist("dead-letters", key="crm")] == ["dlv_dead"]
    assert await log.alist("events", limit=1) == (await log.alist("events"))[:1]
    with pytest.raises(UsageError):
        await log.alist("events", status="nope")
    with pytest.raises(UsageError):
        await log.alist("nope")
    for keys in ("stripe", {"events": "stripe"}, {"events": [1]}):
        with pytest.raises(UsageError, match="keys"):
            EventLog(keys=keys)  # type: ignore[arg-type]


async def test_a_record_view_has_its_attempts_and_redacted_headers(store: SQLiteStore) -> None:
    filled = await fill(store)
    record = await filled.log.aget("dlv_dead")
    assert record is not None
    view = record_view(record, data=True)
    assert view["section"] == "deliveries"
    assert view["status"] == "dead"
    assert view["attempt_count"] == 2
    assert [a["status_code"] for a in view["attempts"]] == [503, 404]
    assert view["attempts"][0]["latency_ms"] == 8.0
    assert view["created_at"].endswith("Z")
    event = await filled.log.aget("evt_ok", "events")
    assert event is not None
    headers = record_view(event, data=True)["data"]["headers"]
    assert headers["webhook-signature"] == "[redacted]"
    assert headers["x-github-event"] == "push"
    assert SIGNED_HEADERS["webhook-signature"] not in str(record_view(event, data=True))


async def test_replay_makes_finished_and_dead_records_pending_again(store: SQLiteStore) -> None:
    filled = await fill(store)
    log = filled.log
    again = await log.areplay("dlv_dead")
    assert again is not None
    assert again.status == "pending"
    assert [r.id for r in await log.alist("dead-letters")] == ["evt_dead"]
    assert await log.areplay("evt_open") is None  # open: nothing to replay
    assert await log.areplay("missing") is None
    assert await log.areplay("evt_ok", "deliveries") is None  # wrong section


async def test_replay_since_replays_only_finished_records_of_the_key(store: SQLiteStore) -> None:
    filled = await fill(store)
    replayed = await filled.log.areplay_since(0, section="events", key="stripe")
    assert [r.id for r in replayed] == ["evt_ok"]
    future = await filled.log.areplay_since(parse_since("0s") + 60, section="events")
    assert future == []


class SlowUpdates(MemoryStore):
    """A MemoryStore whose updates wait a turn of the loop, as a store doing I/O does,
    noting the most in flight at once."""

    in_flight = 0
    most = 0

    async def aupdate(self, keys: Any, fn: Any, *, ttl: float | None = None) -> Any:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await anyio.lowlevel.checkpoint()
            return await super().aupdate(keys, fn, ttl=ttl)
        finally:
            self.in_flight -= 1


async def test_a_bulk_replay_runs_a_step_of_replays_at_once_and_keeps_their_order() -> None:
    # One by one, each replay waited for a commit of its own: 10,000 took 8.5 s on
    # SQLite. The replays of a step at once share one (group commit).
    store = SlowUpdates()
    filled = await fill(store)
    for n in range(100):
        await filled.events.aadd({"n": n}, id=f"evt_{n:03d}", key="shop", status="acknowledged")
    store.most = 0
    replayed = await filled.log.areplay_since(0, key="shop")
    assert [r.id for r in replayed] == [f"evt_{n:03d}" for n in range(100)]
    assert store.most == 32


class OtherQueue:
    """A queue of another kind than DurableQueue (the RecordQueue protocol only)."""

    def __init__(self, queue: DurableQueue) -> None:
        self.aget, self.alist = queue.aget, queue.alist
        self.areplay, self.apurge = queue.areplay, queue.apurge


@pytest.mark.parametrize("durable", [True, False])
async def test_replay_since_replays_every_finished_record_oldest_first(
    store: SQLiteStore, durable: bool
) -> None:
    filled = await fill(store)
    events: Any = filled.events if durable else OtherQueue(filled.events)
    log = EventLog(events=events, deliveries=filled.deliveries)
    for n in range(120):  # more than a listing's page
        await filled.events.aadd({"n": n}, id=f"evt_{n:03d}", key="shop", status="acknowledged")
    newest = await log.areplay_since(0, section="events", limit=2)
    assert [r.id for r in newest] == ["evt_118", "evt_119"]
    rest = await log.areplay_since(0, section="events")
    assert len(rest) == 120  # evt_ok, evt_dead and 118 of the new; evt_open is open
    assert {"evt_ok", "evt_dead", "evt_000"} <= {r.id for r in rest}
    assert {r.status for r in rest} == {"pending"}
    dead = await log.areplay_since(0, section="dead-letters")
    assert [r.id for r in dead] == ["dlv_dead"]
    with pytest.raises(UsageError):
        await log.areplay_since(0, section="events", limit=0)


async def test_a_bulk_replay_gives_the_loop_back_on_a_store_that_works_inline() -> None:
    # A MemoryStore never yields, and the replays ran one after another: replaying
    # 10,000 events (an admin's "replay since 1h" on a standalone gateway) held the
    # event loop for 0.7 s.
    filled = await fill(MemoryStore())
    for n in range(320):
        await filled.events.aadd({"n": n}, id=f"evt_{n:03d}", key="shop", status="acknowledged")
    replayed, during = await ticks_during(filled.log.areplay_since(0, key="shop"))
    assert len(replayed) == 320
    assert during >= 320 // 32  # the listing alone gives the loop back once or twice


async def test_a_bulk_replay_sorts_its_listing_between_turns_of_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Between the listing's last read and the first replay, the records listed are
    # sorted (oldest first): one sort of 100,000 held the loop for 20 ms, and the
    # listing's own sort as long. Pieces of 128 stand for the 8,192 of a real one.
    monkeypatch.setattr(_sorting, "PIECE", 128)
    store = MemoryStore()
    filled = await fill(store)
    for n in range(320):
        await filled.events.aadd({"n": n}, id=f"evt_{n:03d}", key="shop", status="acknowledged")
    gauge, reads, first_replay = BetweenTurns(), [0], []
    update, replay = store.aupdate, filled.events.areplay

    async def read(keys: Any, fn: Any, **kw: Any) -> Any:
        reads.append(gauge.turns)
        return await update(keys, fn, **kw)

    async def replayed(record_id: str) -> Any:
        if not first_replay:
            first_replay.append(gauge.turns - reads[-1])
        return await replay(record_id)

    store.aupdate = read  # type: ignore[method-assign]
    filled.events.areplay = replayed  # type: ignore[method-assign]
    done = await gauge.during(filled.log.areplay_since(0, key="shop"))
    assert [r.id for r in done] == [f"evt_{n:03d}" for n in range(320)]
    assert first_replay[0] >= 10  # 1 without the steps (after the listing's last read)


async def test_purge_deletes_dead_letters_only(store: SQLiteStore) -> None:
    filled = await fill(store)
    assert await filled.log.apurge_dead("evt_ok") is None
    assert await filled.log.aget("evt_ok") is not None
    purged = await filled.log.apurge_dead("evt_dead")
    assert purged is not None
    assert await filled.log.aget("evt_dead") is None


async def test_trim_keeps_the_newest_finished_records_per_queue(store: SQLiteStore) -> None:
    filled = await fill(store, max_records=1)
    assert await filled.log.atrim() == 2  # one of two finished per queue
    assert len([r for r in await filled.log.alist("events") if not r.is_open]) == 1
    assert len(await filled.log.alist("deliveries")) == 1
    assert await filled.log.aget("evt_open") is not None  # open records are never trimmed
    assert await filled.log.atrim() == 0


def test_parse_since_reads_relative_iso_and_unix_times() -> None:
    assert parse_since("15m", now=1000.0) == 100.0
    assert parse_since("2h", now=10_000.0) == 2800.0
    assert parse_since("1767182400") == 1767182400.0
    assert parse_since("2026-01-01T00:00:00Z") == 1767225600.0
    assert parse_since("2026-01-01T00:00") == 1767225600.0
    with pytest.raises(UsageError, match="15m"):
        parse_since("yesterday")


async def test_the_trimmer_keeps_the_log_bounded_while_it_runs(store: SQLiteStore) -> None:
    import anyio

    filled = await fill(store, max_records=1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(filled.log.run_trimmer, 0.01)
        with anyio.fail_after(10):
            for _ in range(1000):  # polls the store: the trimmer signals nothing
                if len(await filled.log.alist("deliveries")) == 1:
                    break
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert len(await filled.log.alist("deliveries")) == 1


def test_the_inspector_escapes_what_it_shows() -> None:
    from converge.durable import Record
    from converge.extensions.connectors.server.inspector import (
        render_detail,
        render_list,
        render_row,
    )

    evil = "<script>alert(1)</script>"
    record = Record(
        id="evt_x",
        kind="inbound",
        status="dead",
        key="p",
        data={"payload": evil, "headers": {"x-evil": evil}},
        created=0.0,
        updated=0.0,
        last_error=evil,
    )
    view = record_view(record, data=True)
    for html in (
        render_detail(view, base="/admin"),
        render_list(
            "events",
            [render_row(view, "events", base="/admin", back="/admin/")],
            base="/admin",
            keys=[evil],
            statuses=["dead"],
            key=evil,
        ),
    ):
        assert "<script>" not in html
        assert "&lt;script&gt;" in html


class CountingStore(MemoryStore):
    """A MemoryStore that counts its value reads."""

    reads = 0

    def get(self, key: str) -> Any:
        self.reads += 1
        return super().get(key)


async def test_trim_reads_no_record_while_the_log_is_within_its_bound() -> None:
    store = CountingStore()
    events = DurableQueue(store, prefix="t:inbox", kind="inbound", done_status="acknowledged")
    for i in range(300):
        await events.aadd({"n": i}, key="stripe", status="acknowledged")
    log = EventLog(events=events, max_records=300)
    store.reads = 0
    assert await log.atrim() == 0
    assert store.reads == 0  # two key listings, no record read
    log.max_records = 100
    assert await log.atrim() == 200
    assert len(await events.alist(limit=1_000)) == 100
    assert store.reads <= 300 + 2 * 200  # each record read once, then the purges


async def test_trimming_a_queue_of_another_kind_gives_the_loop_back() -> None:
    # Such a queue is trimmed a purge at a time; on a MemoryStore none of them yields.
    events = DurableQueue(MemoryStore(), prefix="t:inbox", kind="inbound")
    for i in range(352):
        await events.aadd({"n": i}, key="stripe", status="acknowledged")
    log = EventLog(events=OtherQueue(events), max_records=32)
    trimmed, during = await ticks_during(log.atrim())
    assert trimmed == 320
    assert during >= 320 // 32  # the listing alone gives the loop back a few times


async def test_trimming_a_queue_of_another_kind_sorts_between_turns_of_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Between its listing and the first purge, the finished records are picked out and
    # sorted, oldest first: at once, 100,000 held the loop 77-134 ms. Pieces of 64
    # stand for the 8,192 of a real one.
    monkeypatch.setattr(_sorting, "PIECE", 64)
    events = DurableQueue(MemoryStore(), prefix="t:inbox", kind="inbound")
    for i in range(352):
        await events.aadd({"n": i}, key="stripe", status="acknowledged")
    await events.aadd({"n": "open"}, key="stripe")
    gauge, listed, purged = BetweenTurns(), [], []
    queue = OtherQueue(events)

    async def listing(**kw: Any) -> Any:
        records = await events.alist(**kw)
        listed.append(gauge.turns)
        return records

    async def purge(record_id: str) -> Any:
        purged.append((gauge.turns - listed[-1], record_id))
        return await events.apurge(record_id)

    queue.alist, queue.apurge = listing, purge
    log = EventLog(events=queue, max_records=32)
    assert await gauge.during(log.atrim()) == 320
    assert purged[0][0] >= 8  # 0 before: no turn between the listing and the first purge
    kept = await events.alist(limit=1_000)
    assert sorted(r.data["n"] for r in kept if r.status != "pending") == list(range(320, 352))


async def test_a_queue_of_another_kind_is_trimmed_over_the_span_given() -> None:
    # 320 purges in steps of 32: each step waits for its share (50 ms) of 0.5 s.
    events = DurableQueue(MemoryStore(), prefix="t:inbox", kind="inbound")
    for i in range(352):
        await events.aadd({"n": i}, key="stripe", status="acknowledged")
    queue, purged = OtherQueue(events), []

    async def purge(record_id: str) -> Any:
        purged.append(time.monotonic())
        return await events.apurge(record_id)

    queue.apurge = purge
    log = EventLog(events=queue, max_records=32)
    assert await log.atrim(spread_sec=0.5) == 320
    steps = purged[::32]
    assert len(steps) == 10
    for n, at in enumerate(steps):
        assert at - steps[0] >= n * 0.05 - 0.02
    with pytest.raises(UsageError, match="spread_sec"):
        await log.atrim(spread_sec=-1)
    with pytest.raises(UsageError, match="interval_sec"):
        await log.run_trimmer(0)


async def test_a_trim_of_two_queues_shares_one_span_between_them() -> None:
    # Each queue spread its deletes over the whole span, one after the other: a
    # forwarding gateway's trim lasted its whole interval. Now each takes an equal share
    # of what is left, and a queue with nothing to delete leaves its share to the next.
    events = DurableQueue(MemoryStore(), prefix="t:inbox", kind="inbound")
    deliveries = DurableQueue(MemoryStore(), prefix="t:outbox", kind="outbound")
    given: list[tuple[str, float]] = []

    def trimmed(name: str, uses_its_share: bool) -> Any:
        async def atrim_finished(keep: int, *, spread_sec: float = 0.0) -> int:
            given.append((name, spread_sec))
            if uses_its_share:  # as a queue with many deletes does
                await anyio.sleep(spread_sec)
            return 0

        return atrim_finished

    log = EventLog(events=events, deliveries=deliveries, max_records=32)
    events.atrim_finished = trimmed("events", True)  # type: ignore[method-assign]
    deliveries.atrim_finished = trimmed("deliveries", True)  # type: ignore[method-assign]
    await log.atrim(spread_sec=0.6)
    assert given[0] == ("events", pytest.approx(0.3, abs=0.01))  # half the span
    assert given[1][0] == "deliveries"
    assert 0 <= given[1][1] <= 0.3 + 1e-6  # what the first turn left, not 0.6 again

    given.clear()
    events.atrim_finished = trimmed("events", False)  # type: ignore[method-assign]
    await log.atrim(spread_sec=0.6)
    assert given[0] == ("events", pytest.approx(0.3, abs=0.01))
    assert given[1][1] > 0.4  # nearly all of it: the first turn took no time


async def test_a_connectors_outbox_is_trimmed_in_batches_through_its_durable_queue() -> None:
    import time
    from types import SimpleNamespace

    from converge.extensions.connectors.outbound.outbox import Outbox

    store = CountingUpdates()
    outbox = Outbox(store, prefix="t", clock=time.time, dead_letter_ttl_sec=3600)
    for i in range(300):
        await outbox.queue.aadd({"n": i}, key="crm", status="delivered")
    log = EventLog.for_connector(SimpleNamespace(outbox=outbox), max_records=10)
    store.updates = 0
    assert await log.atrim() == 290
    assert store.updates == 2 + 5  # 300 read, 290 deleted: not an update per record
    assert len(await log.alist("deliveries", limit=1_000)) == 10


async def test_recount_repairs_a_sections_counters_and_refuses_dead_letters() -> None:
    store = MemoryStore()
    inbox = DurableQueue(store, prefix="in", kind="inbound")
    for i in range(3):
        await inbox.aadd({"i": i})
    for key in inbox.keys.counts:  # as a crash on a FileStore can leave them
        await store.aput(key, 0)
    log = EventLog(events=inbox)
    assert await log.arecount("events") == 3
    assert await inbox.apending_count() == 3
    with pytest.raises(UsageError):
        await log.arecount("dead-letters")
