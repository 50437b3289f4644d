"""Retry policy and response classification for outbound delivery (sans-I/O)."""

from __future__ import annotations

import email.utils
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from converge._numbers import check_int, finite_float
from converge._repr import safe_repr
from converge.errors import ConfigurationError, UsageError

__all__ = [
    "DEFAULT_LEASE_MARGIN_SEC",
    "MAX_RETRY_AFTER_SEC",
    "NON_RETRYABLE_STATUSES",
    "SVIX_DELAYS_SEC",
    "RetrySchedule",
    "RetryStrategy",
    "Verdict",
    "WebhookRetryPolicy",
    "classify_status",
    "counts_as_breaker_failure",
    "lease_margin",
    "parse_duration",
    "parse_retry_after",
]

#: Statuses that go to the dead letters at once: retrying cannot help.
NON_RETRYABLE_STATUSES: frozenset[int] = frozenset({400, 401, 403, 404, 405, 410, 422})
#: The longest ``Retry-After`` honoured; a larger value is cut to this.
MAX_RETRY_AFTER_SEC = 3600.0

#: Waits after failed attempts 1, 2, ... in Svix's schedule (the first attempt is made at
#: once): 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h, so 8 attempts over about 27.6 hours.
SVIX_DELAYS_SEC: tuple[float, ...] = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
#: Lease time past the request timeout when the strategy names none (the seed policy).
DEFAULT_LEASE_MARGIN_SEC = 5.0

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
            _check_number(owner, name, getattr(self, name))
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
            UsageError: If ``attempt`` is not a positive integer, or ``rand`` not callable.
        """
        _check_attempt(attempt, rand)
        raw = min(self.max_delay_sec, self.base_delay_sec * 2.0 ** min(attempt - 1, 64))
        spread = 1.0 + self.jitter_ratio * (2.0 * rand() - 1.0)
        return max(0.0, min(self.max_delay_sec, raw * spread))


def _check_attempt(attempt: object, rand: object) -> None:
    check_int("attempt", attempt, 1)
    if not callable(rand):
        raise UsageError(
            f"rand must be a function returning a float in [0, 1), not {safe_repr(rand)}"
        )


def _check_number(owner: str, name: str, value: object, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"{owner}.{name} must be a number")
    number = finite_float(value)
    if number is None or number < 0 or (positive and number == 0):
        bound = "> 0" if positive else ">= 0"
        raise ConfigurationError(f"{owner}.{name} must be finite and {bound}")
    return number


@dataclass(frozen=True, slots=True)
class RetrySchedule:
    """An explicit delay schedule for outbound retries (the gateway's default).

    Where :class:`WebhookRetryPolicy` computes capped exponential delays (seconds apart,
    for short hiccups), a schedule lists each wait, so deliveries can ride out outages of
    hours. The default is Svix's: the first attempt at once, then 5 s, 5 min, 30 min,
    2 h, 5 h, 10 h and 10 h after each failure (8 attempts over about 27.6 hours).

    Failures while the target's circuit breaker is open never use up attempts (see
    ``docs/connectors.md``), so ``max_attempts`` bounds failures of a reachable target.

    Args:
        delays_sec: Wait after failed attempt 1, 2, ...; ``max_attempts`` is its length
            plus one. Non-empty, each finite and >= 0.
        jitter_ratio: Each wait is spread uniformly over ``+-jitter_ratio`` of itself.
        request_timeout_sec: Time limit of one attempt, connection included.
        lease_margin_sec: How long past ``request_timeout_sec`` an attempt holds its
            action's lease (time for the bookkeeping after the answer). A replica that
            dies mid-attempt leaves its action to the others after timeout plus margin.

    Raises:
        ConfigurationError: If a field is invalid.
    """

    delays_sec: tuple[float, ...] = SVIX_DELAYS_SEC
    jitter_ratio: float = 0.1
    request_timeout_sec: float = 5.0
    lease_margin_sec: float = DEFAULT_LEASE_MARGIN_SEC

    def __post_init__(self) -> None:
        owner = "RetrySchedule"
        delays = self.delays_sec
        if isinstance(delays, str | bytes) or not isinstance(delays, tuple | list) or not delays:
            raise ConfigurationError(f"{owner}.delays_sec must be a non-empty sequence")
        object.__setattr__(
            self, "delays_sec", tuple(_check_number(owner, "delays_sec", d) for d in delays)
        )
        ratio = _check_number(owner, "jitter_ratio", self.jitter_ratio)
        if ratio > 1:
            raise ConfigurationError(f"{owner}.jitter_ratio must be between 0 and 1")
        _check_number(owner, "request_timeout_sec", self.request_timeout_sec, positive=True)
        _check_number(owner, "lease_margin_sec", self.lease_margin_sec, positive=True)

    @property
    def max_attempts(self) -> int:
        """Attempts per action before it is dead-lettered: ``len(delays_sec) + 1``."""
        return len(self.delays_sec) + 1

    def compute_delay(self, attempt: int, *, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1 for the first).

        ``delays_sec[attempt - 1]`` (the last entry past the end), spread by
        ``+-jitter_ratio``.

        Args:
            attempt: The attempt that just failed, counting from 1.
            rand: Source of uniform numbers in ``[0, 1)``.

        Raises:
            UsageError: If ``attempt`` is not a positive integer, or ``rand`` not callable.
        """
        _check_attempt(attempt, rand)
        raw = self.delays_sec[min(attempt, len(self.delays_sec)) - 1]
        return max(0.0, raw * (1.0 + self.jitter_ratio * (2.0 * rand() - 1.0)))


#: What the connector and dispatcher accept as a retry strategy.
RetryStrategy = WebhookRetryPolicy | RetrySchedule


def lease_margin(strategy: RetryStrategy) -> float:
    """The lease margin of ``strategy`` (:data:`DEFAULT_LEASE_MARGIN_SEC` for the policy)."""
    if isinstance(strategy, RetrySchedule):
        return strategy.lease_margin_sec
    return DEFAULT_LEASE_MARGIN_SEC


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(ms|s|min|m|h|d)")


def parse_duration(value: object) -> float:
    """Seconds in a duration: a number of seconds, or text like ``"5s"``, ``"30m"``,
    ``"2h"``, ``"1d"``, ``"250ms"``.

    Raises:
        ConfigurationError: If ``value`` is not a duration.
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = finite_float(value)
        if number is not None and number >= 0:
            return number
    elif isinstance(value, str):
        match = _DURATION_RE.fullmatch(value.strip())
        if match is not None:
            return float(match.group(1)) * _UNITS[match.group(2)]
    raise ConfigurationError(
        f"{value!r} is not a duration: use seconds or text like '5s', '30m', '2h', '1d'"
    )


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
