"""The durable outbox: outbound actions as fenced, inspectable records in a Store.

Each action is one record in the durable-queue shape (id, kind, status, key, data,
created, updated, attempts, lease owner/token/until, last error). Its status decides
where it lives: ``{prefix}:outbox:{id}`` while pending or leased (the dispatcher scans
this prefix only), ``{prefix}:outbox-done:{id}`` once delivered and
``{prefix}:dead:{id}`` once dead-lettered; done records carry a TTL of
``retention_sec`` so the store sweeps them, and every move is one atomic
``Store.aupdate``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from converge.core.store import Store
from converge.errors import IdempotencyConflictError, UsageError
from converge.extensions.connectors.models import OutboundWebhookAction

__all__ = [
    "NAMESPACES",
    "Attempt",
    "DeadLetter",
    "Namespace",
    "Outbox",
    "OutboxRecord",
    "Status",
    "action_id",
]

#: Who submitted an action: its idempotency key is only unique within one of these.
Namespace = Literal["api", "agent", "inbound"]
#: Every namespace: ``"api"`` (``POST /outbound`` and direct library calls),
#: ``"agent"`` (messages of agents), ``"inbound"`` (forwards of accepted webhooks).
NAMESPACES: tuple[str, ...] = ("api", "agent", "inbound")
#: Where a record is in its life.
Status = Literal["pending", "leased", "delivered", "dead"]
_STATUSES = ("pending", "leased", "delivered", "dead")
# Attempts kept per record (the newest); a long outage must not grow a record forever.
_HISTORY_LIMIT = 50


def action_id(action: OutboundWebhookAction, namespace: str = "api") -> str:
    """The outbox id of ``action``: derived from its namespace and idempotency key, else
    random. Equal keys in different namespaces give different ids."""
    if namespace not in NAMESPACES:
        raise UsageError(f"namespace must be one of {NAMESPACES}, got {namespace!r}")
    if action.idempotency_key is None:
        return uuid.uuid4().hex
    seed = f"{namespace}\0{action.idempotency_key}"
    return hashlib.sha256(seed.encode()).hexdigest()[:32]


def _fingerprint(action_dict: Mapping[str, Any]) -> str:
    text = json.dumps(action_dict, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


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


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


@dataclass(frozen=True, slots=True)
class Attempt:
    """One delivery attempt, as kept in a record's history.

    Attributes:
        at: Unix time the attempt ended.
        status_code: HTTP status of the answer, or None when none came.
        error: Why it failed (``"status 503"``, ``"ConnectError"``, ...); empty on success.
        latency_ms: How long it took, or None when no request was sent.
        outcome: ``"delivered"``, ``"retry"`` (counted against the attempt budget),
            ``"outage"`` (failed while the target's circuit was open: not counted) or
            ``"dead"``.
    """

    at: float
    status_code: int | None = None
    error: str = ""
    latency_ms: float | None = None
    outcome: str = "retry"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dict."""
        return {
            "at": self.at,
            "status_code": self.status_code,
            "error": self.error,
            "latency_ms": self.latency_ms,
            "outcome": self.outcome,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Attempt:
        """Rebuild an attempt from :meth:`to_dict` output (unreadable fields become None)."""
        if not isinstance(data, Mapping):
            raise UsageError("not an attempt")
        return cls(
            at=_num(data.get("at")) or 0.0,
            status_code=_int(data.get("status_code")),
            error=_str(data.get("error")) or "",
            latency_ms=_num(data.get("latency_ms")),
            outcome=_str(data.get("outcome")) or "retry",
        )


@dataclass(frozen=True, slots=True)
class OutboxRecord:
    """An outbound action and its delivery state.

    Attributes:
        id: Outbox id (also the ``webhook-id`` of signed requests).
        action: The action to deliver.
        attempts: Attempts counted against the retry budget (outage attempts are not).
        due: Unix time of the next attempt.
        created: Unix time the action was accepted.
        last_error: Short description of the last failure (the reason once dead).
        last_status: HTTP status of the last attempt, if it got an answer.
        lease_owner: Dispatcher currently attempting it, if any.
        lease_until: End of its lease, on the store's clock (:meth:`Outbox.atime`).
        lease_token: Fencing token of the current lease: every transition checks it.
        status: ``"pending"``, ``"leased"``, ``"delivered"`` or ``"dead"``.
        history: The latest attempts, oldest first (at most 50).
        namespace: Who submitted it (see :data:`NAMESPACES`).
        updated: Unix time of the last change.
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
    lease_token: str | None = None
    status: Status = "pending"
    history: tuple[Attempt, ...] = ()
    namespace: str = "api"
    updated: float = 0.0

    @property
    def idempotency_key(self) -> str:
        """The ``Idempotency-Key`` sent on every attempt."""
        return self.action.idempotency_key or self.id

    @property
    def target(self) -> str:
        """The action's target name (the record's key)."""
        return self.action.target

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dict (the stored form, the durable-queue record shape)."""
        action = self.action.to_dict()
        return {
            "v": 2,
            "id": self.id,
            "kind": "outbound",
            "status": self.status,
            "key": self.action.target,
            "data": {
                "action": action,
                "namespace": self.namespace,
                "fingerprint": _fingerprint(action),
                "counted": self.attempts,
                "last_status": self.last_status,
            },
            "due": self.due,
            "created": self.created,
            "updated": self.updated,
            "attempts": [a.to_dict() for a in self.history],
            "lease_owner": self.lease_owner,
            "lease_token": self.lease_token,
            "lease_until": self.lease_until,
            "last_error": self.last_error,
        }

    @classmethod
    def from_dict(cls, data: Any) -> OutboxRecord:
        """Rebuild a record from :meth:`to_dict` output (or a version-1 record).

        Raises:
            UsageError: If ``data`` is not a record.
        """
        if not isinstance(data, Mapping):
            raise UsageError("not an outbox record")
        if data.get("v") == 1:  # written by converge before the attempt history
            attempts = _int(data.get("attempts"))
            if attempts is None or attempts < 0:
                raise UsageError("outbox record has a bad attempt count")
            return cls(
                id=str(data["id"]),
                action=_stored_action(data["action"]),
                attempts=attempts,
                due=_num(data.get("due")) or 0.0,
                created=_num(data.get("created")) or 0.0,
                last_error=_str(data.get("last_error")),
                last_status=_int(data.get("last_status")),
            )
        if data.get("v") != 2 or data.get("kind") != "outbound":
            raise UsageError("not an outbox record")
        inner = data.get("data")
        if not isinstance(inner, Mapping):
            raise UsageError("outbox record has no data")
        counted = _int(inner.get("counted"))
        status = data.get("status")
        history = data.get("attempts")
        if counted is None or counted < 0 or status not in _STATUSES:
            raise UsageError("outbox record has a bad attempt count or status")
        return cls(
            id=str(data["id"]),
            action=_stored_action(inner.get("action")),
            attempts=counted,
            due=_num(data.get("due")) or 0.0,
            created=_num(data.get("created")) or 0.0,
            last_error=_str(data.get("last_error")),
            last_status=_int(inner.get("last_status")),
            lease_owner=_str(data.get("lease_owner")),
            lease_until=_num(data.get("lease_until")),
            lease_token=_str(data.get("lease_token")),
            status=status,
            history=tuple(
                Attempt.from_dict(a) for a in (history if isinstance(history, list) else ())
            ),
            namespace=_str(inner.get("namespace")) or "api",
            updated=_num(data.get("updated")) or 0.0,
        )


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An action that will not be attempted again unless replayed.

    Attributes:
        id: Outbox id.
        action: The action.
        attempts: Attempts counted against its budget.
        reason: Why it was given up (``"status 404"``, ``"max attempts"``, ...).
        last_status: HTTP status of the last attempt, if any.
        created: Unix time it was accepted.
        dead_at: Unix time it was dead-lettered.
        history: Its latest attempts, oldest first.
    """

    id: str
    action: OutboundWebhookAction
    attempts: int
    reason: str
    last_status: int | None
    created: float
    dead_at: float
    history: tuple[Attempt, ...] = ()

    @classmethod
    def of(cls, record: OutboxRecord) -> DeadLetter:
        """The dead letter a ``"dead"`` record describes."""
        return cls(
            id=record.id,
            action=record.action,
            attempts=record.attempts,
            reason=record.last_error or "",
            last_status=record.last_status,
            created=record.created,
            dead_at=record.updated,
            history=record.history,
        )


def _read(data: Any) -> OutboxRecord | None:
    if data is None:
        return None
    try:
        return OutboxRecord.from_dict(data)
    except (UsageError, KeyError, TypeError, ValueError):
        return None


def _add_attempt(history: tuple[Attempt, ...], attempt: Attempt | None) -> tuple[Attempt, ...]:
    if attempt is None:
        return history
    return (*history, attempt)[-_HISTORY_LIMIT:]


class Outbox:
    """Outbound actions kept in a :class:`~converge.core.store.Store`, leased and fenced.

    Every state change is one atomic store operation (``Store.aupdate``), so replicas
    sharing a store never lose or double-own an action. A lease names its owner, carries
    a fresh fencing token and ends at a time on the store's clock (:meth:`atime`), so
    hosts with skewed clocks agree on when it ends; completing, rescheduling, burying and
    releasing a record check the token and change nothing for a holder whose lease was
    taken over.

    Delivered and dead records stay readable (:meth:`aget`, :meth:`alist`) for
    ``retention_sec``: the store expires them, no scan needed.

    Args:
        store: The store.
        prefix: Key prefix (``{prefix}:outbox:{id}``, ``{prefix}:outbox-done:{id}``,
            ``{prefix}:dead:{id}``).
        clock: Unix seconds (due times, creation and attempt times).
        dead_letter_ttl_sec: How long dead letters are kept.
        retention_sec: How long delivered actions are kept (default: as dead letters).
    """

    def __init__(
        self,
        store: Store,
        *,
        prefix: str,
        clock: Callable[[], float],
        dead_letter_ttl_sec: float,
        retention_sec: float | None = None,
    ) -> None:
        self.store = store
        self._pending = f"{prefix}:outbox:"
        self._done = f"{prefix}:outbox-done:"
        self._dead = f"{prefix}:dead:"
        self._clock = clock
        self._dead_ttl = dead_letter_ttl_sec
        self._retention = dead_letter_ttl_sec if retention_sec is None else retention_sec

    # -- keys and clocks -----------------------------------------------------------------

    def pending_key(self, record_id: str) -> str:
        """Store key of a pending (or leased) action."""
        return self._pending + record_id

    def done_key(self, record_id: str) -> str:
        """Store key of a delivered action."""
        return self._done + record_id

    def dead_key(self, record_id: str) -> str:
        """Store key of a dead letter."""
        return self._dead + record_id

    def _keys(self, record_id: str) -> list[str]:
        return [self.pending_key(record_id), self.done_key(record_id), self.dead_key(record_id)]

    async def atime(self) -> float:
        """The store's clock (``Store.atime()``), which leases are measured on.

        Stores without one (before the store contract had it) fall back to this
        process's clock.
        """
        store_time = getattr(self.store, "atime", None)
        if store_time is None:
            return self._clock()
        return float(await store_time())

    # -- adding --------------------------------------------------------------------------

    async def add(self, action: OutboundWebhookAction, *, namespace: str = "api") -> OutboxRecord:
        """Persist ``action``; idempotent per ``(namespace, idempotency_key)``.

        Args:
            action: The action.
            namespace: ``"api"`` (``POST /outbound``, library calls), ``"agent"``
                (agents' messages) or ``"inbound"`` (webhook forwards): keys in one
                namespace never collide with keys in another.

        Returns:
            The new record; or, when the namespace already holds this key (pending,
            delivered or dead and still kept) for the same action, that record.

        Raises:
            IdempotencyConflictError: The key is taken by a different action.
            UsageError: For an unknown namespace.
        """
        record_id = action_id(action, namespace)
        now = self._clock()
        record = OutboxRecord(
            id=record_id, action=action, due=now, created=now, updated=now, namespace=namespace
        )
        stored = record.to_dict()
        if action.idempotency_key is None:  # a random id: nothing to collide with
            await self.store.aput(self.pending_key(record_id), stored)
            return record
        fingerprint = stored["data"]["fingerprint"]
        keys = self._keys(record_id)

        def claim(current: dict[str, Any]) -> tuple[dict[str, Any], OutboxRecord | None]:
            for key in keys:
                data = current.get(key)
                if data is None:
                    continue
                existing = _read(data)
                if existing is None or _fingerprint(existing.action.to_dict()) != fingerprint:
                    return {}, None
                return {}, existing
            return {keys[0]: stored}, record

        outcome = await self.store.aupdate(keys, claim)
        if outcome is None:
            raise IdempotencyConflictError(
                f"idempotency key {action.idempotency_key!r} ({namespace}) already names "
                "a different action",
                existing_id=record_id,
            )
        return outcome

    # -- reading -------------------------------------------------------------------------

    async def pending_ids(self) -> list[str]:
        """Ids of every pending (or leased) action."""
        keys = await self.store.alist(self._pending)
        return [k[len(self._pending) :] for k in keys]

    async def apending_count(self) -> int:
        """How many actions are pending or leased, over every process sharing the store."""
        return len(await self.store.alist(self._pending))

    async def get(self, record_id: str) -> OutboxRecord | None:
        """The pending record, or None if gone (or unreadable)."""
        return _read(await self.store.aget(self.pending_key(record_id)))

    async def aget(self, record_id: str) -> OutboxRecord | None:
        """The record with this id in any status, or None (unknown, expired, unreadable)."""
        for key in self._keys(record_id):
            found = _read(await self.store.aget(key))
            if found is not None:
                return found
        return None

    async def alist(
        self,
        *,
        status: str | None = None,
        key: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> list[OutboxRecord]:
        """Records, newest first.

        Args:
            status: Only this status (``"pending"`` includes leased records).
            key: Only actions for this target.
            since: Only records created at or after this Unix time.
            limit: At most this many (>= 1).

        Raises:
            UsageError: For an unknown status or a bad limit.
        """
        if status is not None and status not in _STATUSES:
            raise UsageError(f"status must be one of {_STATUSES}, got {status!r}")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise UsageError("limit must be an integer >= 1")
        prefixes = {
            None: (self._pending, self._done, self._dead),
            "pending": (self._pending,),
            "leased": (self._pending,),
            "delivered": (self._done,),
            "dead": (self._dead,),
        }[status]
        found: list[OutboxRecord] = []
        for prefix in prefixes:
            for name in await self.store.alist(prefix):
                record = _read(await self.store.aget(name))
                if record is None or (key is not None and record.action.target != key):
                    continue
                if since is not None and record.created < since:
                    continue
                if status == "leased" and record.status != "leased":
                    continue
                found.append(record)
        found.sort(key=lambda r: r.created, reverse=True)
        return found[:limit]

    async def dead_letters(self) -> list[DeadLetter]:
        """Every readable dead letter, oldest first."""
        letters = [DeadLetter.of(r) for r in await self.alist(status="dead", limit=2**62)]
        return sorted(letters, key=lambda d: d.dead_at)

    # -- leases and transitions ----------------------------------------------------------

    async def lease(
        self, record_id: str, owner: str, duration: float
    ) -> OutboxRecord | float | None:
        """Take the lease of a pending action for ``duration`` seconds of store time.

        Returns:
            The leased record (with a fresh ``lease_token``); the seconds until another
            owner's lease ends; or None when the action is gone or unreadable.
        """
        key = self.pending_key(record_id)
        now = await self.atime()
        token = uuid.uuid4().hex

        def take(current: dict[str, Any]) -> tuple[dict[str, Any], OutboxRecord | float | None]:
            record = _read(current.get(key))
            if record is None:
                return {}, None
            held = record.lease_until is not None and record.lease_until > now
            if held and record.lease_owner != owner:
                assert record.lease_until is not None
                return {}, record.lease_until - now
            leased = dataclasses.replace(
                record,
                status="leased",
                lease_owner=owner,
                lease_until=now + duration,
                lease_token=token,
            )
            return {key: leased.to_dict()}, leased

        return await self.store.aupdate([key], take)

    def _fenced(
        self,
        record: OutboxRecord,
        moves: Callable[[OutboxRecord], dict[str, Any]],
    ) -> Callable[[dict[str, Any]], tuple[dict[str, Any], bool]]:
        key = self.pending_key(record.id)

        def update(current: dict[str, Any]) -> tuple[dict[str, Any], bool]:
            stored = _read(current.get(key))
            if stored is None or stored.lease_token != record.lease_token:
                return {}, False  # taken over (or finished) by another holder
            return moves(stored), True

        return update

    async def release(self, record: OutboxRecord) -> bool:
        """Give up the lease of ``record`` without counting an attempt.

        Returns:
            False if the lease was no longer ours (nothing changed).
        """
        key = self.pending_key(record.id)

        def moves(stored: OutboxRecord) -> dict[str, Any]:
            free = dataclasses.replace(
                stored, status="pending", lease_owner=None, lease_until=None, lease_token=None
            )
            return {key: free.to_dict()}

        return await self.store.aupdate([key], self._fenced(record, moves))

    async def complete(self, record: OutboxRecord, attempt: Attempt | None = None) -> bool:
        """The action was delivered: keep it as ``"delivered"`` for the retention period.

        Returns:
            False if the lease was no longer ours (nothing changed).
        """
        pending, done = self.pending_key(record.id), self.done_key(record.id)
        now = self._clock()

        def moves(stored: OutboxRecord) -> dict[str, Any]:
            final = dataclasses.replace(
                stored,
                status="delivered",
                attempts=stored.attempts + 1,
                last_error=None,
                last_status=attempt.status_code if attempt else stored.last_status,
                lease_owner=None,
                lease_until=None,
                lease_token=None,
                history=_add_attempt(stored.history, attempt),
                updated=now,
            )
            return {pending: None, done: final.to_dict()}

        return await self.store.aupdate(
            [pending, done], self._fenced(record, moves), ttl=self._retention
        )

    async def reschedule(
        self,
        record: OutboxRecord,
        *,
        due: float,
        error: str,
        status: int | None,
        attempt: Attempt | None = None,
        counted: bool = True,
    ) -> bool:
        """Record a failed attempt and set the next one for ``due`` (lease dropped).

        Args:
            record: The leased record.
            due: Unix time of the next attempt.
            error: Why this one failed.
            status: Its HTTP status, if any.
            attempt: The attempt, for the history.
            counted: Whether it uses up one of the action's attempts (outage attempts,
                made while the target's circuit was open, do not).

        Returns:
            False if the lease was no longer ours (nothing changed).
        """
        key = self.pending_key(record.id)
        now = self._clock()

        def moves(stored: OutboxRecord) -> dict[str, Any]:
            new = dataclasses.replace(
                stored,
                status="pending",
                attempts=stored.attempts + (1 if counted else 0),
                due=due,
                last_error=error,
                last_status=status,
                lease_owner=None,
                lease_until=None,
                lease_token=None,
                history=_add_attempt(stored.history, attempt),
                updated=now,
            )
            return {key: new.to_dict()}

        return await self.store.aupdate([key], self._fenced(record, moves))

    async def bury(
        self,
        record: OutboxRecord,
        *,
        reason: str,
        status: int | None,
        attempts: int,
        attempt: Attempt | None = None,
    ) -> DeadLetter | None:
        """Move a leased action to the dead letters (atomically).

        Returns:
            The dead letter, or None if the lease was no longer ours (nothing changed).
        """
        pending, dead = self.pending_key(record.id), self.dead_key(record.id)
        now = self._clock()
        letters: list[DeadLetter] = []

        def moves(stored: OutboxRecord) -> dict[str, Any]:
            final = dataclasses.replace(
                stored,
                status="dead",
                attempts=attempts,
                last_error=reason,
                last_status=status,
                lease_owner=None,
                lease_until=None,
                lease_token=None,
                history=_add_attempt(stored.history, attempt),
                updated=now,
            )
            letters.append(DeadLetter.of(final))
            return {pending: None, dead: final.to_dict()}

        moved = await self.store.aupdate(
            [pending, dead], self._fenced(record, moves), ttl=self._dead_ttl
        )
        return letters[-1] if moved and letters else None

    async def areplay(self, record_id: str) -> OutboxRecord | None:
        """Send a dead or delivered action again: back to pending, attempt budget reset
        (its history is kept).

        Returns:
            The new pending record, or None if there is no such dead or delivered record.
        """
        pending = self.pending_key(record_id)
        done, dead = self.done_key(record_id), self.dead_key(record_id)
        now = self._clock()

        def move(current: dict[str, Any]) -> tuple[dict[str, Any], OutboxRecord | None]:
            if current.get(pending) is not None:
                return {}, None  # already on its way
            for key in (dead, done):
                found = _read(current.get(key))
                if found is not None:
                    record = dataclasses.replace(
                        found,
                        status="pending",
                        attempts=0,
                        due=now,
                        last_error=None,
                        lease_owner=None,
                        lease_until=None,
                        lease_token=None,
                        updated=now,
                    )
                    return {key: None, pending: record.to_dict()}, record
            return {}, None

        return await self.store.aupdate([pending, done, dead], move)

    async def replay(self, record_id: str) -> OutboxRecord | None:
        """Move a dead letter back to the pending actions, attempts reset.

        Returns:
            The new pending record, or None if there is no such dead letter.
        """
        if _read(await self.store.aget(self.dead_key(record_id))) is None:
            return None
        return await self.areplay(record_id)

    async def discard(self, record_id: str) -> None:
        """Delete a dead letter for good."""
        await self.store.adelete(self.dead_key(record_id))

    async def apurge(
        self, record_id: str, *, statuses: Sequence[str] = ("delivered", "dead")
    ) -> bool:
        """Delete a record for good (by default only a delivered or dead one).

        Args:
            record_id: The record.
            statuses: Which statuses may be purged; include ``"pending"`` to drop an
                action that has not been delivered (a leased one is never purged).

        Returns:
            True if a record was deleted.
        """
        keys = {
            "pending": self.pending_key(record_id),
            "delivered": self.done_key(record_id),
            "dead": self.dead_key(record_id),
        }
        names = [keys[s] for s in statuses if s in keys]

        def drop(current: dict[str, Any]) -> tuple[dict[str, Any], bool]:
            for name in names:
                found = _read(current.get(name))
                if found is not None and found.status != "leased":
                    return {name: None}, True
            return {}, False

        return await self.store.aupdate(names, drop) if names else False
