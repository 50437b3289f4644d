"""The durable outbox: outbound actions as records of a :class:`converge.durable.DurableQueue`.

Each action is one durable-queue record of kind ``"outbound"``: its key is the target,
its data holds the action and the namespace it was submitted in, and the record keeps
its status (pending, leased, delivered, dead), its fenced lease (on the store's clock)
and its latest attempts (time, status code, error, latency, outcome). Delivered and dead
records are kept, inspectable and replayable, for the retention period, then the store
sweeps them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import warnings
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from converge._numbers import finite_float
from converge._repr import safe_repr
from converge._sorting import in_pieces, sort_yielding
from converge.core.store import Store, WithTTL
from converge.durable import Attempt, DurableQueue, Record
from converge.errors import DuplicateRecordError, IdempotencyConflictError, UsageError
from converge.extensions.connectors.models import OutboundWebhookAction

__all__ = [
    "DEFAULT_MAX_PENDING",
    "NAMESPACES",
    "DeadLetter",
    "Namespace",
    "Outbox",
    "OutboxRecord",
    "action_id",
]

#: Who submitted an action: its idempotency key is only unique within one of these.
Namespace = Literal["api", "agent", "inbound"]
#: Every namespace: ``"api"`` (``POST /outbound`` and direct library calls),
#: ``"agent"`` (messages of agents), ``"inbound"`` (forwards of accepted webhooks).
NAMESPACES: tuple[str, ...] = ("api", "agent", "inbound")
#: Most actions waiting in an outbox at once (``submit`` beyond it raises QueueFullError).
DEFAULT_MAX_PENDING = 1_000_000


def action_id(action: OutboundWebhookAction, namespace: str = "api") -> str:
    """The outbox id of ``action``: derived from its namespace and idempotency key, else
    random. Equal keys in different namespaces give different ids."""
    if namespace not in NAMESPACES:
        raise UsageError(f"namespace must be one of {NAMESPACES}, got {safe_repr(namespace)}")
    if action.idempotency_key is None:
        return DurableQueue.new_id()
    seed = f"{namespace}\0{action.idempotency_key}"
    return hashlib.sha256(seed.encode()).hexdigest()[:32]


def _fingerprint(action: Mapping[str, Any]) -> str:
    text = json.dumps(action, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _addition(
    action: OutboundWebhookAction, namespace: str, lease: tuple[str, float] | None
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """What adding ``action`` writes: its record id and data, and the lease arguments
    of :meth:`DurableQueue.aadd` (none: added pending)."""
    if not isinstance(action, OutboundWebhookAction):
        raise UsageError(f"action must be an OutboundWebhookAction, not {type(action).__name__}")
    record_id = action_id(action, namespace)
    stored = action.to_dict()
    data = {"action": stored, "namespace": namespace, "fingerprint": _fingerprint(stored)}
    if lease is None:
        return record_id, data, {}
    return record_id, data, {"status": "leased", "lease_owner": lease[0], "lease_sec": lease[1]}


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
    ("raw_body", (str, type(None))),  # forward_format = "raw" (absent in older records)
)


def _held(record: object) -> OutboxRecord:
    """``record`` if it is an :class:`OutboxRecord` (what :meth:`Outbox.alease` returns)."""
    if not isinstance(record, OutboxRecord):
        raise UsageError(
            f"record must be the OutboxRecord a lease returned, not {type(record).__name__}"
        )
    return record


@dataclass(frozen=True, slots=True)
class OutboxRecord:
    """An outbound action and its delivery state (a view of its durable record).

    Attributes:
        id: Outbox id (also the ``webhook-id`` of signed requests).
        action: The action to deliver.
        attempts: Attempts counted against the retry budget since it was accepted or
            last replayed (attempts during an outage of its target are not counted).
        due: Unix time (store clock) of the next attempt.
        created: Unix time it was accepted.
        last_error: Short description of the last failure (the reason once dead).
        last_status: HTTP status of the last attempt, if it got an answer.
        lease_owner: Dispatcher currently attempting it, if any.
        lease_until: End of its lease (store clock).
        lease_token: Fencing token of its latest lease.
        status: ``"pending"``, ``"leased"``, ``"delivered"`` or ``"dead"``.
        history: Its latest attempts, oldest first.
        namespace: Who submitted it (see :data:`NAMESPACES`).
        updated: Unix time of its last change.
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
    lease_token: int = 0
    status: str = "pending"
    history: tuple[Attempt, ...] = ()
    namespace: str = "api"
    updated: float = 0.0

    @property
    def idempotency_key(self) -> str:
        """The ``Idempotency-Key`` sent on every attempt."""
        return self.action.idempotency_key or self.id

    @classmethod
    def of(cls, record: Record) -> OutboxRecord:
        """The outbox view of a durable ``record``.

        Raises:
            UsageError: If ``record`` does not hold an outbound action.
        """
        data = record.data
        return cls(
            id=record.id,
            action=_stored_action(data.get("action")),
            attempts=record.budget_used,
            due=record.due,
            created=record.created,
            last_error=record.last_error,
            last_status=record.attempts[-1].status_code if record.attempts else None,
            lease_owner=record.lease_owner,
            lease_until=record.lease_until,
            lease_token=record.lease_token,
            status=record.status,
            history=record.attempts,
            namespace=str(data.get("namespace") or "api"),
            updated=record.updated,
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


def _view(record: Record | None) -> OutboxRecord | None:
    if record is None:
        return None
    try:
        return OutboxRecord.of(record)
    except (UsageError, TypeError, ValueError):
        return None


# Records read into views (about 10 us each) between turns of the event loop.
_VIEWS_PER_STEP = 256


def _views(records: list[Record]) -> list[OutboxRecord]:
    return [view for record in records if (view := _view(record)) is not None]


def _dead_letters(
    numbered: list[tuple[int, OutboxRecord]],
) -> list[tuple[float, int, DeadLetter]]:
    """Dead letters keyed by death, then by their place in the listing (so that a sort
    of the keys keeps ties in the listing's order)."""
    letters = [(n, DeadLetter.of(record)) for n, record in numbered]
    return [(letter.dead_at, n, letter) for n, letter in letters]


def _unkeyed(keyed: list[tuple[float, int, DeadLetter]]) -> list[DeadLetter]:
    return [letter for _, _, letter in keyed]


def _renamed(old: str, new: str) -> Callable[..., Awaitable[Any]]:
    """A deprecated alias ``old`` of the coroutine method ``new`` (the names before the
    ``a`` prefix of every coroutine): it warns, then awaits ``new``."""

    async def alias(self: Outbox, *args: Any, **kwargs: Any) -> Any:
        warnings.warn(
            f"Outbox.{old}() is deprecated; await Outbox.{new}() instead",
            DeprecationWarning,
            stacklevel=2,
        )
        return await getattr(self, new)(*args, **kwargs)

    alias.__name__ = alias.__qualname__ = old
    alias.__doc__ = f"Deprecated: await :meth:`{new}`."
    return alias


class Outbox:
    """Outbound actions in a durable queue: leased, fenced, inspectable.

    Every state change is one atomic store update of the durable queue, so replicas
    sharing a store never lose or double-own an action. A lease names its owner, carries
    a fencing token and ends at a time on the store's clock (``Store.atime``, so hosts
    with skewed clocks agree on it); completing, rescheduling, burying and releasing
    name the token and change nothing once another dispatcher took the action over.

    :meth:`aget`, :meth:`alist`, :meth:`areplay` and :meth:`apurge` work on the durable
    records themselves (:class:`converge.durable.Record`: status, key = target, data
    with the action, attempts), like the connector's inbox: the event log, the CLI and
    the admin API use them.

    Args:
        store: The store.
        prefix: Key prefix; the records live under ``{prefix}:outbound:``.
        clock: Unix seconds. ``time.time`` (the default) means "the store's clock";
            any other clock (tests) replaces it.
        dead_letter_ttl_sec: How long dead letters are kept.
        retention_sec: How long delivered actions are kept (default: as dead letters).
        max_pending: Most actions waiting at once.
    """

    def __init__(
        self,
        store: Store,
        *,
        prefix: str,
        clock: Callable[[], float],
        dead_letter_ttl_sec: float,
        retention_sec: float | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        self.store = store
        self.queue = DurableQueue(
            store,
            prefix=f"{prefix}:outbound",
            kind="outbound",
            retention_sec=dead_letter_ttl_sec if retention_sec is None else retention_sec,
            dead_retention_sec=dead_letter_ttl_sec,
            max_pending=max_pending,
            clock=None if clock is time.time else clock,
        )
        self._legacy_pending = f"{prefix}:outbox:"
        self._legacy_dead = f"{prefix}:dead:"
        #: Called with each record made pending here (the dispatcher schedules it).
        self.listener: Callable[[OutboxRecord], None] | None = None

    async def atime(self) -> float:
        """The outbox's clock: the store's time (see :meth:`DurableQueue.anow`)."""
        return await self.queue.anow()

    def _added(self, record: OutboxRecord) -> OutboxRecord:
        if self.listener is not None and record.status == "pending":
            self.listener(record)
        return record

    # -- adding --------------------------------------------------------------------------

    async def aadd(
        self,
        action: OutboundWebhookAction,
        *,
        namespace: str = "api",
        lease: tuple[str, float] | None = None,
    ) -> OutboxRecord:
        """Persist ``action``; idempotent per ``(namespace, idempotency_key)``.

        Args:
            action: The action.
            namespace: ``"api"`` (``POST /outbound``, library calls), ``"agent"``
                (agents' messages) or ``"inbound"`` (webhook forwards): a key in one
                namespace never collides with the same key in another.
            lease: ``(owner, seconds)``: add it leased to that dispatcher (see
                :meth:`OutboundDispatcher.lease_at_add`) rather than pending.

        Returns:
            The new record (pending, or leased with ``lease``); or, when the namespace
            already holds this key (in any status, while kept) for the same action,
            that record.

        Raises:
            IdempotencyConflictError: The key names a different action.
            QueueFullError: ``max_pending`` actions are waiting already.
            UsageError: For an unknown namespace.
            StoreError: The store failed (nothing was added).
        """
        record_id, data, leased = _addition(action, namespace, lease)
        for _ in range(3):
            try:
                added = await self.queue.aadd(data, id=record_id, key=action.target, **leased)
            except DuplicateRecordError:
                existing = _view(await self.queue.aget(record_id))
                if existing is None:
                    continue  # purged or expired meanwhile: try again
                if _fingerprint(existing.action.to_dict()) != data["fingerprint"]:
                    raise IdempotencyConflictError(
                        f"idempotency key {action.idempotency_key!r} ({namespace}) already "
                        "names a different action",
                        existing_id=record_id,
                    ) from None
                return existing
            return OutboxRecord.of(added)
        raise IdempotencyConflictError(
            f"idempotency key {action.idempotency_key!r} ({namespace}) is unreadable",
            existing_id=record_id,
        )

    async def anew_record(
        self,
        action: OutboundWebhookAction,
        *,
        namespace: str = "api",
        lease: tuple[str, float] | None = None,
    ) -> Record:
        """The record :meth:`aadd` adds for ``action``, not written: for a caller that
        writes it in an update of its own (see :meth:`DurableQueue.anew_record`).

        Raises:
            UsageError: For an unknown namespace.
        """
        record_id, data, leased = _addition(action, namespace, lease)
        return await self.queue.anew_record(data, id=record_id, key=action.target, **leased)

    # -- reading -------------------------------------------------------------------------

    async def apending_ids(self) -> list[str]:
        """Ids of every pending (or leased) action."""
        return await self.queue.aopen_ids()

    async def apending_count(self) -> int:
        """How many actions wait (pending or leased), over every process sharing the
        store: one read of the queue's counter."""
        return await self.queue.apending_count()

    async def aget_pending(self, record_id: str) -> OutboxRecord | None:
        """The pending (or leased) action, or None."""
        found = _view(await self.queue.aget(record_id))
        return found if found is not None and found.status in ("pending", "leased") else None

    async def apending(self, record_ids: Sequence[str]) -> list[OutboxRecord]:
        """The pending (or leased) actions among ``record_ids``, read 256 per store call.

        Raises:
            UsageError: If ``record_ids`` is not a sequence of record ids.
        """
        found = (_view(record) for record in await self.queue.aget_open(record_ids))
        return [record for record in found if record is not None]

    async def aget(self, record_id: str) -> Record | None:
        """The durable record with this id, in any status (None: unknown or expired)."""
        return await self.queue.aget(record_id)

    async def alist(
        self,
        *,
        status: str | None = None,
        key: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> list[Record]:
        """Durable records, newest first (see :meth:`DurableQueue.alist`); ``key`` is
        the target."""
        return await self.queue.alist(status=status, key=key, since=since, limit=limit)

    async def alist_actions(
        self, *, status: str | None = None, key: str | None = None, limit: int = 100
    ) -> list[OutboxRecord]:
        """Like :meth:`alist`, as :class:`OutboxRecord` views."""
        found = await self.alist(status=status, key=key, limit=limit)
        return await in_pieces(found, _views, _VIEWS_PER_STEP, consume=True)

    async def alist_dead_letters(self) -> list[DeadLetter]:
        """Every readable dead letter, oldest first."""
        # Built and sorted in steps: 20,000 dead letters built at once held the event
        # loop for 250-290 ms.
        numbered = list(enumerate(await self.alist_actions(status="dead", limit=2**62)))
        keyed = await in_pieces(numbered, _dead_letters, _VIEWS_PER_STEP, consume=True)
        return await in_pieces(await sort_yielding(keyed), _unkeyed)

    # -- leases and transitions ----------------------------------------------------------

    async def alease(
        self, record_id: str, owner: str, duration: float
    ) -> OutboxRecord | float | None:
        """Take the lease of a pending action for ``duration`` seconds (store clock).

        Returns:
            The leased record (with a new fencing token); the seconds until it may be
            leased (another owner holds it, or it is not due yet on the store's clock);
            or None when it is gone or unreadable.
        """
        leased = await self.queue.alease_id(record_id, owner, lease_sec=duration)
        if leased is not None:
            return _view(leased)
        found = await self.queue.aget(record_id)
        if found is None or found.status not in ("pending", "leased"):
            return None
        now = await self.queue.anow()
        until = found.lease_until if found.status == "leased" else found.due
        return max(0.001, (until or now) - now)

    async def arelease(self, record: OutboxRecord) -> bool:
        """Give up the lease of ``record`` without counting an attempt.

        Returns:
            False if the lease was no longer ours (nothing changed).
        """
        record = _held(record)
        return await self.queue.arelease(record.id, record.lease_token) is not None

    async def acomplete(self, record: OutboxRecord, attempt: Attempt | None = None) -> bool:
        """The action was delivered: keep it as ``"delivered"`` for the retention period.

        Returns:
            False if the lease was no longer ours (nothing changed).
        """
        record = _held(record)
        return await self.queue.aack(record.id, record.lease_token, attempt=attempt) is not None

    async def areschedule(
        self,
        record: OutboxRecord,
        *,
        delay: float,
        attempt: Attempt,
        counted: bool = True,
    ) -> OutboxRecord | None:
        """Record a failed attempt and make the action due again ``delay`` seconds later.

        Args:
            record: The leased record.
            delay: Seconds until the next attempt.
            attempt: The failed attempt (kept in the history).
            counted: Whether it uses up one of the action's attempts; attempts made
                while the target's circuit was open do not.

        Returns:
            The updated record, or None if the lease was no longer ours (nothing changed).
        """
        record = _held(record)
        if finite_float(delay) is None or delay < 0:
            raise UsageError(f"delay must be a number of seconds >= 0, not {safe_repr(delay)}")
        if not isinstance(attempt, Attempt):
            raise UsageError(f"attempt must be an Attempt, not {type(attempt).__name__}")
        queue = self.queue
        now = await queue.anow()
        key = queue.keys.open(record.id)

        def retry(current: dict[str, Any]) -> tuple[dict[str, Any], Record | None]:
            changes, updated = queue.transitions.retry(
                current, record.id, record.lease_token, now, now + delay, attempt
            )
            if updated is not None and not counted:
                # Recorded, but the budget starts one attempt later: it is not counted.
                updated = dataclasses.replace(updated, budget_from=updated.budget_from + 1)
                changes[key] = WithTTL(updated.to_dict(), None)
            return changes, updated

        return _view(await self.store.aupdate([key], retry))

    async def abury(
        self, record: OutboxRecord, *, reason: str, attempt: Attempt | None = None
    ) -> DeadLetter | None:
        """Move a leased action to the dead letters (kept for ``dead_letter_ttl_sec``).

        Returns:
            The dead letter, or None if the lease was no longer ours (nothing changed).
        """
        record = _held(record)
        dead = _view(await self.queue.abury(record.id, record.lease_token, reason, attempt))
        return DeadLetter.of(dead) if dead is not None else None

    async def areplay(self, record_id: str) -> Record | None:
        """Send a dead or delivered action again: pending, due now, a fresh budget (its
        attempts are kept).

        Returns:
            The pending record, or None if there is no such dead or delivered record.
        """
        record = await self.queue.areplay(record_id)
        view = _view(record)
        if view is not None:
            self._added(view)
        return record

    async def areplay_dead_letter(self, record_id: str) -> OutboxRecord | None:
        """Move a dead letter back to the pending actions with a fresh attempt budget.

        Returns:
            The new pending record, or None if there is no such dead letter.
        """
        found = await self.queue.aget(record_id)
        if found is None or found.status != "dead":
            return None
        return _view(await self.areplay(record_id))

    async def apurge(self, record_id: str) -> Record | None:
        """Delete a record for good, whatever its status.

        Returns:
            The deleted record, or None if there was none.
        """
        return await self.queue.apurge(record_id)

    async def adiscard_dead_letter(self, record_id: str) -> None:
        """Delete a dead letter for good (other statuses are left alone)."""
        found = await self.queue.aget(record_id)
        if found is not None and found.status == "dead":
            await self.queue.apurge(record_id)

    # -- the names before the ``a`` prefix (deprecated) ----------------------------------

    add = _renamed("add", "aadd")
    pending_ids = _renamed("pending_ids", "apending_ids")
    get = _renamed("get", "aget_pending")
    pending = _renamed("pending", "apending")
    dead_letters = _renamed("dead_letters", "alist_dead_letters")
    lease = _renamed("lease", "alease")
    release = _renamed("release", "arelease")
    complete = _renamed("complete", "acomplete")
    reschedule = _renamed("reschedule", "areschedule")
    bury = _renamed("bury", "abury")
    replay = _renamed("replay", "areplay_dead_letter")
    discard = _renamed("discard", "adiscard_dead_letter")

    # -- upgrade -------------------------------------------------------------------------

    async def amigrate(self) -> int:
        """Move actions stored by converge before the durable queue into it.

        Earlier versions kept pending actions under ``{prefix}:outbox:{id}`` and dead
        letters under ``{prefix}:dead:{id}``; each becomes a record with the same id.
        A single open-record counter of theirs is replaced by the sharded counters
        (:meth:`DurableQueue.aupgrade_counts`). Idempotent; the dispatcher runs it when
        it starts.

        Returns:
            How many actions were moved.
        """
        moved = 0
        for prefix, dead in ((self._legacy_pending, False), (self._legacy_dead, True)):
            for name in await self.store.alist(prefix):
                record_id = name[len(prefix) :]
                if ":" in record_id:
                    continue  # another layout's key
                data = await self.store.aget(name)
                action = data.get("action") if isinstance(data, Mapping) else None
                try:
                    parsed = _stored_action(action)
                except UsageError:
                    continue
                stored = parsed.to_dict()
                body = {"action": stored, "namespace": "api", "fingerprint": _fingerprint(stored)}
                try:
                    added = await self.queue.aadd(body, id=record_id, key=parsed.target)
                except DuplicateRecordError:
                    added = None
                if added is not None and dead:
                    leased = await self.queue.alease_id(record_id, "migration", lease_sec=60)
                    if leased is not None:
                        reason = data.get("reason") if isinstance(data, Mapping) else None
                        await self.queue.abury(
                            record_id, leased.lease_token, str(reason or "dead letter")
                        )
                await self.store.adelete(name)
                moved += added is not None
        await self.queue.aupgrade_counts()
        return moved
