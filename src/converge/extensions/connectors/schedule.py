"""Which outbound actions may start now: due times plus concurrency limits (sans-I/O)."""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable

from converge.errors import UsageError

__all__ = ["DispatchSchedule"]

# Due actions a take() moves to the ready queues at most: 100,000 actions due at once
# (a restart over a backlog) took 0.3 s of the event loop in one take. The rest move in
# the next takes; next_due() says they are due, so the dispatcher comes back at once.
_MOVES_PER_TAKE = 1024


class DispatchSchedule:
    """Due times and concurrency limits for the dispatcher, with no clock and no I/O.

    An action is *waiting* (due at some time), *ready* (due, held back by a limit or a
    pause) or *running*. :meth:`take` starts every ready action the global and
    per-target limits allow, taking targets in turn so one busy target cannot starve the
    others. A waiting action holds no worker: it is a heap entry. A target whose circuit
    is open is paused (:meth:`pause`): its ready actions stay where they are, however
    many, instead of each being taken and put back.

    Args:
        max_in_flight: Running actions at most, over all targets.
        target_limit: Running actions at most for one target.
    """

    def __init__(self, *, max_in_flight: int, target_limit: Callable[[str], int]) -> None:
        if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int):
            raise UsageError("max_in_flight must be an integer >= 1")
        if max_in_flight < 1:
            raise UsageError("max_in_flight must be an integer >= 1")
        self._max = max_in_flight
        self._limit = target_limit
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._waiting: dict[str, tuple[float, int, str]] = {}  # id -> (due, seq, target)
        self._waiting_of: dict[str, set[str]] = {}  # target -> its waiting ids
        self._ready: dict[str, deque[str]] = {}
        self._ready_ids: set[str] = set()
        self._running: dict[str, str] = {}  # id -> target
        self._per_target: dict[str, int] = {}
        self._turn: deque[str] = deque()
        self._paused: dict[str, float] = {}  # target -> no start before this time
        # Targets hurried, with when and the ids still to make due (see hurry()).
        self._hurried: deque[tuple[str, float, list[str]]] = deque()

    def __len__(self) -> int:
        """Actions known: waiting, ready or running."""
        return len(self._waiting) + len(self._ready_ids) + len(self._running)

    def __contains__(self, action_id: object) -> bool:
        return (
            action_id in self._waiting
            or action_id in self._ready_ids
            or (action_id in self._running)
        )

    @property
    def running(self) -> int:
        """Actions started and not yet finished."""
        return len(self._running)

    def add(self, action_id: str, target: str, due: float) -> None:
        """Make ``action_id`` due at ``due``; a known waiting action is moved to ``due``.

        Ready or running actions are left alone (they are on their way already).
        """
        if action_id in self._running or action_id in self._ready_ids:
            return
        entry = (due, next(self._seq), target)
        old = self._waiting.get(action_id)
        if old is not None and old[2] != target:
            self._unwait(action_id, old[2])
        self._waiting[action_id] = entry
        heapq.heappush(self._heap, (entry[0], entry[1], action_id))
        ids = self._waiting_of.get(target)
        if ids is None:
            self._waiting_of[target] = {action_id}
        else:
            ids.add(action_id)

    def discard(self, action_id: str) -> None:
        """Forget a waiting or ready action (running ones finish normally)."""
        entry = self._waiting.pop(action_id, None)
        if entry is not None:
            self._unwait(action_id, entry[2])
        if action_id in self._ready_ids:
            self._ready_ids.discard(action_id)
            for queue in self._ready.values():
                if action_id in queue:
                    queue.remove(action_id)
                    break

    def pause(self, target: str, until: float) -> None:
        """Start no action of ``target`` before ``until`` (its circuit is open)."""
        self._paused[target] = until

    def resume(self, target: str) -> None:
        """End ``target``'s pause (its circuit admits a probe again)."""
        self._paused.pop(target, None)

    def hurry(self, target: str, now: float) -> None:
        """End ``target``'s pause and make its waiting actions due at ``now`` (circuit
        closed again): :meth:`take` moves them up, a bounded number per call, and
        :meth:`next_due` says ``now`` until it has (60,000 re-added in one call held the
        event loop for 100 ms)."""
        self.resume(target)
        waiting = self._waiting_of.get(target)
        if waiting:
            self._hurried.append((target, now, list(waiting)))

    def _hurry_some(self, budget: int) -> int:
        """Make up to ``budget`` hurried actions due; return how many were looked at."""
        looked = 0
        while self._hurried and looked < budget:
            target, now, ids = self._hurried[0]
            while ids and looked < budget:
                looked += 1
                action_id = ids.pop()
                entry = self._waiting.get(action_id)  # gone, started or moved meanwhile?
                if entry is not None and entry[2] == target and entry[0] > now:
                    self.add(action_id, target, now)
            if not ids:
                self._hurried.popleft()
        return looked

    def next_due(self) -> float | None:
        """When :meth:`take` may next start something that is not started yet: the
        earliest due time of a waiting action, or the end of a pause holding ready
        actions back; None if neither."""
        due = None
        while self._heap:
            first, seq, action_id = self._heap[0]
            entry = self._waiting.get(action_id)
            if entry is not None and entry[1] == seq:
                due = first
                break
            heapq.heappop(self._heap)  # stale entry
        if self._hurried:
            hurried = self._hurried[0][1]
            due = hurried if due is None else min(due, hurried)
        for target, until in self._paused.items():
            if self._ready.get(target) and (due is None or until < due):
                due = until
        return due

    def take(self, now: float) -> list[tuple[str, str]]:
        """Start what may start at ``now``.

        Returns:
            ``(action_id, target)`` pairs now counted as running; call :meth:`finish`
            for each when its attempt is over.
        """
        for target in [t for t, until in self._paused.items() if until <= now]:
            del self._paused[target]
        moves = self._hurry_some(_MOVES_PER_TAKE)
        while self._heap and self._heap[0][0] <= now and moves < _MOVES_PER_TAKE:
            moves += 1
            _, seq, action_id = heapq.heappop(self._heap)
            entry = self._waiting.get(action_id)
            if entry is None or entry[1] != seq:
                continue
            del self._waiting[action_id]
            target = entry[2]
            waiting = self._waiting_of[target]  # _unwait, inlined: once per action
            waiting.discard(action_id)
            if not waiting:
                del self._waiting_of[target]
            queue = self._ready.get(target)
            if queue is None:
                queue = self._ready[target] = deque()
                self._turn.append(target)
            queue.append(action_id)
            self._ready_ids.add(action_id)
        started: list[tuple[str, str]] = []
        idle = 0
        while self._turn and len(self._running) < self._max and idle < len(self._turn):
            target = self._turn[0]
            self._turn.rotate(-1)
            queue = self._ready[target]
            if not queue:
                del self._ready[target]
                self._turn.remove(target)
                idle = 0
                continue
            if target in self._paused or self._per_target.get(target, 0) >= self._limit(target):
                idle += 1
                continue
            idle = 0
            action_id = queue.popleft()
            self._ready_ids.discard(action_id)
            self._running[action_id] = target
            self._per_target[target] = self._per_target.get(target, 0) + 1
            started.append((action_id, target))
        return started

    def _unwait(self, action_id: str, target: str) -> None:
        ids = self._waiting_of[target]
        ids.discard(action_id)
        if not ids:
            del self._waiting_of[target]

    def finish(self, action_id: str) -> None:
        """An attempt is over; its slot is free. Re-:meth:`add` it to try again."""
        target = self._running.pop(action_id, None)
        if target is not None:
            left = self._per_target[target] - 1
            if left:
                self._per_target[target] = left
            else:
                del self._per_target[target]
