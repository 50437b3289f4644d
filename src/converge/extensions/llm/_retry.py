"""The one retry policy of the LLM providers: a sans-I/O schedule and its anyio driver.

The SDKs' own retries are switched off (``max_retries=0``) so that every provider retries
the same way: 408, 409, 429 and 5xx answers and connection errors, with capped
exponential backoff and jitter, honouring ``retry-after-ms`` / ``Retry-After`` (seconds or
an HTTP date) up to a cap, inside an overall deadline.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import anyio

from converge._numbers import finite_float, positive_float
from converge._repr import safe_repr
from converge.errors import ConfigurationError, ProviderError, ProviderTimeoutError, UsageError

__all__ = ["Failure", "RetryPolicy", "acall_with_retry", "parse_retry_after"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How providers retry failed calls.

    The delay before retry ``n`` (0-based) is ``min(max_delay, initial_delay * 2**n)``
    reduced by up to ``jitter`` of itself at random. A server-given ``Retry-After`` replaces
    that delay when it is at most ``max_retry_after``; a longer one is not waited for: the
    error is raised at once, carrying the requested wait. No retry starts that could not
    finish before ``deadline``.

    The last four fields are testing switches: inject a recording ``sleep`` and a fake
    ``clock`` to check waits without waiting.

    Args:
        max_retries: Retries after the first attempt (0 disables retrying).
        initial_delay: Seconds before the first retry.
        max_delay: Cap on the backoff delay, in seconds.
        jitter: Fraction (0..1) of each backoff delay removed at random.
        max_retry_after: Longest server-requested wait honoured, in seconds.
        deadline: Seconds for the whole call, retries and waits included; None for none.
        sleep: Awaitable sleep, ``anyio.sleep`` by default.
        clock: Monotonic seconds for the deadline, ``anyio.current_time`` by default.
        random: Uniform ``[0, 1)`` source for jitter.
        wall_clock: Epoch seconds, to read ``Retry-After`` HTTP dates.
    """

    max_retries: int = 2
    initial_delay: float = 0.5
    max_delay: float = 8.0
    jitter: float = 0.2
    max_retry_after: float = 60.0
    deadline: float | None = 180.0
    sleep: Callable[[float], Awaitable[None]] = field(
        default=anyio.sleep, compare=False, repr=False
    )
    clock: Callable[[], float] = field(default=anyio.current_time, compare=False, repr=False)
    random: Callable[[], float] = field(default=random.random, compare=False, repr=False)
    wall_clock: Callable[[], float] = field(default=time.time, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int):
            raise ConfigurationError("max_retries must be an integer")
        if self.max_retries < 0:
            raise ConfigurationError("max_retries must be >= 0")
        for name in ("initial_delay", "max_delay", "max_retry_after"):
            value = getattr(self, name)
            if finite_float(value) is None or value < 0:
                raise ConfigurationError(
                    f"{name} must be a finite number >= 0, not {safe_repr(value)}"
                )
        if self.initial_delay > self.max_delay:
            raise ConfigurationError("initial_delay must not exceed max_delay")
        jitter = finite_float(self.jitter)
        if jitter is None or not 0 <= jitter <= 1:
            raise ConfigurationError("jitter must be a number between 0 and 1")
        if self.deadline is not None and positive_float(self.deadline) is None:
            raise ConfigurationError("deadline must be a positive number of seconds or None")
        for name in ("sleep", "clock", "random", "wall_clock"):
            if not callable(getattr(self, name)):
                raise ConfigurationError(f"{name} must be callable")

    def backoff(self, retry: int, rand: float) -> float:
        """Backoff delay before retry number ``retry`` (0-based), given ``rand`` in [0, 1).

        Raises:
            UsageError: If ``retry`` is not an integer >= 0 or ``rand`` not in [0, 1].
        """
        _check_sample(retry, rand)
        return self._backoff(retry, rand)

    def _backoff(self, retry: int, rand: float) -> float:
        base = min(self.max_delay, self.initial_delay * 2.0 ** min(retry, 64))
        return float(base * (1 - self.jitter * rand))

    def next_delay(
        self,
        retry: int,
        *,
        retryable: bool,
        retry_after: float | None,
        elapsed: float,
        rand: float,
    ) -> float | None:
        """Seconds to wait before retry number ``retry``, or None to give up.

        Args:
            retry: Retries already made (0 before the first retry).
            retryable: Whether the failure is of a retryable kind.
            retry_after: Server-requested wait in seconds, if any.
            elapsed: Seconds since the call started.
            rand: Uniform [0, 1) sample for jitter.

        Raises:
            UsageError: For ``retry`` or ``rand`` as :meth:`backoff` refuses them, or an
                ``elapsed`` or ``retry_after`` that is not a finite number.
        """
        if finite_float(elapsed) is None or (
            retry_after is not None and finite_float(retry_after) is None
        ):
            raise UsageError("elapsed and retry_after must be finite numbers of seconds")
        _check_sample(retry, rand)
        if not retryable or retry >= self.max_retries:
            return None
        if retry_after is not None:
            if retry_after > self.max_retry_after:
                return None
            delay = retry_after
        else:
            delay = self._backoff(retry, rand)  # checked above
        if self.deadline is not None and elapsed + delay >= self.deadline:
            return None
        return delay


