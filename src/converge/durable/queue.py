"""DurableQueue: the async driver of the durable queue over any :class:`Store`."""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, TypeVar

import anyio.lowlevel

from converge._expiring import ExpiringIds
from converge._numbers import check_int, finite_float, positive_float
from converge._pacing import Spread, check_spread
from converge._repr import safe_repr
from converge._sorting import in_pieces, sort_yielding
from converge.core.store import Store, UpdateFn
from converge.durable.core import (
    Listed,
    QueueKeys,
    Stamp,
    Transitions,
    cutoff,
    delete_unchanged,
    finished_stamp,
    finished_stamps,
    leasable_keys,
    listed,
    open_count,
    read_record,
    read_values,
    split_at,
)
from converge.durable.records import STATUSES as _STATUSES
from converge.durable.records import Attempt, Record
from converge.errors import (
    ConfigurationError,
    DuplicateRecordError,
    QueueFullError,
    UsageError,
)

__all__ = ["DurableQueue"]

R = TypeVar("R")

_ID_RE = re.compile(r"[A-Za-z0-9_.:\-]{1,200}")
_KIND_RE = re.compile(r"[a-z][a-z0-9_\-]{0,31}")
# How often the offset between this host's clock and the store's clock is refreshed.
_CLOCK_REFRESH_SEC = 30.0
# Keys per store call when a listing or a trim reads (or deletes) many records: one
# call per record cost a thread hop each on SQLite (10,000 records: 4 s), and a
# MemoryStore never yields on its own, so the loop is given back between calls.
_BATCH = 256
# Keys per store update when a trim deletes. Each delete rewrites index pages all over
# the file (record ids are digests): on SQLite an update of 256 held the write lock long
# enough to triple the gateway's p99 under sustained load (46-56 ms, 18-34 ms with 64).
_DELETE_BATCH = 64
# Leases taken one update each between two turns of the event loop (a store that works
# inline, a MemoryStore, never yields by itself).
_LEASE_STEP = 32
# Records a listing reads again (in reads of _BATCH) per window of its sorted listing.
_WINDOW = 2_048
# Batches of stamps a trim picks from between checkpoints: 2,048 stamps. The stamps a
# trim knows are built then (a tuple each), and a young collection lands in some step:
# with 8,192 a step, a trim of 40,000 held the loop up to 17 ms; with 2,048, 4 ms.
_PARTS_PER_STEP = 8


async def _store_time(store: Store) -> float | None:
    """The store's clock (``Store.atime``), or None for a store object without one."""
    atime = getattr(store, "atime", None)
    return None if atime is None else float(await atime())


def _positive(name: str, value: object) -> float:
    seconds = positive_float(value)
    if seconds is None:
        raise ConfigurationError(f"{name} must be a positive finite number of seconds")
    return seconds


def _time(name: str, value: object) -> float:
    seconds = finite_float(value)
    if seconds is None:
        raise UsageError(f"{name} must be a Unix time in seconds, not {safe_repr(value)}")
    return seconds


def _newer(record: Record, than: Record) -> bool:
    """Whether ``record`` sorts before ``than`` in a listing (newest first)."""
    return (record.created, record.id) > (than.created, than.id)


def _check_id(record_id: object) -> str:
    if not isinstance(record_id, str) or not _ID_RE.fullmatch(record_id):
        raise UsageError("a record id is 1-200 letters, digits, '_', '.', ':' or '-'")
    return record_id


def _check_token(token: object) -> int:
    if isinstance(token, bool) or not isinstance(token, int):
        raise UsageError("a lease token is the int lease_token of a leased Record")
    return token


