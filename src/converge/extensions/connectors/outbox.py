"""The durable outbox: pending actions and dead letters, as records in a Store."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from converge.core.store import Store
from converge.errors import UsageError
from converge.extensions.connectors.models import OutboundWebhookAction

__all__ = ["DeadLetter", "Outbox", "OutboxRecord", "action_id"]


def action_id(action: OutboundWebhookAction) -> str:
    """The outbox id of ``action``: derived from its idempotency key, else random."""
    if action.idempotency_key is None:
        return uuid.uuid4().hex
    return hashlib.sha256(action.idempotency_key.encode()).hexdigest()[:32]


def _stored_action(data: Any) -> OutboundWebhookAction:
    """Rebuild an action this module stored: it was validated on submit, so only the
    shape is checked here (a full re-validation would dominate the dispatch cost). A
    body that no longer serializes is caught when the request is built."""
    if not isinstance(data, Mapping):
        raise UsageError("stored action is not a mapping")
    action = object.__new__(OutboundWebhookAction)
    for name, kind in _ACTION_FIELDS:
        value = data.get(name)
        if not isinstance(value, kind):
            raise UsageError(f"stored action field {name!r} is malformed")
        object.__setattr__(action, name, value)
    return action


_ACTION_FIELDS: tuple[tuple[str, type | tuple[type, ...]], ...] = (
    ("target", str),
    ("method", str),
    ("url", str),
    ("body", dict),
    ("headers", dict),
    ("idempotency_key", (str, type(None))),
    ("deadline", (int, float, type(None))),
)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


@dataclass(frozen=True, slots=True)
class OutboxRecord:
    """A pending outbound action and its delivery state.

    Attributes:
        id: Outbox id (also the ``webhook-id`` of signed requests).
        action: The action to deliver.
        attempts: Attempts made so far.
        due: Unix time of the next attempt.
        created: Unix time the action was accepted.
        last_error: Short description of the last failure.
        last_status: HTTP status of the last attempt, if it got an answer.
        lease_owner: Dispatcher currently attempting it, if any.
        lease_until: Unix time its lease ends.
    """

    id: str
    action: OutboundWebhookAction
    attempts: int = 0
    due: float = 0.0
    created: float = 0.0
    last_error: str | None = None
    last_status: int | None = None
    lease_owner: str | None = None
    lease_until: float | None = None

    @property
    def idempotency_key(self) -> str:
        """The ``Idempotency-Key`` sent on every attempt."""
        return self.action.idempotency_key or self.id

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dict (the stored form)."""
        return {
            "v": 1,
            "id": self.id,
            "action": self.action.to_dict(),
            "attempts": self.attempts,
            "due": self.due,
            "created": self.created,
            "last_error": self.last_error,
            "last_status": self.last_status,
            "lease_owner": self.lease_owner,
            "lease_until": self.lease_until,
        }

    @classmethod
    def from_dict(cls, data: Any) -> OutboxRecord:
        """Rebuild a record from :meth:`to_dict` output.

        Raises:
            UsageError: If ``data`` is not a record.
        """
        if not isinstance(data, Mapping) or data.get("v") != 1:
            raise UsageError("not an outbox record")
        attempts = data.get("attempts")
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 0:
            raise UsageError("outbox record has a bad attempt count")
        status = data.get("last_status")
        return cls(
            id=str(data["id"]),
            action=_stored_action(data["action"]),
            attempts=attempts,
            due=_num(data.get("due")) or 0.0,
            created=_num(data.get("created")) or 0.0,
            last_error=data.get("last_error") if isinstance(data.get("last_error"), str) else None,
            last_status=status if isinstance(status, int) else None,
            lease_owner=data.get("lease_owner")
            if isinstance(data.get("lease_owner"), str)
            else None,
            lease_until=_num(data.get("lease_until")),
        )


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An action that will not be attempted again unless replayed.

    Attributes:
        id: Outbox id.
        action: The action.
        attempts: Attempts made.
        reason: Why it was given up (``"status 404"``, ``"max attempts"``, ...).
        last_status: HTTP status of the last attempt, if any.
        created: Unix time it was accepted.
        dead_at: Unix time it was dead-lettered.
    """

    id: str
    action: OutboundWebhookAction
    attempts: int
    reason: str
    last_status: int | None
    created: float
    dead_at: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dict (the stored form)."""
        return {
            "v": 1,
            "id": self.id,
            "action": self.action.to_dict(),
            "attempts": self.attempts,
            "reason": self.reason,
            "last_status": self.last_status,
            "created": self.created,
            "dead_at": self.dead_at,
        }

    @classmethod
    def from_dict(cls, data: Any) -> DeadLetter:
        """Rebuild a dead letter from :meth:`to_dict` output.

        Raises:
            UsageError: If ``data`` is not a dead letter.
        """
        if not isinstance(data, Mapping) or data.get("v") != 1:
            raise UsageError("not a dead letter record")
        status = data.get("last_status")
        return cls(
            id=str(data["id"]),
            action=_stored_action(data["action"]),
            attempts=int(data.get("attempts", 0)),
            reason=str(data.get("reason", "")),
            last_status=status if isinstance(status, int) else None,
            created=_num(data.get("created")) or 0.0,
            dead_at=_num(data.get("dead_at")) or 0.0,
        )


