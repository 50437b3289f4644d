"""DurableQueue on every Store backend (asyncio and trio), and its sans-I/O transitions."""

from __future__ import annotations

import gc
import time
from typing import Any

import anyio
import pytest

from converge import _sorting
from converge.core.store import Store
from converge.durable import Attempt, DurableQueue, QueueKeys, Record, Transitions
from converge.durable import queue as queue_module
from converge.durable.core import (
    COUNT_SHARDS,
    cutoff,
    delete_unchanged,
    finished_stamps,
    listed,
    split_at,
)
from converge.errors import (
    ConfigurationError,
    DuplicateRecordError,
    FormatError,
    QueueFullError,
    UsageError,
)
from converge.extensions.storage import MemoryStore
from counting_store import CountingUpdates
from loop_stall import BetweenTurns, ticks_during

pytestmark = pytest.mark.anyio


def queue(store: Store, **kw: Any) -> DurableQueue:
    kw.setdefault("prefix", "q")
    kw.setdefault("kind", "inbound")
    return DurableQueue(store, **kw)


# -- the sans-I/O core ----------------------------------------------------------------


def plain(changes: dict[str, Any]) -> dict[str, Any]:
    """Apply WithTTL wrappers the way a store would: keep the values."""
    return {k: getattr(v, "value", v) for k, v in changes.items()}


def test_transitions_add_lease_ack_keep_the_counter_and_fence_tokens() -> None:
    keys = QueueKeys("q")
    t = Transitions(keys, retention_sec=60.0, dead_retention_sec=120.0, max_pending=1)
    record = Record("r1", "inbound", "pending", "p", {"x": 1}, created=1.0, updated=1.0, due=1.0)
    state: dict[str, Any] = {}
    changes, outcome = t.add(state, record, {"claim": "c"}, 30.0)
    assert outcome == "added"
    assert changes["claim"].ttl == 30.0
    assert changes[keys.open("r1")].ttl is None
    state.update(plain(changes))
    assert state[keys.count_of("r1")] == 1
    assert t.add(state, record, {}, None) == ({}, "duplicate")
    other = pending("r2")
    assert t.add(state, other, {"claim": "c"}, None) == ({}, "duplicate")
    assert t.add(state, other, {}, None) == ({}, "full")
    assert t.lease(state, "r1", "a", now=0.5, until=10.0) == ({}, None)  # not due yet
    changes, leased = t.lease(state, "r1", "a", now=2.0, until=10.0)
    assert leased is not None
    assert leased.lease_token == 1
    state.update(plain(changes))
    assert t.lease(state, "r1", "b", now=5.0, until=20.0) == ({}, None)  # held
    changes, taken = t.lease(state, "r1", "b", now=11.0, until=20.0)  # ran out
    assert taken is not None
    assert taken.lease_token == 2
    state.update(plain(changes))
    assert t.ack(state, "r1", 1, now=12.0) == ({}, None)  # the first holder is fenced off
    changes, done = t.ack(state, "r1", 2, now=12.0)
    assert done is not None
    assert done.status == "acknowledged"
    assert changes[keys.done("r1")].ttl == 60.0
    assert changes[keys.open("r1")] is None
    state.update(plain(changes))
    state = {k: v for k, v in state.items() if v is not None}
    assert state[keys.count_of("r1")] == 0


def pending(record_id: str) -> Record:
    """A pending record with no data, created at 1.0."""
    return Record(record_id, "inbound", "pending", "p", {}, created=1.0, updated=1.0)


def shard_ids(keys: QueueKeys, count: int) -> list[str]:
    """``count`` record ids that each fall on a counter of their own."""
    ids: dict[str, str] = {}
    n = 0
    while len(ids) < count:
        ids.setdefault(keys.count_of(f"r{n}"), f"r{n}")
        n += 1
    return list(ids.values())


def test_records_on_different_counters_share_no_key() -> None:
    # One counter for the whole queue put every add and every close of every replica
    # on one key: Redis replicas' compare-and-sets failed each other, and forwarding
    # did not scale with replicas.
    keys = QueueKeys("q")
    t = Transitions(keys, 60.0, 60.0, max_pending=1_000_000)
    first, second = (pending(i) for i in shard_ids(keys, 2))
    assert not set(t.add_keys(first, {})) & set(t.add_keys(second, {}))
    assert not set(t.close_keys(first.id)) & set(t.close_keys(second.id))
    assert len(set(keys.counts)) == COUNT_SHARDS


def test_a_large_bound_gives_each_counter_its_share_and_a_small_one_is_exact() -> None:
    keys = QueueKeys("q")
    large = Transitions(keys, 60.0, 60.0, max_pending=COUNT_SHARDS * 300)
    first, second = shard_ids(keys, 2)
    state: dict[str, Any] = {keys.count_of(first): 300}
    assert large.add(state, pending(first), {}, None) == ({}, "full")
    changes, outcome = large.add(state, pending(second), {}, None)
    assert outcome == "added"
    assert plain(changes)[keys.count_of(second)] == 1
    small = Transitions(keys, 60.0, 60.0, max_pending=3)
    state = {}
    added = []
    for record_id in shard_ids(keys, 4):
        changes, outcome = small.add(state, pending(record_id), {}, None)
        state.update(plain(changes))
        added.append(outcome)
    assert added == ["added", "added", "added", "full"]


