"""MemoryStore: a thread-safe in-process store with TTLs and an atomic put-if-absent."""

from __future__ import annotations

import builtins
import heapq
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from converge._repr import safe_repr
from converge._sorting import sort_yielding
from converge.core.store import (
    Store,
    UpdateFn,
    check_changes,
    split_change,
    validate_key,
    validate_prefix,
    validate_ttl,
)
from converge.errors import ClosedError, UsageError
from converge.extensions.storage._codec import SerializerName, check_update, get_serializer

__all__ = ["MemoryStore"]

R = TypeVar("R")

# Expired entries freed per call at most (about 2 ms): a store that sat idle while
# 100,000 keys expired held its event loop for 180 ms on the next call, which freed them
# all. Entries left for a later call read as absent meanwhile.
_SWEEP_BATCH = 1_000


def _group(key: str) -> str:
    """The part of ``key`` up to its last ``:`` (the key group ``list()`` reads)."""
    return key[: key.rfind(":") + 1]


# The keys due at one time: one key, a tuple of a few or a list of many. A tuple of
# strings (and the dict holding it) leaves the collector's reach once a collection has
# seen it; a list is walked by every collection that reaches it (a GitHub event's two
# replay claims share their time: 1,000,000 of them as lists added 95 ms to each full
# collection). A tuple grows by copying, so a batch of keys sharing a time (an update
# of many with one TTL) goes on in a list past a few.
_Due = str | tuple[str, ...] | list[str]
_TUPLE_MAX = 8


def _schedule(due: dict[float, _Due], key: str, at: float) -> bool:
    """Note ``key`` as due at ``at``; True when no key was due at that time before."""
    keys = due.get(at)
    if keys is None:
        due[at] = key
        return True
    if isinstance(keys, str):
        if keys != key:
            due[at] = (keys, key)
    elif keys[-1] != key:  # a key listed twice is only skipped the second time
        if isinstance(keys, list):
            keys.append(key)
        elif len(keys) < _TUPLE_MAX:
            due[at] = (*keys, key)
        else:
            due[at] = [*keys, key]
    return False


