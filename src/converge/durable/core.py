"""The sans-I/O core of a durable queue: key layout and state transitions.

Each transition is a pure function ``(current, ...) -> (changes, result)`` in the shape
of a :meth:`~converge.core.store.Store.aupdate` function: it reads the values of the
keys it names, takes ``now`` as an argument, and never touches a store or a clock. The
driver (:class:`~converge.durable.queue.DurableQueue`) runs each one as a single atomic
store update, so every state change is all-or-nothing and checked against the record's
fencing token inside the same transaction.

Records live under three key prefixes, one per phase, so that scanning for work never
reads the retained history::

    {prefix}:open:{id}    pending or leased (no TTL: kept until its consumer is done)
    {prefix}:done:{id}    acknowledged or delivered (TTL = retention: the store sweeps it)
    {prefix}:dead:{id}    dead letters (TTL = dead-letter retention)
    {prefix}:count:{n}    how many open records shard n holds (kept in the same
                          transactions; n = the record id's CRC-32 mod 16)
    {prefix}:count        the single counter of earlier versions (folded in by a recount)

One counter for the whole queue made every add and every close of every replica touch
the same key: on Redis, a replica's updates queued behind each other and the replicas'
compare-and-sets failed each other, so forwarding did not scale with replicas. Each
record is counted in one of 16 shards instead.
"""

from __future__ import annotations

import dataclasses
import zlib
from bisect import bisect_left
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from converge._numbers import finite_float
from converge.core.store import WithTTL
from converge.durable.records import DONE_STATUSES as _DONE
from converge.durable.records import MAX_ATTEMPTS_KEPT as _KEPT
from converge.durable.records import OPEN_STATUSES as _OPEN
from converge.durable.records import Attempt, Record, clip_error
from converge.errors import FormatError, UsageError

__all__ = [
    "COUNT_SHARDS",
    "Changes",
    "Listed",
    "QueueKeys",
    "Stamp",
    "Transitions",
    "cutoff",
    "delete_unchanged",
    "finished_stamp",
    "finished_stamps",
    "leasable_keys",
    "listed",
    "open_count",
    "read_record",
    "read_values",
    "split_at",
]

#: The ``changes`` half of an update function's return value.
Changes = dict[str, Any]

#: Open-record counters per queue (a record's is its id's CRC-32 modulo this).
COUNT_SHARDS = 16
# Below this ``max_pending`` an add reads every counter and checks the exact total;
# above it, only its own counter, against its share (``max_pending // COUNT_SHARDS``).
_EXACT_BELOW = COUNT_SHARDS * 256


@dataclass(frozen=True, slots=True)
class QueueKeys:
    """Where a queue's records live in the store.

    Attributes:
        prefix: The queue's key prefix.
        count: Key of the single open-record counter of earlier versions.
        counts: Keys of the open-record counters (see :meth:`count_of`).
        open_prefix: Prefix of the open (pending or leased) records.
        done_prefix: Prefix of the acknowledged or delivered records.
        dead_prefix: Prefix of the dead letters.
    """

    prefix: str
    # Derived once: every transition names several keys.
    count: str = field(init=False)
    counts: tuple[str, ...] = field(init=False)
    open_prefix: str = field(init=False)
    done_prefix: str = field(init=False)
    dead_prefix: str = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, str):
            raise UsageError(f"prefix must be a str, not {type(self.prefix).__name__}")
        for name in ("open", "done", "dead"):
            object.__setattr__(self, f"{name}_prefix", f"{self.prefix}:{name}:")
        object.__setattr__(self, "count", f"{self.prefix}:count")
        shards = tuple(f"{self.prefix}:count:{n:x}" for n in range(COUNT_SHARDS))
        object.__setattr__(self, "counts", shards)

    def count_of(self, record_id: str) -> str:
        """Key of the counter that counts ``record_id`` while it is open."""
        return self.counts[zlib.crc32(record_id.encode()) % COUNT_SHARDS]

    def open(self, record_id: str) -> str:
        """Key of an open record."""
        return self.open_prefix + record_id

    def done(self, record_id: str) -> str:
        """Key of a done record."""
        return self.done_prefix + record_id

    def dead(self, record_id: str) -> str:
        """Key of a dead letter."""
        return self.dead_prefix + record_id

    def all(self, record_id: str) -> tuple[str, str, str]:
        """The three keys a record may live under: open, done, dead."""
        return self.open(record_id), self.done(record_id), self.dead(record_id)

    def finished_id(self, store_key: str) -> str:
        """The record id in the key of a done record or a dead letter."""
        dead = store_key.startswith(self.dead_prefix)
        return store_key[len(self.dead_prefix if dead else self.done_prefix) :]


