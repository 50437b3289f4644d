"""MemoryStore: the Store contract, no thread hop, fake-clock TTLs, expired entries freed."""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from converge.errors import ClosedError, UsageError
from converge.extensions.storage import MemoryStore
from converge.extensions.storage.testing import StoreContract
from loop_stall import assert_loop_stall_below


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TestMemoryStoreContract(StoreContract):
    @pytest.fixture(params=[None, "json", "pickle"])
    def store(self, request: pytest.FixtureRequest) -> Iterator[MemoryStore]:
        store = MemoryStore(serializer=request.param)
        yield store
        store.close()


def test_seed_flags() -> None:
    assert MemoryStore.atomic_put_if_absent is True
    assert MemoryStore.supports_locking is False


@pytest.mark.anyio
async def test_sync_methods_work_on_the_event_loop_thread() -> None:
    store = MemoryStore()
    store.put("k", 1)
    assert store.get("k") == 1
    assert store.put_if_absent("k", 2) is False
    assert store.list() == ["k"]
    store.delete("k")
    assert await store.aget("k") is None


@pytest.mark.anyio
async def test_async_methods_take_no_thread_hop(monkeypatch: pytest.MonkeyPatch) -> None:
    store = MemoryStore()
    hops: list[object] = []
    original = anyio.to_thread.run_sync

    async def counting_run_sync(*args: Any, **kwargs: Any) -> Any:
        hops.append(args[0])
        return await original(*args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counting_run_sync)
    await store.aput("k", 1)
    assert await store.aget("k") == 1
    await store.aput_if_absent("j", 2)
    await store.alist()
    await store.aupdate(["k"], lambda current: ({"k": 2}, None))
    await store.adelete("k")
    assert hops == []


def test_values_are_kept_by_reference() -> None:
    store = MemoryStore()
    assert store.serializer is None
    value = {"a": [1]}
    store.put("k", value)
    assert store.get("k") is value


@pytest.mark.parametrize("serializer", ["json", "pickle"])
def test_a_serializing_store_keeps_copies(serializer: str) -> None:
    store = MemoryStore(serializer=serializer)  # type: ignore[arg-type]
    assert store.serializer == serializer
    value = {"a": [1]}
    store.put("k", value)
    store.put_if_absent("j", value)
    store.update(["u"], lambda current: ({"u": value}, None))
    value["a"].append(2)  # mutating after the write changes nothing stored
    first = store.get("k")
    assert first == {"a": [1]}
    assert store.get("j") == {"a": [1]}
    first["a"].append(3)  # nor does mutating what a read returned
    assert store.get("k") == {"a": [1]}
    seen: list[Any] = []
    store.update(["u"], lambda current: (seen.append(current["u"]) or {}, None))
    assert seen == [{"a": [1]}]


def test_a_json_store_refuses_what_json_cannot_hold_and_changes_nothing() -> None:
    store = MemoryStore(serializer="json")
    store.put("k", 1)
    for bad in (object(), float("nan"), {"set": {1}}):
        with pytest.raises(UsageError, match="not JSON-serializable"):
            store.put("k", bad)
        with pytest.raises(UsageError):
            store.put_if_absent("new", bad)
        changes = {"a": 1, "k": None, "z": bad}
        with pytest.raises(UsageError):  # one bad value of several: none is written
            store.update(["k", "a", "z"], lambda current, c=changes: (c, None))
    assert store.get("k") == 1
    assert store.list() == ["k"]
    assert MemoryStore(serializer="pickle").put("k", {1, 2}) is None  # pickle takes a set


@pytest.mark.parametrize("bad", ["xml", "", 1, True])
def test_an_unknown_serializer_is_a_usage_error(bad: Any) -> None:
    with pytest.raises(UsageError, match="serializer must be"):
        MemoryStore(serializer=bad)


def test_a_call_frees_a_bounded_number_of_expired_entries_and_hides_the_rest() -> None:
    # Freeing 100,000 expired entries in one call held the event loop for 180 ms.
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    for i in range(2_500):
        store.put(f"g:t{i}", i, ttl=1 + (i % 2))  # two expiry times, 1,250 keys each
        store.put(f"g:kept{i}", i)
    clock.now += 5
    assert store.get("g:t1") is None
    assert len(store._data) == 5_000 - 1_000
    assert store.list("g:t") == []
    assert store.list("") == sorted(f"g:kept{i}" for i in range(2_500))
    assert store.put_if_absent("g:t3", "new") is True
    assert store.update(["g:t5", "g:t7"], lambda current: ({}, current)) == {
        "g:t5": None,
        "g:t7": None,
    }
    assert store.get("g:t3") == "new"  # written again: not freed when its old time comes
    for _ in range(3):
        store.get("x")
    assert set(store._data) == {"g:t3"} | {f"g:kept{i}" for i in range(2_500)}
    assert (store._heap, store._due, store._expires, store._lagging) == ([], {}, {}, False)


