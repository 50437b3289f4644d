"""The value objects of a durable queue: :class:`Record` and :class:`Attempt`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from converge._numbers import finite_float
from converge.errors import FormatError

__all__ = [
    "DONE_STATUSES",
    "MAX_ATTEMPTS_KEPT",
    "OPEN_STATUSES",
    "STATUSES",
    "Attempt",
    "Record",
    "clip_error",
]

#: Every status a record can have.
STATUSES = ("pending", "leased", "acknowledged", "delivered", "dead")
#: Statuses of records still waiting for their consumer (counted against ``max_pending``).
OPEN_STATUSES = frozenset({"pending", "leased"})
#: Statuses of records whose consumer is done with them (kept for the retention period).
DONE_STATUSES = frozenset({"acknowledged", "delivered"})

# The attempts history keeps the most recent ones only; ``attempt_count`` counts all.
MAX_ATTEMPTS_KEPT = 50
_ERROR_CHARS = 500


def _num(value: Any, name: str) -> float:
    number = finite_float(value)
    if number is None:
        raise FormatError(f"record field {name!r} must be a finite number")
    return number


def _opt_num(value: Any, name: str) -> float | None:
    return None if value is None else _num(value, name)


def _opt_str(value: Any, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise FormatError(f"record field {name!r} must be a string or null")
    return value


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FormatError(f"record field {name!r} must be an integer >= 0")
    return value


def clip_error(text: str | None) -> str | None:
    """``text`` cut to a bounded length (error reasons are stored and listed)."""
    if text is None or len(text) <= _ERROR_CHARS:
        return text
    return text[: _ERROR_CHARS - 3] + "..."


@dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt at handling a record (a delivery, a consumer's try, ...).

    Attributes:
        at: Unix time (store clock) the attempt ended.
        status_code: HTTP status of the answer, if there was one.
        error: Short reason of a failure; None when it succeeded.
        latency_ms: How long the attempt took, if measured.
        outcome: ``"delivered"``, ``"acknowledged"``, ``"retry"``, ``"dead"``,
            ``"released"`` or another short word the queue's user chooses.
    """

    at: float
    status_code: int | None = None
    error: str | None = None
    latency_ms: float | None = None
    outcome: str = "retry"

    def __post_init__(self) -> None:
        _num(self.at, "at")
        if self.status_code is not None and (
            isinstance(self.status_code, bool) or not isinstance(self.status_code, int)
        ):
            raise FormatError("Attempt.status_code must be an int or None")
        _opt_str(self.error, "error")
        _opt_num(self.latency_ms, "latency_ms")
        if not isinstance(self.outcome, str) or not self.outcome:
            raise FormatError("Attempt.outcome must be a non-empty string")
        object.__setattr__(self, "error", clip_error(self.error))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dict (the stored form)."""
        return {
            "at": self.at,
            "status_code": self.status_code,
            "error": self.error,
            "latency_ms": self.latency_ms,
            "outcome": self.outcome,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Attempt:
        """Rebuild an attempt from :meth:`to_dict` output.

        Raises:
            FormatError: If ``data`` is not an attempt.
        """
        if not isinstance(data, Mapping):
            raise FormatError("an attempt must be a mapping")
        try:
            return cls(
                at=data["at"],
                status_code=data.get("status_code"),
                error=data.get("error"),
                latency_ms=data.get("latency_ms"),
                outcome=data.get("outcome", "retry"),
            )
        except KeyError as exc:
            raise FormatError(f"an attempt lacks {exc}") from None


@dataclass(frozen=True, slots=True)
class Record:
    """One item of a durable queue and its whole history.

    Attributes:
        id: The record id (unique in its queue).
        kind: What the queue holds: ``"inbound"``, ``"outbound"``, ...
        status: One of :data:`STATUSES`.
        key: What the record belongs to: the provider of an inbound event, the target
            of an outbound action (filters listings).
        data: The item itself, a JSON object.
        created: Unix time (store clock) it was added.
        updated: Unix time of its last change.
        due: Unix time from which a pending record may be leased.
        attempts: The most recent attempts, oldest first (at most 50 kept).
        attempt_count: Every attempt ever made (``attempts`` may hold fewer).
        budget_from: ``attempt_count`` when the current attempt budget began (a replay
            starts a fresh budget); see :attr:`budget_used`.
        replays: How many times an operator replayed it (:meth:`DurableQueue.areplay`);
            consumers that derive idempotency keys from the record include it, so a
            replay is a new delivery while a crash redelivery is not.
        lease_owner: Who holds the lease, while ``status == "leased"``.
        lease_token: Fencing token of the latest lease: it grows with each lease, and
            every transition names it, so a holder whose lease was taken over can no
            longer change the record.
        lease_until: Unix time (store clock) the lease ends.
        last_error: The latest failure reason (or dead-letter reason).
    """

    id: str
    kind: str
    status: str
    key: str
    data: dict[str, Any]
    created: float
    updated: float
    due: float = 0.0
    attempts: tuple[Attempt, ...] = ()
    attempt_count: int = 0
    budget_from: int = 0
    replays: int = 0
    lease_owner: str | None = None
    lease_token: int = 0
    lease_until: float | None = None
    last_error: str | None = field(default=None)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise FormatError(f"record status must be one of {STATUSES}, not {self.status!r}")
        if not isinstance(self.data, dict):
            raise FormatError("record data must be a JSON object (dict)")

    @property
    def is_open(self) -> bool:
        """True while the record waits for its consumer (pending or leased)."""
        return self.status in OPEN_STATUSES

    @property
    def budget_used(self) -> int:
        """Attempts made since the current attempt budget began."""
        return self.attempt_count - self.budget_from

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dict (the stored form)."""
        return {
            "v": 1,
            "id": self.id,
            "kind": self.kind,
            "status": self.status,
            "key": self.key,
            "data": self.data,
            "created": self.created,
            "updated": self.updated,
            "due": self.due,
            "attempts": [a.to_dict() for a in self.attempts],
            "attempt_count": self.attempt_count,
            "budget_from": self.budget_from,
            "replays": self.replays,
            "lease_owner": self.lease_owner,
            "lease_token": self.lease_token,
            "lease_until": self.lease_until,
            "last_error": self.last_error,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Record:
        """Rebuild a record from :meth:`to_dict` output.

        Raises:
            FormatError: If ``data`` is not a record.
        """
        if not isinstance(data, Mapping) or data.get("v") != 1:
            raise FormatError("not a durable queue record")
        attempts = data.get("attempts", [])
        if not isinstance(attempts, list | tuple):
            raise FormatError("record field 'attempts' must be a list")
        for name in ("id", "kind", "status", "key"):
            if not isinstance(data.get(name), str):
                raise FormatError(f"record field {name!r} must be a string")
        return cls(
            id=data["id"],
            kind=data["kind"],
            status=data["status"],
            key=data["key"],
            data=data.get("data"),  # type: ignore[arg-type]  # checked in __post_init__
            created=_num(data.get("created"), "created"),
            updated=_num(data.get("updated"), "updated"),
            due=_num(data.get("due", 0.0), "due"),
            attempts=tuple(Attempt.from_dict(a) for a in attempts),
            attempt_count=_int(data.get("attempt_count", len(attempts)), "attempt_count"),
            budget_from=_int(data.get("budget_from", 0), "budget_from"),
            replays=_int(data.get("replays", 0), "replays"),
            lease_owner=_opt_str(data.get("lease_owner"), "lease_owner"),
            lease_token=_int(data.get("lease_token", 0), "lease_token"),
            lease_until=_opt_num(data.get("lease_until"), "lease_until"),
            last_error=_opt_str(data.get("last_error"), "last_error"),
        )
