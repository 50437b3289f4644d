"""Token-bucket math in integer nanoseconds: pure, no clock, no I/O.

A bucket is stored as a single integer, its *theoretical arrival time* ``tat``: the
instant (in the limiter clock's nanoseconds) at which the bucket will be full again.
This is the GCRA form of a token bucket; with

* ``interval`` = nanoseconds to refill one token (``ceil(1e9 / rate)``), and
* ``tolerance`` = ``floor(capacity * interval)`` (a full bucket, in nanoseconds),

the bucket holds ``(tolerance - max(tat - now, 0)) / interval`` tokens at ``now``, a token
can be taken at ``now`` when ``max(tat, now) + interval - now <= tolerance``, and taking it
sets ``tat = max(tat, now) + interval``. Over any window ``[a, b]`` at most
``capacity + rate * (b - a)`` tokens are taken: ``interval`` is rounded up and
``tolerance`` down, so rounding never admits more than the configuration says.

A bucket whose ``tat <= now`` is full and carries no information, so it can be forgotten;
a missing bucket reads as ``tat = 0`` (full). Everything is integer arithmetic: no float
residue can make a wait loop spin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from converge._numbers import finite_float
from converge._repr import safe_repr
from converge.errors import ConfigurationError

__all__ = [
    "NEVER",
    "NEVER_REFILL_NS",
    "BucketParams",
    "TokenBucketConfig",
    "reserve",
    "wait_ns",
]

#: Returned by :func:`wait_ns` / :func:`reserve` when a bucket can never admit a message
#: (capacity below one token, or a drained bucket that does not refill).
NEVER = -1

#: The refill interval used for ``refill_tokens_per_sec == 0``: about 146 years, so a
#: drained non-refilling bucket never becomes admissible in practice.
NEVER_REFILL_NS = 1 << 62

_NS = 1_000_000_000


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"{name} must be a number, not {type(value).__name__}")
    number = finite_float(value)
    if number is None:
        raise ConfigurationError(f"{name} must be finite, got {safe_repr(value)}")
    return number


@dataclass(frozen=True, slots=True)
class TokenBucketConfig:
    """Size and refill rate of a token bucket.

    Each message takes one token. ``capacity`` is the burst a quiet sender may spend at
    once; ``refill_tokens_per_sec`` is the sustained rate.

    Args:
        capacity: Maximum tokens in the bucket; a positive finite number. Fractions are
            allowed (1.5 admits one message, then another after half a token refills); a
            capacity below 1 can never admit a message, so every check fails with
            ``retry_after == math.inf``.
        refill_tokens_per_sec: Tokens added per second; a finite number >= 0. ``0`` makes
            the bucket a lifetime quota of ``capacity`` messages that never refills (such
            buckets are never forgotten, so use them for the global bucket or a bounded
            set of senders/topics).

    Raises:
        ConfigurationError: For a capacity <= 0, a negative rate, NaN, infinity or a
            non-number.
    """

    capacity: float
    refill_tokens_per_sec: float

    def __post_init__(self) -> None:
        capacity = _number("capacity", self.capacity)
        rate = _number("refill_tokens_per_sec", self.refill_tokens_per_sec)
        if capacity <= 0:
            raise ConfigurationError(f"capacity must be > 0 tokens, got {self.capacity!r}")
        if rate < 0:
            raise ConfigurationError(
                f"refill_tokens_per_sec must be >= 0, got {self.refill_tokens_per_sec!r}"
            )

    def params(self) -> BucketParams:
        """The integer-nanosecond parameters of this configuration."""
        return BucketParams.from_config(self)


@dataclass(frozen=True, slots=True)
class BucketParams:
    """A bucket configuration in integer nanoseconds (see the module docstring).

    Attributes:
        interval: Nanoseconds to refill one token (rounded up).
        tolerance: Nanoseconds worth of tokens in a full bucket (rounded down).
        refills: False when the rate is 0.
    """

    interval: int
    tolerance: int
    refills: bool

    @classmethod
    def from_config(cls, config: TokenBucketConfig, *, ticks_per_sec: int = _NS) -> BucketParams:
        """Convert ``config`` exactly (rational arithmetic, then integer rounding).

        Args:
            config: The bucket configuration.
            ticks_per_sec: The time unit: nanoseconds by default; the Redis script
                counts in microseconds (``1_000_000``).
        """
        rate = Fraction(config.refill_tokens_per_sec)
        never = NEVER_REFILL_NS * ticks_per_sec // _NS
        interval = never if rate == 0 else max(1, math.ceil(Fraction(ticks_per_sec) / rate))
        tolerance = math.floor(Fraction(config.capacity) * interval)
        return cls(interval=interval, tolerance=tolerance, refills=rate != 0)


def wait_ns(tat: int, now: int, params: BucketParams) -> int:
    """Nanoseconds from ``now`` until the bucket can give one token.

    Returns:
        ``0`` if a token is available now, a positive wait, or :data:`NEVER`.
    """
    if params.tolerance < params.interval:
        return NEVER
    wait = tat + params.interval - params.tolerance - now
    if wait <= 0:
        return 0
    return wait if params.refills else NEVER


def reserve(
    tats: Sequence[int],
    now: int,
    params: Sequence[BucketParams],
    max_wait: int | None,
) -> tuple[int, list[int] | None]:
    """Decide one message against several buckets, all or nothing.

    The message is admitted at ``now + wait`` where ``wait`` is the longest wait of any
    bucket; every bucket is charged *as of that instant* (so a token reserved for later
    is never counted as spent earlier, which would let a burst through around the
    admission time).

    Args:
        tats: Current ``tat`` of each bucket (0 for a missing one).
        now: The clock reading, in nanoseconds.
        params: Each bucket's parameters, in the same order.
        max_wait: The longest acceptable wait in nanoseconds (0: admit only now;
            None: any finite wait; negative: admit nothing, only compute the wait).

    Returns:
        ``(wait, new_tats)``: ``new_tats`` is None when the message is not admitted
        (``wait`` is then the wait it would need, or :data:`NEVER`).
    """
    wait = 0
    for tat, p in zip(tats, params, strict=True):
        w = wait_ns(tat, now, p)
        if w == NEVER:
            return NEVER, None
        if w > wait:
            wait = w
    if max_wait is not None and wait > max_wait:
        return wait, None
    at = now + wait
    new = [(tat if tat > at else at) + p.interval for tat, p in zip(tats, params, strict=True)]
    return wait, new