@pytest.mark.parametrize("serializer", [None, "json"])
def test_serialized_values_are_out_of_the_collectors_reach(serializer: Any) -> None:
    # What a busy gateway's event log holds: thousands of nested JSON objects. Kept by
    # reference, each is several containers every full collection walks; serialized,
    # none (which is why ``store = "memory"`` in the CLI serializes).
    store = MemoryStore(serializer=serializer)
    gc.collect()
    before = len(gc.get_objects())
    for i in range(3_000):
        store.put(f"log:{i}", {"id": i, "data": {"items": [1, 2, 3]}, "attempts": []}, ttl=60)
    gc.collect()
    added = len(gc.get_objects()) - before
    if serializer is None:
        assert added >= 4 * 3_000
    else:
        assert added < 100
    assert store.get("log:7") == {"id": 7, "data": {"items": [1, 2, 3]}, "attempts": []}


def test_ttl_follows_the_injected_clock() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    store.put("k", 1, ttl=10)
    clock.now += 9.999
    assert store.get("k") == 1
    clock.now += 0.001
    assert store.get("k") is None
    assert store.put_if_absent("k", 2, ttl=5) is True


def test_expired_entries_are_freed_without_being_read() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    for i in range(10_000):
        store.put(f"k{i}", i, ttl=1)
    clock.now += 2
    for _ in range(10):
        store.put("other", 0)  # any call sweeps, 1,000 entries at most
    assert len(store._data) == 1
    assert (store._heap, store._due, store._expires) == ([], {}, {})
    assert store._groups == {"": {"other": None}}


@pytest.mark.parametrize("serializer", [None, "json"])
def test_writes_give_the_garbage_collector_nothing_to_walk(serializer: Any) -> None:
    # Each write used to add two tuples (the entry and its expiry): a gateway's young
    # generation filled with them, and a young collection took 25-45 ms. gc.get_count()
    # counts the container objects created and not freed since the last collection.
    store = MemoryStore(serializer=serializer)
    store.put("log:warm", "x", ttl=60)
    gc.disable()
    try:
        gc.collect()
        before = gc.get_count()[0]
        for i in range(3_000):
            store.put(f"log:{i}", "value", ttl=60 + i)
            store.update([f"claim:{i}"], lambda current, i=i: ({f"claim:{i}": i}, None), ttl=60)
        store.delete("log:7")
        created = gc.get_count()[0] - before
    finally:
        gc.enable()
    assert created < 30
    assert (store.get("log:8"), store.get("claim:8")) == ("value", 8)


def test_no_container_the_collector_walks_holds_the_keys() -> None:
    # A gateway's replay claims live an hour: hundreds of thousands of keys in one group,
    # and a GitHub event's two claims share their expiry time. The group was a set and
    # keys sharing a time a list, which every full collection walked: 100,000 claims
    # added about 10 ms to it. gc.get_referrers() returns only what the collector tracks.
    clock = FakeClock()
    store = MemoryStore(clock=clock, serializer="pickle")
    for i in range(2_000):
        names = [f"claim:a:{i}", f"claim:b:{i}"]
        store.update(names, lambda current, names=names: (dict.fromkeys(names, 1), None), ttl=60)
        store.put(f"log:{i}", "value")
        clock.now += 0.001
    batch = [f"batch:{i}" for i in range(20)]  # past a few keys, one time: a list
    store.update(batch, lambda current: (dict.fromkeys(batch, 1), None), ttl=30)
    gc.collect()
    sample = (*store.list("claim:")[::400], *store.list("log:")[::400])
    holders = [
        r
        for r in gc.get_referrers(*sample)
        if r is not sample and isinstance(r, dict | list | set | tuple)
    ]
    assert holders == []
    clock.now += 30
    assert [store.get(key) for key in ("batch:0", "batch:19", "claim:b:7")] == [None, None, 1]
    clock.now += 30
    assert (store.get("claim:a:7"), store.get("log:7")) == (None, "value")
    for _ in range(5):  # a call frees up to 1,000
        store.get("x")
    assert (store.list("claim:"), store._expires) == ([], {})


