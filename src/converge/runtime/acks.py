"""Acknowledgement bookkeeping for the bus: who still holds a message, and who to tell.

A subscription opened with ``ack=True`` acknowledges each message it receives
(:meth:`MessageBus.aack <converge.runtime.MessageBus.aack>`) or gives it up as a dead
letter (:meth:`MessageBus.adead_letter <converge.runtime.MessageBus.adead_letter>`).
Ack listeners (a durable inbox, for example) learn when a message is settled or dead.
This module holds the sans-I/O part: the per-message table of outstanding consumers.
"""

from __future__ import annotations

from collections import Counter
from typing import Protocol, runtime_checkable

from converge.core.message import Message

__all__ = ["AckListener", "AckTable"]


@runtime_checkable
class AckListener(Protocol):
    """Told when a published message is settled or given up by a consumer.

    Register with :meth:`MessageBus.add_ack_listener
    <converge.runtime.MessageBus.add_ack_listener>`. Exceptions a listener raises are
    logged and counted (``bus_ack_listener_errors_total``); they never reach the
    consumer that acknowledged.
    """

    async def on_settled(self, message: Message) -> None:
        """Every acking subscription that received ``message`` acknowledged it.

        Also called when ``publish`` returns having delivered the message only to
        receivers that do not acknowledge (sinks, subscriptions without ``ack``). Not
        called for a message that any consumer dead-lettered, nor for a publish that
        raised or delivered to nobody (a hook dropped it, no subscriber matched): that
        publisher sees ``0`` and decides (the durable inbox publishes it again later).
        """

    async def on_dead(self, message: Message, consumer: str, reason: str) -> None:
        """``consumer`` gave ``message`` up (it failed its bounded retries)."""


class _Pending:
    """One message id's outstanding acknowledgements."""

    __slots__ = ("dead", "holds", "incomplete", "message", "outstanding")

    def __init__(self, message: Message) -> None:
        self.message = message
        self.outstanding: Counter[str] = Counter()
        self.holds = 0  # publishes still delivering this id
        self.dead = False  # some consumer dead-lettered it
        self.incomplete = False  # a publish of it raised mid-way

    @property
    def done(self) -> bool:
        return self.holds == 0 and not self.outstanding


class AckTable:
    """Outstanding acknowledgements per message id (no I/O; the bus drives it).

    A publish *holds* the message id while it delivers, so a fast consumer's ack cannot
    settle it before the slower inboxes have it. The message settles when no publish
    holds it and every delivered copy was acknowledged; it settles only if no consumer
    dead-lettered it and no publish of it failed mid-way.
    """

    def __init__(self) -> None:
        self._pending: dict[str, _Pending] = {}

    def __len__(self) -> int:
        """Message ids still waiting for an acknowledgement or a publish."""
        return len(self._pending)

    def hold(self, message: Message) -> None:
        """A publish of ``message`` starts delivering."""
        entry = self._pending.get(message.id)
        if entry is None:
            entry = self._pending[message.id] = _Pending(message)
        entry.holds += 1

    def delivered(self, message: Message, consumer: str) -> None:
        """An acking subscription named ``consumer`` got a copy."""
        self._pending[message.id].outstanding[consumer] += 1

    def release(self, message: Message, *, failed: bool = False) -> Message | None:
        """The publish ends; return the message if it is now settled."""
        entry = self._pending[message.id]
        entry.holds -= 1
        entry.incomplete = entry.incomplete or failed
        return self._finish(message.id, entry)

    def ack(self, message_id: str, consumer: str) -> Message | None:
        """``consumer`` acknowledged; return the message if it is now settled."""
        entry = self._pending.get(message_id)
        if entry is None or entry.outstanding[consumer] <= 0:
            return None
        entry.outstanding[consumer] -= 1
        if entry.outstanding[consumer] <= 0:
            del entry.outstanding[consumer]
        return self._finish(message_id, entry)

    def dead(self, message_id: str, consumer: str) -> None:
        """``consumer`` gave the message up: it will not settle."""
        entry = self._pending.get(message_id)
        if entry is None:
            return
        entry.dead = True
        if entry.outstanding[consumer] > 0:
            entry.outstanding[consumer] -= 1
        if entry.outstanding[consumer] <= 0:
            del entry.outstanding[consumer]
        self._finish(message_id, entry)

    def _finish(self, message_id: str, entry: _Pending) -> Message | None:
        if not entry.done:
            return None
        del self._pending[message_id]
        if entry.dead or entry.incomplete:
            return None
        return entry.message
