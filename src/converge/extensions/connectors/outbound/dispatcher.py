"""The outbound dispatcher: an anyio task group draining the outbox."""

from __future__ import annotations

import logging
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from converge._expiring import ExpiringIds
from converge._numbers import positive_float
from converge.core.metrics import MetricsCollector
from converge.durable import Attempt
from converge.errors import StoreError, UsageError
from converge.extensions.connectors.logs import log_dead, log_delivered, log_retried
from converge.extensions.connectors.outbound.breaker import CircuitBreaker
from converge.extensions.connectors.outbound.outbox import Outbox, OutboxRecord
from converge.extensions.connectors.outbound.retry import (
    RetrySchedule,
    Verdict,
    WebhookRetryPolicy,
    lease_margin,
)
from converge.extensions.connectors.outbound.schedule import DispatchSchedule

__all__ = ["AttemptResult", "OutboundDispatcher"]

_log = logging.getLogger("converge.connectors")

_BREAKER_STATE = {"closed": 0, "open": 1, "half_open": 2}
# Rescans of the store that find nothing back off up to this many poll intervals.
_MAX_SCAN_BACKOFF = 16
# Pending actions a scan reads at once (one store call per 256, and no more held).
_SCAN_BATCH = 256


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """The outcome of one delivery attempt.

    Attributes:
        verdict: ``"delivered"``, ``"retry"`` or ``"dead"``.
        status: HTTP status, or None when no answer came.
        retry_after: Seconds the target asked to wait (429/503 ``Retry-After``).
        error: Short description of the failure (empty on success).
        breaker_failure: Whether the outcome counts against the target's breaker.
        sent: False when no request left (the action can never be sent): the
            target's breaker learns nothing from it.
        latency_ms: How long the attempt took, when a request was made.
    """

    verdict: Verdict
    status: int | None = None
    retry_after: float | None = None
    error: str = ""
    breaker_failure: bool = field(default=False)
    sent: bool = True
    latency_ms: float | None = None


