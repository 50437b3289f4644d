"""Ids noted until a time: the lease polls and rescans skip what they cannot take yet."""

from __future__ import annotations

import heapq
import math

__all__ = ["ExpiringIds"]

# Ended notes one expire() drops at most (about 2 ms): 100,000 notes ending together took
# 218 ms in one call. The others read as ended already and go at the next calls.
_EXPIRE_BATCH = 1_000


class ExpiringIds:
    """Ids, each noted until a time; ``record_id in notes`` until :meth:`expire` passes it.

    A dict and a heap of the same notes: expiring costs a heap pop per ended note, never
    a walk over every note (rebuilding 100,000 of them took 15 ms of the event loop). A
    note replaced or forgotten leaves its old heap item behind, skipped when popped.
    """

    def __init__(self) -> None:
        self._until: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._now = -math.inf  # the last expire()'s time: notes ended by then are out

    def __contains__(self, record_id: object) -> bool:
        return isinstance(record_id, str) and self._until.get(record_id, -math.inf) > self._now

    def note(self, record_id: str, until: float) -> None:
        """Note ``record_id`` until ``until`` (replacing an earlier note of it)."""
        self._until[record_id] = until
        heapq.heappush(self._heap, (until, record_id))

    def forget(self, record_id: str) -> None:
        """Drop the note of ``record_id``, if any."""
        self._until.pop(record_id, None)

    def expire(self, now: float) -> None:
        """End every note that has ended by ``now``: each reads as absent from now on,
        and up to 1,000 of them are dropped (the rest at the next calls)."""
        self._now = now
        heap, until = self._heap, self._until
        for _ in range(_EXPIRE_BATCH):
            if not heap or heap[0][0] > now:
                return
            end, record_id = heapq.heappop(heap)
            if until.get(record_id) == end:
                del until[record_id]

    def first_end(self) -> float | None:
        """The earliest end among the notes (or an old item's, not popped yet)."""
        return self._heap[0][0] if self._heap else None
