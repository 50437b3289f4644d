"""How the agent runner retries a failed batch: sans-I/O, no clock, no sleeping."""

from __future__ import annotations

from dataclasses import dataclass

from converge._chain import exception_chain
from converge._numbers import check_int, finite_float
from converge._repr import safe_repr
from converge.errors import (
    BudgetExceededError,
    ProviderRateLimitError,
    RateLimitTimeoutError,
    UsageError,
)

__all__ = ["AgentRetry"]


def _seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UsageError(f"{name} must be a number of seconds, got {safe_repr(value)}")
    seconds = finite_float(value)
    if seconds is None or seconds < 0:
        raise UsageError(f"{name} must be a finite number of seconds >= 0, got {safe_repr(value)}")
    return seconds


@dataclass(frozen=True, slots=True)
class AgentRetry:
    """The runner's retry schedule for an agent's failed batch.

    A failure carrying ``retry_after`` (a :class:`~converge.errors.ProviderRateLimitError`
    or :class:`~converge.errors.RateLimitTimeoutError`, directly or as the cause of what
    ``adecide`` raised) is a wait, not an attempt: the batch runs again after
    ``retry_after`` seconds (at least ``backoff``, at most ``max_retry_after``), as
    often as the provider asks.
    Any other failure uses one of ``max_attempts``; between attempts the runner waits
    ``backoff * multiplier ** (attempt - 1)`` seconds, at most ``max_backoff``. A
    :class:`~converge.errors.BudgetExceededError` (an agent looping on tools) is not
    retried. When the attempts are used up the batch's messages become dead letters.

    Attributes:
        max_attempts: Attempts per batch (1 = no retry).
        backoff: Seconds before the second attempt.
        multiplier: Growth of the wait per further attempt.
        max_backoff: Longest wait between attempts.
        max_retry_after: Longest wait honoured for a ``retry_after``.
    """

    max_attempts: int = 3
    backoff: float = 1.0
    multiplier: float = 2.0
    max_backoff: float = 60.0
    max_retry_after: float = 3600.0

    def __post_init__(self) -> None:
        check_int("max_attempts", self.max_attempts, 1)
        _seconds("backoff", self.backoff)
        _seconds("max_backoff", self.max_backoff)
        _seconds("max_retry_after", self.max_retry_after)
        multiplier = _seconds("multiplier", self.multiplier)
        if multiplier < 1:
            raise UsageError(f"multiplier must be >= 1, got {multiplier!r}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based).

        Raises:
            UsageError: If ``attempt`` is not an integer.
        """
        if isinstance(attempt, bool) or not isinstance(attempt, int):
            raise UsageError(f"attempt must be an integer, got {safe_repr(attempt)}")
        exponent = min(max(attempt - 1, 0), 64)  # large attempts: no float overflow
        return float(min(self.backoff * self.multiplier**exponent, self.max_backoff))

    def retry_after(self, error: BaseException) -> float | None:
        """The wait a rate limit asks for, capped; None if ``error`` is not one.

        Looks at ``error`` and its causes (``__cause__``, then ``__context__``).
        """
        for current in exception_chain(error):
            if isinstance(current, ProviderRateLimitError | RateLimitTimeoutError):
                wait = finite_float(current.retry_after)
                if wait is not None and wait >= 0:
                    # at least the backoff: "Retry-After: 0" must not spin on the provider
                    return float(min(max(wait, self.backoff), self.max_retry_after))
        return None

    def retryable(self, error: BaseException) -> bool:
        """False for failures that another attempt cannot fix (a tool budget spent)."""
        return not isinstance(error, BudgetExceededError)