def read_record(value: Any) -> Record | None:
    """The record stored as ``value``, or None if absent or unreadable."""
    # An unreadable value reads as "no record": transitions then change nothing.
    if value is None:
        return None
    try:
        return Record.from_dict(value)
    except (FormatError, KeyError, TypeError, ValueError):
        return None


def _count(value: Any) -> int:
    # Signed: a record counted by the single counter of earlier versions is taken off
    # its shard when it closes, so a shard may go below zero until a recount.
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def open_count(values: Mapping[str, Any]) -> int:
    """The open records counted by ``values`` (counter keys to their values)."""
    return max(sum(_count(value) for value in values.values()), 0)


def _with_attempt(record: Record, attempt: Attempt | None) -> dict[str, Any]:
    if attempt is None:
        return {}
    kept = (*record.attempts, attempt)[-_KEPT:]
    return {"attempts": kept, "attempt_count": record.attempt_count + 1}


@dataclass(frozen=True, slots=True)
class Transitions:
    """The state machine of one queue, as pure update functions.

    Attributes:
        keys: The key layout.
        retention_sec: TTL of done records.
        dead_retention_sec: TTL of dead letters.
        max_pending: Most open records at once (``aadd`` beyond it is refused).
        done_status: Status of an acknowledged record (``"acknowledged"`` or
            ``"delivered"``).
    """

    keys: QueueKeys
    retention_sec: float
    dead_retention_sec: float
    max_pending: int
    done_status: str = "acknowledged"

    # -- add ---------------------------------------------------------------------------

    def add_keys(self, record: Record, claims: Mapping[str, Any]) -> list[str]:
        """The keys :meth:`add` reads: the record's three, the claims, and, when the
        record is added open (only open records are counted), its counter (every
        counter when ``max_pending`` is small enough to be checked exactly)."""
        keys = [*self.keys.all(record.id), *claims]
        if record.status in _OPEN:
            if self.max_pending < _EXACT_BELOW:
                keys += (self.keys.count, *self.keys.counts)
            else:
                keys.append(self.keys.count_of(record.id))
        return keys

    def _full(self, current: Mapping[str, Any], record_id: str) -> bool:
        if self.max_pending < _EXACT_BELOW:
            counters = (self.keys.count, *self.keys.counts)
            return open_count({key: current.get(key) for key in counters}) >= self.max_pending
        # Each counter takes its share: the queue may refuse a record a little before
        # max_pending are open (when they are unevenly spread), never after.
        share = self.max_pending // COUNT_SHARDS
        return _count(current.get(self.keys.count_of(record_id))) >= share

    def add(
        self,
        current: Mapping[str, Any],
        record: Record,
        claims: Mapping[str, Any],
        claim_ttl: float | None,
    ) -> tuple[Changes, str]:
        """Add ``record`` and write ``claims``, unless a claim or the record exists.

        Returns:
            ``(changes, outcome)``; outcome ``"added"``, ``"duplicate"`` (a claim key
            or the record id is taken: nothing written) or ``"full"`` (the record is
            open and ``max_pending`` records are open already: nothing written).
        """
        get = current.get
        for key in (*claims, *self.keys.all(record.id)):
            if get(key) is not None:
                return {}, "duplicate"
        # Order matters for stores whose multi-key updates are atomic against other
        # writers but not against a crash (FileStore writes key by key, in this order):
        # the record first, then the counter, then the claims, so a crash in between
        # leaves at worst a record without its claims (its id still makes the sender's
        # retry a duplicate) and an undercount (repaired by DurableQueue.arecount).
        changes: Changes = {}
        if record.status in _OPEN:
            if self._full(current, record.id):
                return {}, "full"
            counter = self.keys.count_of(record.id)
            changes[self.keys.open(record.id)] = WithTTL(record.to_dict(), None)
            changes[counter] = WithTTL(_count(current.get(counter)) + 1, None)
        elif record.status in _DONE:
            changes[self.keys.done(record.id)] = WithTTL(record.to_dict(), self.retention_sec)
        else:
            changes[self.keys.dead(record.id)] = WithTTL(record.to_dict(), self.dead_retention_sec)
        for key, value in claims.items():
            changes[key] = WithTTL(value, claim_ttl)
        return changes, "added"

    # -- leases ------------------------------------------------------------------------

    @staticmethod
    def leasable(record: Record, now: float) -> bool:
        """True if ``record`` may be leased at ``now`` (due, or its lease ran out)."""
        if record.status == "pending":
            return record.due <= now
        if record.status == "leased":
            return record.lease_until is None or record.lease_until <= now
        return False

    def lease(
        self, current: Mapping[str, Any], record_id: str, owner: str, now: float, until: float
    ) -> tuple[Changes, Record | None]:
        """Lease an open record to ``owner`` until ``until`` with a new fencing token.

        Returns:
            ``(changes, record)``: the leased record, or None when it is not leasable.
        """
        key = self.keys.open(record_id)
        record = read_record(current.get(key))
        if record is None or not self.leasable(record, now):
            return {}, None
        leased = dataclasses.replace(
            record,
            status="leased",
            lease_owner=owner,
            lease_token=record.lease_token + 1,
            lease_until=until,
            updated=now,
        )
        return {key: WithTTL(leased.to_dict(), None)}, leased

    def _held(self, current: Mapping[str, Any], record_id: str, token: int) -> Record | None:
        record = read_record(current.get(self.keys.open(record_id)))
        if record is None or record.status != "leased" or record.lease_token != token:
            return None
        return record

    def extend(
        self, current: Mapping[str, Any], record_id: str, token: int, now: float, until: float
    ) -> tuple[Changes, Record | None]:
        """Move the end of a held lease to ``until`` (None when the token is stale)."""
        record = self._held(current, record_id, token)
        if record is None:
            return {}, None
        extended = dataclasses.replace(record, lease_until=until, updated=now)
        return {self.keys.open(record_id): WithTTL(extended.to_dict(), None)}, extended

    def release(
        self,
        current: Mapping[str, Any],
        record_id: str,
        token: int,
        now: float,
        due: float,
        attempt: Attempt | None = None,
    ) -> tuple[Changes, Record | None]:
        """Give a held record back as pending from ``due`` (optionally recording an attempt).

        This is also :meth:`retry`: with an ``attempt``, it counts against the budget.
        """
        record = self._held(current, record_id, token)
        if record is None:
            return {}, None
        error = attempt.error if attempt is not None else None
        pending = dataclasses.replace(
            record,
            status="pending",
            lease_owner=None,
            lease_until=None,
            due=due,
            updated=now,
            last_error=clip_error(error) if error is not None else record.last_error,
            **_with_attempt(record, attempt),
        )
        return {self.keys.open(record_id): WithTTL(pending.to_dict(), None)}, pending

    def retry(
        self,
        current: Mapping[str, Any],
        record_id: str,
        token: int,
        now: float,
        due: float,
        attempt: Attempt | None,
    ) -> tuple[Changes, Record | None]:
        """Record a failed attempt and make the record due again at ``due``."""
        return self.release(current, record_id, token, now, due, attempt)

    # -- finishing ---------------------------------------------------------------------

    def close_keys(self, record_id: str) -> list[str]:
        """The keys :meth:`ack`, :meth:`bury`, :meth:`replay` and :meth:`purge` read."""
        return [*self.keys.all(record_id), self.keys.count_of(record_id)]

    def ack(
        self,
        current: Mapping[str, Any],
        record_id: str,
        token: int,
        now: float,
        attempt: Attempt | None = None,
    ) -> tuple[Changes, Record | None]:
        """The consumer is done: move the held record to done (TTL = retention)."""
        done_key = self.keys.done(record_id)
        return self._finish(current, record_id, token, now, self.done_status, done_key, attempt)

    def bury(
        self,
        current: Mapping[str, Any],
        record_id: str,
        token: int,
        now: float,
        reason: str,
        attempt: Attempt | None = None,
    ) -> tuple[Changes, Record | None]:
        """Give up on a held record: move it to the dead letters."""
        dead_key = self.keys.dead(record_id)
        return self._finish(current, record_id, token, now, "dead", dead_key, attempt, reason)

    def _finish(
        self,
        current: Mapping[str, Any],
        record_id: str,
        token: int,
        now: float,
        status: str,
        key: str,
        attempt: Attempt | None,
        error: str | None = None,
    ) -> tuple[Changes, Record | None]:
        # A held record leaves the open records for ``key`` with ``status`` (lease gone).
        record = self._held(current, record_id, token)
        if record is None:
            return {}, None
        final = dataclasses.replace(
            record,
            status=status,
            lease_owner=None,
            lease_until=None,
            updated=now,
            last_error=clip_error(error) if error is not None else record.last_error,
            **_with_attempt(record, attempt),
        )
        return self._move(current, record_id, final, key, -1), final

    def replay(
        self, current: Mapping[str, Any], record_id: str, now: float
    ) -> tuple[Changes, Record | None]:
        """Make a done or dead record pending again, due now, with a fresh budget.

        Replays are operator actions: they are not refused by ``max_pending``.
        """
        for key in (self.keys.dead(record_id), self.keys.done(record_id)):
            record = read_record(current.get(key))
            if record is None:
                continue
            pending = dataclasses.replace(
                record,
                status="pending",
                due=now,
                updated=now,
                lease_owner=None,
                lease_until=None,
                budget_from=record.attempt_count,
                replays=record.replays + 1,
            )
            changes = self._move(current, record_id, pending, self.keys.open(record_id), +1)
            return changes, pending
        return {}, None

    def purge(self, current: Mapping[str, Any], record_id: str) -> tuple[Changes, Record | None]:
        """Delete a record wherever it is (the counter follows)."""
        found: Record | None = None
        changes: Changes = {}
        for key in self.keys.all(record_id):
            if current.get(key) is not None:
                found = found or read_record(current.get(key))
                changes[key] = None
        if current.get(self.keys.open(record_id)) is not None:
            counter = self.keys.count_of(record_id)
            changes[counter] = WithTTL(_count(current.get(counter)) - 1, None)
        return changes, found

    def _move(
        self, current: Mapping[str, Any], record_id: str, record: Record, to: str, delta: int
    ) -> Changes:
        ttl: float | None = None
        if record.status in _DONE:
            ttl = self.retention_sec
        elif record.status == "dead":
            ttl = self.dead_retention_sec
        # The new copy first (see add): a crash half-way leaves two copies, never none.
        changes: Changes = {to: WithTTL(record.to_dict(), ttl)}
        for key in self.keys.all(record_id):
            if key != to and current.get(key) is not None:
                changes[key] = None
        counter = self.keys.count_of(record_id)
        changes[counter] = WithTTL(_count(current.get(counter)) + delta, None)
        return changes

    def set_counts(self, counted: Mapping[str, int]) -> Changes:
        """Every counter set to what ``counted`` says (counter key to the open records
        it counts, as :meth:`QueueKeys.count_of` assigns them; 0 for a counter not in
        it): a recount's repair. The single counter of earlier versions is deleted."""
        counts = dict.fromkeys(self.keys.counts, 0)
        counts.update((key, counted[key]) for key in counts if key in counted)
        changes: Changes = {key: WithTTL(value, None) for key, value in counts.items()}
        changes[self.keys.count] = None
        return changes


