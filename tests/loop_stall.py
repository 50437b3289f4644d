"""Measure how long an awaited call keeps the event loop from running other tasks.

``tests/`` is on ``sys.path`` under pytest, so ``from loop_stall import max_loop_stall``.
A ticker task sleeps 1 ms in a loop and records the largest gap between its wake-ups
while the call runs: the longest the loop was blocked (plus the timer's own slack).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

__all__ = ["max_loop_stall", "min_max_loop_stall"]


async def max_loop_stall(call: Callable[[], Awaitable[Any]]) -> float:
    """Seconds of the largest gap between 1 ms ticks while ``call()`` is awaited.

    The call's result is freed only after the measurement: freeing 64 MiB can take
    20 ms on a busy VM, and that is the caller's doing, not the call's.
    """
    largest = 0.0
    done = False
    result: list[Any] = []

    async def ticker() -> None:
        nonlocal largest
        last = time.perf_counter()
        while not done:
            await anyio.sleep(0.001)
            now = time.perf_counter()
            largest = max(largest, now - last)
            last = now

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await anyio.sleep(0.005)
        try:
            result.append(await call())
        finally:
            done = True
    result.clear()
    return largest


async def min_max_loop_stall(call: Callable[[], Awaitable[Any]], runs: int = 5) -> float:
    """The best of ``runs`` measurements: robust against a busy machine's own pauses."""
    return min([await max_loop_stall(call) for _ in range(runs)])
