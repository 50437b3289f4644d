"""MemoryStore: a thread-safe in-process store with TTLs and an atomic put-if-absent."""

from __future__ import annotations

import builtins
import heapq
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

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
from converge.extensions.storage._codec import check_keys

__all__ = ["MemoryStore"]

R = TypeVar("R")


def _group(key: str) -> str:
    """The part of ``key`` up to its last ``:`` (the key group ``list()`` reads)."""
    return key[: key.rfind(":") + 1]


class MemoryStore(Store):
    """In-memory storage implementation.

    Values are kept by reference (not copied), in this process only. All work is pure
    in-memory, so the sync methods (``get``, ``put``, ...) do it directly, even on the
    event-loop thread, and the async methods (``aget``, ``aput``, ...) finish without a
    thread hop. Every method is thread-safe and ``put_if_absent`` is atomic.

    Expired entries are really freed: a heap of expiry times is swept on every call, so
    a store that only ever sees short-lived keys stays small. Keys are indexed by their
    part up to the last ``:``, so ``list("app:inbox:open:")`` reads only the keys under
    that prefix, however many others the store holds.

    Args:
        clock: Monotonic clock in seconds, used for TTLs (inject a fake one in tests).
    """

    atomic_put_if_absent = True
    supports_locking = False

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        if not callable(clock):
            raise UsageError(f"clock must be callable, not {clock!r}")
        self._clock = clock
        # Re-entrant so that an update function that (against advice) calls the store
        # does not deadlock.
        self._lock = threading.RLock()
        # key -> (value, expires_at or None, generation)
        self._data: dict[str, tuple[Any, float | None, int]] = {}
        # (expires_at, generation, key); an item is stale once the key's generation moved
        self._heap: builtins.list[tuple[float, int, str]] = []
        # key up to its last ":" -> the keys there (list() reads only matching groups)
        self._groups: dict[str, set[str]] = {}
        self._generation = 0
        self._closed = False

    # -- the core (caller holds the lock) ----------------------------------------------

    def _sweep(self) -> float:
        if self._closed:
            raise ClosedError("MemoryStore was closed")
        now = self._clock()
        heap, data = self._heap, self._data
        while heap and heap[0][0] <= now:
            _, generation, key = heapq.heappop(heap)
            entry = data.get(key)
            if entry is not None and entry[2] == generation:
                self._drop(key)
        return now

    def _drop(self, key: str) -> None:
        if self._data.pop(key, None) is None:
            return
        group = _group(key)
        members = self._groups[group]
        members.discard(key)
        if not members:
            del self._groups[group]

    def _store(self, key: str, value: Any, ttl: float | None, now: float) -> None:
        if key not in self._data:
            group = _group(key)
            members = self._groups.get(group)
            if members is None:
                self._groups[group] = {key}
            else:
                members.add(key)
        self._generation += 1
        if ttl is None:
            self._data[key] = (value, None, self._generation)
            return
        expires_at = now + ttl
        self._data[key] = (value, expires_at, self._generation)
        heapq.heappush(self._heap, (expires_at, self._generation, key))
        if len(self._heap) > 2 * len(self._data) + 64:
            # Overwritten TTL keys leave stale heap items behind; rebuild from live ones.
            self._heap = [
                (exp, gen, k) for k, (_, exp, gen) in self._data.items() if exp is not None
            ]
            heapq.heapify(self._heap)

    # -- the public surface: sync and async share the core -----------------------------

    def get(self, key: str) -> Any | None:
        """Retrieve a value."""
        validate_key(key)
        with self._lock:
            self._sweep()
            entry = self._data.get(key)
        return None if entry is None else entry[0]

    def put(self, key: str, value: Any, *, ttl: float | None = None) -> None:
        """Store a value."""
        validate_key(key)
        seconds = validate_ttl(ttl)
        with self._lock:
            self._store(key, value, seconds, self._sweep())

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
            self._sweep()
            if not prefix:
                keys = builtins.list(self._data)
            else:
                keys = []
                for group, members in self._groups.items():
                    if group.startswith(prefix):  # every key of the group matches
                        keys.extend(members)
                    elif prefix.startswith(group):  # the prefix reaches past the group
                        keys.extend(k for k in members if k.startswith(prefix))
        return keys

    def put_if_absent(self, key: str, value: Any, *, ttl: float | None = None) -> bool:
        """Atomic put only if key is absent.

        Returns:
            True if stored, False if the key existed (and had not expired).
        """
        validate_key(key)
        seconds = validate_ttl(ttl)
        with self._lock:
            now = self._sweep()
            if key in self._data:
                return False
            self._store(key, value, seconds, now)
            return True

    def update(self, keys: Sequence[str], fn: UpdateFn[R], *, ttl: float | None = None) -> R:
        """Atomically read ``keys``, let ``fn`` compute changes, and write them.

        ``fn`` runs under the store's lock, so it must be quick and must not block.

        Returns:
            The ``result`` part of ``fn``'s return value.
        """
        names = check_keys(keys)
        seconds = validate_ttl(ttl)
        with self._lock:
            now = self._sweep()
            current = {}
            for key in names:
                entry = self._data.get(key)
                current[key] = None if entry is None else entry[0]
            changes, result = fn(current)
            check_changes(names, changes)
            # Split first: a bad change (WithTTL validates itself) changes nothing.
            writes = [(key, *split_change(change, seconds)) for key, change in changes.items()]
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
            self._groups.clear()
            self._heap.clear()

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
