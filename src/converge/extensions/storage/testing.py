"""The Store contract suite: subclass it to test your own Store backend with pytest.

Every converge backend runs this suite, sync and async, on asyncio and trio. A
backend's test module subclasses :class:`StoreContract` and provides a ``store`` fixture
yielding a fresh, empty store; the async tests need the anyio pytest plugin (installed
with anyio) and an ``anyio_backend`` fixture (``"asyncio"`` and ``"trio"``)::

    import pytest
    from converge.extensions.storage.testing import StoreContract

    class TestMyStore(StoreContract):
        @pytest.fixture
        def store(self):
            store = MyStore()
            yield store
            store.close()

This module imports pytest: import it from tests only.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import pytest

from converge.core.store import MAX_TTL, Store, WithTTL
from converge.errors import SyncInEventLoopError, UsageError

__all__ = ["TTL_SHORT", "TTL_WAIT", "VALUES", "StoreContract"]

VALUES: list[Any] = [
    "text",
    "ünïcode ✓",
    0,
    -17,
    3.5,
    True,
    [1, "two", None],
    {"nested": {"list": [1, 2, 3], "flag": False}},
]

TTL_SHORT = 0.3
TTL_WAIT = 0.5  # only needs to exceed TTL_SHORT; the 0.3 s margin is before the sleep


class StoreContract:
    """Behaviour every :class:`Store` backend must show."""

    # Inherited by subclasses in other modules (a module-level pytestmark is not).
    pytestmark = pytest.mark.anyio

    # -- async surface -----------------------------------------------------------------

    async def test_get_of_absent_key_is_none(self, store: Store) -> None:
        assert await store.aget("missing") is None

    @pytest.mark.parametrize("value", VALUES)
    async def test_put_then_get_round_trips_value(self, store: Store, value: Any) -> None:
        await store.aput("k", value)
        assert await store.aget("k") == value

    async def test_put_replaces_previous_value(self, store: Store) -> None:
        await store.aput("k", "old")
        await store.aput("k", "new")
        assert await store.aget("k") == "new"

    async def test_delete_removes_key_and_tolerates_absent(self, store: Store) -> None:
        await store.aput("k", 1)
        await store.adelete("k")
        await store.adelete("k")
        assert await store.aget("k") is None
        assert await store.alist() == []

    async def test_list_filters_by_prefix_and_sorts(self, store: Store) -> None:
        for key in ["b/2", "a/1", "b/1", "bb", "c"]:
            await store.aput(key, key)
        assert await store.alist("b/") == ["b/1", "b/2"]
        assert await store.alist("b") == ["b/1", "b/2", "bb"]
        assert await store.alist() == ["a/1", "b/1", "b/2", "bb", "c"]
        assert await store.alist("zzz") == []

    async def test_keys_with_awkward_characters_round_trip(self, store: Store) -> None:
        keys = ["a/b/../c", "..", "with space", "ünï/ʞ", "x" * 300, "CON", "semi;colon%25"]
        for i, key in enumerate(keys):
            await store.aput(key, i)
        for i, key in enumerate(keys):
            assert await store.aget(key) == i
        assert await store.alist() == sorted(keys)

    async def test_list_prefix_is_literal_not_a_pattern(self, store: Store) -> None:
        # Backends that list with SCAN MATCH, LIKE or GLOB must escape the prefix.
        keys = ["a*b", "a?c", "a%d", "a_e", "a[x]", "a\\y", "ab", "aXc", "a.f"]
        for key in keys:
            await store.aput(key, key)
        for prefix in ["a*", "a?", "a%", "a_", "a[", "a\\", "a."]:
            assert await store.alist(prefix) == [k for k in sorted(keys) if k.startswith(prefix)]

    async def test_list_sorts_by_code_point_like_python(self, store: Store) -> None:
        keys = ["a", "a\x7f", "a\u00e9", "a\uffff", "a\U0001f600", "A", "\U0010ffff", "a b"]
        for key in keys:
            await store.aput(key, 1)
        assert await store.alist() == sorted(keys)
        assert await store.alist("a") == sorted(k for k in keys if k.startswith("a"))

    async def test_put_if_absent_stores_only_once(self, store: Store) -> None:
        assert await store.aput_if_absent("k", "first") is True
        assert await store.aput_if_absent("k", "second") is False
        assert await store.aget("k") == "first"

    async def test_put_if_absent_has_exactly_one_winner_among_tasks(self, store: Store) -> None:
        wins: list[int] = []

        async def claim(i: int) -> None:
            if await store.aput_if_absent("claim", i):
                wins.append(i)

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(claim, i)
        assert len(wins) == 1
        assert await store.aget("claim") == wins[0]

    async def test_ttl_expires_key(self, store: Store) -> None:
        await store.aput("short", 1, ttl=TTL_SHORT)
        await store.aput("long", 2, ttl=60)
        await store.aput("forever", 3)
        assert await store.aget("short") == 1
        await anyio.sleep(TTL_WAIT)
        assert await store.aget("short") is None
        assert await store.aget("long") == 2
        assert await store.aget("forever") == 3
        assert await store.alist() == ["forever", "long"]

    async def test_put_if_absent_succeeds_after_ttl_expiry(self, store: Store) -> None:
        assert await store.aput_if_absent("k", "a", ttl=TTL_SHORT) is True
        assert await store.aput_if_absent("k", "b", ttl=TTL_SHORT) is False
        await anyio.sleep(TTL_WAIT)
        assert await store.aput_if_absent("k", "c") is True
        assert await store.aget("k") == "c"

    async def test_put_without_ttl_clears_previous_ttl(self, store: Store) -> None:
        await store.aput("k", 1, ttl=TTL_SHORT)
        await store.aput("k", 2)
        await anyio.sleep(TTL_WAIT)
        assert await store.aget("k") == 2

    @pytest.mark.parametrize("key", [None, 1, b"bytes", ""])
    async def test_invalid_key_raises_usage_error(self, store: Store, key: Any) -> None:
        with pytest.raises(UsageError):
            await store.aput(key, 1)
        with pytest.raises(UsageError):
            await store.aget(key)

    @pytest.mark.parametrize(
        "ttl", [0, -1, float("nan"), float("inf"), "5", MAX_TTL * 1.01, 9.3e15, 1.7e308, 10**400]
    )
    async def test_invalid_ttl_raises_usage_error(self, store: Store, ttl: Any) -> None:
        with pytest.raises(UsageError):
            await store.aput("k", 1, ttl=ttl)
        with pytest.raises(UsageError):
            await store.aput_if_absent("k", 1, ttl=ttl)
        with pytest.raises(UsageError):
            await store.aupdate(["k"], lambda cur: ({"k": 1}, None), ttl=ttl)
        assert await store.aget("k") is None

    async def test_the_documented_maximum_ttl_is_accepted(self, store: Store) -> None:
        await store.aput("a", 1, ttl=MAX_TTL)
        assert await store.aput_if_absent("b", 2, ttl=MAX_TTL) is True
        await store.aupdate(["c"], lambda cur: ({"c": 3}, None), ttl=MAX_TTL)
        assert [await store.aget(k) for k in "abc"] == [1, 2, 3]

    async def test_async_context_manager_closes(self, store: Store) -> None:
        async with store as same:
            await same.aput("k", 1)
            assert await same.aget("k") == 1

    # -- sync surface ------------------------------------------------------------------

    def test_sync_surface_round_trips(self, store: Store) -> None:
        store.put("k", {"v": 1})
        assert store.get("k") == {"v": 1}
        assert store.put_if_absent("k", 2) is False
        assert store.put_if_absent("k2", 2) is True
        assert store.list("k") == ["k", "k2"]
        store.delete("k")
        assert store.get("k") is None
        store.put("t", 1, ttl=60)
        assert store.get("t") == 1

    def test_sync_surface_from_many_threads(self, store: Store) -> None:
        errors: list[BaseException] = []
        wins: list[int] = []

        def work(i: int) -> None:
            try:
                store.put(f"t/{i}", i)
                assert store.get(f"t/{i}") == i
                if store.put_if_absent("race", i):
                    wins.append(i)
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert len(wins) == 1
        assert store.list("t/") == sorted(f"t/{i}" for i in range(8))

    async def test_sync_surface_from_worker_thread(self, store: Store) -> None:
        def work() -> Any:
            store.put("w", "from worker")
            return store.get("w")

        assert await anyio.to_thread.run_sync(work) == "from worker"
        assert await store.aget("w") == "from worker"

    async def test_sync_call_on_event_loop_never_hangs(self, store: Store) -> None:
        # In-memory backends may simply do the work; every other backend must refuse
        # with an error that names the coroutine to await.
        refused: SyncInEventLoopError | None = None
        with anyio.fail_after(5):
            try:
                store.put("loop", 1)
            except SyncInEventLoopError as exc:
                refused = exc
            if refused is None:
                assert await store.aget("loop") == 1
        if refused is not None:
            assert "aput" in str(refused)

    # -- atomic read-modify-write ------------------------------------------------------

    async def test_update_reads_and_writes_several_keys(self, store: Store) -> None:
        await store.aput("a", 1)

        def move(current: dict[str, Any]) -> tuple[dict[str, Any], str]:
            return {"a": None, "b": current["a"] + 1}, "moved"

        assert await store.aupdate(["a", "b"], move) == "moved"
        assert await store.aget("a") is None
        assert await store.aget("b") == 2

    async def test_update_is_atomic_among_concurrent_tasks(self, store: Store) -> None:
        def bump(current: dict[str, Any]) -> tuple[dict[str, Any], None]:
            return {"n": (current["n"] or 0) + 1}, None

        async with anyio.create_task_group() as tg:
            for _ in range(25):
                tg.start_soon(store.aupdate, ["n"], bump)
        assert await store.aget("n") == 25

    async def test_update_rejects_changes_to_unread_keys(self, store: Store) -> None:
        with pytest.raises(UsageError):
            await store.aupdate(["a"], lambda cur: ({"other": 1}, None))
        assert await store.aget("other") is None

    async def test_update_with_a_function_that_is_not_callable_is_a_usage_error(
        self, store: Store
    ) -> None:
        with pytest.raises(UsageError, match="fn must be a function"):
            await store.aupdate(["a"], {"a": 1})  # type: ignore[arg-type]
        with pytest.raises(UsageError, match="fn must be a function"):
            await anyio.to_thread.run_sync(lambda: store.update(["a"], None))  # type: ignore[arg-type]
        assert await store.aget("a") is None

    async def test_update_with_ttl_gives_a_key_its_own_ttl(self, store: Store) -> None:
        def write(current: dict[str, Any]) -> tuple[dict[str, Any], None]:
            return {
                "short": WithTTL("s", TTL_SHORT),
                "call": "c",
                "forever": WithTTL("f", None),
            }, None

        await store.aupdate(["short", "call", "forever"], write, ttl=60)
        assert await store.aget("short") == "s"
        await anyio.sleep(TTL_WAIT)
        assert await store.aget("short") is None
        assert await store.aget("call") == "c"
        assert await store.aget("forever") == "f"

        def rewrite(current: dict[str, Any]) -> tuple[dict[str, Any], None]:
            return {"call": WithTTL("c2", 60), "forever": "f2"}, None

        # The call's ttl applies to plain values, WithTTL's to its own.
        await store.aupdate(["call", "forever"], rewrite, ttl=TTL_SHORT)
        await anyio.sleep(TTL_WAIT)
        assert await store.aget("call") == "c2"
        assert await store.aget("forever") is None

    async def test_invalid_with_ttl_changes_nothing(self, store: Store) -> None:
        with pytest.raises(UsageError):
            await store.aupdate(["a", "b"], lambda cur: ({"a": 1, "b": WithTTL(2, 0)}, None))
        with pytest.raises(UsageError):
            await store.aupdate(["a"], lambda cur: ({"a": WithTTL(None, 5)}, None))
        assert await store.aget("a") is None
        assert await store.aget("b") is None

    async def test_atime_is_the_stores_clock_in_unix_seconds(self, store: Store) -> None:
        before = time.time()
        now = await store.atime()
        assert isinstance(now, float)
        # A shared server's clock may differ a little from ours; not by minutes.
        assert before - 60 < now < time.time() + 60
        assert await store.atime() >= now

    def test_sync_update_from_threads_is_atomic(self, store: Store) -> None:
        def bump(current: dict[str, Any]) -> tuple[dict[str, Any], None]:
            return {"n": (current["n"] or 0) + 1}, None

        threads = [
            threading.Thread(target=lambda: [store.update(["n"], bump) for _ in range(5)])
            for _ in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert store.get("n") == 20