async def test_the_single_counter_of_earlier_versions_still_counts_until_an_upgrade(
    backend: Store,
) -> None:
    q = queue(backend, max_pending=100_000)
    ids = [(await q.aadd({"i": i})).id for i in range(5)]
    assert await q.aupgrade_counts() is None  # nothing to fold in: no recount
    for counter in q.keys.counts:  # as an earlier version left them: one counter
        await backend.adelete(counter)
    await backend.aput(q.keys.count, 5)
    assert await q.apending_count() == 5
    leased = await q.alease_id(ids[0], "me", lease_sec=30.0)
    assert leased is not None
    assert await q.aack(ids[0], leased.lease_token) is not None
    assert await q.apending_count() == 4  # its shard went below zero
    assert await q.aupgrade_counts() == 4  # a recount
    assert await backend.aget(q.keys.count) is None
    assert await q.apending_count() == 4
    assert min([await backend.aget(key) for key in q.keys.counts]) == 0
    assert await q.aupgrade_counts() is None


def test_transitions_keep_a_bounded_attempt_history() -> None:
    keys = QueueKeys("q")
    t = Transitions(keys, 60.0, 60.0, 10)
    record = Record("r", "outbound", "pending", "t", {}, created=0.0, updated=0.0)
    state = plain(t.add({}, record, {}, None)[0])
    for i in range(60):
        changes, leased = t.lease(state, "r", "a", now=float(i), until=i + 1.0)
        assert leased is not None
        state.update(plain(changes))
        attempt = Attempt(at=float(i), status_code=500, error="boom", outcome="retry")
        changes, _ = t.retry(state, "r", leased.lease_token, float(i), float(i), attempt)
        state.update(plain(changes))
    final = Record.from_dict(state[keys.open("r")])
    assert final.attempt_count == 60
    assert len(final.attempts) == 50
    assert final.attempts[-1].at == 59.0


def test_records_round_trip_and_reject_malformed_data() -> None:
    record = Record(
        "r",
        "outbound",
        "dead",
        "t",
        {"a": [1]},
        created=1.0,
        updated=2.0,
        attempts=(Attempt(at=1.5, status_code=503, error="x" * 900, latency_ms=3.0),),
        attempt_count=1,
        last_error="gone",
    )
    assert len(record.attempts[0].error or "") == 500
    assert Record.from_dict(record.to_dict()) == record
    for bad in [None, {}, {**record.to_dict(), "status": "lost"}, {**record.to_dict(), "id": 5}]:
        with pytest.raises(FormatError):
            Record.from_dict(bad)


def test_bad_configuration_is_refused() -> None:
    from converge.extensions.storage import MemoryStore

    store = MemoryStore()
    for kw in [
        {"max_pending": 0},
        {"retention_sec": -1},
        {"kind": "Bad Kind"},
        {"prefix": ""},
        {"done_status": "dead"},
    ]:
        with pytest.raises(ConfigurationError):
            queue(store, **kw)


def test_trim_picks_the_oldest_by_update_time_then_id() -> None:
    stamps = [(5.0, "e", "k:e"), (1.0, "b", "k:b"), (3.0, "d", "k:d"), (1.0, "a", "k:a")]
    stamps += [(3.0, "c", "k:c")]
    times = sorted(s[0] for s in stamps)
    assert cutoff(times, 3) == (3.0, 1)  # 1.0, 1.0, then one of the two at 3.0
    assert cutoff(times, 4) == (3.0, 2)
    assert cutoff(times, 1) == (1.0, 1)
    assert cutoff(times, 5) == (5.0, 1)
    older, at_time = split_at(stamps, 3.0)
    assert sorted(s[1] for s in older) == ["a", "b"]
    assert sorted(at_time) == [(3.0, "c", "k:c"), (3.0, "d", "k:d")]  # by id: c goes first


def test_trim_reads_stamps_and_deletes_only_records_still_as_read() -> None:
    def record(record_id: str, updated: float) -> dict[str, Any]:
        return {"id": record_id, "updated": updated, "status": "acknowledged"}

    current = {
        "q:done:a": record("a", 1.0),
        "q:done:b": record("b", 2.0),
        "q:dead:c": record("c", 3.0),
        "q:done:x": "not a record",
    }
    changes, stamps = finished_stamps(current)
    assert changes == {}  # a read: nothing written
    assert sorted(stamps) == [
        (1.0, "a", "q:done:a"),
        (2.0, "b", "q:done:b"),
        (3.0, "c", "q:dead:c"),
    ]
    now = {
        "q:done:a": record("a", 1.0),  # unchanged: deleted
        "q:done:b": record("b", 9.0),  # finished again since: kept
        "q:dead:c": None,  # replayed since (open again): nothing to delete
    }
    assert delete_unchanged(stamps)(now) == ({"q:done:a": None}, 1)