class DurableQueue:
    """A queue of :class:`Record` items kept in a :class:`Store`, with leases.

    Every state change (add, lease, extend, release, retry, acknowledge, bury, replay,
    purge) is one atomic :meth:`Store.aupdate`, computed by the sans-I/O
    :class:`~converge.durable.core.Transitions`; every change made by a lease holder
    names the lease's fencing token and is refused once another holder took the record
    over. Done records (acknowledged or delivered) and dead letters are written with a
    TTL, so the store sweeps them; the number of open records is kept in a counter
    written by the same transactions, so :meth:`apending_count` and the
    ``max_pending`` bound cost one read, not a scan.

    Lease times come from the store's clock (``Store.atime``; Redis ``TIME`` for
    replicas on several hosts), read once every 30 s and applied as an offset to this
    host's clock; pass ``clock`` to use your own instead (tests).

    The guarantee is at-least-once: a record stays open until its consumer
    acknowledges it; a lease that runs out makes it available again (same id, same
    data). With a ``MemoryStore`` nothing survives the process.

    Args:
        store: Where the records live.
        prefix: Key prefix of this queue (distinct per queue).
        kind: What it holds (``"inbound"``, ``"outbound"``, ...).
        retention_sec: How long done records are kept.
        max_pending: Most open records at once; :meth:`aadd` beyond it raises
            :class:`~converge.errors.QueueFullError`.
        clock: Unix seconds; None uses the store's clock.
        dead_retention_sec: How long dead letters are kept (``retention_sec`` if None).
        done_status: Status of acknowledged records: ``"delivered"`` for the
            ``"outbound"`` kind, else ``"acknowledged"``, unless given.

    Raises:
        ConfigurationError: For invalid arguments.
    """

    def __init__(
        self,
        store: Store,
        *,
        prefix: str,
        kind: str,
        retention_sec: float = 7 * 24 * 3600.0,
        max_pending: int = 10_000,
        clock: Callable[[], float] | None = None,
        dead_retention_sec: float | None = None,
        done_status: str | None = None,
    ) -> None:
        if not isinstance(store, Store):
            raise ConfigurationError("store must be a converge Store")
        if not isinstance(prefix, str) or not prefix:
            raise ConfigurationError("prefix must be a non-empty string")
        if not isinstance(kind, str) or not _KIND_RE.fullmatch(kind):
            raise ConfigurationError("kind must be a short lower-case word like 'inbound'")
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ConfigurationError("max_pending must be an integer >= 1")
        if clock is not None and not callable(clock):
            raise ConfigurationError("clock must be a callable returning Unix seconds")
        if done_status is None:
            done_status = "delivered" if kind == "outbound" else "acknowledged"
        if done_status not in ("acknowledged", "delivered"):
            raise ConfigurationError("done_status must be 'acknowledged' or 'delivered'")
        retention = _positive("retention_sec", retention_sec)
        dead = (
            retention
            if dead_retention_sec is None
            else _positive("dead_retention_sec", dead_retention_sec)
        )
        self.store = store
        self.kind = kind
        self.keys = QueueKeys(prefix)
        self.max_pending = max_pending
        self.transitions = Transitions(self.keys, retention, dead, max_pending, done_status)
        self._clock = clock
        self._offset = 0.0
        self._offset_at = -_CLOCK_REFRESH_SEC
        # Open records a lease poll read that no lease may take before a known time
        # (leased until then, by anyone, or due then). Later polls skip them until then:
        # another replica's 5,000 held events were read again at every poll.
        self._not_before = ExpiringIds()
        self._made_due = 0  # records this queue made leasable sooner (see _forget)
        # The stamps of the finished records the last trim read, and (once trims run)
        # of those this queue finished since, by store key: a trim reads only the
        # records it has not seen. Reading every finished record at every trim cost
        # about 0.4 s of CPU per trim on SQLite with 10,000 kept. Kept as each one's
        # ``updated`` time (the id is in the key): a dict of floats is out of the
        # collector's reach, where a stamp tuple per event stayed tracked while a
        # trim's frees held young collections off, and the first one after the trim
        # walked up to 20,000 of them (7-25 ms in a memory gateway).
        self._stamps: dict[str, float] = {}
        self._trimmed = False  # a trim ran: remember the stamps of records finished here

    # -- time and ids ------------------------------------------------------------------

    async def anow(self) -> float:
        """The queue's current time: the store's clock in Unix seconds (or ``clock``)."""
        if self._clock is not None:
            return float(self._clock())
        local = time.time()
        if local - self._offset_at >= _CLOCK_REFRESH_SEC or local < self._offset_at:
            remote = await _store_time(self.store)
            after = time.time()
            self._offset = 0.0 if remote is None else remote - (local + after) / 2
            self._offset_at = local = after
        return local + self._offset

    @staticmethod
    def new_id(now: float | None = None) -> str:
        """A fresh record id: time-ordered (so listings sort by age), then random."""
        stamp = int((time.time() if now is None else _time("now", now)) * 1_000_000)
        return f"{stamp:014x}{os.urandom(6).hex()}"

    # -- adding ------------------------------------------------------------------------

    async def anew_record(
        self,
        data: Mapping[str, Any],
        *,
        id: str | None = None,
        key: str = "",
        status: str = "pending",
        lease_owner: str | None = None,
        lease_sec: float | None = None,
        due: float | None = None,
    ) -> Record:
        """The record :meth:`aadd` adds with these arguments, checked and stamped with the
        store's time but not written: for a caller that writes it in an update of its own
        (beside another queue's record, say) with :attr:`transitions`.

        Raises:
            UsageError: For invalid arguments.
        """
        if not isinstance(data, Mapping):
            raise UsageError("record data must be a JSON object (a mapping)")
        if status not in _STATUSES or status == "dead":
            raise UsageError(f"a record is added pending, leased or done, not {status!r}")
        if not isinstance(key, str):
            raise UsageError("key must be a string")
        now = await self.anow()
        record_id = _check_id(id) if id is not None else self.new_id(now)
        token, until, owner = 0, None, None
        if status == "leased":
            if not isinstance(lease_owner, str) or not lease_owner:
                raise UsageError("a leased record needs its lease_owner")
            until = now + _positive("lease_sec", lease_sec)
            token, owner = 1, lease_owner
        return Record(
            id=record_id,
            kind=self.kind,
            status=status,
            key=key,
            data=dict(data),
            created=now,
            updated=now,
            due=now if due is None else _time("due", due),
            lease_owner=owner,
            lease_token=token,
            lease_until=until,
        )

    async def aadd(
        self,
        data: Mapping[str, Any],
        *,
        id: str | None = None,
        key: str = "",
        status: str = "pending",
        lease_owner: str | None = None,
        lease_sec: float | None = None,
        due: float | None = None,
        claims: Mapping[str, Any] | None = None,
        claim_ttl: float | None = None,
    ) -> Record:
        """Add a record, atomically with ``claims`` (e.g. an inbound event's replay claim).

        Args:
            data: The item, a JSON object.
            id: The record id; a fresh time-ordered one if None.
            key: What the record belongs to (provider, target, ...).
            status: ``"pending"``; ``"leased"`` to hand it to ``lease_owner`` at once
                (no separate lease write); or a done status to record an item its
                consumer already handled (kept for the retention, never counted).
            lease_owner: The holder, with ``status="leased"``.
            lease_sec: Lease length, with ``status="leased"``.
            due: When a pending record may first be leased (now if None).
            claims: Extra keys written in the same transaction; if any exists already
                the add is a duplicate.
            claim_ttl: TTL of the ``claims`` keys (None: no expiry).

        Returns:
            The stored record (``lease_token`` is the token to acknowledge it with).

        Raises:
            DuplicateRecordError: A claim key or the record id exists: nothing written.
            QueueFullError: ``max_pending`` records are open: nothing written.
            UsageError: For invalid arguments.
            StoreError: The store failed (nothing was added).
        """
        record = await self.anew_record(
            data,
            id=id,
            key=key,
            status=status,
            lease_owner=lease_owner,
            lease_sec=lease_sec,
            due=due,
        )
        if claims is not None and not isinstance(claims, Mapping):
            raise UsageError("claims must be a mapping of store keys to values")
        claims = dict(claims or {})
        transitions = self.transitions

        def add(current: dict[str, Any]) -> tuple[dict[str, Any], str]:
            return transitions.add(current, record, claims, claim_ttl)

        outcome = await self.store.aupdate(transitions.add_keys(record, claims), add)
        if outcome == "duplicate":
            raise DuplicateRecordError(f"record {record.id!r} or one of its claims exists")
        if outcome == "full":
            raise QueueFullError(
                f"the {self.kind} queue holds {self.max_pending} open records (max_pending)"
            )
        if id is not None:  # an id purged and added again: polls read it again
            self._not_before.forget(id)
        self.note_finished(record)
        return record

    # -- leases ------------------------------------------------------------------------

    async def alease(
        self,
        owner: str,
        *,
        lease_sec: float = 30.0,
        limit: int = 1,
        key: str | None = None,
        exclude: Collection[str] = (),
    ) -> list[Record]:
        """Lease up to ``limit`` records that are due (or whose lease ran out).

        Scans the open records (not the retained ones), oldest id first; each lease is
        one atomic update with a new fencing token. A record read leased until later
        (by anyone) or due later is not read again by this queue's polls before then,
        unless this queue itself releases, retries or replays it: another process's
        early release is seen when its lease would have ended.

        Args:
            owner: Who takes the leases.
            lease_sec: Lease length.
            limit: Most records to lease.
            key: Only records of this key (provider, target).
            exclude: Ids to skip (e.g. those the caller holds already).

        Returns:
            The leased records (possibly none).
        """
        if not isinstance(owner, str) or not owner:
            raise UsageError("owner must be a non-empty string")
        seconds = _positive("lease_sec", lease_sec)
        check_int("limit", limit, 1)
        if not isinstance(exclude, Collection) or isinstance(exclude, str | bytes):
            raise UsageError("exclude must be a collection of record ids")
        prefix = self.keys.open_prefix
        now = await self.anow()
        waiting = self._not_before
        waiting.expire(now)
        cut = len(prefix)

        def worth_reading(keys: list[str]) -> list[str]:
            return [k for k in keys if (i := k[cut:]) not in exclude and i not in waiting]

        # In steps: the open records of a raised max_pending (100,000) took 20-40 ms.
        names = await in_pieces(await self.store.alist(prefix), worth_reading)
        due = leasable_keys(now, key)
        leased: list[Record] = []
        for start in range(0, len(names), _BATCH):
            # A plain read of 256 records first: only those worth leasing cost a write.
            made_due = self._made_due
            found, later = await self.store.aupdate(names[start : start + _BATCH], due)
            if self._made_due == made_due:  # else ``later`` may predate a release here
                for store_key, when in later.items():
                    waiting.note(store_key[cut:], when)
            for n, store_key in enumerate(found, 1):
                record = await self._lease(store_key[cut:], owner, now, now + seconds)
                if record is not None:
                    leased.append(record)
                    if len(leased) >= limit:
                        return leased
                if n % _LEASE_STEP == 0:  # 256 leases in a row held the loop for 30 ms
                    await anyio.lowlevel.checkpoint()
            await anyio.lowlevel.checkpoint()
        return leased

    def _forget(self, record_id: str) -> None:
        """``record_id`` was just made leasable sooner than a lease poll may have noted
        (released, retried, replayed): polls read it again."""
        self._not_before.forget(record_id)
        self._made_due += 1

    async def alease_id(
        self, record_id: str, owner: str, *, lease_sec: float = 30.0
    ) -> Record | None:
        """Lease one record by id (None if it is not open, not due, or held by another)."""
        _check_id(record_id)
        if not isinstance(owner, str) or not owner:
            raise UsageError("owner must be a non-empty string")
        now = await self.anow()
        return await self._lease(record_id, owner, now, now + _positive("lease_sec", lease_sec))

    async def _lease(self, record_id: str, owner: str, now: float, until: float) -> Record | None:
        transitions = self.transitions

        def lease(current: dict[str, Any]) -> tuple[dict[str, Any], Record | None]:
            return transitions.lease(current, record_id, owner, now, until)

        return await self.store.aupdate([self.keys.open(record_id)], lease)

    async def aextend(self, record_id: str, token: int, *, lease_sec: float) -> Record | None:
        """Extend a held lease to ``lease_sec`` from now (None if the token is stale)."""
        _check_id(record_id)
        _check_token(token)
        now = await self.anow()
        until = now + _positive("lease_sec", lease_sec)
        transitions = self.transitions

        def extend(current: dict[str, Any]) -> tuple[dict[str, Any], Record | None]:
            return transitions.extend(current, record_id, token, now, until)

        return await self.store.aupdate([self.keys.open(record_id)], extend)

    async def arelease(
        self, record_id: str, token: int, *, due: float | None = None
    ) -> Record | None:
        """Give a held record back, pending from ``due`` (now), counting no attempt."""
        return await self.aretry(record_id, token, due, None)

    async def aretry(
        self, record_id: str, token: int, due: float | None, attempt: Attempt | None
    ) -> Record | None:
        """Record a failed ``attempt`` and make the held record pending again at ``due``.

        Returns:
            The updated record, or None if ``token`` no longer holds it.
        """
        _check_id(record_id)
        _check_token(token)
        if attempt is not None and not isinstance(attempt, Attempt):
            raise UsageError("attempt must be an Attempt or None")
        now = await self.anow()
        when = now if due is None else _time("due", due)
        transitions = self.transitions

        def retry(current: dict[str, Any]) -> tuple[dict[str, Any], Record | None]:
            return transitions.retry(current, record_id, token, now, when, attempt)

        record = await self.store.aupdate([self.keys.open(record_id)], retry)
        if record is not None:
            self._forget(record_id)
        return record

    # -- finishing ---------------------------------------------------------------------

    async def aack(
        self, record_id: str, token: int, *, attempt: Attempt | None = None
    ) -> Record | None:
        """The consumer is done with a held record: it becomes acknowledged/delivered.

        It is kept (for the event log) for ``retention_sec``, then swept by the store.

        Returns:
            The done record, or None if ``token`` no longer holds it (another holder
            took it over after the lease ran out, or it was purged).
        """
        _check_id(record_id)
        _check_token(token)
        now = await self.anow()
        transitions = self.transitions

        def ack(current: dict[str, Any]) -> tuple[dict[str, Any], Record | None]:
            return transitions.ack(current, record_id, token, now, attempt)

        return self.note_finished(await self.store.aupdate(transitions.close_keys(record_id), ack))

    async def abury(
        self, record_id: str, token: int, reason: str, attempt: Attempt | None = None
    ) -> Record | None:
        """Give up on a held record: it becomes a dead letter (kept, replayable).

        Returns:
            The dead record, or None if ``token`` no longer holds it.
        """
        _check_id(record_id)
        _check_token(token)
        if not isinstance(reason, str) or not reason:
            raise UsageError("reason must be a non-empty string")
        now = await self.anow()
        transitions = self.transitions

        def bury(current: dict[str, Any]) -> tuple[dict[str, Any], Record | None]:
            return transitions.bury(current, record_id, token, now, reason, attempt)

        return self.note_finished(await self.store.aupdate(transitions.close_keys(record_id), bury))

    async def areplay(self, record_id: str) -> Record | None:
        """Make a dead or done record pending again (due now, a fresh attempt budget).

        Returns:
            The pending record, or None if there is no such done or dead record.
        """
        _check_id(record_id)
        now = await self.anow()
        transitions = self.transitions

        def replay(current: dict[str, Any]) -> tuple[dict[str, Any], Record | None]:
            return transitions.replay(current, record_id, now)

        record = await self.store.aupdate(transitions.close_keys(record_id), replay)
        if record is not None:
            self._forget(record_id)
        return record

    async def apurge(self, record_id: str) -> Record | None:
        """Delete a record for good, whatever its status.

        Returns:
            The deleted record, or None if there was none.
        """
        _check_id(record_id)
        transitions = self.transitions

        def purge(current: dict[str, Any]) -> tuple[dict[str, Any], Record | None]:
            return transitions.purge(current, record_id)

        return await self.store.aupdate(transitions.close_keys(record_id), purge)

    # -- reading -----------------------------------------------------------------------

    async def aget(self, record_id: str) -> Record | None:
        """The record with this id, wherever it is (None if absent or unreadable)."""
        _check_id(record_id)
        for store_key in self.keys.all(record_id):
            record = read_record(await self.store.aget(store_key))
            if record is not None:
                return record
        return None

    async def aget_open(self, ids: Sequence[str]) -> list[Record]:
        """The open (pending or leased) records among ``ids``, read 256 per store call;
        an id with no open record is left out.

        Raises:
            UsageError: If ``ids`` is not a sequence of record ids.
        """
        if isinstance(ids, str) or not isinstance(ids, Sequence):
            raise UsageError("ids must be a list of record ids")
        names = [self.keys.open(_check_id(record_id)) for record_id in ids]
        return [
            record
            for values in await self._in_batches(names, read_values)
            for value in values.values()
            if (record := read_record(value)) is not None
        ]

    async def alist(
        self,
        *,
        status: str | None = None,
        key: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> list[Record]:
        """Records, newest first, filtered by status, key and creation time.

        This reads every record of the phases asked for (256 per store call, building
        only the records it returns): it is for operators (event log, CLI, admin API),
        not for a per-request path.

        Args:
            status: Only this status (one of :data:`~converge.durable.STATUSES`).
            key: Only records of this key (provider, target).
            since: Only records created at or after this Unix time.
            limit: Most records returned.
        """
        check_int("limit", limit, 1)
        # Sorted in steps: heapq.nlargest over 100,000 records listed oldest first
        # (time-ordered ids) held the event loop for 70-95 ms.
        found = await sort_yielding(await self._listed(status, key, since))
        # Read the newest again, in full: one that changed meanwhile so that it no longer
        # matches (or was moved to another phase's key) gives its place to the next.
        records: list[Record] = []
        ordered = True  # newest first as read; else (one re-added meanwhile) sorted
        while len(records) < limit and found:
            # A window of the newest at a time, dropped from the listing as it is taken
            # (freeing 20,000 entries at once held the loop for 5-15 ms).
            start = max(len(found) - min(limit - len(records), _WINDOW), 0)
            names = [store_key for _, _, store_key in reversed(found[start:])]
            del found[start:]
            for values in await self._in_batches(names, read_values):
                for _, _, store_key in listed(values, status, key, since):
                    record = read_record(values[store_key])
                    if record is not None:
                        if records and _newer(record, records[-1]):
                            ordered = False
                        records.append(record)
                # Building 10,000 records at once held the event loop for 100 ms.
                await anyio.lowlevel.checkpoint()
        if not ordered:
            records.sort(key=lambda r: (r.created, r.id), reverse=True)
        return records  # never more than limit: each window takes what is missing

    async def alisted(
        self, *, status: str | None = None, key: str | None = None, since: float | None = None
    ) -> list[tuple[float, str]]:
        """``(created, id)`` of every record :meth:`alist` would list, newest first,
        without building the records (a bulk replay of 10,000 needs their ids only)."""
        found = await sort_yielding(await self._listed(status, key, since))
        found.reverse()
        return await in_pieces(found, lambda part: [(when, rid) for when, rid, _ in part])

    async def _listed(
        self, status: str | None, key: str | None, since: float | None
    ) -> list[Listed]:
        """The records of the phases ``status`` asks for that match the filters (every
        record of those phases is read, 256 per store call, and none is built)."""
        if status is not None and status not in _STATUSES:
            raise UsageError(f"status must be one of {_STATUSES}")
        if since is not None:
            since = _time("since", since)
        prefixes = {
            None: (self.keys.open_prefix, self.keys.done_prefix, self.keys.dead_prefix),
            "pending": (self.keys.open_prefix,),
            "leased": (self.keys.open_prefix,),
            "acknowledged": (self.keys.done_prefix,),
            "delivered": (self.keys.done_prefix,),
            "dead": (self.keys.dead_prefix,),
        }[status]

        def matching(current: dict[str, Any]) -> tuple[dict[str, Any], list[Listed]]:
            return {}, listed(current, status, key, since)

        found: list[Listed] = []
        for prefix in prefixes:
            for part in await self._in_batches(await self.store.alist(prefix), matching):
                found.extend(part)
        return found

    async def aopen_ids(self) -> list[str]:
        """Ids of every open (pending or leased) record, oldest id first."""
        prefix = self.keys.open_prefix
        cut = len(prefix)
        keys = await self.store.alist(prefix)
        return await in_pieces(keys, lambda part: [k[cut:] for k in part])

    def note_finished(self, record: Record | None) -> Record | None:
        """Note that ``record``, written by this process, is stored as it is now.

        If it is finished (done or dead) and trims run on this queue, its stamp is
        remembered, so the next trim need not read it. The queue's own methods call
        this; call it after an update of your own that stored a record finished
        (built with :meth:`anew_record` and :attr:`transitions`). A stamp that has gone
        stale (the record was changed since, elsewhere) only costs a read: a trim
        deletes nothing that is not still as stamped.

        Returns:
            ``record``, unchanged.
        """
        if record is not None and not isinstance(record, Record):
            raise UsageError(f"record must be a Record or None, not {type(record).__name__}")
        if record is not None and self._trimmed:
            stamp = finished_stamp(self.keys, record)
            if stamp is not None:
                self._stamps[stamp[2]] = stamp[0]
        return record

    async def atrim_finished(self, keep: int, *, spread_sec: float = 0.0) -> int:
        """Delete the oldest finished records (done and dead) beyond the newest ``keep``.

        Newest means latest ``updated``, then greatest id. Within ``keep`` this costs two
        key listings. Beyond it, the finished records this queue has not read at an
        earlier trim are read, except those it finished itself since a trim first ran
        (:meth:`note_finished`): a trim that runs now and then reads only the records
        others finished since the last one. The queue keeps one stamp per finished
        record, its ``updated`` time: about 60 bytes (210 as the tuple it was). Then the
        oldest are deleted, 64 keys per store update (an update of more held a SQLite
        store's write lock for long enough to show in the gateway's p99), with a
        checkpoint between updates: trimming 100,000 records takes about 1,600 store
        calls, not one per record, and does not hold the event loop. A record replayed or
        finished again since it was stamped is left alone, and read again at the next
        trim.

        Args:
            keep: How many finished records to keep.
            spread_sec: Spread the deletes over about this many seconds, the store updates
                evenly spaced (none waits when they run late): a trim beside live
                traffic then slows no stretch of it. 0 (the default) deletes at full
                speed.

        Returns:
            How many records were deleted.
        """
        check_int("keep", keep, 0)
        spread = check_spread(spread_sec)
        self._trimmed = True
        finished = await self._finished_keys()
        if len(finished) <= keep:
            if len(self._stamps) > 2 * len(finished) + _BATCH:  # expired or purged since
                known = self._stamps
                self._stamps = {key: known[key] for key in finished if key in known}
            return 0
        parts = await self._stamp_parts(finished)
        del finished
        count = sum(map(len, parts)) - keep  # unreadable records were not stamped
        if count <= 0:
            return 0
        victims = await _oldest(parts, count)
        # Free the stamps as they are done with: freeing 130,000 at once, when the trim
        # returned, held the loop for 20-25 ms.
        del parts
        await anyio.lowlevel.checkpoint()
        stamps = self._stamps
        deleted = 0
        pace = Spread(len(victims), _DELETE_BATCH, spread)
        while victims:  # each update checks its own batch
            batch = victims[-_DELETE_BATCH:]
            del victims[-_DELETE_BATCH:]
            names = [store_key for _, _, store_key in batch]
            deleted += await self.store.aupdate(names, delete_unchanged(batch))
            for name in names:  # deleted, or changed since read: not to be reused
                stamps.pop(name, None)
            await pace.step()
        return deleted

    async def _stamp_parts(self, finished: list[str]) -> list[list[Stamp]]:
        """The stamps of the records ``finished`` names (store keys), in parts of up to
        256: those an earlier trim read, then those read now. Becomes the stamps this
        queue remembers (the keys no longer listed are forgotten)."""
        known = self._stamps
        stamps: dict[str, float] = {}
        self._stamps = stamps
        parts: list[list[Stamp]] = []
        unread: list[str] = []
        for n, start in enumerate(range(0, len(finished), _BATCH), 1):
            part = []
            for store_key in finished[start : start + _BATCH]:
                updated = known.get(store_key)
                if updated is None:
                    unread.append(store_key)
                else:
                    part.append((updated, self.keys.finished_id(store_key), store_key))
                    stamps[store_key] = updated
            if part:
                parts.append(part)
            if n % _PARTS_PER_STEP == 0:
                await anyio.lowlevel.checkpoint()
        del known
        for n, part in enumerate(await self._in_batches(unread, finished_stamps), 1):
            parts.append(part)
            stamps.update((stamp[2], stamp[0]) for stamp in part)
            if n % _PARTS_PER_STEP == 0:  # 100,000 read at once: 20-35 ms
                await anyio.lowlevel.checkpoint()
        return parts

    async def _in_batches(self, keys: list[str], fn: UpdateFn[R]) -> list[R]:
        """``fn`` over ``keys`` in store updates of 256 keys, the loop given back between
        them (a store that works inline never yields): the result of each update."""
        results = []
        for start in range(0, len(keys), _BATCH):
            results.append(await self.store.aupdate(keys[start : start + _BATCH], fn))
            await anyio.lowlevel.checkpoint()
        return results

    async def afinished_count(self) -> int:
        """How many records are done or dead: one key listing each, no record read."""
        return len(await self._finished_keys())

    async def _finished_keys(self) -> list[str]:
        """The store keys of the done and dead records: one key listing each."""
        done = await self.store.alist(self.keys.done_prefix)
        return done + await self.store.alist(self.keys.dead_prefix)

    async def apending_count(self) -> int:
        """How many records are open (pending or leased): one read of the counters."""
        counters = [self.keys.count, *self.keys.counts]
        return open_count(await self.store.aupdate(counters, read_values))

    async def arecount(self) -> int:
        """Recount the open records by listing them and repair the counters (O(open)).

        The counters are exact while every change goes through this class; run this
        after keys were deleted by hand, or after a crash on a store whose multi-key
        updates a crash can tear (FileStore). Changes that this or other processes make
        while it lists are not counted: run it while the queue is quiet.
        """
        open_ids = await self.aopen_ids()
        count_of = self.keys.count_of
        # Hashed in steps: 100,000 open records (a raised max_pending) took 50 ms.
        counters = await in_pieces(open_ids, lambda part: [count_of(i) for i in part])
        changes = self.transitions.set_counts(Counter(counters))

        def fix(current: dict[str, Any]) -> tuple[dict[str, Any], int]:
            return changes, len(open_ids)

        return await self.store.aupdate(list(changes), fix)

    async def aupgrade_counts(self) -> int | None:
        """Fold an earlier version's single counter into the 16 (:meth:`arecount`), if
        it is still there; otherwise read that one key and change nothing.

        The inbox pump and the dispatcher run this at start. They do not recount
        otherwise: a recount misses what other writers change while it lists, and a
        replica starts while its own server and the other replicas accept events.

        Returns:
            The open records counted, or None when there was nothing to fold in.
        """
        if await self.store.aget(self.keys.count) is None:
            return None
        return await self.arecount()


async def _oldest(parts: list[list[Stamp]], count: int) -> list[Stamp]:
    """The ``count`` oldest stamps of ``parts`` (the reads of a trim), picked by their
    times only, in steps that give the loop back (one pass over 130,000 stamps held it
    for 20-30 ms)."""
    times: list[float] = []
    for n, part in enumerate(parts, 1):
        times += [stamp[0] for stamp in part]
        if n % _PARTS_PER_STEP == 0:
            await anyio.lowlevel.checkpoint()
    time, tied = cutoff(await sort_yielding(times), count)
    victims: list[Stamp] = []
    ties: list[Stamp] = []
    for n, part in enumerate(parts, 1):
        older, at_time = split_at(part, time)
        victims += older
        ties += at_time
        if n % _PARTS_PER_STEP == 0:
            await anyio.lowlevel.checkpoint()
    return victims + sorted(ties)[:tied]
