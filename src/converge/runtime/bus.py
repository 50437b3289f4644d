"""The in-process message bus: hooks around publishing, bounded inboxes with backpressure."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any

import anyio
import anyio.lowlevel

from converge._numbers import check_int
from converge._repr import safe_repr
from converge.core.hooks import MessageHook
from converge.core.message import Message, Topic
from converge.core.metrics import MetricsCollector
from converge.errors import BusFullError, ClosedError, UsageError
from converge.runtime.acks import AckListener, AckTable

__all__ = ["MessageBus", "Sink", "Subscription"]

#: ``async handler(message)``: a durable hand-off registered with
#: :meth:`MessageBus.add_sink`; ``publish`` awaits it.
Sink = Callable[[Message], Awaitable[None]]

_log = logging.getLogger("converge.runtime")


def _check_patterns(topics: object) -> tuple[str, ...]:
    if isinstance(topics, str) or not isinstance(topics, Sequence):
        raise UsageError("topics must be a sequence of topic patterns, not a string")
    return tuple(dict.fromkeys(_check_pattern(p) for p in topics))


def _check_pattern(pattern: object) -> str:
    if not isinstance(pattern, str):
        raise UsageError(f"topic patterns are strings, not {type(pattern).__name__}")
    base = pattern[:-2] if pattern.endswith((".*", ".#")) else pattern
    try:
        Topic(base)
    except UsageError:
        raise UsageError(
            f"invalid topic pattern {pattern!r}: a topic name, optionally ending in "
            "'.*' (one more segment) or '.#' (any further segments)"
        ) from None
    return pattern


class _Putter:
    """A publisher waiting for inbox space; a receiver hands its message in."""

    __slots__ = ("done", "event", "message")

    def __init__(self, message: Message) -> None:
        self.message = message
        self.event = anyio.Event()
        self.done = False


class Subscription:
    """A bounded inbox of messages addressed to a recipient and/or published on topics.

    Created by :meth:`MessageBus.subscribe`. Iterate it (``async for message in sub``),
    or call :meth:`receive` / :meth:`receive_nowait`. :meth:`close` (or leaving
    ``async with sub:``) unsubscribes: nothing new arrives, what is already queued can
    still be received, then iteration ends. Publishers waiting for space in a full inbox
    are served first come, first served. A subscription belongs to one event loop.

    With ``ack=True`` the receiver acknowledges each message it received, once it is done
    with it (:meth:`ack`, or :meth:`MessageBus.aack` naming :attr:`consumer`), or gives it
    up (:meth:`dead_letter`); the bus tells its ack listeners when a message is settled.

    Attributes:
        recipient: The recipient id it receives, or None.
        topics: The topic patterns it receives.
        inbox_size: How many messages it queues before publishers wait.
        ack: True if the receiver acknowledges each message.
        consumer: The name it acknowledges under (the recipient, else the patterns).
    """

    def __init__(
        self,
        bus: MessageBus,
        recipient: str | None,
        topics: tuple[str, ...],
        inbox_size: int,
        ack: bool = False,
        consumer: str | None = None,
    ) -> None:
        if not isinstance(bus, MessageBus):  # its arguments are checked there
            raise UsageError("a Subscription is made by MessageBus.subscribe")
        self._bus = bus
        self.recipient = recipient
        self.topics = topics
        self.inbox_size = inbox_size
        self.ack = ack
        self.consumer = consumer or recipient or ",".join(topics)
        self._queue: deque[Message] = deque()
        self._getters: deque[anyio.Event] = deque()
        self._putters: deque[_Putter] = deque()
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"Subscription(recipient={self.recipient!r}, topics={self.topics!r}, "
            f"queued={len(self._queue)}, closed={self._closed})"
        )

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called (or the bus closed)."""
        return self._closed

    def __len__(self) -> int:
        """Messages queued and not yet received."""
        return len(self._queue)

    def matches(self, message: Message) -> bool:
        """True if ``message`` is addressed to this recipient or on one of these topics."""
        if self.recipient is not None and message.recipient == self.recipient:
            return True
        return any(t.matches(p) for t in message.topics for p in self.topics)

    # -- receiving ---------------------------------------------------------------------

    def receive_nowait(self) -> Message:
        """Return the oldest queued message without waiting.

        Raises:
            anyio.WouldBlock: If the inbox is empty.
            anyio.EndOfStream: If it is empty and closed.
        """
        if self._queue:
            message = self._queue.popleft()
            if self._putters:
                # hand the freed slot to the longest-waiting publisher
                putter = self._putters.popleft()
                self._queue.append(putter.message)
                putter.done = True
                putter.event.set()
            return message
        if self._closed:
            raise anyio.EndOfStream
        raise anyio.WouldBlock

    async def receive(self) -> Message:
        """Wait for the next message.

        Raises:
            anyio.EndOfStream: When the subscription is closed and drained.
        """
        await anyio.lowlevel.checkpoint()
        while True:
            try:
                return self.receive_nowait()
            except anyio.WouldBlock:
                pass
            event = anyio.Event()
            self._getters.append(event)
            try:
                await event.wait()
            except BaseException:
                try:
                    self._getters.remove(event)
                except ValueError:
                    # woken, then cancelled: pass the wake-up on
                    self._wake_getter()
                raise

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def aack(self, message: Message) -> None:
        """Acknowledge ``message`` (same as ``bus.aack(message, sub.consumer)``)."""
        await self._bus.aack(message, self.consumer)

    async def adead_letter(self, message: Message, reason: str) -> None:
        """Give ``message`` up (same as ``bus.adead_letter(message, sub.consumer, reason)``)."""
        await self._bus.adead_letter(message, self.consumer, reason)

    # -- delivering (used by the bus) ---------------------------------------------------

    def _full(self) -> bool:
        return len(self._queue) >= self.inbox_size

    def _wake_getter(self) -> None:
        if self._getters and self._queue:
            self._getters.popleft().set()

    def _put_nowait(self, message: Message) -> bool:
        if self._closed:
            return False
        self._queue.append(message)
        self._wake_getter()
        return True

    async def _put(self, message: Message) -> bool:
        if self._closed:
            return False
        if not self._putters and not self._full():
            return self._put_nowait(message)
        putter = _Putter(message)
        self._putters.append(putter)
        try:
            await putter.event.wait()
        except BaseException:
            if not putter.done:
                self._putters.remove(putter)
            raise
        return putter.done

    # -- closing -----------------------------------------------------------------------

    def close(self) -> None:
        """Unsubscribe. Idempotent; queued messages stay receivable."""
        if self._closed:
            return
        self._closed = True
        self._bus._remove(self)
        while self._putters:
            self._putters.popleft().event.set()  # done stays False: not delivered
        while self._getters:
            self._getters.popleft().set()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class MessageBus:
    """An in-process message bus applying :class:`~converge.core.hooks.MessageHook` s.

    Publishing runs every hook's ``apre_send`` in order (a hook returning None drops the
    message), finds the matching subscriptions, runs every hook's ``apost_receive`` for
    each receiver (None drops it for that receiver) and queues it in each inbox. A hook
    that raises gets ``on_error(stage, error, context)`` and the message is dropped (for
    every receiver at ``"pre_send"``, for that receiver at ``"post_receive"``); the bus
    keeps working.

    Inboxes are bounded: a publish waits for space (backpressure: a slow consumer slows
    its senders instead of growing memory), or with ``wait=False`` refuses with
    :class:`~converge.errors.BusFullError`. The bus belongs to one event loop; it is
    not thread-safe.

    Acknowledgements: a subscription opened with ``ack=True`` acknowledges each message
    (:meth:`aack`) or gives it up (:meth:`adead_letter`); ack listeners
    (:meth:`add_ack_listener`) hear ``on_settled(message)`` once every acking subscription
    that received it acknowledged it (or when ``publish`` delivered it to receivers none
    of which acks), and ``on_dead(message, consumer, reason)`` for each dead letter. A
    publish that delivered to nobody (``0``) settles nothing: its publisher decides. Sinks
    (:meth:`add_sink`) are durable hand-offs: ``publish`` awaits each matching sink's
    handler before it delivers to subscriptions, and raises what a handler raises.

    Metrics (on ``metrics``): ``bus_messages_published_total``,
    ``bus_messages_delivered_total``, ``bus_messages_dropped_total{stage}``,
    ``bus_hook_errors_total{stage}``, ``bus_full_total``,
    ``bus_dead_letters_total{consumer}``, ``bus_ack_listener_errors_total``.

    Args:
        hooks: Middleware applied to every message, in order.
        inbox_size: Default capacity of a subscription's inbox.
        metrics: Where to count; a private collector (``bus.metrics``) when None.

    Raises:
        UsageError: For a hook that is not a MessageHook or an inbox size below 1.
    """

    def __init__(
        self,
        *,
        hooks: Sequence[MessageHook] = (),
        inbox_size: int = 100,
        metrics: MetricsCollector | None = None,
    ) -> None:
        if isinstance(hooks, MessageHook) or not isinstance(hooks, Sequence):
            raise UsageError("hooks must be a sequence of MessageHook")
        for hook in hooks:
            if not isinstance(hook, MessageHook):
                raise UsageError(f"hooks must be MessageHook instances, not {safe_repr(hook)}")
        if metrics is not None and not isinstance(metrics, MetricsCollector):
            raise UsageError("metrics must be a MetricsCollector or None")
        self.hooks: tuple[MessageHook, ...] = tuple(hooks)
        self.inbox_size = check_int("inbox_size", inbox_size, 1)
        self.metrics = metrics if metrics is not None else MetricsCollector()
        # insertion-ordered sets of subscriptions
        self._by_recipient: dict[str, dict[Subscription, None]] = {}
        self._by_topic: dict[Subscription, None] = {}
        self._sinks: list[tuple[tuple[str, ...], Sink]] = []
        self._ack_listeners: list[AckListener] = []
        self._acks = AckTable()
        self._closed = False

    # -- subscribing -------------------------------------------------------------------

    def subscribe(
        self,
        recipient: str | None = None,
        *,
        topics: Sequence[str] = (),
        inbox_size: int | None = None,
        ack: bool = False,
        consumer: str | None = None,
    ) -> Subscription:
        """Open an inbox for messages addressed to ``recipient`` and/or on ``topics``.

        Args:
            recipient: A recipient id (``message.recipient``), or None.
            topics: Topic patterns: a name (``"orders"``), ``"orders.*"`` (one more
                segment) or ``"orders.#"`` (the name and anything below it).
            inbox_size: Capacity of this inbox; the bus default when None.
            ack: True if the receiver acknowledges each message (:meth:`aack`); the
                message is settled only once every acking receiver has.
            consumer: The name it acknowledges under; the recipient, else the topic
                patterns joined by commas, when None.

        Raises:
            UsageError: For neither a recipient nor topics, an empty recipient, an invalid
                pattern or inbox size.
            ClosedError: If the bus is closed.
        """
        if recipient is not None and (not isinstance(recipient, str) or not recipient):
            raise UsageError("recipient must be a non-empty string or None")
        patterns = _check_patterns(topics)
        if recipient is None and not patterns:
            raise UsageError("subscribe to a recipient, to topics, or to both")
        size = self.inbox_size if inbox_size is None else check_int("inbox_size", inbox_size, 1)
        if not isinstance(ack, bool):
            raise UsageError("ack must be True or False")
        if consumer is not None and (not isinstance(consumer, str) or not consumer):
            raise UsageError("consumer must be a non-empty string or None")
        if self._closed:
            raise ClosedError("the message bus is closed")
        sub = Subscription(self, recipient, patterns, size, ack, consumer)
        if recipient is not None:
            self._by_recipient.setdefault(recipient, {})[sub] = None
        if patterns:
            self._by_topic[sub] = None
        return sub

    def _remove(self, sub: Subscription) -> None:
        if sub.recipient is not None:
            subs = self._by_recipient.get(sub.recipient)
            if subs is not None:
                subs.pop(sub, None)
                if not subs:
                    del self._by_recipient[sub.recipient]
        self._by_topic.pop(sub, None)

    def _match(self, message: Message) -> list[Subscription]:
        found: dict[Subscription, None] = {}
        if message.recipient is not None:
            found.update(self._by_recipient.get(message.recipient, {}))
        if message.topics:
            for sub in self._by_topic:
                if sub not in found and sub.matches(message):
                    found[sub] = None
        return list(found)

    def has_subscribers(self, message: Message) -> bool:
        """True if at least one open subscription matches ``message`` (hooks aside)."""
        if not isinstance(message, Message):
            raise UsageError(f"expected a converge Message, got {type(message).__name__}")
        return bool(self._match(message)) or bool(self._match_sinks(message))

    # -- sinks and acknowledgements ------------------------------------------------------

    def add_sink(self, topics: str | Sequence[str], handler: Sink) -> None:
        """Hand every message published on ``topics`` to ``handler``, awaited by ``publish``.

        A sink is a durable hand-off (an outbox, for example): when ``publish`` returns,
        each matching handler has finished; if one raises, ``publish`` raises that error
        and delivers to no subscription. Sinks see the message after the ``pre_send``
        hooks (``post_receive`` hooks are for receivers' inboxes); each counts as one
        receiver in ``publish``'s result.

        Args:
            topics: A topic pattern or a sequence of them.
            handler: ``async handler(message) -> None``.

        Raises:
            UsageError: For an invalid pattern or a handler that is not callable.
        """
        patterns = _check_patterns([topics] if isinstance(topics, str) else topics)
        if not patterns:
            raise UsageError("a sink needs at least one topic pattern")
        if not callable(handler):
            raise UsageError("a sink handler must be an async callable")
        self._sinks.append((patterns, handler))

    def remove_sink(self, handler: Sink) -> None:
        """Remove every registration of ``handler`` (no error if there is none).

        A bound method matches the same method of the same object: ``obj.write`` makes a
        new method object on every access.
        """
        self._sinks = [(p, h) for p, h in self._sinks if h != handler]

    def _match_sinks(self, message: Message) -> list[Sink]:
        if not self._sinks or not message.topics:
            return []
        return [
            handler
            for patterns, handler in self._sinks
            if any(t.matches(p) for t in message.topics for p in patterns)
        ]

    def add_ack_listener(self, listener: AckListener) -> None:
        """Tell ``listener`` when messages are settled (``on_settled``) or dead (``on_dead``).

        Raises:
            UsageError: If it lacks ``on_settled`` or ``on_dead``.
        """
        if not isinstance(listener, AckListener):
            raise UsageError("an ack listener needs async on_settled() and on_dead()")
        self._ack_listeners.append(listener)

    def remove_ack_listener(self, listener: AckListener) -> None:
        """Stop telling ``listener`` (no error if it was not added)."""
        self._ack_listeners = [x for x in self._ack_listeners if x is not listener]

    @property
    def unacknowledged(self) -> int:
        """How many message ids wait for an acknowledgement (or a publish in flight)."""
        return len(self._acks)

    async def aack(self, message: Message, consumer: str) -> None:
        """``consumer`` is done with ``message``; settle it once every acking receiver is.

        Acknowledging a message the consumer does not hold (twice, or never received)
        does nothing.
        """
        if not isinstance(message, Message):
            raise UsageError(f"expected a converge Message, got {type(message).__name__}")
        settled = self._acks.ack(message.id, consumer)
        if settled is not None:
            await self._settled(settled)

    async def adead_letter(self, message: Message, consumer: str, reason: str) -> None:
        """``consumer`` gives ``message`` up: listeners hear ``on_dead``; it never settles."""
        if not isinstance(message, Message):
            raise UsageError(f"expected a converge Message, got {type(message).__name__}")
        self.metrics.inc("bus_dead_letters_total", labels={"consumer": consumer})
        self._acks.dead(message.id, consumer)
        for listener in list(self._ack_listeners):
            try:
                await listener.on_dead(message, consumer, reason)
            except Exception:
                self.metrics.inc("bus_ack_listener_errors_total")
                _log.exception("%r.on_dead failed for message %s", listener, message.id)

    async def _settled(self, message: Message) -> None:
        for listener in list(self._ack_listeners):
            try:
                await listener.on_settled(message)
            except Exception:
                self.metrics.inc("bus_ack_listener_errors_total")
                _log.exception("%r.on_settled failed for message %s", listener, message.id)

    # -- publishing --------------------------------------------------------------------

    def _hook_failed(
        self, hook: MessageHook, stage: str, error: Exception, context: dict[str, Any]
    ) -> None:
        self.metrics.inc("bus_hook_errors_total", labels={"stage": stage})
        self.metrics.inc("bus_messages_dropped_total", labels={"stage": stage})
        try:
            hook.on_error(stage, error, context)
        except Exception:
            _log.exception("%r.on_error raised while handling %r", hook, error)

    async def _post_receive(self, message: Message, sub: Subscription) -> Message | None:
        current: Message | None = message
        for hook in self.hooks:
            try:
                current = await hook.apost_receive(current)  # type: ignore[arg-type]
                if current is not None and not isinstance(current, Message):
                    raise UsageError(f"{hook!r}.apost_receive returned {current!r}")
            except Exception as exc:
                context = {"message": message, "subscription": sub, "bus": self}
                self._hook_failed(hook, "post_receive", exc, context)
                return None
            if current is None:
                self.metrics.inc("bus_messages_dropped_total", labels={"stage": "post_receive"})
                return None
        return current

    async def publish(self, message: Message, *, wait: bool = True) -> int:
        """Run the hooks and deliver ``message`` to every matching subscription.

        Args:
            message: The message.
            wait: True waits for space in full inboxes (backpressure). False never
                waits: if any matching inbox is full it raises and delivers to none.

        Returns:
            How many receivers got the message (0 when a hook dropped it or nobody
            subscribes).

        Raises:
            BusFullError: With ``wait=False``, when a matching inbox is full; nothing
                was delivered.
            UsageError: For a non-Message or a non-bool ``wait``.
            ClosedError: If the bus is closed.
        """
        if not isinstance(message, Message):
            raise UsageError(f"expected a converge Message, got {type(message).__name__}")
        if not isinstance(wait, bool):
            raise UsageError("wait must be True or False")
        if self._closed:
            raise ClosedError("the message bus is closed")
        await anyio.lowlevel.checkpoint()
        metrics = self.metrics
        metrics.inc("bus_messages_published_total")
        current: Message | None = message
        for hook in self.hooks:
            try:
                current = await hook.apre_send(current)  # type: ignore[arg-type]
                if current is not None and not isinstance(current, Message):
                    raise UsageError(f"{hook!r}.apre_send returned {current!r}")
            except Exception as exc:
                self._hook_failed(hook, "pre_send", exc, {"message": message, "bus": self})
                return 0
            if current is None:
                metrics.inc("bus_messages_dropped_total", labels={"stage": "pre_send"})
                _log.info("a pre_send hook dropped message %s", message.id)
                return 0
        assert current is not None
        targets = self._match(current)
        if not wait and any(sub._full() for sub in targets):
            raise self._full_error(current)
        track = bool(self._ack_listeners) or any(sub.ack for sub in targets)
        if not track:
            return await self._deliver(current, targets, wait)
        acks = self._acks
        acks.hold(current)
        delivered = 0
        try:
            delivered = await self._deliver(current, targets, wait)
        finally:
            # nobody took it (or the publish failed): not settled, the publisher decides
            settled = acks.release(current, failed=not delivered)
        if settled is not None:
            await self._settled(settled)
        return delivered

    async def _deliver(self, current: Message, targets: list[Subscription], wait: bool) -> int:
        delivered = 0
        for sink in self._match_sinks(current):
            await sink(current)
            delivered += 1
        if wait:
            for sub in targets:
                final = await self._post_receive(current, sub) if self.hooks else current
                if final is not None and await self._put(sub, final, current):
                    delivered += 1
        else:
            finals = []
            for sub in targets:
                final = await self._post_receive(current, sub) if self.hooks else current
                if final is not None:
                    finals.append((sub, final))
            # no await from this check to the last delivery: all or none
            if any(sub._full() for sub, _ in finals):
                raise self._full_error(current)
            for sub, final in finals:
                if sub.ack:
                    self._acks.delivered(current, sub.consumer)
                if sub._put_nowait(final):
                    delivered += 1
                elif sub.ack:
                    self._acks.ack(current.id, sub.consumer)  # not delivered: undo
        if delivered:
            self.metrics.inc("bus_messages_delivered_total", delivered)
        return delivered

    async def _put(self, sub: Subscription, final: Message, current: Message) -> bool:
        if not sub.ack:
            return await sub._put(final)
        # counted before it is queued: the receiver may ack before this task resumes
        self._acks.delivered(current, sub.consumer)
        ok = False
        try:
            ok = await sub._put(final)
        finally:
            if not ok:
                self._acks.ack(current.id, sub.consumer)  # not delivered: undo
        return ok

    def _full_error(self, message: Message) -> BusFullError:
        self.metrics.inc("bus_full_total")
        return BusFullError(
            f"an inbox matching message {message.id} is full; nothing was delivered "
            "(publish with wait=True to wait for space)"
        )

    # -- closing -----------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Close the bus and every subscription (queued messages stay receivable)."""
        self._closed = True
        subs = {s: None for group in self._by_recipient.values() for s in group}
        subs.update(self._by_topic)
        for sub in subs:
            sub.close()

    async def aclose(self) -> None:
        """Async form of :meth:`close`."""
        self.close()

    async def __aenter__(self) -> MessageBus:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
