"""Measure how long an awaited call keeps the event loop from running other tasks, see
where blocking work ran, and wait for a state the loop offers no event for.

``tests/`` is on ``sys.path`` under pytest, so ``from loop_stall import max_loop_stall``.
A ticker task sleeps 1 ms in a loop and records the largest gap between its wake-ups
while the call runs: the longest the loop was blocked (plus the timer's own slack).
"""

from __future__ import annotations

import gc
import heapq
import threading
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import anyio
import anyio.lowlevel

__all__ = [
    "BetweenTurns",
    "CountedHeaps",
    "assert_loop_stall_below",
    "busy",
    "eventually",
    "max_loop_stall",
    "spy_on_tls_builds",
    "ticks_during",
]

T = TypeVar("T")


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


async def busy(seconds: float, step: float = 0.0005) -> None:
    """CPU-bound work on the loop for ``seconds``, in ``step``-long slices with a
    checkpoint after each: the best any chunked computation can do."""
    end = time.perf_counter() + seconds
    while (now := time.perf_counter()) < end:
        while time.perf_counter() < now + step:
            pass
        await anyio.lowlevel.checkpoint()


async def assert_loop_stall_below(
    call: Callable[[], Awaitable[Any]], limit: float = 0.020, runs: int = 3
) -> None:
    """Assert that ``call()`` never holds the loop for ``limit`` s (best of ``runs``).

    On a busy machine (two cores shared with other test runs) the OS preempts any
    thread that computes, for longer the busier the machine is. Each run is paired with
    a baseline, :func:`busy` for as long as the call took; when even the best baseline
    shows long pauses, the call may exceed it by half plus 10 ms (OS pauses vary from
    run to run). On a quiet machine the limit is ``limit``: a call that holds the loop
    for 40-80 ms, as the code before did, fails.
    """
    stalls, baselines = [], []
    for _ in range(runs):
        # A cyclic garbage collection of a whole test session's objects can pause any
        # code for tens of milliseconds: collect first, and not while measuring.
        gc.collect()
        gc.disable()
        try:
            started = time.perf_counter()
            stalls.append(await max_loop_stall(call))
            duration = time.perf_counter() - started
            baselines.append(await max_loop_stall(partial(busy, duration)))
        finally:
            gc.enable()
    stall, baseline = min(stalls), min(baselines)
    assert stall < max(limit, 1.5 * baseline + 0.010), (
        f"the loop stalled {stall * 1000:.1f} ms at best (chunked work of the same "
        f"length, {baseline * 1000:.1f} ms)"
    )


async def ticks_during(work: Awaitable[T]) -> tuple[T, int]:
    """Await ``work`` while another task counts its turns: (result, turns it had).

    Not timed: a call that never gives the loop back lets the other task run 0 times.
    """
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
        result = await work
        during = ticks - before
        tg.cancel_scope.cancel()
    return result, during


class BetweenTurns:
    """The most work done between two turns of another task: call :meth:`count` per
    unit of work (a record built, a stamp walked) and await the work with
    :meth:`during`; :attr:`most` is then the largest count between two turns, and
    :attr:`turns` the other task's turns so far (read it at two points of the work).

    Not timed: work done all at once counts all of it.
    """

    def __init__(self) -> None:
        self.since = 0
        self.most = 0
        self.turns = 0

    def count(self, units: int = 1) -> None:
        self.since += units
        self.most = max(self.most, self.since)

    async def during(self, work: Awaitable[T]) -> T:
        async def other_task() -> None:
            while True:
                self.turns += 1
                self.since = 0
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(other_task)
            result = await work
            tg.cancel_scope.cancel()
        return result


class CountedHeaps:
    """A stand-in for a module's ``heapq`` that counts the entries pushed and popped:
    ``monkeypatch.setattr(module, "heapq", CountedHeaps())``. Patch the module's name,
    never ``heapq`` itself: a thread left by another test (an event loop's timers) would
    be counted too.
    """

    def __init__(self) -> None:
        self.pushes = self.pops = 0

    @property
    def moves(self) -> int:
        return self.pushes + self.pops

    def heappush(self, heap: list[Any], item: Any) -> None:
        self.pushes += 1
        heapq.heappush(heap, item)

    def heappop(self, heap: list[Any]) -> Any:
        self.pops += 1
        return heapq.heappop(heap)


async def eventually(predicate: Callable[[], bool], within: float = 10.0) -> None:
    """Wait (polling) until ``predicate()`` is true; fail after ``within`` seconds."""
    with anyio.fail_after(within):
        # Polling on purpose: the state lives on another thread or loop, or in an object
        # that offers no event to await.
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.01)


def spy_on_tls_builds(monkeypatch: Any) -> list[threading.Thread]:
    """Forget the process's shared TLS context (``converge._tls``) for this test, and
    list the thread that builds it each time it is built again."""
    import httpx2

    import converge._tls

    built_on: list[threading.Thread] = []
    build = httpx2.create_ssl_context

    def spy(*args: Any, **kwargs: Any) -> Any:
        built_on.append(threading.current_thread())
        return build(*args, **kwargs)

    monkeypatch.setattr(httpx2, "create_ssl_context", spy)
    monkeypatch.setattr(converge._tls, "_context", None)
    return built_on