_SEGMENT = st.sampled_from(["", "a", "ab", "b", ":", "a:", "a:b", "é"])
_KEY = st.lists(_SEGMENT, min_size=1, max_size=4).map("".join).filter(bool)
_OPS = st.lists(
    st.tuples(st.sampled_from(["put", "put_ttl", "delete", "update_delete", "tick"]), _KEY),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(_OPS, st.lists(st.lists(_SEGMENT, max_size=4).map("".join), min_size=1, max_size=6))
def test_list_by_prefix_matches_a_full_scan(
    ops: list[tuple[str, str]], prefixes: list[str]
) -> None:
    # list() reads only the key groups a prefix can reach: it must still return exactly
    # the live keys a scan of every key would, after puts, expiries and deletes.
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    live: dict[str, float | None] = {}
    for op, key in ops:
        if op == "put":
            store.put(key, 1)
            live[key] = None
        elif op == "put_ttl":
            store.put(key, 1, ttl=1)
            live[key] = clock.now + 1
        elif op == "delete":
            store.delete(key)
            live.pop(key, None)
        elif op == "update_delete":
            store.update([key], lambda current: ({k: None for k in current}, None))
            live.pop(key, None)
        else:
            clock.now += 1
    alive = {k for k, expiry in live.items() if expiry is None or expiry > clock.now}
    for prefix in [*prefixes, ""]:
        assert store.list(prefix) == sorted(k for k in alive if k.startswith(prefix))
    assert set().union(*store._groups.values()) == set(store._data) == alive


def test_rewriting_a_ttl_key_keeps_the_expiry_heap_bounded() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    for i in range(10_000):
        store.put("same", i, ttl=3600)
        clock.now += 0.001  # a new expiry time each write
    assert len(store._heap) <= 2 * len(store._data) + 65
    assert store.get("same") == 9_999
    clock.now += 3600
    assert store.get("same") is None
    assert (store._data, store._expires) == ({}, {})


def test_keys_rewritten_with_later_expiries_push_nothing_and_expire_on_time() -> None:
    # Each rewrite pushed a new time: every so often the heap of stale times was rebuilt
    # whole, 37 ms for 100,000 keys (a rate limiter's buckets are rewritten per call).
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    for round_ in range(5):
        for i in range(1_000):
            store.put(f"b:{i}", round_, ttl=10)
            clock.now += 0.0001  # a time of its own per write
        clock.now += 1
    assert len(store._heap) == 1_000  # one time per key, however often it is rewritten
    clock.now += 5.5  # the first writes' times have passed, the last writes' have not
    assert store.get("b:0") == 4
    assert len(store.list("b:")) == 1_000
    store.put("b:0", "sooner", ttl=1)  # an earlier expiry is pushed
    clock.now += 1
    assert store.get("b:0") is None
    assert store.get("b:1") == 4
    clock.now += 3  # past every key's last expiry
    assert store.list("b:") == []
    while store._heap:
        store.get("x")
    assert (store._data, store._expires, store._due) == ({}, {}, {})


def test_put_if_absent_has_one_winner_among_threads() -> None:
    store = MemoryStore()
    barrier = threading.Barrier(16)
    wins: list[int] = []

    def claim(i: int) -> None:
        barrier.wait()
        if store.put_if_absent("claim", i):
            wins.append(i)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1


def test_closed_store_refuses_calls() -> None:
    store = MemoryStore()
    store.put("k", 1)
    store.close()
    store.close()
    with pytest.raises(ClosedError):
        store.get("k")


def test_clock_must_be_callable() -> None:
    with pytest.raises(UsageError):
        MemoryStore(clock=5)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_a_long_listing_does_not_hold_the_loop() -> None:
    # 150,000 keys sort in 60-90 ms as one list.sort: a stall for every other task.
    store = MemoryStore()
    for i in range(150_000):
        store.put(f"app:done:{os.urandom(10).hex()}{i}", 1)
    listed = await store.alist("app:done:")
    assert len(listed) == 150_000
    assert listed == sorted(listed)
    await assert_loop_stall_below(lambda: store.alist("app:done:"))
