"""Long lists (store keys, times) are sorted in steps that give the event loop back."""

from __future__ import annotations

import os
import random

import pytest

from converge import _sorting
from converge._sorting import in_pieces, sort_yielding
from loop_stall import BetweenTurns, ticks_during

pytestmark = pytest.mark.anyio


async def test_sorts_like_python_whatever_the_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pieces of 8 items: many runs, merged in many steps; small alphabets make duplicates
    # and long equal stretches, shapes make sorted, reversed and interleaved runs.
    monkeypatch.setattr(_sorting, "PIECE", 8)
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
        assert await sort_yielding(keys) == expected, keys
        times = [float(rng.randrange(0, 20)) for _ in range(size)]
        assert await sort_yielding(list(times)) == sorted(times)


async def test_a_long_sort_gives_the_loop_back() -> None:
    keys = [os.urandom(8).hex() for _ in range(5 * _sorting.PIECE)]
    result, during = await ticks_during(sort_yielding(list(keys)))
    assert result == sorted(keys)
    assert during >= 10  # 5 run sorts, then the merge's steps
    short = keys[: _sorting.PIECE]
    result, during = await ticks_during(sort_yielding(list(short)))
    assert result == sorted(short)
    assert during == 0  # one C sort, nothing to give back


async def test_sorts_tuples_as_python_does(monkeypatch: pytest.MonkeyPatch) -> None:
    # Listings sort (created, id, key) triples: ties on the time fall to the id.
    monkeypatch.setattr(_sorting, "PIECE", 8)
    rng = random.Random(5)
    items = [(float(rng.randrange(0, 5)), rng.choice("abc"), str(n)) for n in range(200)]
    assert await sort_yielding(list(items)) == sorted(items)


async def test_builds_a_piece_at_a_time_between_turns_of_the_loop() -> None:
    built = BetweenTurns()

    def double(part: list[int]) -> list[int]:
        built.count(len(part))
        return [2 * n for n in part]

    items = list(range(1_000))
    assert await built.during(in_pieces(items, double, 100)) == [2 * n for n in items]
    assert built.most <= 2 * 100  # trio may run the other task's turn late: two can meet
    result, during = await ticks_during(in_pieces(items, double, 1_000))
    assert result == [2 * n for n in items]
    assert during == 0  # one piece: one comprehension, nothing to give back


async def test_consuming_frees_each_piece_once_built() -> None:
    # What only the list held goes a piece at a time: freeing 20,000 records at once
    # when a listing returned held the loop for 16 ms.
    items = list(range(1_000))
    left: list[int] = []

    def double(part: list[int]) -> list[int]:
        left.append(len(items))
        return [2 * n for n in part]

    assert await in_pieces(items, double, 300, consume=True) == [2 * n for n in range(1_000)]
    assert left == [700, 400, 100, 0]  # taken off the list before each piece is built
    assert items == []