# -- the driver on every backend ------------------------------------------------------


async def test_a_record_is_added_leased_acknowledged_and_kept_for_its_retention(
    backend: Store,
) -> None:
    q = queue(backend, retention_sec=0.4)
    added = await q.aadd({"n": 1}, key="github")
    assert added.status == "pending"
    assert await q.apending_count() == 1
    assert (await q.aget(added.id)) == added
    [leased] = await q.alease("worker-1", lease_sec=30)
    assert (leased.id, leased.status, leased.lease_token) == (added.id, "leased", 1)
    assert await q.alease("worker-2") == []
    assert await q.aack(added.id, 99) is None  # a wrong token changes nothing
    done = await q.aack(added.id, leased.lease_token)
    assert done is not None
    assert done.status == "acknowledged"
    assert await q.apending_count() == 0
    assert [r.id for r in await q.alist(status="acknowledged")] == [added.id]
    assert await q.aack(added.id, leased.lease_token) is None  # done already
    await anyio.sleep(0.7)
    assert await q.aget(added.id) is None  # swept by the store's TTL


async def test_max_pending_refuses_adds_atomically_until_one_is_done(backend: Store) -> None:
    q = queue(backend, max_pending=5)
    outcomes: list[str] = []

    async def add(i: int) -> None:
        try:
            await q.aadd({"i": i})
            outcomes.append("added")
        except QueueFullError:
            outcomes.append("full")

    async with anyio.create_task_group() as tg:
        for i in range(12):
            tg.start_soon(add, i)
    assert sorted(outcomes) == ["added"] * 5 + ["full"] * 7
    assert await q.apending_count() == 5
    assert len(await q.aopen_ids()) == 5
    [leased] = await q.alease("w")
    await q.aack(leased.id, leased.lease_token)
    await q.aadd({"i": "late"})
    with pytest.raises(QueueFullError):
        await q.aadd({"i": "too many"})
    # Done records never count against the bound.
    await q.aadd({"i": "logged"}, status="acknowledged")
    assert await q.apending_count() == 5


async def test_claims_are_written_with_the_record_and_make_later_adds_duplicates(
    backend: Store,
) -> None:
    q = queue(backend, max_pending=1)
    await q.aadd({"a": 1}, id="e1", claims={"seen:x": {"at": 1}}, claim_ttl=0.3)
    assert await backend.aget("seen:x") == {"at": 1}
    with pytest.raises(DuplicateRecordError):
        await q.aadd({"a": 2}, id="e2", claims={"seen:x": {"at": 2}})
    with pytest.raises(DuplicateRecordError):
        await q.aadd({"a": 3}, id="e1")
    # A full queue writes neither the record nor its claim.
    with pytest.raises(QueueFullError):
        await q.aadd({"a": 4}, id="e4", claims={"seen:y": 1})
    assert await backend.aget("seen:y") is None
    assert await q.aget("e4") is None
    await anyio.sleep(0.6)
    assert await backend.aget("seen:x") is None  # the claim has its own TTL
    assert (await q.aget("e1")) is not None  # the open record has none


async def test_a_lease_that_runs_out_is_taken_over_and_fences_the_old_holder(
    backend: Store,
) -> None:
    q = queue(backend)
    added = await q.aadd({"n": 1}, status="leased", lease_owner="dead-process", lease_sec=0.3)
    assert added.lease_token == 1
    assert await q.alease("survivor") == []
    await anyio.sleep(0.5)
    [taken] = await q.alease("survivor", lease_sec=30)
    assert (taken.id, taken.lease_token, taken.lease_owner) == (added.id, 2, "survivor")
    assert await q.aack(added.id, 1) is None
    assert await q.abury(added.id, 1, "late") is None
    assert await q.aextend(added.id, 1, lease_sec=5) is None
    extended = await q.aextend(added.id, 2, lease_sec=60)
    assert extended is not None
    assert extended.lease_until is not None
    assert extended.lease_until > taken.lease_until  # type: ignore[operator]
    assert (await q.aack(added.id, 2)) is not None


async def test_retry_records_attempts_and_waits_for_the_due_time(backend: Store) -> None:
    q = queue(backend, kind="outbound")
    added = await q.aadd({"n": 1}, key="target-a")
    [leased] = await q.alease("w", key="target-a")
    now = await q.anow()
    attempt = Attempt(at=now, status_code=503, error="status 503", latency_ms=12.5)
    retried = await q.aretry(added.id, leased.lease_token, now + 0.4, attempt)
    assert retried is not None
    assert (retried.status, retried.attempt_count, retried.last_error) == (
        "pending",
        1,
        "status 503",
    )
    assert await q.alease("w") == []
    await anyio.sleep(0.6)
    [again] = await q.alease("w", key="target-a")
    assert again.lease_token == 2
    assert await q.alease("w", key="target-b") == []
    ok = Attempt(at=now, status_code=200, outcome="delivered")
    done = await q.aack(added.id, again.lease_token, attempt=ok)
    assert done is not None
    assert done.status == "delivered"
    assert [a.status_code for a in done.attempts] == [503, 200]