#: One finished record as a trim sees it: ``(updated, id, store key)``.
Stamp = tuple[float, str, str]


def _time_and_id(value: Any, field: str) -> tuple[float, str] | None:
    # A stored record's time ``field`` and id, without building a Record; None for a
    # value no Record could be read from (never listed, so never trimmed either).
    if not isinstance(value, Mapping):
        return None
    time, record_id = finite_float(value.get(field)), value.get("id")
    if time is None or not isinstance(record_id, str):
        return None
    return time, record_id


def _stamp(key: str, value: Any) -> Stamp | None:
    found = _time_and_id(value, "updated")
    return None if found is None else (*found, key)


def finished_stamp(keys: QueueKeys, record: Record) -> Stamp | None:
    """The stamp of ``record`` as stored, if it is finished (done or dead); else None."""
    if record.status in _DONE:
        return float(record.updated), record.id, keys.done(record.id)
    if record.status == "dead":
        return float(record.updated), record.id, keys.dead(record.id)
    return None


def read_values(current: dict[str, Any]) -> tuple[Changes, dict[str, Any]]:
    """An update function that only reads: the values of its keys (a many-key read in
    one store call, where a loop of gets would cost a call each)."""
    return {}, current


def leasable_keys(
    now: float, key: str | None
) -> Callable[[Mapping[str, Any]], tuple[Changes, tuple[list[str], dict[str, float]]]]:
    """An update function that only reads. Its result is ``(leasable, later)``:
    ``leasable`` holds the store keys of the records in ``current`` that a lease may take
    at ``now`` (of ``key`` only, when given), in ``current``'s order; ``later`` maps the
    store key of every record that no lease may take before a known time (leased until
    then, or pending and due then) to that time."""

    def due(current: Mapping[str, Any]) -> tuple[Changes, tuple[list[str], dict[str, float]]]:
        found = []
        later = {}
        for store_key, value in current.items():
            record = read_record(value)
            if record is None:
                continue
            if not Transitions.leasable(record, now):
                when = record.due if record.status == "pending" else record.lease_until
                if when is not None and record.status in _OPEN:
                    later[store_key] = when
                continue
            if key is None or record.key == key:
                found.append(store_key)
        return {}, (found, later)

    return due


