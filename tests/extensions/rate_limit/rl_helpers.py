"""Helpers for the rate-limit tests: a virtual clock and cheap messages."""

from __future__ import annotations

import time
from typing import Any

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


def hammer(kind: str, path: str, start: Any, duration: float, results: Any) -> None:
    """Child process: call ``allow_message`` in a loop on a shared store; report counts.

    Waits on the ``start`` barrier (so that all children hammer together), then puts
    ``(admitted, calls, first_ns, last_ns)``, or ``("error", text)`` if it failed.
    """
    try:
        results.put(_hammer(kind, path, start, duration))
    except BaseException as exc:
        results.put(("error", f"{type(exc).__name__}: {exc}"))


def _hammer(kind: str, path: str, start: Any, duration: float) -> tuple[int, int, int, int]:
    from converge.core.store import Store
    from converge.extensions.rate_limit import RateLimiter, TokenBucketConfig
    from converge.extensions.storage import FileStore, RedisStore, SQLiteStore

    store: Store
    if kind == "file":
        store = FileStore(path, locking=True)
    elif kind == "redis":  # path is "url namespace"
        url, namespace = path.split()
        store = RedisStore(url, namespace=namespace)
    else:
        store = SQLiteStore(path)
    limiter = RateLimiter(
        store=store,
        global_config=TokenBucketConfig(5, 20),
        sender_config=TokenBucketConfig(1000, 1000),
        topic_config=TokenBucketConfig(1000, 1000),
    )
    message = Message(sender="hammer", topics=("shared",))
    limiter.retry_after(message, direction="egress")  # connect (and load a script) first
    start.wait(timeout=60)
    first = time.time_ns()
    end = first + int(duration * SECOND)
    admitted = calls = 0
    try:
        while time.time_ns() < end:
            admitted += limiter.allow_message(message, direction="egress")
            calls += 1
    finally:
        store.close()
    return admitted, calls, first, time.time_ns()
