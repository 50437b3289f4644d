"""Helpers for the rate-limit tests: a virtual clock and cheap messages."""

from __future__ import annotations

import anyio
import anyio.lowlevel

from converge.core.message import Message, Topic

SECOND = 1_000_000_000


class VirtualClock:
    """Integer-nanosecond virtual time; ``sleep`` jumps the clock instead of waiting.

    ``sleeps`` records every requested duration, so tests can check that a waiter slept
    exactly as long as needed.
    """

    def __init__(self, start: int = 1_000 * SECOND) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += round(seconds * SECOND)

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += round(seconds * SECOND)
        await anyio.lowlevel.checkpoint()


def msg(sender: str = "alice", *topics: str, recipient: str | None = None) -> Message:
    return Message(sender=sender, recipient=recipient, topics=topics)


def relabel(message: Message, *, sender: str | None = None, topic: str | None = None) -> Message:
    """Change a message in place, for loops over a million senders.

    Building a million real messages (uuid, validation) would take longer than the
    limiter under test; the limiter only reads ``sender`` and ``topics``.
    """
    if sender is not None:
        object.__setattr__(message, "sender", sender)
    if topic is not None:
        t = object.__new__(Topic)
        object.__setattr__(t, "name", topic)
        object.__setattr__(message, "topics", (t,))
    return message


class GatedSleep:
    """A sleep that records its duration and returns only once ``open()`` is called.

    With it, concurrent waiters all arrive at the same virtual instant.
    """

    def __init__(self) -> None:
        self.sleeps: list[float] = []
        self._gate: anyio.Event | None = None

    async def __call__(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self._gate is None:
            self._gate = anyio.Event()
        await self._gate.wait()

    def open(self) -> None:
        if self._gate is not None:
            self._gate.set()