#: One record of a listing by its sort key: ``(created, id, store key)``. A listing
#: keeps these, not the values, and reads the records it returns again: holding (and
#: then freeing) 10,000 decoded records took tens of ms of the event loop.
Listed = tuple[float, str, str]


def listed(
    current: Mapping[str, Any], status: str | None, key: str | None, since: float | None
) -> list[Listed]:
    """The stored records in ``current`` (store key to value) that match a listing's
    filters, as :data:`Listed` entries (no Record is built)."""
    out: list[Listed] = []
    for store_key, value in current.items():
        found = _time_and_id(value, "created")
        if found is None:
            continue
        if status is not None and value.get("status") != status:
            continue
        if key is not None and value.get("key") != key:
            continue
        if since is not None and found[0] < since:
            continue
        out.append((*found, store_key))
    return out


def finished_stamps(current: Mapping[str, Any]) -> tuple[Changes, list[Stamp]]:
    """An update function that only reads: the stamps of the finished records in
    ``current`` (a many-key read in one store call)."""
    found = (_stamp(key, value) for key, value in current.items())
    return {}, [stamp for stamp in found if stamp is not None]


def cutoff(times: list[float], count: int) -> tuple[float, int]:
    """Where the ``count`` oldest of some stamps end, given their times sorted
    (``1 <= count <= len(times)``): the time of the last of them, and how many of the
    stamps at exactly that time are among them (those with the smallest ids).

    Only the times are sorted (a list of floats sorts in C, without tuple comparisons).
    """
    time = times[count - 1]
    return time, count - bisect_left(times, time)


def split_at(stamps: list[Stamp], time: float) -> tuple[list[Stamp], list[Stamp]]:
    """The stamps older than ``time``, and those at exactly ``time``."""
    return [s for s in stamps if s[0] < time], [s for s in stamps if s[0] == time]


def delete_unchanged(stamps: list[Stamp]) -> Callable[[Mapping[str, Any]], tuple[Changes, int]]:
    """An update function deleting each stamped record that is still as stamped.

    A record replayed since (its finished key is gone) or finished again (a newer
    ``updated``) is left alone. Its result is how many were deleted.
    """

    def delete(current: Mapping[str, Any]) -> tuple[Changes, int]:
        changes: Changes = {
            key: None
            for updated, record_id, key in stamps
            if _stamp(key, current.get(key)) == (updated, record_id, key)
        }
        return changes, len(changes)

    return delete
