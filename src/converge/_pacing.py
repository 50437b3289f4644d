"""Spreading background work evenly over a span of time, beside live traffic.

A trim that deletes a few thousand records runs as a chain of store updates. Run back
to back, they share every group commit of an embedded SQLite store with the requests
arriving meanwhile, and the requests' latency rises for as long as the chain lasts (the
SQLite gateway's p99 under sustained load, median of twelve runs: 28.6 ms with the trim
at full speed, 20.2 ms with its updates spread out). :class:`Spread` paces such a
chain: each step gets an equal share of the span, and the work finishes in about that
span however many steps there are.
"""

from __future__ import annotations

import anyio
import anyio.lowlevel

from converge._numbers import finite_float
from converge._repr import safe_repr
from converge.errors import UsageError

__all__ = ["Spread", "check_spread"]


def check_spread(value: object) -> float:
    """``value`` as a span in seconds: a finite number ``>= 0``, else a UsageError."""
    seconds = finite_float(value)
    if seconds is None or seconds < 0:
        raise UsageError(f"spread_sec must be a finite number >= 0, got {safe_repr(value)}")
    return seconds


class Spread:
    """Paces work on ``items`` items, ``per_step`` at a time, over about ``seconds``, from
    its creation.

    :meth:`step` is called after each step: it sleeps until that step's share of the span
    has passed, or only lets other tasks run when the steps are late, after the last one,
    or when ``seconds`` is 0 (full speed).

    Args:
        items: How many items the work has.
        per_step: How many of them a step does (the last step may do fewer).
        seconds: The span to spread the steps over (checked by :func:`check_spread`).
    """

    def __init__(self, items: int, per_step: int, seconds: float) -> None:
        self._steps = steps = -(-items // per_step)  # the last may be partial
        self._share = seconds / steps if steps > 0 else 0.0
        self._start = anyio.current_time() if self._share > 0 else 0.0
        self._done = 0

    async def step(self) -> None:
        """One step is done: wait for the next one's turn."""
        self._done += 1
        if self._share > 0 and self._done < self._steps:
            delay = self._start + self._done * self._share - anyio.current_time()
            if delay > 0:
                await anyio.sleep(delay)
                return
        await anyio.lowlevel.checkpoint()