def _check_sample(retry: object, rand: object) -> None:
    if isinstance(retry, bool) or not isinstance(retry, int) or retry < 0:
        raise UsageError(f"retry must be an integer >= 0, not {safe_repr(retry)}")
    sample = finite_float(rand)
    if sample is None or not 0 <= sample <= 1:
        raise UsageError("rand must be a number in [0, 1]")


def parse_retry_after(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds a response asks the client to wait, or None when it does not say.

    Reads ``retry-after-ms`` (milliseconds) first, then ``Retry-After`` as seconds or as an
    HTTP date (relative to ``now``, epoch seconds). Malformed values are ignored; past
    dates mean 0.

    Args:
        headers: Response headers (case-insensitive mapping or lower-case keys).
        now: Current epoch time in seconds.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    raw_ms = lowered.get("retry-after-ms")
    if raw_ms is not None:
        try:
            ms = float(raw_ms)
        except ValueError:
            ms = math.nan
        if math.isfinite(ms) and ms >= 0:
            return ms / 1000
    raw = lowered.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        return max(0.0, when.timestamp() - now)
    if math.isfinite(seconds) and seconds >= 0:
        return seconds
    return None


@dataclass(frozen=True, slots=True)
class Failure:
    """A classified provider failure.

    Attributes:
        error: The converge error to raise if the call is given up.
        retryable: Whether the policy may retry it.
        retry_after: Server-requested wait in seconds, if any.
    """

    error: ProviderError
    retryable: bool
    retry_after: float | None = None


async def acall_with_retry(
    policy: RetryPolicy,
    attempt: Callable[[], Awaitable[T]],
    classify: Callable[[Exception, float], Failure | None],
    *,
    provider: str,
    on_retry: Callable[[int, ProviderError, float], None] | None = None,
) -> T:
    """Run ``attempt`` under ``policy``.

    Args:
        policy: The retry policy.
        attempt: Makes one call; raises on failure.
        classify: Maps an exception (and the wall-clock time, for HTTP dates) to a
            :class:`Failure`; None means "not a provider failure" and re-raises it as is.
        provider: Provider name, for the deadline error.
        on_retry: Called as ``on_retry(attempt, error, delay)`` before each retry's wait
            (``attempt`` is the failed attempt's 1-based number), for telemetry.

    Raises:
        ProviderError: The classified error of the last attempt, or
            ProviderTimeoutError when the overall deadline passes.
    """
    start = policy.clock()
    retry = 0
    while True:
        remaining = None if policy.deadline is None else policy.deadline - (policy.clock() - start)
        error: Exception | None = None
        deadline_hit = True
        if remaining is None or remaining > 0:
            with anyio.move_on_after(remaining) as scope:
                try:
                    return await attempt()
                except Exception as exc:
                    error = exc
            deadline_hit = scope.cancelled_caught
        if error is None or deadline_hit:
            raise ProviderTimeoutError(
                f"{provider}: no answer within the overall deadline of {policy.deadline} s "
                f"({retry + 1} attempt(s)); raise RetryPolicy.deadline if calls need longer",
                provider=provider,
            ) from error
        failure = classify(error, policy.wall_clock())
        if failure is None:
            raise error
        delay = policy.next_delay(
            retry,
            retryable=failure.retryable,
            retry_after=failure.retry_after,
            elapsed=policy.clock() - start,
            rand=policy.random(),
        )
        if delay is None:
            if retry:
                failure.error.args = (f"{failure.error} (after {retry + 1} attempts)",)
            raise failure.error from error
        if on_retry is not None:
            on_retry(retry + 1, failure.error, delay)
        await policy.sleep(delay)
        retry += 1
