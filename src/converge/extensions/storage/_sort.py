"""Sorting a store's keys on the event loop without holding it.

``list.sort`` is one C call that keeps the GIL: 130,000 keys take 60-75 ms here, a stall
for every other task on the loop, and for the loop too when the sort runs in a worker
thread. :func:`sort_keys` sorts runs of :data:`PIECE` keys, then merges them a piece at a
time, giving the loop back after each step. Each step is a C sort of at most about
``PIECE`` keys that are already sorted runs (which timsort merges in linear time), so no
step holds the loop for more than a few milliseconds, however many keys there are; the
whole costs less than one big sort (the runs fit the CPU's caches).
"""

from __future__ import annotations

from bisect import bisect_right

import anyio.lowlevel

__all__ = ["PIECE", "sort_keys"]

#: Keys sorted, or merged, per step between checkpoints.
PIECE = 16_384
# The fewest keys a step takes from each run while merging many runs.
_MIN_STEP = 64


async def sort_keys(keys: list[str]) -> list[str]:
    """Return ``keys`` sorted (``keys`` itself when it is short), yielding between steps."""
    if len(keys) <= PIECE:
        keys.sort()
        return keys
    runs = []
    for start in range(0, len(keys), PIECE):
        run = keys[start : start + PIECE]
        run.sort()
        runs.append(run)
        await anyio.lowlevel.checkpoint()
    return await _merge(runs)


async def _merge(runs: list[list[str]]) -> list[str]:
    # Each step takes at most ``step`` keys from each run: every key up to the smallest
    # last key among the runs' next ``step`` keys. What a step takes is then all the
    # merge holds up to that key, and the run that key came from gives all ``step``.
    step = max(PIECE // len(runs), _MIN_STEP)
    starts = [0] * len(runs)
    merged: list[str] = []
    while True:
        live = [r for r, run in enumerate(runs) if starts[r] < len(run)]
        if not live:
            return merged
        bound: str | None = None
        for r in live:
            end = starts[r] + step
            if end < len(runs[r]) and (bound is None or runs[r][end - 1] < bound):
                bound = runs[r][end - 1]
        piece: list[str] = []
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
