"""A per-target circuit breaker with a single half-open probe (sans-I/O)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from converge._numbers import finite_float
from converge.errors import ConfigurationError

__all__ = ["BreakerState", "CircuitBreaker"]

#: ``"closed"`` lets everything through; ``"open"`` nothing; ``"half_open"`` one probe.
BreakerState = Literal["closed", "open", "half_open"]


@dataclass(slots=True)
class CircuitBreaker:
    """Stops calling a failing target, then lets a single probe test its recovery.

    After ``failure_threshold`` consecutive failures the circuit opens; once
    ``recovery_timeout_sec`` has passed, :meth:`allow_request` admits one probe (the
    circuit is half-open). The probe's success closes the circuit; its failure reopens
    it for another ``recovery_timeout_sec``. A probe that never reports back is
    forgotten after ``recovery_timeout_sec`` and another is admitted.

    Pure in-memory state: safe to use from async and sync code alike (one thread).

    Args:
        failure_threshold: Consecutive failures that open the circuit (>= 1).
        recovery_timeout_sec: Seconds the circuit stays open before a probe.
        clock: Monotonic seconds (keyword-only; injectable for tests).

    Raises:
        ConfigurationError: If a field is invalid.
    """

    failure_threshold: int = 5
    recovery_timeout_sec: float = 30.0
    _failures: int = 0
    _opened_at: float | None = None
    _probe_started_at: float | None = field(default=None, repr=False, init=False)
    clock: Callable[[], float] = field(
        default=time.monotonic, repr=False, compare=False, kw_only=True
    )

    def __post_init__(self) -> None:
        threshold = self.failure_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
            raise ConfigurationError("CircuitBreaker.failure_threshold must be an integer >= 1")
        timeout = self.recovery_timeout_sec
        seconds = finite_float(timeout)
        if seconds is None or seconds < 0:
            raise ConfigurationError("CircuitBreaker.recovery_timeout_sec must be finite, >= 0")
        if not callable(self.clock):
            raise ConfigurationError("CircuitBreaker.clock must be callable")
        # The seed's signature lets a breaker start in a saved state: it must be one.
        failures, opened_at = self._failures, self._opened_at
        if isinstance(failures, bool) or not isinstance(failures, int) or failures < 0:
            raise ConfigurationError("CircuitBreaker._failures must be an integer >= 0")
        if opened_at is not None and finite_float(opened_at) is None:
            raise ConfigurationError("CircuitBreaker._opened_at must be a clock reading or None")

    @property
    def state(self) -> BreakerState:
        """``"closed"``, ``"open"`` or ``"half_open"`` (probe admitted or due)."""
        if self._opened_at is None:
            return "closed"
        if self.clock() - self._opened_at >= self.recovery_timeout_sec:
            return "half_open"
        return "open"

    @property
    def is_open(self) -> bool:
        """True unless the circuit is closed (open, or half-open awaiting a probe)."""
        return self._opened_at is not None

    def allow_request(self) -> bool:
        """Return True if a request may go out now (claims the probe when half-open)."""
        if self._opened_at is None:
            return True
        now = self.clock()
        if now - self._opened_at < self.recovery_timeout_sec:
            return False
        probe = self._probe_started_at
        if probe is not None and now - probe < self.recovery_timeout_sec:
            return False
        self._probe_started_at = now
        return True

    def retry_at(self) -> float:
        """Clock time at which :meth:`allow_request` may next return True."""
        if self._opened_at is None:
            return self.clock()
        start = self._opened_at
        if self._probe_started_at is not None:
            start = max(start, self._probe_started_at)
        return start + self.recovery_timeout_sec

    def cancel_probe(self) -> None:
        """The admitted request was never sent (nothing learnt): admit another probe now."""
        self._probe_started_at = None

    def record_success(self) -> None:
        """A request succeeded: close the circuit."""
        self._failures = 0
        self._opened_at = None
        self._probe_started_at = None

    def record_failure(self) -> None:
        """A request failed: count it; open (or reopen) the circuit at the threshold."""
        self._failures += 1
        if self._opened_at is not None or self._failures >= self.failure_threshold:
            self._opened_at = self.clock()
            self._probe_started_at = None
