"""Retry policy and response classification for outbound delivery (sans-I/O)."""

from __future__ import annotations

import email.utils
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from converge.errors import ConfigurationError, UsageError

__all__ = [
    "MAX_RETRY_AFTER_SEC",
    "NON_RETRYABLE_STATUSES",
    "Verdict",
    "WebhookRetryPolicy",
    "classify_status",
    "counts_as_breaker_failure",
    "parse_retry_after",
]

#: Statuses that go to the dead letters at once: retrying cannot help.
NON_RETRYABLE_STATUSES: frozenset[int] = frozenset({400, 401, 403, 404, 405, 410, 422})
#: The longest ``Retry-After`` honoured; a larger value is cut to this.
MAX_RETRY_AFTER_SEC = 3600.0

#: What to do after an attempt: done, try again later, or give up.
Verdict = Literal["delivered", "retry", "dead"]


@dataclass(frozen=True, slots=True)
class WebhookRetryPolicy:
    """How outbound deliveries are retried.

    Args:
        max_attempts: Attempts per action before it is dead-lettered (>= 1).
        base_delay_sec: Delay after the first failed attempt.
        max_delay_sec: Upper bound of any computed delay.
        jitter_ratio: Each delay is spread uniformly over ``+-jitter_ratio`` of itself
            (then capped), so retries of many actions do not arrive together.
        request_timeout_sec: Time limit of one attempt, connection included.

    Raises:
        ConfigurationError: If a field is invalid.
    """

    max_attempts: int = 5
    base_delay_sec: float = 0.25
    max_delay_sec: float = 10.0
    jitter_ratio: float = 0.2
    request_timeout_sec: float = 5.0

    def __post_init__(self) -> None:
        owner = "WebhookRetryPolicy"
        attempts = self.max_attempts
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ConfigurationError(f"{owner}.max_attempts must be an integer >= 1")
        for name in ("base_delay_sec", "max_delay_sec", "jitter_ratio", "request_timeout_sec"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigurationError(f"{owner}.{name} must be a number")
            if not math.isfinite(value) or value < 0:
                raise ConfigurationError(f"{owner}.{name} must be finite and >= 0")
        if self.max_delay_sec < self.base_delay_sec:
            raise ConfigurationError(f"{owner}.max_delay_sec must be >= base_delay_sec")
        if self.jitter_ratio > 1:
            raise ConfigurationError(f"{owner}.jitter_ratio must be between 0 and 1")
        if self.request_timeout_sec <= 0:
            raise ConfigurationError(f"{owner}.request_timeout_sec must be > 0")

    def compute_delay(self, attempt: int, *, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1 for the first).

        Capped exponential backoff: ``base * 2**(attempt-1)``, at most ``max_delay_sec``,
        spread by ``+-jitter_ratio`` and capped again.

        Args:
            attempt: The attempt that just failed, counting from 1.
            rand: Source of uniform numbers in ``[0, 1)``; pass a constant for exact
                schedules in tests.

        Raises:
            UsageError: If ``attempt`` is not a positive integer.
        """
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
            raise UsageError(f"attempt must be an integer >= 1, got {attempt!r}")
        raw = min(self.max_delay_sec, self.base_delay_sec * 2.0 ** min(attempt - 1, 64))
        spread = 1.0 + self.jitter_ratio * (2.0 * rand() - 1.0)
        return max(0.0, min(self.max_delay_sec, raw * spread))


def classify_status(status: int) -> Verdict:
    """What an HTTP status means for a delivery.

    2xx is delivered; 400/401/403/404/405/410/422 are dead at once; everything else
    (3xx, since redirects are not followed, 408, 409, 429, 5xx, ...) is retried.
    """
    if 200 <= status < 300:
        return "delivered"
    if status in NON_RETRYABLE_STATUSES:
        return "dead"
    return "retry"


def counts_as_breaker_failure(status: int | None) -> bool:
    """True for outcomes that say the target is unwell: no answer, 408, 429 or 5xx."""
    return status is None or status in (408, 429) or status >= 500


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date).

    Args:
        value: The header value, or None.
        now: Current Unix time, for HTTP dates.

    Returns:
        Seconds to wait (0 to :data:`MAX_RETRY_AFTER_SEC`), or None when absent or
        unreadable.
    """
    if value is None:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        seconds = float(int(text[:12]))
    else:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - now
    return max(0.0, min(MAX_RETRY_AFTER_SEC, seconds))