async def test_bury_replay_and_purge_move_records_and_keep_the_count(backend: Store) -> None:
    q = queue(backend, dead_retention_sec=60)
    first = await q.aadd({"n": 1}, key="p")
    second = await q.aadd({"n": 2}, key="p")
    [leased] = await q.alease("w", exclude={second.id})
    assert leased.id == first.id
    dead = await q.abury(first.id, leased.lease_token, "max attempts")
    assert dead is not None
    assert dead.status == "dead"
    assert await q.apending_count() == 1
    assert [r.id for r in await q.alist(status="dead")] == [first.id]
    replayed = await q.areplay(first.id)
    assert replayed is not None
    assert replayed.status == "pending"
    assert replayed.budget_used == 0
    assert await q.apending_count() == 2
    assert await q.areplay(first.id) is None  # it is open, not dead
    assert await q.areplay("unknown") is None
    purged = await q.apurge(first.id)
    assert purged is not None
    assert purged.id == first.id
    assert await q.apurge(first.id) is None
    assert await q.apending_count() == 1
    assert [r.id for r in await q.alist()] == [second.id]
    assert await q.alist(key="other") == []
    assert len(await q.alist(since=second.created)) == 1
    assert await q.arecount() == 1


async def test_concurrent_leases_hand_each_record_to_one_owner(backend: Store) -> None:
    q = queue(backend)
    ids = {(await q.aadd({"i": i})).id for i in range(8)}
    got: list[tuple[str, str]] = []

    async def worker(name: str) -> None:
        while True:
            records = await q.alease(name, limit=2)
            if not records:
                return
            got.extend((name, r.id) for r in records)

    async with anyio.create_task_group() as tg:
        for name in ("a", "b", "c"):
            tg.start_soon(worker, name)
    assert sorted(i for _, i in got) == sorted(ids)


async def test_lease_times_come_from_the_stores_clock(backend: Store) -> None:
    q = queue(backend)
    added = await q.aadd({}, status="leased", lease_owner="me", lease_sec=10)
    atime = getattr(backend, "atime", None)
    if atime is not None:
        assert abs(added.created - await atime()) < 1.0
    assert added.lease_until == pytest.approx(added.created + 10)


async def test_bad_arguments_raise_usage_errors(backend: Store) -> None:
    q = queue(backend)
    with pytest.raises(UsageError):
        await q.aadd({}, id="has space")
    with pytest.raises(UsageError):
        await q.aadd({}, status="leased")  # no owner
    with pytest.raises(UsageError):
        await q.aadd([1])  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        await q.aack("x", "token")  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        await q.alist(status="lost")
    # Each of these raised TypeError or ValueError, or (NaN) was taken.
    for due in ("soon", float("nan"), [1]):
        with pytest.raises(UsageError, match="due"):
            await q.aadd({}, due=due)  # type: ignore[arg-type]
        with pytest.raises(UsageError, match="due"):
            await q.anew_record({}, due=due)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="claims"):
        await q.aadd({}, claims=True)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="since"):
        await q.alist(since="yesterday")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="now"):
        q.new_id("")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="Record"):
        q.note_finished({"status": "acknowledged"})  # type: ignore[arg-type]
    for exclude in (None, 5, b"id"):  # TypeError
        with pytest.raises(UsageError, match="exclude"):
            await q.alease("me", exclude=exclude)  # type: ignore[arg-type]
    assert await q.alist() == []


async def test_listing_many_records_lets_other_tasks_run() -> None:
    # A MemoryStore answers without yielding: a listing must give the loop back now
    # and then, or 1,000 records would hold every other task for the whole listing.
    q = queue(MemoryStore())
    for i in range(1_000):
        await q.aadd({"n": i})
    listing, during = await ticks_during(q.alist(limit=2_000))
    assert len(listing) == 1_000
    assert during >= 1  # none at all without the listing's own checkpoints


async def test_a_lease_of_many_gives_the_loop_back_between_leases() -> None:
    # Each lease is an update of its own; on a MemoryStore (which never yields) the 256
    # of a batch held the event loop for 30 ms.
    q = queue(MemoryStore(), max_pending=10_000)
    for i in range(512):
        await q.aadd({"n": i})
    leased, during = await ticks_during(q.alease("me", limit=512))
    assert len(leased) == 512
    # A turn after every 32 leases: 15 here (one, between the two batches, without).
    # Trio's scheduling moves the count by a turn or two.
    assert during >= 512 // 32 // 2


async def open_records(monkeypatch: pytest.MonkeyPatch) -> tuple[MemoryStore, DurableQueue]:
    """1,000 open records, and sorts in pieces of 128 (standing for the 8,192 of a real
    one), so that going through them takes several steps."""
    monkeypatch.setattr(_sorting, "PIECE", 128)
    store = MemoryStore()
    q = queue(store, max_pending=10_000)
    for i in range(1_000):
        await q.aadd({"n": i})
    return store, q


