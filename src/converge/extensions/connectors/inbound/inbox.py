"""The connector's durable inbox: accepted events as records that consumers acknowledge.

Every accepted inbound event is a :class:`~converge.durable.Record` in the connector's
store, written in the same atomic update as its replay claims. It is born leased to the
process that accepted it (no second write to hand it on) and stays open until its
consumer acknowledges it; a lease that runs out (the consumer or the process died)
makes it available again, with the same message id.

This module keeps the per-process side of that: which records this process holds
(their fencing tokens), the records ready for :meth:`WebhookConnector.receive_inbound`
and the conversions between a record and the item consumers see.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import anyio

from converge.core.message import Message, Topic
from converge.core.task import Task
from converge.durable import DurableQueue, Record
from converge.errors import FormatError

__all__ = [
    "INBOUND_TOPIC",
    "Consumer",
    "InboxHolds",
    "event_of",
    "event_uid",
    "forward_key",
    "item_data",
    "item_of",
    "message_of",
    "record_event",
]

#: Topic of the messages accepted inbound events become.
INBOUND_TOPIC = "bridge.webhook.inbound"
_INBOUND_TOPICS = (Topic(INBOUND_TOPIC),)

#: Who consumes an accepted event: the outbox (``forward_to``), the record itself (the
#: event log is the consumer), a bus, or :meth:`WebhookConnector.receive_inbound`.
Consumer = Literal["forward", "record", "bus", "queue"]


def event_uid(provider: str, event_id: str) -> str:
    """The inbox record id and message id of an event: a digest, never the raw id.

    Event ids come from clients (GitHub's delivery header is not even signed), so
    every internal key is derived by hashing: bounded, printable, collision-free.
    """
    return hashlib.sha256(f"{provider}\0{event_id}".encode()).hexdigest()[:32]


def forward_key(uid: str, replays: int = 0) -> str:
    """Idempotency key of the outbox action that forwards the event ``uid``.

    The same for every redelivery of the event (the outbox keeps one action), a new
    one for each operator replay (``replays``), which is meant to deliver again.
    """
    return f"inbound:{uid}" if replays == 0 else f"inbound:{uid}:replay-{replays}"


def item_data(item: Message | Task) -> dict[str, Any]:
    """The record data of an accepted item."""
    if isinstance(item, Task):
        return {"emit": "task", "item": item.to_dict()}
    return {"emit": "message", "item": item.to_dict()}


def item_of(record: Record) -> Message | Task:
    """The item (message or task) an inbox record holds, as it was accepted.

    Raises:
        FormatError: If the record does not hold an inbound item.
    """
    data = record.data
    item = data.get("item")
    if not isinstance(item, dict):
        raise FormatError(f"inbox record {record.id} holds no item")
    if data.get("emit") == "task":
        return Task.from_dict(item)
    return Message.from_dict(item)


def message_of(item: Message | Task, sender: str) -> Message:
    """The bus message of an item: a task travels in a message with the same id."""
    if isinstance(item, Message):
        return item
    return Message(
        sender=sender,
        topics=_INBOUND_TOPICS,
        payload={"task": item.to_dict()},
        task_id=item.id,
        id=item.id,
    )


def record_event(record: Record) -> dict[str, Any]:
    """The :class:`InboundWebhookEvent` dict an inbox record holds, read in place.

    The same as ``event_of(item_of(record))`` without building the item.

    Raises:
        FormatError: If the record does not hold an inbound event.
    """
    item = record.data.get("item")
    field = "inputs" if record.data.get("emit") == "task" else "payload"
    event = item.get(field) if isinstance(item, dict) else None
    if not isinstance(event, dict):
        raise FormatError(f"inbox record {record.id} holds no inbound event")
    return event


def event_of(item: Message | Task) -> dict[str, Any]:
    """The :class:`InboundWebhookEvent` dict an item carries."""
    if isinstance(item, Task):
        return dict(item.inputs)
    payload: dict[str, Any] = item.to_dict()["payload"]
    return payload


@dataclass(slots=True)
class _Hold:
    token: int
    until: float
    consumer: Consumer


class InboxHolds:
    """The inbox records this process holds, and the ones ready for ``receive_inbound``.

    Args:
        queue: The inbox queue.
        owner: This process's lease owner name.
        lease_sec: Lease length.
    """

    def __init__(self, queue: DurableQueue, *, owner: str, lease_sec: float) -> None:
        self.queue = queue
        self.owner = owner
        self.lease_sec = lease_sec
        self._holds: dict[str, _Hold] = {}
        self._ready: dict[str, tuple[Record, Message | Task | None]] = {}
        self._wake: anyio.Event | None = None
        # When receive_inbound() may next list the store's open records (monotonic
        # seconds): a listing costs O(open records), O(every key) on Redis, so waiting
        # receivers share one per poll interval instead of making one per event.
        self._poll_at = 0.0
        self._released: list[float] = []  # heap: when records given back here fall due

    def __len__(self) -> int:
        """Records held (their leases may have run out since)."""
        return len(self._holds)

    def hold(self, record: Record, consumer: Consumer) -> None:
        """Remember that this process holds ``record`` for ``consumer``."""
        self._holds[record.id] = _Hold(record.lease_token, record.lease_until or 0.0, consumer)

    def drop(self, record_id: str) -> int | None:
        """Forget a hold; return its fencing token (None if not held)."""
        held = self._holds.pop(record_id, None)
        self._ready.pop(record_id, None)
        return None if held is None else held.token

    def token(self, record_id: str) -> int | None:
        """The fencing token of a held record."""
        held = self._holds.get(record_id)
        return None if held is None else held.token

    def live(self, now: float) -> set[str]:
        """Ids held with a lease that has not run out (the pump skips them)."""
        return {rid for rid, held in self._holds.items() if held.until > now}

    def renewable(self, now: float) -> list[tuple[str, int]]:
        """Bus-held records past half their lease: their consumer is still at work."""
        margin = self.lease_sec / 2
        return [
            (rid, held.token)
            for rid, held in self._holds.items()
            if held.consumer == "bus" and held.until > now and held.until - now < margin
        ]

    def renewed(self, record: Record) -> None:
        """Record a lease extension."""
        held = self._holds.get(record.id)
        if held is not None and held.token == record.lease_token:
            held.until = record.lease_until or held.until

    def expired(self, now: float) -> Iterable[str]:
        """Forget holds whose lease ran out (they are someone's to take again)."""
        gone = [rid for rid, held in self._holds.items() if held.until <= now]
        for rid in gone:
            self.drop(rid)
        return gone

    # -- receive_inbound hand-off ------------------------------------------------------

    def ready(self, record: Record, item: Message | Task | None = None) -> None:
        """Queue a held record (and its item, if built) for ``receive_inbound``; wake one."""
        self._ready[record.id] = (record, item)
        self.wake()

    def wake(self) -> None:
        """Wake every waiting receiver (new record, or the connector closed)."""
        if self._wake is not None:
            self._wake.set()
            self._wake = None

    def take(self) -> tuple[Record, Message | Task | None] | None:
        """The oldest ready record and its item (None if not built yet), if any."""
        for record_id in self._ready:
            return self._ready.pop(record_id)
        return None

    def poll_start(self) -> float | None:
        """Now, if ``receive_inbound`` should look in the store for records to take
        over; None if it should wait (see :meth:`until_poll`)."""
        now = time.monotonic()
        return now if now >= self._poll_at else None

    def polled(self, started: float, found: int, interval: float) -> None:
        """The store poll begun at ``started`` found ``found`` records: poll again at
        once if any, else after ``interval`` or when a record given back falls due."""
        released = self._released
        while released and released[0] <= started:
            heapq.heappop(released)  # due before the listing: it saw them
        if found:
            self._poll_at = 0.0
        else:
            self._poll_at = min(started + interval, released[0] if released else math.inf)

    def poll_within(self, seconds: float) -> None:
        """A record this process gave back falls due in ``seconds``: poll by then."""
        at = time.monotonic() + seconds
        heapq.heappush(self._released, at)
        self._poll_at = min(self._poll_at, at)

    def until_poll(self) -> float:
        """Seconds until the next store poll is due (0 if it is)."""
        return max(0.0, self._poll_at - time.monotonic())

    async def wait(self, seconds: float) -> None:
        """Wait until woken or ``seconds`` passed."""
        if self._wake is None:
            self._wake = anyio.Event()
        event = self._wake
        with anyio.move_on_after(seconds):
            await event.wait()
