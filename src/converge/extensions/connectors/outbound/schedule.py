"""Which outbound actions may start now: due times plus concurrency limits (sans-I/O)."""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable

from converge._numbers import check_int

__all__ = ["DispatchSchedule"]

# Targets a take() lets join the turn at most (those with an action newly due): 100,000
# actions due at once, each for a target of its own, would take 0.3 s of the event loop
# in one take. The rest join in the next takes; next_due() says they are due, so the
# dispatcher comes back at once.
_JOINS_PER_TAKE = 1024

_Entry = tuple[float, int, str]  # (due, seq, action id) in a target's heap


class DispatchSchedule:
    """Due times and concurrency limits for the dispatcher, with no clock and no I/O.

    An action is *waiting* (until it is due, and while a limit or a pause holds it
    back) or *running*. Each target keeps its waiting actions in a heap of its own, by
    due time; a target with an action due joins the *turn*, and :meth:`take` starts
    every due action the global and per-target limits allow, taking the targets in
    turn so one busy target cannot starve the others. What a take does grows with what
    it starts and the targets it looks at, never with a target's backlog: a waiting
    action holds no worker and is never moved, however many are due. A target whose
    circuit is open is paused (:meth:`pause`): its due actions stay where they are.

    Args:
        max_in_flight: Running actions at most, over all targets.
        target_limit: Running actions at most for one target.
    """

    def __init__(self, *, max_in_flight: int, target_limit: Callable[[str], int]) -> None:
        self._max = check_int("max_in_flight", max_in_flight, 1)
        self._limit = target_limit
        self._seq = itertools.count()
        self._waiting: dict[str, tuple[float, int, str]] = {}  # id -> (due, seq, target)
        # Heap entries whose seq is no longer their action's were started, moved or
        # discarded since: they are dropped when they come to the top.
        self._heaps: dict[str, list[_Entry]] = {}  # target -> its waiting actions
        # Heaps set aside by hurry(), each with its time: all their actions are due then.
        self._hurried: dict[str, deque[tuple[float, list[_Entry]]]] = {}
        # (time, seq, target) for targets outside the turn: nothing of the target is due
        # before the earliest of its entries (an entry may be early, or stale).
        self._next: list[tuple[float, int, str]] = []
        self._turn: deque[str] = deque()
        self._in_turn: set[str] = set()
        self._running: dict[str, str] = {}  # id -> target
        self._per_target: dict[str, int] = {}
        self._paused: dict[str, float] = {}  # target -> no start before this time

    def __len__(self) -> int:
        """Actions known: waiting or running."""
        return len(self._waiting) + len(self._running)

    def __contains__(self, action_id: object) -> bool:
        return action_id in self._waiting or action_id in self._running

    @property
    def running(self) -> int:
        """Actions started and not yet finished."""
        return len(self._running)

    def add(self, action_id: str, target: str, due: float) -> None:
        """Make ``action_id`` due at ``due``; a known waiting action is moved to ``due``.

        Running actions are left alone (they are on their way already).
        """
        if action_id in self._running:
            return
        seq = next(self._seq)
        self._waiting[action_id] = (due, seq, target)
        heap = self._heaps.get(target)
        if heap is None:
            heap = self._heaps[target] = []
        if target not in self._in_turn and (not heap or due < heap[0][0]):
            heapq.heappush(self._next, (due, seq, target))
        heapq.heappush(heap, (due, seq, action_id))

    def discard(self, action_id: str) -> None:
        """Forget a waiting action (running ones finish normally)."""
        self._waiting.pop(action_id, None)

    def pause(self, target: str, until: float) -> None:
        """Start no action of ``target`` before ``until`` (its circuit is open)."""
        self._paused[target] = until

    def resume(self, target: str) -> None:
        """End ``target``'s pause (its circuit admits a probe again)."""
        self._paused.pop(target, None)

    def hurry(self, target: str, now: float) -> None:
        """End ``target``'s pause and make its waiting actions due at ``now`` (circuit
        closed again). Their heap is set aside whole, as due at ``now``: a hurry costs
        the same for 60,000 waiting actions as for one (re-adding each held the event
        loop for 100 ms)."""
        self.resume(target)
        heap = self._heaps.pop(target, None)
        if heap:
            self._hurried.setdefault(target, deque()).append((now, heap))
            if target not in self._in_turn:
                heapq.heappush(self._next, (min(now, heap[0][0]), next(self._seq), target))

    def _clean(self, heap: list[_Entry]) -> bool:
        """Drop the stale entries at the top of ``heap``; True if it holds an action."""
        waiting = self._waiting
        while heap:
            _, seq, action_id = heap[0]
            entry = waiting.get(action_id)
            if entry is not None and entry[1] == seq:
                return True
            heapq.heappop(heap)
        return False

    def _first(self, target: str) -> tuple[float, list[_Entry]] | None:
        """When ``target``'s first waiting action is due, and the heap it tops; None
        if the target has none (its empty heaps are dropped)."""
        first = None
        hurried = self._hurried.get(target)
        if hurried is not None:
            while hurried and not self._clean(hurried[0][1]):
                hurried.popleft()
            if hurried:
                at, heap = hurried[0]
                first = (min(at, heap[0][0]), heap)
            else:
                del self._hurried[target]
        own = self._heaps.get(target)
        if own is not None:
            if not self._clean(own):
                del self._heaps[target]
            elif first is None or own[0][0] < first[0]:
                first = (own[0][0], own)
        return first

    def next_due(self) -> float | None:
        """When :meth:`take` may next start something that is not started yet: the
        earliest due time of a waiting action outside the turn, or the end of a pause
        holding a target of the turn back; None if neither."""
        due = None
        nexts = self._next
        while nexts:
            at, _, target = nexts[0]
            first = None if target in self._in_turn else self._first(target)
            if first is not None and first[0] <= at:
                due = first[0]
                break
            heapq.heappop(nexts)  # early or stale
            if first is not None:
                heapq.heappush(nexts, (first[0], next(self._seq), target))
        for target, until in self._paused.items():
            if target in self._in_turn and (due is None or until < due):
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
        nexts, turn, in_turn = self._next, self._turn, self._in_turn
        joins = 0
        while nexts and nexts[0][0] <= now and joins < _JOINS_PER_TAKE:
            joins += 1
            target = heapq.heappop(nexts)[2]
            first = None if target in in_turn else self._first(target)
            if first is None:
                continue
            if first[0] <= now:
                turn.append(target)
                in_turn.add(target)
            else:
                heapq.heappush(nexts, (first[0], next(self._seq), target))
        started: list[tuple[str, str]] = []
        running, per_target, paused = self._running, self._per_target, self._paused
        idle = 0
        while turn and len(running) < self._max and idle < len(turn):
            target = turn[0]
            turn.rotate(-1)
            if target in paused or per_target.get(target, 0) >= self._limit(target):
                idle += 1
                continue
            idle = 0
            first = self._first(target)
            if first is None or first[0] > now:
                turn.pop()  # nothing due: out of the turn (rotated to its end)
                in_turn.discard(target)
                if first is not None:
                    heapq.heappush(nexts, (first[0], next(self._seq), target))
                continue
            action_id = heapq.heappop(first[1])[2]
            del self._waiting[action_id]
            running[action_id] = target
            per_target[target] = per_target.get(target, 0) + 1
            started.append((action_id, target))
        return started

    def finish(self, action_id: str) -> None:
        """An attempt is over; its slot is free. Re-:meth:`add` it to try again."""
        target = self._running.pop(action_id, None)
        if target is not None:
            left = self._per_target[target] - 1
            if left:
                self._per_target[target] = left
            else:
                del self._per_target[target]