async def store_calls(store: MemoryStore, work: Any) -> list[tuple[str, int]]:
    """Await ``work`` while another task counts its turns: ``(call, turns so far)`` once
    each of the store's listings returns (``"listed"``), at each of its reads
    (``"read"``), and at the end (``"end"``)."""
    gauge = BetweenTurns()
    calls: list[tuple[str, int]] = []
    listing, update = store.alist, store.aupdate

    async def listed(prefix: str = "") -> list[str]:
        keys = await listing(prefix)
        calls.append(("listed", gauge.turns))
        return keys

    async def read(keys: Any, fn: Any, **kw: Any) -> Any:
        calls.append(("read", gauge.turns))
        return await update(keys, fn, **kw)

    store.alist = listed  # type: ignore[method-assign]
    store.aupdate = read  # type: ignore[method-assign]
    try:
        await gauge.during(work)
        calls.append(("end", gauge.turns))
    finally:
        del store.alist, store.aupdate
    return calls


def after_listing(calls: list[tuple[str, int]]) -> int:
    """Turns between the store's listing and the next store call (or the end)."""
    at = [call for call, _ in calls].index("listed")
    return calls[at + 1][1] - calls[at][1]


async def test_what_goes_through_every_open_record_gives_the_loop_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Past the store's listing (which sorts in steps), the open ids were cut out of
    # their keys, filtered for a lease poll or hashed for a recount in one go: with
    # 100,000 open records (a raised max_pending; the outbox allows 1,000,000) that
    # held the loop for 20-65 ms.
    store, q = await open_records(monkeypatch)
    assert after_listing(await store_calls(store, q.aopen_ids())) >= 4  # 0 before; 8
    assert after_listing(await store_calls(store, q.alease("me", limit=1))) >= 4
    assert after_listing(await store_calls(store, q.arecount())) >= 8  # ids, counters
    assert await q.apending_count() == 1_000


async def test_a_long_listing_is_sorted_between_turns_of_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Between reading the listing (256 records a read) and reading the newest records
    # again, the listing is sorted: heapq.nlargest over 100,000 records listed oldest
    # first held the loop for 70-95 ms, as did the sort of alisted().
    store, q = await open_records(monkeypatch)
    listing: list[Record] = []

    async def listed() -> None:
        listing.extend(await q.alist(limit=1_000))

    seen = [turns for call, turns in await store_calls(store, listed()) if call != "listed"]
    assert len(seen) == 4 + 4 + 1  # 4 reads list the records, 4 read them again
    assert seen[4] - seen[3] >= 8  # 1 without the steps (the listing's last read)
    assert sorted({r.data["n"] for r in listing}) == list(range(1_000))
    assert listing == sorted(listing, key=lambda r: (r.created, r.id), reverse=True)

    found: list[tuple[float, str]] = []

    async def ids() -> None:
        found.extend(await q.alisted())

    seen = [turns for call, turns in await store_calls(store, ids()) if call != "listed"]
    assert len(seen) == 4 + 1
    assert seen[4] - seen[3] >= 8  # 1 without the steps
    assert found == [(r.created, r.id) for r in listing]


async def test_a_listing_builds_its_records_a_batch_between_two_turns_of_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The reads gave the loop back every 256 records, but the records were then built
    # all at once: 10,000 of them (a bulk replay) held the event loop for 100 ms.
    q = queue(MemoryStore(), max_pending=10_000)
    for i in range(1_000):
        await q.aadd({"n": i})
    built = BetweenTurns()
    from_dict = Record.from_dict

    def counted(value: dict[str, Any]) -> Record:
        built.count()
        return from_dict(value)

    monkeypatch.setattr(Record, "from_dict", counted)
    assert len(await built.during(q.alist(limit=2_000))) == 1_000
    assert built.most <= 2 * 256  # trio runs a batch's tasks in random order: two can meet