class Outbox:
    """Pending actions and dead letters kept in a :class:`~converge.core.store.Store`.

    Every state change is one atomic store operation (``aput_if_absent`` or
    ``aupdate``), so replicas sharing a store never lose or double-own an action: a
    lease marks the dispatcher attempting it until the lease runs out.

    Args:
        store: The store.
        prefix: Key prefix (``{prefix}:outbox:{id}``, ``{prefix}:dead:{id}``).
        clock: Unix seconds.
        dead_letter_ttl_sec: How long dead letters are kept.
    """

    def __init__(
        self,
        store: Store,
        *,
        prefix: str,
        clock: Callable[[], float],
        dead_letter_ttl_sec: float,
    ) -> None:
        self.store = store
        self._pending = f"{prefix}:outbox:"
        self._dead = f"{prefix}:dead:"
        self._clock = clock
        self._dead_ttl = dead_letter_ttl_sec

    def pending_key(self, record_id: str) -> str:
        """Store key of a pending action."""
        return self._pending + record_id

    def dead_key(self, record_id: str) -> str:
        """Store key of a dead letter."""
        return self._dead + record_id

    async def add(self, action: OutboundWebhookAction) -> OutboxRecord:
        """Persist ``action`` (a no-op if one with its idempotency key is pending)."""
        now = self._clock()
        record = OutboxRecord(id=action_id(action), action=action, due=now, created=now)
        await self.store.aput_if_absent(self.pending_key(record.id), record.to_dict())
        return record

    async def pending_ids(self) -> list[str]:
        """Ids of every pending action."""
        keys = await self.store.alist(self._pending)
        return [k[len(self._pending) :] for k in keys]

    async def get(self, record_id: str) -> OutboxRecord | None:
        """The pending record, or None if gone (or unreadable)."""
        data = await self.store.aget(self.pending_key(record_id))
        if data is None:
            return None
        try:
            return OutboxRecord.from_dict(data)
        except (UsageError, KeyError, TypeError, ValueError):
            return None

    async def lease(self, record_id: str, owner: str, until: float) -> OutboxRecord | float | None:
        """Take the lease of a pending action.

        Returns:
            The leased record; the Unix time another owner's lease ends; or None when
            the action is gone or unreadable.
        """
        key = self.pending_key(record_id)
        now = self._clock()

        def take(current: dict[str, Any]) -> tuple[dict[str, Any], OutboxRecord | float | None]:
            try:
                record = OutboxRecord.from_dict(current.get(key))
            except (UsageError, KeyError, TypeError, ValueError):
                return {}, None
            if (
                record.lease_owner not in (None, owner)
                and record.lease_until is not None
                and record.lease_until > now
            ):
                return {}, record.lease_until
            leased = dataclasses.replace(record, lease_owner=owner, lease_until=until)
            return {key: leased.to_dict()}, leased

        return await self.store.aupdate([key], take)

    async def release(self, record_id: str, owner: str) -> None:
        """Give up ``owner``'s lease without counting an attempt."""
        key = self.pending_key(record_id)

        def drop(current: dict[str, Any]) -> tuple[dict[str, Any], None]:
            data = current.get(key)
            if isinstance(data, Mapping) and data.get("lease_owner") == owner:
                return {key: {**data, "lease_owner": None, "lease_until": None}}, None
            return {}, None

        await self.store.aupdate([key], drop)

    async def complete(self, record_id: str) -> None:
        """The action was delivered: forget it."""
        await self.store.adelete(self.pending_key(record_id))

    async def reschedule(
        self, record: OutboxRecord, *, due: float, error: str, status: int | None
    ) -> None:
        """Count a failed attempt and set the next one for ``due`` (lease dropped)."""
        key = self.pending_key(record.id)

        def update(current: dict[str, Any]) -> tuple[dict[str, Any], None]:
            data = current.get(key)
            if not isinstance(data, Mapping):
                return {}, None  # delivered or dead-lettered meanwhile
            attempts = data.get("attempts")
            count = attempts if isinstance(attempts, int) else record.attempts
            new = {
                **data,
                "attempts": max(count, record.attempts + 1),
                "due": due,
                "last_error": error,
                "last_status": status,
                "lease_owner": None,
                "lease_until": None,
            }
            return {key: new}, None

        await self.store.aupdate([key], update)

    async def bury(
        self, record: OutboxRecord, *, reason: str, status: int | None, attempts: int
    ) -> DeadLetter:
        """Move an action to the dead letters (atomically)."""
        letter = DeadLetter(
            id=record.id,
            action=record.action,
            attempts=attempts,
            reason=reason,
            last_status=status,
            created=record.created,
            dead_at=self._clock(),
        )
        pending, dead = self.pending_key(record.id), self.dead_key(record.id)

        def move(current: dict[str, Any]) -> tuple[dict[str, Any], None]:
            return {pending: None, dead: letter.to_dict()}, None

        await self.store.aupdate([pending, dead], move, ttl=self._dead_ttl)
        return letter

    async def dead_letters(self) -> list[DeadLetter]:
        """Every readable dead letter, oldest first."""
        letters = []
        for key in await self.store.alist(self._dead):
            data = await self.store.aget(key)
            if data is None:
                continue
            try:
                letters.append(DeadLetter.from_dict(data))
            except (UsageError, KeyError, TypeError, ValueError):
                continue
        return sorted(letters, key=lambda d: d.dead_at)

    async def replay(self, record_id: str) -> OutboxRecord | None:
        """Move a dead letter back to the pending actions, attempts reset.

        Returns:
            The new pending record, or None if there is no such dead letter.
        """
        pending, dead = self.pending_key(record_id), self.dead_key(record_id)
        now = self._clock()

        def move(current: dict[str, Any]) -> tuple[dict[str, Any], OutboxRecord | None]:
            try:
                letter = DeadLetter.from_dict(current.get(dead))
            except (UsageError, KeyError, TypeError, ValueError):
                return {}, None
            record = OutboxRecord(
                id=letter.id, action=letter.action, due=now, created=letter.created
            )
            return {dead: None, pending: record.to_dict()}, record

        return await self.store.aupdate([pending, dead], move)

    async def discard(self, record_id: str) -> None:
        """Delete a dead letter for good."""
        await self.store.adelete(self.dead_key(record_id))