class OutboundDispatcher:
    """Delivers the outbox's actions with limits, retries, leases and breakers.

    One per connector; :meth:`run` is the task, :meth:`stop` asks it to finish.

    Args:
        outbox: Where pending actions live.
        attempt: Makes one delivery attempt of a record.
        retry_policy: Backoff, attempt limits, request timeout and lease margin
            (a :class:`~.retry.WebhookRetryPolicy` or a :class:`~.retry.RetrySchedule`).
        breaker_for: The circuit breaker of a target.
        metrics: Where counters and gauges go.
        clock: Unix seconds.
        max_in_flight: Attempts in flight at most, over all targets.
        target_limit: Attempts in flight at most for one target.
    """

    def __init__(
        self,
        *,
        outbox: Outbox,
        attempt: Callable[[OutboxRecord], Awaitable[AttemptResult]],
        retry_policy: WebhookRetryPolicy | RetrySchedule,
        breaker_for: Callable[[str], CircuitBreaker],
        metrics: MetricsCollector,
        clock: Callable[[], float],
        max_in_flight: int,
        target_limit: Callable[[str], int],
    ) -> None:
        self._outbox = outbox
        self._attempt = attempt
        self._policy = retry_policy
        self._breaker_for = breaker_for
        self._metrics = metrics
        self._clock = clock
        self._max_in_flight = max_in_flight
        self._target_limit = target_limit
        self._schedule = DispatchSchedule(max_in_flight=max_in_flight, target_limit=target_limit)
        self._owner = uuid.uuid4().hex
        self._wake: anyio.Event | None = None
        self._work_send: MemoryObjectSendStream[tuple[str, str]] | None = None
        self._token: object | None = None
        self._running = False
        self._stopping = False
        self.store_ok = True
        self.failed: BaseException | None = None
        self._breaker_seen: set[str] = set()
        self._store_backlog = 0
        # Actions added already leased to this dispatcher (see lease_at_add), by id, and
        # their lease ends in the order they came (see _drop_spent_holds).
        self._held: dict[str, OutboxRecord] = {}
        self._held_ends: deque[tuple[float, str]] = deque()
        # Actions a scan found leased by another dispatcher sharing the store, until
        # that lease ends (our clock). Scans skip them until then; the first scan after
        # reads them again (most are gone: delivered).
        self._foreign = ExpiringIds()
        outbox.listener = self.notify  # replays made by operators are scheduled at once

    @property
    def running(self) -> bool:
        """True while :meth:`run` is active."""
        return self._running

    @property
    def backlog(self) -> int:
        """Actions this dispatcher has scheduled (waiting, ready or in flight), locally.

        Replicas sharing a store each schedule what they have seen, except actions
        another replica holds a lease on; the outbox's true size is
        :meth:`Outbox.apending_count` (the ``webhook_outbound_backlog`` gauge).
        """
        return len(self._schedule)

    @property
    def lease_sec(self) -> float:
        """How long an attempt holds its action: request timeout plus lease margin."""
        return self._policy.request_timeout_sec + lease_margin(self._policy)

    def stop(self) -> None:
        """Ask :meth:`run` to return once in-flight attempts finish.

        Asked before a run has begun (one just scheduled, say), the next run returns as
        soon as it starts: a stop is never lost to the start it raced with.
        """
        self._stopping = True
        if self._on_loop():
            assert self._wake is not None
            self._wake.set()

    def _on_loop(self) -> bool:
        # Loop-bound state (the schedule, events, the work stream) is touched only from
        # the dispatcher's own loop; other threads rely on the store rescan.
        if self._token is None:
            return False
        try:
            return anyio.lowlevel.current_token().native_token is self._token
        except RuntimeError:
            return False

    def lease_at_add(self) -> tuple[str, float] | None:
        """``(owner, lease_sec)`` for adding an action already leased to this dispatcher.

        An action added leased to a running dispatcher (in the update that adds it)
        and then passed to :meth:`notify` is attempted without a lease write of its
        own. None when this dispatcher is not running on the calling
        loop: add the action pending then. Should the process die first, the action
        is attempted again once that lease runs out, as after a crash mid-attempt.
        """
        if self._running and not self._stopping and self._on_loop():
            return self._owner, self.lease_sec
        return None

    def notify(self, record: OutboxRecord) -> None:
        """A record was just persisted in this process: schedule it without a poll."""
        held = record.status == "leased" and record.lease_owner == self._owner
        if record.status != "pending" and not held:
            return  # an idempotent resubmission of a delivered or dead action
        if self._running and self._on_loop():
            if held:
                if record.id in self._schedule:
                    return  # a resubmission of an action this dispatcher is attempting
                self._keep_held(record)
            # Just added here: due now (record.due is on the store's clock).
            self._schedule.add(record.id, record.action.target, self._clock())
            self._hand_out()

    def _keep_held(self, record: OutboxRecord) -> None:
        """Keep ``record`` (added leased here) for its first attempt, while its lease
        can still cover one.

        Past that, the attempt leases the action anew anyway (:meth:`_lease`). Held
        longer, the actions that came during a target's outage (its circuit open)
        stayed in memory, payload and all, until it ended: 47,000 of them took 224 MB,
        and the garbage collector's passes over them held the event loop for 20-40 ms.
        """
        self._drop_spent_holds()
        until = record.lease_until
        if until is None:
            return
        breaker = self._breaker_for(record.action.target)
        if breaker.is_open and breaker.retry_at() > until - self._policy.request_timeout_sec:
            return
        self._held[record.id] = record
        self._held_ends.append((until, record.id))

    def _drop_spent_holds(self) -> None:
        """Forget the held records whose lease no longer covers an attempt (leases are
        all as long, so they end in the order the actions came)."""
        ends, held = self._held_ends, self._held
        spent = self._clock() + self._policy.request_timeout_sec
        while ends and ends[0][0] < spent:
            until, action_id = ends.popleft()
            record = held.get(action_id)
            if record is not None and record.lease_until == until:
                del held[action_id]

    def _hand_out(self) -> None:
        """Give every action that may start now to an idle worker."""
        if self._work_send is None or self._stopping:
            return
        for item in self._schedule.take(self._clock()):
            # Never blocks: the buffer holds max_in_flight items, and the schedule never
            # has more than that running (buffered items count as running).
            self._work_send.send_nowait(item)

    def _gauges(self) -> None:
        self._metrics.gauge(
            "webhook_outbound_backlog",
            self._store_backlog,
            help="Outbound actions pending in the outbox store (all replicas sharing it).",
        )
        self._metrics.gauge(
            "webhook_outbound_in_flight", self._schedule.running, help="Attempts in flight."
        )

    async def run(self, poll_interval_sec: float) -> None:
        """Deliver until :meth:`stop`; rescans the store for other processes' actions.

        ``max_in_flight`` worker tasks take actions as they become due; a worker that
        finishes hands out the next ready actions itself, and this loop only wakes for
        due times, rescans and stopping. Rescans run every ``poll_interval_sec`` while
        they find new actions and back off (up to 16 intervals) while they find none.

        Raises:
            UsageError: If already running, or for a bad interval.
        """
        if positive_float(poll_interval_sec) is None:
            raise UsageError("poll_interval_sec must be a positive finite number")
        if self._running:
            raise UsageError("the outbound dispatcher is already running")
        self._running, self.failed = True, None  # a stop asked already holds (see stop)
        self._token = anyio.lowlevel.current_token().native_token
        self._wake = anyio.Event()
        self._schedule = DispatchSchedule(
            max_in_flight=self._max_in_flight, target_limit=self._target_limit
        )
        self._foreign = ExpiringIds()
        send, receive = anyio.create_memory_object_stream[tuple[str, str]](self._max_in_flight)
        self._work_send = send
        try:
            async with anyio.create_task_group() as tg, receive:
                for _ in range(self._max_in_flight):
                    tg.start_soon(self._worker, receive.clone())
                await self._migrate()
                await self._scan()
                last_scan = last_count = anyio.current_time()
                scan_every = poll_interval_sec
                while not self._stopping:
                    self._wake = anyio.Event()
                    self._drop_spent_holds()
                    self._hand_out()
                    takeover = self._takeover_in()
                    if takeover is not None and takeover <= 0:
                        # Another dispatcher's lease ran out: the next scan (within one
                        # interval) looks at its action, whatever the back-off.
                        scan_every = poll_interval_sec
                    if anyio.current_time() - last_count >= poll_interval_sec:
                        # The gauge counts the store's pending records (all replicas):
                        # one key listing per interval, never the local schedule.
                        await self._count()
                        last_count = anyio.current_time()
                    if anyio.current_time() - last_scan >= scan_every:
                        # A rescan costs O(pending); it only finds actions that other
                        # processes submitted, so back off while it finds none.
                        found = await self._scan()
                        last_scan = anyio.current_time()
                        if found:
                            scan_every = poll_interval_sec
                            self._hand_out()
                        else:
                            scan_every = min(scan_every * 2, poll_interval_sec * _MAX_SCAN_BACKOFF)
                    self._gauges()
                    if self._stopping:
                        break
                    due = self._schedule.next_due()
                    timeout = min(
                        scan_every,
                        max(0.0, last_scan + scan_every - anyio.current_time()),
                        max(0.0, last_count + poll_interval_sec - anyio.current_time()),
                    )
                    if due is not None:
                        timeout = min(timeout, max(0.0, due - self._clock()))
                    takeover = self._takeover_in()  # the scan may have seen new ones
                    if takeover is not None and takeover > 0:
                        timeout = min(timeout, takeover)
                    with anyio.move_on_after(max(timeout, 0.001)):
                        await self._wake.wait()
                send.close()  # workers finish what they hold, then exit
        except BaseException as exc:
            if not isinstance(exc, anyio.get_cancelled_exc_class()):
                self.failed = exc
            raise
        finally:
            send.close()
            self._work_send = None
            await self._give_back()
            self._running = self._stopping = False
            self._wake = self._token = None
            self._gauges()

    async def _worker(self, receive: MemoryObjectReceiveStream[tuple[str, str]]) -> None:
        async with receive:
            async for action_id, target in receive:
                await self._work(action_id, target)

    async def _migrate(self) -> None:
        try:
            moved = await self._outbox.amigrate()
        except StoreError as exc:
            self._store_failed(exc)
            return
        if moved:
            _log.info("moved %d outbound actions into the durable outbox", moved)

    async def _count(self) -> None:
        try:
            self._store_backlog = await self._outbox.apending_count()
        except StoreError as exc:
            self._store_failed(exc)

    async def _scan(self) -> int:
        """Schedule pending actions this dispatcher does not know yet; return how many."""
        found = 0
        self._foreign.expire(self._clock())
        try:
            ids = await self._outbox.apending_ids()
            self._store_backlog = len(ids)
            store_now = await self._outbox.atime()
            for start in range(0, len(ids), _SCAN_BATCH):
                # A batch at a time, the loop given back between: checking 100,000 ids
                # against the schedule at once held it for 30-50 ms.
                batch = ids[start : start + _SCAN_BATCH]
                unknown = [i for i in batch if i not in self._schedule and i not in self._foreign]
                for record in await self._outbox.apending(unknown) if unknown else ():
                    found += self._found(record, store_now)
                await anyio.lowlevel.checkpoint()
        except StoreError as exc:
            self._store_failed(exc)
        else:
            self.store_ok = True
        return found

    def _found(self, record: OutboxRecord, store_now: float) -> bool:
        """Schedule a pending action a scan read, unless this dispatcher has it already."""
        if record.id in self._schedule:
            return False  # notified while the scan read
        if record.lease_owner == self._owner and (record.lease_until or 0) > store_now:
            return False  # added leased to us: notify() schedules it (or a later scan)
        # Record times are on the store's clock; the schedule runs on ours.
        lease_left = (record.lease_until or 0) - store_now
        if record.lease_owner not in (None, self._owner) and lease_left > 0:
            # Leased elsewhere: its owner is most likely delivering it. Trying to lease
            # it when that lease ends would cost a store update per action and replica;
            # a scan then reads it again, with the others, if it is still pending.
            self._foreign.note(record.id, self._clock() + lease_left)
            return True
        wait = max(0.0, record.due - store_now)
        self._schedule.add(record.id, record.action.target, self._clock() + wait)
        return True

    def _takeover_in(self) -> float | None:
        """Seconds until the first lease of another dispatcher that a scan saw ends."""
        end = self._foreign.first_end()
        return None if end is None else end - self._clock()

    def _store_failed(self, exc: BaseException) -> None:
        if self.store_ok:
            _log.warning("outbox store failed: %s", exc)
        self.store_ok = False

    async def _work(self, action_id: str, target: str) -> None:
        breaker = self._breaker_for(target)
        record: OutboxRecord | None = None
        try:
            now = self._clock()
            if breaker.is_open and breaker.retry_at() > now:
                # Open, or half-open with the probe out: wait without touching the store,
                # with every other action of the target (one pause, not one deferral
                # per action and per probe interval).
                self._hold(action_id, target, breaker.retry_at())
                return
            started = anyio.current_time()
            lease = await self._lease(action_id)
            if lease is None:
                self._schedule.finish(action_id)
                return
            if isinstance(lease, float):
                self._defer(action_id, target, self._clock() + lease)
                return
            record = lease
            if anyio.current_time() - started > lease_margin(self._policy):
                # The lease write took longer than the margin: too little of the lease
                # may be left for a whole attempt. Give it back and try again.
                await self._release(record)
                record = None
                self._defer(action_id, target, self._clock())
                return
            deadline = record.action.deadline
            if deadline is not None and now >= deadline:
                await self._bury(record, "deadline passed")
                record = None
                return
            if not breaker.allow_request():
                await self._release(record)
                record = None
                self._hold(action_id, target, breaker.retry_at())
                return
            was_open = breaker.is_open
            result = await self._attempt(record)
            if not result.sent:
                breaker.cancel_probe()  # nothing was sent: nothing learnt about the target
                self._schedule.resume(target)  # the next action may be the probe
            elif result.breaker_failure:
                breaker.record_failure()
            else:
                breaker.record_success()
            if was_open or breaker.is_open or target not in self._breaker_seen:
                self._breaker_seen.add(target)
                self._metrics.gauge(
                    "webhook_breaker_state",
                    _BREAKER_STATE[breaker.state],
                    labels={"target": target},
                    help="Circuit breaker per target: 0 closed, 1 open, 2 half-open.",
                )
            # A failure that leaves the circuit open is the target's outage, not this
            # action's fault: it does not use up one of the action's attempts.
            outage = result.verdict == "retry" and result.breaker_failure and breaker.is_open
            await self._settle(record, result, outage=outage, retry_at=breaker.retry_at())
            record = None
            if was_open and not breaker.is_open:
                self._schedule.hurry(target, self._clock())
        except StoreError as exc:
            self._store_failed(exc)
            # The lease runs out and the action is attempted again: at least once.
            self._defer(action_id, target, self._clock() + 1.0)
        except anyio.get_cancelled_exc_class():
            if record is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
                    await self._release(record)
            raise
        except Exception:  # a bug must not kill the dispatcher; the lease runs out
            _log.exception("outbound attempt of %s failed unexpectedly", action_id)
            self._defer(action_id, target, self._clock() + 1.0)
        finally:
            self._schedule.finish(action_id)
            if not self._stopping:
                self._hand_out()

    async def _lease(self, action_id: str) -> OutboxRecord | float | None:
        """The action's lease: the one it was added with, while enough of it is left
        for a whole attempt, or else a new one (see :meth:`Outbox.alease`)."""
        held = self._held.pop(action_id, None)
        if held is not None and held.lease_until is not None:
            left = held.lease_until - await self._outbox.atime()
            if left >= self._policy.request_timeout_sec:
                return held
        return await self._outbox.alease(action_id, self._owner, self.lease_sec)

    async def _give_back(self) -> None:
        """Release the leases of actions added leased that no attempt used (on stop):
        the next dispatcher need not wait for them to run out."""
        held, self._held = self._held, {}
        self._held_ends.clear()
        with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
            for record in held.values():
                try:
                    await self._outbox.arelease(record)
                except StoreError as exc:
                    self._store_failed(exc)
                    return

    async def _release(self, record: OutboxRecord) -> None:
        if not await self._outbox.arelease(record):
            self._lease_lost(record, "release")

    def _lease_lost(self, record: OutboxRecord, step: str) -> None:
        # Another dispatcher took the action over after our lease ended (a stalled
        # store write, a paused process): its outcome wins; ours changes nothing.
        self._metrics.inc(
            "webhook_outbound_lease_lost_total",
            labels={"target": record.action.target},
            help="Transitions refused because another dispatcher had taken the lease over.",
        )
        _log.warning("outbound action %s: lease lost before %s", record.id, step)

    def _hold(self, action_id: str, target: str, until: float) -> None:
        # Back among the target's ready actions, none of which starts before ``until``.
        self._schedule.pause(target, until)
        self._defer(action_id, target, self._clock())

    def _defer(self, action_id: str, target: str, due: float) -> None:
        self._schedule.finish(action_id)
        self._schedule.add(action_id, target, due)
        if self._wake is not None:
            self._wake.set()  # the loop recomputes its next wake-up

    async def _settle(
        self, record: OutboxRecord, result: AttemptResult, *, outage: bool, retry_at: float
    ) -> None:
        target = record.action.target
        labels = {"target": target}
        now = self._clock()
        outcome = "outage" if outage else result.verdict
        attempt = Attempt(
            at=await self._outbox.atime(),
            status_code=result.status,
            error=result.error or None,
            latency_ms=result.latency_ms,
            outcome=outcome,
        )
        if result.verdict == "delivered":
            if await self._outbox.acomplete(record, attempt):
                self._store_backlog = max(0, self._store_backlog - 1)
                self._gauges()
            else:
                self._lease_lost(record, "complete")
            self._metrics.inc("webhook_outbound_sent_total", labels=labels, help="Delivered.")
            log_delivered(  # ops: one INFO line per delivery
                target,
                record.id,
                status_code=result.status,
                latency_ms=result.latency_ms,
                attempts=record.attempts + 1,
            )
            self.store_ok = True
            return
        attempts = record.attempts + (0 if outage else 1)
        if result.verdict == "dead":
            await self._bury(record, result.error, attempt)
            return
        if attempts >= self._policy.max_attempts:
            await self._bury(record, f"max attempts; last: {result.error}", attempt)
            return
        # After an outage attempt, the next try is the target's next probe.
        delay = max(0.0, retry_at - now) if outage else self._policy.compute_delay(attempts)
        if result.retry_after is not None:
            delay = max(delay, result.retry_after)
        due = now + delay
        deadline = record.action.deadline
        if deadline is not None and due > deadline:
            await self._bury(record, f"deadline; last: {result.error}", attempt)
            return
        moved = await self._outbox.areschedule(
            record, delay=delay, attempt=attempt, counted=not outage
        )
        if moved is None:
            self._lease_lost(record, "reschedule")
            return
        self._metrics.inc(
            "webhook_outbound_retried_total", labels=labels, help="Retries scheduled."
        )
        log_retried(  # ops: one INFO line per failed attempt that will be retried
            target,
            record.id,
            status_code=result.status,
            error=result.error or None,
            latency_ms=result.latency_ms,
            attempts=attempts,
            retry_in_sec=delay,
        )
        self._defer(record.id, target, due)
        self.store_ok = True

    async def _bury(
        self, record: OutboxRecord, reason: str, attempt: Attempt | None = None
    ) -> None:
        letter = await self._outbox.abury(record, reason=reason, attempt=attempt)
        if letter is None:
            self._lease_lost(record, "bury")
            return
        self._store_backlog = max(0, self._store_backlog - 1)
        kind = reason.split(";", 1)[0].split(" ", 1)[0].split(":", 1)[0]
        self._metrics.inc(
            "webhook_outbound_dead_lettered_total",
            labels={"target": record.action.target, "reason": kind},
            help="Actions given up (dead letters).",
        )
        log_dead(  # ops: the WARNING line of a dead letter
            record.action.target,
            record.id,
            reason=reason,
            status_code=attempt.status_code if attempt is not None else None,
            latency_ms=attempt.latency_ms if attempt is not None else None,
            attempts=record.attempts + (1 if attempt is not None else 0),
        )
