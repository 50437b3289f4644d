"""Long key listings are sorted in steps that give the event loop back."""

from __future__ import annotations

import os
import random

import anyio
import anyio.lowlevel
import pytest

from converge.extensions.storage import MemoryStore, _sort
from converge.extensions.storage._sort import sort_keys
from loop_stall import assert_loop_stall_below

pytestmark = pytest.mark.anyio


async def ticks_while_sorting(keys: list[str]) -> tuple[list[str], int]:
    """Sort ``keys`` while another task counts its turns."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await anyio.lowlevel.checkpoint()
        before = ticks
        result = await sort_keys(keys)
        during = ticks - before
        tg.cancel_scope.cancel()
    return result, during


async def test_sorts_like_python_whatever_the_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pieces of 8 keys: many runs, merged in many steps; small alphabets make duplicates
    # and long equal stretches, shapes make sorted, reversed and interleaved runs.
    monkeypatch.setattr(_sort, "PIECE", 8)
    rng = random.Random(17)
    for case in range(400):
        size = rng.randrange(0, 300)
        alphabet = "ab" if case % 3 == 0 else "abcdefghij"
        keys = ["".join(rng.choices(alphabet, k=rng.randrange(0, 6))) for _ in range(size)]
        if case % 5 == 1:
            keys.sort()
        elif case % 5 == 2:
            keys.sort(reverse=True)
        expected = sorted(keys)
        assert await sort_keys(keys) == expected, keys


async def test_a_long_sort_gives_the_loop_back() -> None:
    keys = [os.urandom(8).hex() for _ in range(5 * _sort.PIECE)]
    result, during = await ticks_while_sorting(list(keys))
    assert result == sorted(keys)
    assert during >= 10  # 5 run sorts, then the merge's steps
    short = keys[: _sort.PIECE]
    result, during = await ticks_while_sorting(list(short))
    assert result == sorted(short)
    assert during == 0  # one C sort, nothing to give back


async def test_memory_store_listing_does_not_hold_the_loop() -> None:
    # 150,000 keys sort in 60-90 ms as one list.sort: a stall for every other task.
    store = MemoryStore()
    for i in range(150_000):
        store.put(f"app:done:{os.urandom(10).hex()}{i}", 1)
    listed = await store.alist("app:done:")
    assert len(listed) == 150_000
    assert listed == sorted(listed)
    await assert_loop_stall_below(lambda: store.alist("app:done:"))