async def test_alisted_gives_the_ids_alist_would_list_without_building_records(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    q = queue(MemoryStore(), clock=lambda: now[0])
    for i in range(300):
        now[0] += 1.0
        await q.aadd({"n": i}, id=f"r{i:03d}", key="even" if i % 2 == 0 else "odd")
    monkeypatch.setattr(Record, "from_dict", None)  # any record built fails the test
    listed_ids = await q.alisted(key="even", since=1290.0)
    assert listed_ids == [(1299.0 - 2 * n, f"r{298 - 2 * n}") for n in range(5)]
    assert await q.alisted(status="dead") == []
    with pytest.raises(UsageError):
        await q.alisted(status="finished")


async def test_trim_finished_keeps_the_newest_and_never_an_open_record(backend: Store) -> None:
    now = [1000.0]
    q = queue(backend, clock=lambda: now[0], max_pending=10_000)
    done = []
    for i in range(290):  # more than one batch of 256
        now[0] += 1.0
        done.append(await q.aadd({"i": i}, status="acknowledged"))
    open_one = await q.aadd({"open": True})
    now[0] += 1.0
    dead = await q.aadd({"dead": True})
    [leased] = await q.alease("w", exclude={open_one.id})
    assert await q.abury(dead.id, leased.lease_token, "gave up") is not None
    assert await q.atrim_finished(10) == 281  # 291 finished, the newest 10 kept
    kept = {r.id for r in await q.alist(limit=1_000) if not r.is_open}
    assert kept == {dead.id, *(r.id for r in done[-9:])}
    assert await q.aget(open_one.id) is not None
    assert await q.apending_count() == 1
    assert await q.atrim_finished(10) == 0
    newer = []
    for i in range(5):  # the next trim reads these alone; the oldest 5 kept go
        now[0] += 1.0
        newer.append(await q.aadd({"later": i}, status="acknowledged"))
    assert await q.atrim_finished(10) == 5
    kept = {r.id for r in await q.alist(limit=1_000) if not r.is_open}
    assert kept == {*(r.id for r in done[-4:]), dead.id, *(r.id for r in newer)}
    with pytest.raises(UsageError):
        await q.atrim_finished(-1)


async def test_trim_finished_reads_and_deletes_in_batches_and_lets_other_tasks_run() -> None:
    store = CountingUpdates()
    q = queue(store, max_pending=10_000)
    for i in range(1_000):
        await q.aadd({"n": i}, status="acknowledged")
    store.updates = 0
    trimmed, during = await ticks_during(q.atrim_finished(100))
    assert trimmed == 900
    assert store.updates == 4 + 15  # 1,000 read, 256 per update; 900 deleted, 64 per update
    assert await q.afinished_count() == 100
    assert during >= 4  # the loop is given back between updates (none without)
    other = queue(store, max_pending=10_000)  # another process on the same store
    for i in range(256):
        await q.aadd({"n": 1_000 + i}, status="acknowledged")
        await other.aadd({"n": 2_000 + i}, status="acknowledged")
    store.updates = 0
    assert await q.atrim_finished(600) == 12
    # Read: the 256 the other queue finished since the last trim; this queue's own 256
    # are stamped as it wrote them, and the 100 kept as the last trim read them.
    assert store.updates == 1 + 1


class TimedUpdates(MemoryStore):
    """A MemoryStore that notes when each ``aupdate`` began (``time.monotonic``)."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    async def aupdate(self, keys: Any, fn: Any, *, ttl: float | None = None) -> Any:
        self.times.append(time.monotonic())
        return await super().aupdate(keys, fn, ttl=ttl)


async def test_a_trim_spreads_its_deletes_over_the_span_it_is_given() -> None:
    # Beside a busy SQLite gateway, deletes at full speed shared each group commit with
    # the requests arriving meanwhile (the gateway's p99 under sustained load: 28.6 ms
    # in the median run, 20.2 ms spread). Spread over a span, each delete waits for its
    # share of it.
    store = TimedUpdates()
    q = queue(store, max_pending=10_000)
    for i in range(740):
        await q.aadd({"n": i}, status="acknowledged")
    store.times.clear()
    start = time.monotonic()
    assert await q.atrim_finished(100, spread_sec=0.5) == 640
    took = time.monotonic() - start
    deletes = store.times[-10:]  # 640 deleted, 64 per update (after 3 reads)
    assert len(store.times) == 3 + 10
    for n, at in enumerate(deletes):  # at full speed, all ten within a few milliseconds
        assert at - deletes[0] >= n * 0.05 - 0.02
    assert took >= 0.45 - 0.02  # the whole trim spans the ten shares but the last
    for bad in (-1, float("nan"), float("inf"), True, "1"):
        with pytest.raises(UsageError, match="spread_sec"):
            await q.atrim_finished(100, spread_sec=bad)


async def test_a_trim_notes_what_it_read_between_turns_of_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The reads gave the loop back every 256 records, but their stamps were then noted
    # all at once: 100,000 held the loop for 20-35 ms. Steps of 2 parts (512 stamps)
    # stand for the 32 of a real trim.
    monkeypatch.setattr(queue_module, "_PARTS_PER_STEP", 2)
    walked = BetweenTurns()  # stamps gone through

    class Walked(list):  # type: ignore[type-arg]
        def __iter__(self) -> Any:
            for stamp in list.__iter__(self):
                walked.count()
                yield stamp

    def read(current: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
        changes, stamps = finished_stamps(current)
        return changes, Walked(stamps)

    q = queue(MemoryStore(), max_pending=10_000)
    for i in range(8_192):
        await q.aadd({"n": i}, status="acknowledged")
    monkeypatch.setattr(queue_module, "finished_stamps", read)
    assert await walked.during(q.atrim_finished(100)) == 8_092
    # Before, the 32 parts read were walked at once (8,192 stamps and more). A step of
    # the oldest's pick walks its 2 parts twice (1,024), and on trio the other task
    # may come after two steps.
    assert walked.most <= 16 * 256


async def test_a_trim_never_deletes_a_record_finished_again_since_it_was_read() -> None:
    # A trim remembers what it read; a record replayed and finished again since then,
    # by another process, looks older there than it is. Its delete checks the record as
    # stored, so it stays, and the next trim reads it again and deletes the oldest as
    # it really is.
    now = [1000.0]
    store = MemoryStore()
    q = queue(store, clock=lambda: now[0])
    elsewhere = queue(store, clock=lambda: now[0])
    done = []
    for i in range(4):
        now[0] += 1.0
        done.append(await q.aadd({"i": i}, status="acknowledged"))
    assert await q.atrim_finished(3) == 1  # done[0]; the stamps of done[1:] are read
    now[0] += 10.0
    assert await elsewhere.areplay(done[1].id) is not None
    [again] = await elsewhere.alease("w")
    assert await elsewhere.aack(again.id, again.lease_token) is not None  # the newest
    now[0] += 1.0
    newest = await q.aadd({"i": 9}, status="acknowledged")
    assert await q.atrim_finished(3) == 0  # done[1] as read is the oldest: changed, kept
    assert await q.aget(done[1].id) is not None
    assert await q.atrim_finished(3) == 1  # read again: done[2] is the oldest
    kept = {r.id for r in await q.alist(limit=10)}
    assert kept == {done[1].id, done[3].id, newest.id}


async def test_a_queue_remembers_what_it_finished_once_trims_run_and_no_more() -> None:
    # What a queue finishes itself (added done, acknowledged, buried) is stamped as it
    # writes it, so its trims read none of it; only once a trim has run (a queue that
    # is never trimmed keeps nothing), and only what is still listed.
    store = CountingUpdates()
    now = [1000.0]
    q = queue(store, clock=lambda: now[0], max_pending=10_000)
    for i in range(250):
        await q.aadd({"n": i}, status="acknowledged")
    assert q._stamps == {}  # never trimmed: nothing kept
    assert await q.atrim_finished(250) == 0
    for i in range(20):
        now[0] += 1.0
        await q.aadd({"n": i}, id=f"x{i}")
    held = await q.alease("w", limit=20)
    for record in held[:10]:
        assert await q.aack(record.id, record.lease_token) is not None
    for record in held[10:]:
        assert await q.abury(record.id, record.lease_token, "gave up") is not None
    now[0] += 1.0
    newest = await q.aadd({"n": -1}, status="acknowledged")
    store.updates = 0
    assert await q.atrim_finished(11) == 260  # the first 250 read, not the 21 since
    assert store.updates == 1 + 5  # 250 read in 1, 260 deleted in 5
    kept = {r.id for r in await q.alist(limit=100)}
    assert kept == {*(r.id for r in held[10:]), newest.id}
    # Records deleted behind the queue's back (expired, purged by hand) are forgotten
    # at the next trim, even within the bound: the stamps never outgrow the log.
    for i in range(600):
        await q.aadd({"n": i}, status="acknowledged")
    for key in await store.alist(q.keys.done_prefix):
        await store.adelete(key)
    assert len(q._stamps) > 600
    assert await q.atrim_finished(100) == 0
    assert set(q._stamps) == set(await store.alist(q.keys.dead_prefix))


async def test_the_stamps_a_queue_keeps_are_out_of_the_collectors_reach() -> None:
    # A stamp per finished record, kept between trims, was a tuple each: tens of
    # thousands stayed tracked while a trim's frees held young collections off, and
    # the first collection after the trim walked them all (7-25 ms in a gateway).
    # gc.get_count()[0] counts the container objects created and not freed since the
    # last collection.
    q = queue(MemoryStore(serializer="pickle"), max_pending=10_000)
    await q.atrim_finished(100)  # from now on, what the queue finishes is stamped
    gc.disable()
    try:
        gc.collect()
        before = gc.get_count()[0]
        for i in range(2_000):
            await q.aadd({"n": i}, status="acknowledged")
        created = gc.get_count()[0] - before
    finally:
        gc.enable()
    assert len(q._stamps) == 2_000
    assert created < 200, created
    assert await q.atrim_finished(100) == 1_900  # trimmed from what it kept
    assert len(q._stamps) == 100


async def test_a_lease_reads_the_open_records_in_batches() -> None:
    # Only the records worth leasing cost a write; the rest are read 256 per store call
    # (a plain read each used to cost one call per open record, at every inbox poll).
    store = CountingUpdates()
    now = [1000.0]
    q = queue(store, clock=lambda: now[0], max_pending=10_000)
    for i in range(1_000):
        await q.aadd({"n": i}, id=f"a{i:04d}", key="k", due=now[0] + 60)  # not due yet
    for i in range(3):
        await q.aadd({"n": i}, id=f"b{i}", key="k")
    await q.aadd({"n": 9}, id="b9", key="other")
    store.updates = 0
    store.got.clear()
    leased = await q.alease("me", limit=10, key="k", exclude={"b1"})
    assert [r.id for r in leased] == ["b0", "b2"]
    assert (store.updates, store.gets) == (4 + 2, 0)  # 1,003 read in 4, then 2 leases
    now[0] += 61  # every record is due: the first batch fills the limit
    store.updates = 0
    leased = await q.alease("me", limit=5)
    assert [r.id for r in leased] == [f"a{i:04d}" for i in range(5)]
    assert store.updates == 1 + 5


async def test_a_lease_poll_reads_a_record_held_elsewhere_again_only_when_it_may_lease_it() -> None:
    # Another replica holds 600 records for 30 s: the first poll reads them, 256 per
    # store call; the next polls list the keys and read none of them (they read all
    # 600 each time before), until their leases end.
    store = CountingUpdates()
    now = [1000.0]
    other = queue(store, clock=lambda: now[0], max_pending=10_000)
    mine = queue(store, clock=lambda: now[0], max_pending=10_000)
    held = [
        await other.aadd({"n": i}, id=f"a{i:04d}", status="leased", lease_owner="o", lease_sec=30)
        for i in range(600)
    ]
    await other.aadd({"n": 0}, id="later", due=now[0] + 10)
    store.updates = 0
    assert await mine.alease("me", limit=10) == []
    assert store.updates == 3
    now[0] += 5
    assert await mine.alease("me", limit=10) == []
    assert store.updates == 3
    now[0] += 6  # "later" is due, the leases still run
    (later,) = await mine.alease("me", limit=10)
    assert (later.id, store.updates) == ("later", 3 + 2)  # one read, one lease
    # Released here, it is read again at once; released by the other replica, when
    # the lease it had would have ended.
    assert await mine.alease("me", limit=10) == []
    assert await mine.arelease("later", later.lease_token) is not None
    assert await other.arelease("a0000", held[0].lease_token) is not None
    assert [r.id for r in await mine.alease("me", limit=10)] == ["later"]
    now[0] += 20  # every lease of the other replica has run out
    leased = await mine.alease("me", limit=1_000)
    assert sorted(r.id for r in leased) == [f"a{i:04d}" for i in range(600)]


async def test_a_release_during_a_lease_poll_is_not_hidden_by_what_the_poll_read() -> None:
    # The poll reads the record still leased; the holder here releases it before the
    # poll gets its answer. The next poll must lease it, not wait for the old lease.
    class SlowReads(MemoryStore):
        gate: anyio.Event | None = None
        read = anyio.Event()

        async def aupdate(self, keys: Any, fn: Any, *, ttl: float | None = None) -> Any:
            result = await super().aupdate(keys, fn, ttl=ttl)
            if self.gate is not None and fn.__name__ == "due":
                self.read.set()
                await self.gate.wait()
            return result

    store = SlowReads()
    q = queue(store)
    held = await q.aadd({"n": 1}, id="r", status="leased", lease_owner="a", lease_sec=60)
    store.gate = anyio.Event()
    async with anyio.create_task_group() as tg:
        polled: list[list[Record]] = []

        async def poll() -> None:
            polled.append(await q.alease("b", limit=10))

        tg.start_soon(poll)
        await store.read.wait()  # the poll has read, and waits at the gate
        assert await q.arelease("r", held.lease_token) is not None
        store.gate.set()
    assert polled == [[]]
    store.gate = None
    assert [r.id for r in await q.alease("b", limit=10)] == ["r"]


async def test_open_records_are_read_by_id_in_batches() -> None:
    store = CountingUpdates()
    q = queue(store, max_pending=10_000)
    ids = [(await q.aadd({"n": i})).id for i in range(600)]
    done = await q.aadd({"n": -1}, status="acknowledged")
    store.updates = 0
    found = await q.aget_open([*ids, done.id, "unknown"])
    assert sorted(r.id for r in found) == sorted(ids)
    assert store.updates == 3  # 602 ids, 256 per store call
    for bad in ([""], "abc", [7], None):
        with pytest.raises(UsageError):
            await q.aget_open(bad)  # type: ignore[arg-type]


async def test_listing_reads_in_batches_and_returns_the_newest_records() -> None:
    store = CountingUpdates()
    now = [1000.0]
    q = queue(store, clock=lambda: now[0], max_pending=10_000)
    for i in range(1_000):
        now[0] += 1.0
        await q.aadd({"n": i}, id=f"r{i:04d}", key="even" if i % 2 == 0 else "odd")
    store.put("q:open:junk", "not a record")  # unreadable: skipped, never fatal
    store.updates = 0
    newest = await q.alist(key="even", limit=3)
    assert [r.id for r in newest] == ["r0998", "r0996", "r0994"]
    assert store.updates == 4 + 1  # 1,001 keys read 256 at a time, then the 3 in full
    assert len(await q.alist(limit=5_000)) == 1_000
    assert [r.id for r in await q.alist(since=now[0] - 1)] == ["r0999", "r0998"]


def test_a_listing_keeps_sort_keys_of_the_matching_records_only() -> None:
    record = {"id": "a", "created": 5, "status": "pending", "key": "p"}
    current = {"q:open:a": record, "q:open:b": {**record, "id": "b", "key": "x"}, "q:open:c": 7}
    assert listed(current, None, "p", None) == [(5.0, "a", "q:open:a")]
    assert listed(current, "leased", None, None) == []
    assert listed(current, None, None, 6.0) == []
