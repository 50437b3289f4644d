"""Sorting a long list on the event loop without holding it.

``list.sort`` is one C call that keeps the GIL: 130,000 store keys take 60-75 ms here, a
stall for every other task on the loop, and for the loop too when the sort runs in a
worker thread. :func:`sort_yielding` sorts runs of :data:`PIECE` items, then merges them
a piece at a time, giving the loop back after each step. Each step is a C sort of at
most about ``PIECE`` items that are already sorted runs (which timsort merges in linear
time), so no step holds the loop for more than a few milliseconds, however many items
there are; the whole costs less than one big sort (the runs fit the CPU's caches).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import anyio.lowlevel

__all__ = ["PIECE", "in_pieces", "sort_yielding"]


class _Ordered(Protocol):
    def __lt__(self, other: Any, /) -> bool: ...


#: A sortable item (a store key, a time, a tuple of them).
T = TypeVar("T", bound=_Ordered)

#: Any item, and what is built from it.
Item = TypeVar("Item")
Built = TypeVar("Built")

#: Items sorted, or merged, per step between checkpoints.
PIECE = 8_192
# The fewest items a step takes from each run while merging many runs.
_MIN_STEP = 64


async def sort_yielding(items: list[T]) -> list[T]:
    """Return ``items`` sorted (``items`` itself when it is short), yielding between steps."""
    if len(items) <= PIECE:
        items.sort()
        return items
    await anyio.lowlevel.checkpoint()  # the caller built a long list: give the loop back
    runs = []
    for start in range(0, len(items), PIECE):
        run = items[start : start + PIECE]
        run.sort()
        runs.append(run)
        await anyio.lowlevel.checkpoint()
    return await _merge(runs)


async def _merge(runs: list[list[T]]) -> list[T]:
    # Each step takes at most ``step`` items from each run: every item up to the smallest
    # last item among the runs' next ``step`` items. What a step takes is then all the
    # merge holds up to that item, and the run that item came from gives all ``step``.
    step = max(PIECE // len(runs), _MIN_STEP)
    starts = [0] * len(runs)
    merged: list[T] = []
    while True:
        live = [r for r, run in enumerate(runs) if starts[r] < len(run)]
        if not live:
            return merged
        bound: T | None = None
        for r in live:
            end = starts[r] + step
            if end < len(runs[r]) and (bound is None or runs[r][end - 1] < bound):
                bound = runs[r][end - 1]
        piece: list[T] = []
        for r in live:
            run, start = runs[r], starts[r]
            end = min(start + step, len(run))
            if bound is not None:
                end = bisect_right(run, bound, start, end)
            piece += run[start:end]
            starts[r] = end
        piece.sort()
        merged += piece
        await anyio.lowlevel.checkpoint()


async def in_pieces(
    items: list[Item],
    build: Callable[[list[Item]], list[Built]],
    piece: int | None = None,
    *,
    consume: bool = False,
) -> list[Built]:
    """``build(items)`` (a comprehension) run on ``piece`` items at a time, giving the
    loop back between pieces: one over 100,000 tuples holds it for 10-15 ms; where
    each item costs microseconds (a record read into a view), ``piece`` is smaller
    (None: :data:`PIECE`).

    With ``consume``, ``items`` is emptied a piece at a time, so that what only it
    held is freed in steps too (freeing 20,000 records at once held the loop 16 ms):
    only for a list the caller built, never one a :class:`~converge.core.store.Store`
    (which may be anyone's) returned.
    """
    piece = PIECE if piece is None else piece
    built: list[Built] = []
    if consume:
        items.reverse()  # pieces come off the end: no list is shifted
        while items:
            part = items[-piece:]
            del items[-piece:]
            part.reverse()
            built += build(part)
            del part
            await anyio.lowlevel.checkpoint()
        return built
    if len(items) <= piece:
        return build(items)
    for start in range(0, len(items), piece):
        built += build(items[start : start + piece])
        await anyio.lowlevel.checkpoint()
    return built