class MemoryStore(Store):
    """In-memory storage implementation.

    Values are kept by reference (not copied), in this process only, unless a
    ``serializer`` is named: then each value is stored serialized, as the other backends
    store it, and every read returns a fresh copy. All work is pure
    in-memory, so the sync methods (``get``, ``put``, ...) do it directly, even on the
    event-loop thread, and the async methods (``aget``, ``aput``, ...) finish without a
    thread hop. Every method is thread-safe and ``put_if_absent`` is atomic.

    Expired entries are really freed: a heap of expiry times is swept on every call (at
    most 1,000 entries a call, so that freeing never holds the event loop long; those
    left read as absent), so a store that only ever sees short-lived keys stays small.
    Keys are indexed by their part up to the last ``:``, so ``list("app:inbox:open:")``
    reads only the keys under that prefix, however many others the store holds.

    A serializer costs an encode per write and a decode per read (for a 700-byte webhook
    record, 1.4 and 2.6 µs with pickle, 9.4 and 8.1 µs with JSON), and buys what a
    long-running process holding many nested values needs: the garbage collector never
    walks stored values, so tens of thousands of them cause no collection pauses.

    Args:
        clock: Monotonic clock in seconds, used for TTLs (inject a fake one in tests).
        serializer: ``None`` (the default: values kept by reference), ``"json"`` or
            ``"pickle"``: values stored serialized, refused with
            :class:`~converge.errors.UsageError` when they cannot be.
    """

    atomic_put_if_absent = True
    supports_locking = False

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        serializer: SerializerName | None = None,
    ) -> None:
        if not callable(clock):
            raise UsageError(f"clock must be callable, not {safe_repr(clock)}")
        self._clock = clock
        self._serializer = None if serializer is None else get_serializer(serializer)
        # Re-entrant so that an update function that (against advice) calls the store
        # does not deadlock.
        self._lock = threading.RLock()
        # Nothing below holds a container per entry (only str keys, floats and values;
        # a tuple per expiry time that keys share), so a busy store adds nothing for
        # the garbage collector to walk: a tuple per entry filled the young generation
        # with tens of thousands of them, and a young collection after a large trim
        # took 25-45 ms.
        self._data: dict[str, Any] = {}
        self._expires: dict[str, float] = {}  # key -> expiry time, keys with a TTL only
        # expiry time -> the key (or keys) due then, and a heap of those times. Every key
        # with a TTL is due at its expiry or before: when an earlier time comes, a key
        # whose expiry moved on is put under its expiry; a deleted one is skipped.
        self._due: dict[float, _Due] = {}
        self._heap: builtins.list[float] = []
        # key up to its last ":" -> the keys there (list() reads only matching groups),
        # as the keys of a dict, not a set: a dict of strings is out of the collector's
        # reach, and a set is walked whole by every collection that reaches it (100,000
        # replay claims added about 10 ms to each, 1,000,000 added 78 ms).
        self._groups: dict[str, dict[str, None]] = {}
        self._lagging = False  # expired entries wait for a later sweep
        self._closed = False

    # -- the core (caller holds the lock) ----------------------------------------------

    def _sweep(self) -> float:
        if self._closed:
            raise ClosedError("MemoryStore was closed")
        now = self._clock()
        heap = self._heap
        if heap and heap[0] <= now:
            self._lagging = self._free_due(now)
        elif self._lagging:
            self._lagging = False
        return now

    def _free_due(self, now: float) -> bool:
        """Free up to ``_SWEEP_BATCH`` expired entries; True if more are due."""
        heap, due, expires = self._heap, self._due, self._expires
        left = _SWEEP_BATCH
        while heap and heap[0] <= now:
            if left <= 0:
                return True
            at = heapq.heappop(heap)
            keys = due.pop(at)
            if isinstance(keys, str):
                keys = (keys,)
            elif len(keys) > left:  # the rest waits for the next call
                due[at] = keys[left:]
                heapq.heappush(heap, at)
                keys = keys[:left]
            left -= len(keys)
            for key in keys:
                when = expires.get(key)
                if when == at:
                    self._drop(key)
                elif when is not None and when > at and _schedule(due, key, when):
                    heapq.heappush(heap, when)  # written again since: its time moved on
        return False

    def _expired(self, key: str, now: float) -> bool:
        """Whether ``key``'s entry expired but waits for a later sweep (callers ask only
        while ``_lagging``: a call per read costs the hot path)."""
        return self._expires.get(key, now + 1.0) <= now

    def _drop(self, key: str) -> None:
        if key not in self._data:
            return
        del self._data[key]
        self._expires.pop(key, None)
        group = _group(key)
        members = self._groups[group]
        members.pop(key, None)
        if not members:
            del self._groups[group]

    def _store(self, key: str, value: Any, ttl: float | None, now: float) -> None:
        if key not in self._data:
            group = _group(key)
            members = self._groups.get(group)
            if members is None:
                self._groups[group] = {key: None}
            else:
                members[key] = None
        self._data[key] = value
        if ttl is None:
            self._expires.pop(key, None)
            return
        at = now + ttl
        earlier = self._expires.get(key)
        self._expires[key] = at
        if earlier is not None and earlier <= at:
            # Its earlier time is on the heap already, and the sweep moves it on to this
            # one then: rewriting a key pushes nothing (a heap of stale times had to be
            # rebuilt whole, 37 ms for 100,000 keys).
            return
        if _schedule(self._due, key, at):  # a new time: onto the heap
            heapq.heappush(self._heap, at)
            if len(self._heap) > 2 * len(self._expires) + 64:
                # Keys deleted, or rewritten with an earlier expiry or none, leave stale
                # times behind.
                due: dict[float, _Due] = {}
                for k, when in self._expires.items():
                    _schedule(due, k, when)
                self._due = due
                self._heap = builtins.list(due)
                heapq.heapify(self._heap)

    def _encode(self, key: str, value: Any) -> Any:
        serializer = self._serializer
        return value if serializer is None else serializer.dumps(key, value)

    def _read(self, key: str, now: float) -> Any:
        value = self._data.get(key)
        if value is None or (self._lagging and self._expired(key, now)):
            return None
        serializer = self._serializer
        if serializer is None:
            return value
        return serializer.loads(key, serializer.tag, value)

    # -- the public surface: sync and async share the core -----------------------------

    @property
    def serializer(self) -> SerializerName | None:
        """``None`` (values kept by reference), ``"json"`` or ``"pickle"``."""
        return None if self._serializer is None else self._serializer.name

    def get(self, key: str) -> Any | None:
        """Retrieve a value."""
        validate_key(key)
        with self._lock:
            return self._read(key, self._sweep())

    def put(self, key: str, value: Any, *, ttl: float | None = None) -> None:
        """Store a value."""
        validate_key(key)
        seconds = validate_ttl(ttl)
        stored = self._encode(key, value)
        with self._lock:
            self._store(key, stored, seconds, self._sweep())

    def delete(self, key: str) -> None:
        """Delete a value."""
        validate_key(key)
        with self._lock:
            self._sweep()
            self._drop(key)

    def list(self, prefix: str = "") -> builtins.list[str]:
        """List keys starting with prefix."""
        keys = self._keys(prefix)
        keys.sort()
        return keys

    def _keys(self, prefix: str) -> builtins.list[str]:
        # The live keys starting with ``prefix``, unsorted.
        validate_prefix(prefix)
        with self._lock:
            now = self._sweep()
            if not prefix:
                keys = builtins.list(self._data)
            else:
                keys = []
                for group, members in self._groups.items():
                    if group.startswith(prefix):  # every key of the group matches
                        keys.extend(members)
                    elif prefix.startswith(group):  # the prefix reaches past the group
                        keys.extend(k for k in members if k.startswith(prefix))
            if self._lagging:
                keys = [k for k in keys if not self._expired(k, now)]
        return keys

    def put_if_absent(self, key: str, value: Any, *, ttl: float | None = None) -> bool:
        """Atomic put only if key is absent.

        Returns:
            True if stored, False if the key existed (and had not expired).
        """
        validate_key(key)
        seconds = validate_ttl(ttl)
        stored = self._encode(key, value)
        with self._lock:
            now = self._sweep()
            if key in self._data and not (self._lagging and self._expired(key, now)):
                return False
            self._store(key, stored, seconds, now)
            return True

    def update(self, keys: Sequence[str], fn: UpdateFn[R], *, ttl: float | None = None) -> R:
        """Atomically read ``keys``, let ``fn`` compute changes, and write them.

        ``fn`` runs under the store's lock, so it must be quick and must not block.

        Returns:
            The ``result`` part of ``fn``'s return value.
        """
        names = check_update(keys, fn)
        seconds = validate_ttl(ttl)
        with self._lock:
            now = self._sweep()
            current = {key: self._read(key, now) for key in names}
            changes, result = fn(current)
            check_changes(names, changes)
            # Split and encode first: a bad change (WithTTL validates itself) or a value
            # the serializer refuses changes nothing.
            writes = []
            for key, change in changes.items():
                value, key_ttl = split_change(change, seconds)
                writes.append((key, None if value is None else self._encode(key, value), key_ttl))
            for key, value, key_ttl in writes:
                if value is None:
                    self._drop(key)
                else:
                    self._store(key, value, key_ttl, now)
        return result

    def close(self) -> None:
        """Drop every entry; later calls raise ClosedError. Idempotent."""
        with self._lock:
            self._closed = True
            self._data.clear()
            self._expires.clear()
            self._due.clear()
            self._heap.clear()
            self._groups.clear()

    async def aget(self, key: str) -> Any | None:
        """Return the value under ``key``, or None if absent or expired."""
        return self.get(key)

    async def aput(self, key: str, value: Any, *, ttl: float | None = None) -> None:
        """Store ``value`` under ``key`` (optionally expiring after ``ttl`` seconds)."""
        self.put(key, value, ttl=ttl)

    async def adelete(self, key: str) -> None:
        """Delete ``key``; deleting an absent key is not an error."""
        self.delete(key)

    async def alist(self, prefix: str = "") -> builtins.list[str]:
        """Return the live keys starting with ``prefix``, sorted.

        A long listing is sorted in steps that give the event loop back between them.
        """
        return await sort_yielding(self._keys(prefix))

    async def aput_if_absent(self, key: str, value: Any, *, ttl: float | None = None) -> bool:
        """Store ``value`` only if ``key`` is absent or expired; atomic."""
        return self.put_if_absent(key, value, ttl=ttl)

    async def aupdate(self, keys: Sequence[str], fn: UpdateFn[R], *, ttl: float | None = None) -> R:
        """Atomic read-modify-write; see :meth:`update`."""
        return self.update(keys, fn, ttl=ttl)

    async def aclose(self) -> None:
        """Drop every entry; later calls raise ClosedError. Idempotent."""
        self.close()
