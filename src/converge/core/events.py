"""Progress events a UI can subscribe to, and the tiny emitter that delivers them.

An :class:`EventEmitter` is a fan-out point: producers (``LLMAgent``, the runner) call
:meth:`EventEmitter.emit` with one of the frozen event records below; consumers
subscribe with a callback (:meth:`EventEmitter.subscribe`) or a bounded anyio memory
stream (:meth:`EventEmitter.open_stream`). Emitting never blocks and never raises: a full
stream drops the event for that subscriber (counted in :attr:`EventEmitter.dropped`), a
callback that raises is logged and ignored, and with nobody listening ``emit`` returns
at once (producers can also ask :meth:`EventEmitter.wants` before building an event)::

    events = EventEmitter()
    agent = LLMAgent(identity, provider, events=events)

    with events.open_stream(max_buffer=256) as stream:   # in the UI task
        async for event in stream:
            print(event.to_dict())

Payload conventions (every event, see :meth:`ProgressEvent.to_dict`):

* ``source`` is the emitting agent's id (``""`` for events not tied to an agent) and
  ``at`` the wall-clock time in Unix seconds; ``call_id`` ties together every event of
  one model call (``CallStarted`` ... ``CallFinished`` or ``CallFailed``).
* Values are JSON-ready: tool arguments and results as given (non-JSON values are
  ``repr``'d by :meth:`~ProgressEvent.to_dict`, with depth and width bounded
  when even ``repr`` fails, e.g. nested too deep), usage as a dict of token counts
  with ``None`` for counts the provider did not report, errors as ``error_type`` (the
  class name) plus ``error`` (the message), decisions as their
  :mod:`converge.core.decisions` dicts.
* ``to_dict()`` adds ``"type"``: the event class name (``"TextDelta"``, ...).

Everything here is synchronous and in memory (no I/O). Callbacks run inline in the
emitting task, so keep them quick; a stream subscriber must read on the event loop that
emits (use a callback to cross threads).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from converge._numbers import finite_float
from converge._repr import safe_repr
from converge.core.decisions import Decision
from converge.errors import UsageError

__all__ = [
    "DEFAULT_MAX_BUFFER",
    "MAX_SUBSCRIBERS",
    "CallFailed",
    "CallFinished",
    "CallStarted",
    "DecisionsMade",
    "EventCallback",
    "EventEmitter",
    "EventStream",
    "ProgressEvent",
    "Subscription",
    "TextDelta",
    "ToolInvoked",
    "ToolResult",
    "new_call_id",
]

_logger = logging.getLogger("converge.events")

DEFAULT_MAX_BUFFER = 256
"""Events a stream subscriber may have unread before new ones are dropped for it."""

MAX_SUBSCRIBERS = 1024
"""Most subscriptions one emitter holds at once."""


def new_call_id() -> str:
    """A fresh id for one model call (32 hex digits)."""
    return uuid.uuid4().hex


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return safe_repr(value)
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class ProgressEvent:
    """Base of every progress event.

    Attributes:
        source: The emitting agent's id (``""`` when not tied to an agent).
        at: Wall-clock time of the event, Unix seconds.
    """

    source: str = ""
    at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if not isinstance(self.source, str):
            raise UsageError("source must be a string")
        if finite_float(self.at) is None:
            raise UsageError("at must be a finite number of Unix seconds")

    def to_dict(self) -> dict[str, Any]:
        """The event as a JSON-ready dict, with ``"type"`` set to the class name."""
        out: dict[str, Any] = {"type": type(self).__name__}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "decisions":
                value = [d.to_dict() for d in value]
            out[f.name] = _jsonable(value)
        return out


def _check_str(name: str, value: Any, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, str):
        raise UsageError(f"{name} must be a string" + (" or None" if optional else ""))


@dataclass(frozen=True, slots=True, kw_only=True)
class CallStarted(ProgressEvent):
    """A model call is about to be sent.

    Attributes:
        call_id: Ties this call's events together.
        provider: The provider's class name (``"OpenAIProvider"``, ...).
        model: The model asked for, when known.
        attempt: 1 for the first call of an ``adecide``, 2+ for re-asks.
    """

    call_id: str
    provider: str
    model: str | None = None
    attempt: int = 1

    def __post_init__(self) -> None:
        ProgressEvent.__post_init__(self)
        _check_str("call_id", self.call_id)
        _check_str("provider", self.provider)
        _check_str("model", self.model, optional=True)
        if isinstance(self.attempt, bool) or not isinstance(self.attempt, int) or self.attempt < 1:
            raise UsageError("attempt must be a positive integer")


@dataclass(frozen=True, slots=True, kw_only=True)
class TextDelta(ProgressEvent):
    """A piece of the reply text, as the provider streamed it.

    Attributes:
        call_id: The call it belongs to.
        text: The new text (append to the previous deltas).
    """

    call_id: str
    text: str

    def __post_init__(self) -> None:
        ProgressEvent.__post_init__(self)
        _check_str("call_id", self.call_id)
        _check_str("text", self.text)


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolInvoked(ProgressEvent):
    """A tool is about to run.

    Attributes:
        tool_name: The tool.
        arguments: Its arguments (a JSON object).
        tool_call_id: Ties it to its :class:`ToolResult` (and to the model's tool call).
    """

    tool_name: str
    arguments: Mapping[str, Any]
    tool_call_id: str

    def __post_init__(self) -> None:
        ProgressEvent.__post_init__(self)
        _check_str("tool_name", self.tool_name)
        _check_str("tool_call_id", self.tool_call_id)
        if not isinstance(self.arguments, Mapping):
            raise UsageError("arguments must be a mapping")


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolResult(ProgressEvent):
    """A tool finished: ``result`` on success, ``error`` (a message) on failure.

    Attributes:
        tool_name: The tool.
        tool_call_id: As in the matching :class:`ToolInvoked`.
        result: What it returned (None on failure).
        error: Why it failed (None on success).
    """

    tool_name: str
    tool_call_id: str
    result: Any = None
    error: str | None = None

    def __post_init__(self) -> None:
        ProgressEvent.__post_init__(self)
        _check_str("tool_name", self.tool_name)
        _check_str("tool_call_id", self.tool_call_id)
        _check_str("error", self.error, optional=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class DecisionsMade(ProgressEvent):
    """An agent settled on its decisions for one turn.

    Attributes:
        decisions: The decisions (possibly none).
        call_id: The model call they came from, when there was one.
    """

    decisions: tuple[Decision, ...]
    call_id: str | None = None

    def __post_init__(self) -> None:
        ProgressEvent.__post_init__(self)
        _check_str("call_id", self.call_id, optional=True)
        if not isinstance(self.decisions, tuple) or not all(
            isinstance(d, Decision) for d in self.decisions
        ):
            raise UsageError("decisions must be a tuple of Decision")


@dataclass(frozen=True, slots=True, kw_only=True)
class CallFinished(ProgressEvent):
    """A model call answered.

    Attributes:
        call_id: The call.
        usage: Token counts (``input_tokens``, ``output_tokens``, ``cache_read_tokens``,
            ``cache_write_tokens``, ``reasoning_tokens``); None where not reported.
        stop_reason: ``"stop"``, ``"length"``, ``"tool_calls"``, ... (None when the
            provider does not say).
        latency_s: Seconds from :class:`CallStarted` to the answer.
        model: The model that answered, as the provider named it (after a fallback, the
            fallback's), when known.
    """

    call_id: str
    usage: Mapping[str, int | None] = field(default_factory=dict)
    stop_reason: str | None = None
    latency_s: float | None = None
    model: str | None = None

    def __post_init__(self) -> None:
        ProgressEvent.__post_init__(self)
        _check_str("call_id", self.call_id)
        _check_str("stop_reason", self.stop_reason, optional=True)
        _check_str("model", self.model, optional=True)
        if not isinstance(self.usage, Mapping):
            raise UsageError("usage must be a mapping of token counts")


@dataclass(frozen=True, slots=True, kw_only=True)
class CallFailed(ProgressEvent):
    """A model call, or the handling of its answer, failed.

    Attributes:
        call_id: The call (None for failures outside one).
        error_type: The exception's class name (``"ProviderRateLimitError"``,
            ``"DecisionParseError"``, ...).
        error: Its message.
        final: False when the agent goes on (a re-ask follows), True when it gives up.
    """

    error_type: str
    error: str
    call_id: str | None = None
    final: bool = True

    def __post_init__(self) -> None:
        ProgressEvent.__post_init__(self)
        _check_str("error_type", self.error_type)
        _check_str("error", self.error)
        _check_str("call_id", self.call_id, optional=True)
        if not isinstance(self.final, bool):
            raise UsageError("final must be a bool")

    @classmethod
    def from_exception(
        cls,
        exc: BaseException,
        *,
        source: str = "",
        call_id: str | None = None,
        final: bool = True,
    ) -> CallFailed:
        """The event describing ``exc``.

        Args:
            exc: The failure.
            source: The agent's id.
            call_id: The call it ended.
            final: Whether the agent gives up.

        Raises:
            UsageError: When ``exc`` is not an exception, or for a bad ``source``,
                ``call_id`` or ``final``.
        """
        if not isinstance(exc, BaseException):
            raise UsageError("from_exception takes an exception")
        try:
            message = str(exc)
        except Exception:  # a broken __str__, or RecursionError from nested arguments
            message = f"<{type(exc).__name__}: str() failed>"
        return cls(
            source=source,
            error_type=type(exc).__name__,
            error=message,
            call_id=call_id,
            final=final,
        )


def _check_event_type(event_type: object) -> None:
    if not (isinstance(event_type, type) and issubclass(event_type, ProgressEvent)):
        raise UsageError("event_type must be a ProgressEvent subclass")


EventCallback = Callable[[ProgressEvent], object]
"""What :meth:`EventEmitter.subscribe` takes: a plain function of one event."""


class Subscription:
    """One subscriber; call :meth:`close` (or leave the ``with`` block) to unsubscribe.

    Attributes:
        types: Event classes delivered (subclasses included); None for all.
        dropped: Events not delivered because the subscriber's buffer was full.
    """

    def __init__(
        self,
        emitter: EventEmitter,
        deliver: Callable[[ProgressEvent], bool],
        types: tuple[type[ProgressEvent], ...] | None,
    ) -> None:
        self._emitter = emitter
        self._deliver = deliver
        self.types = types
        self.dropped = 0

    def accepts(self, event_type: type[ProgressEvent]) -> bool:
        """Whether events of ``event_type`` reach this subscriber.

        Raises:
            UsageError: When ``event_type`` is not a :class:`ProgressEvent` subclass.
        """
        _check_event_type(event_type)
        return self._accepts(event_type)

    def _accepts(self, event_type: type[ProgressEvent]) -> bool:
        return self.types is None or issubclass(event_type, self.types)

    def _offer(self, event: ProgressEvent) -> None:
        if not self._accepts(type(event)):
            return
        if not self._deliver(event):
            self.dropped += 1
            self._emitter._count_drop()

    def close(self) -> None:
        """Unsubscribe (idempotent)."""
        self._emitter._remove(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._leave()

    def _leave(self) -> None:
        """What leaving the ``with`` block does."""
        self.close()


class EventStream(Subscription):
    """A stream subscription: iterate it with ``async for`` to receive events.

    Closing it unsubscribes and ends the iteration once the buffered events are read;
    leaving its ``with`` block also closes the receiving end.
    """

    def __init__(
        self,
        emitter: EventEmitter,
        send: MemoryObjectSendStream[ProgressEvent],
        receive: MemoryObjectReceiveStream[ProgressEvent],
        types: tuple[type[ProgressEvent], ...] | None,
    ) -> None:
        super().__init__(emitter, self._send, types)
        self._sender = send
        self.receive = receive

    def _send(self, event: ProgressEvent) -> bool:
        try:
            self._sender.send_nowait(event)
        except anyio.WouldBlock:
            return False
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            self.close()  # the reader closed its end: nobody is left to read
            return True
        return True

    def close(self) -> None:
        """Unsubscribe; pending events can still be read, then the iteration ends."""
        super().close()
        self._sender.close()

    def __enter__(self) -> EventStream:
        return self

    def _leave(self) -> None:
        # Both ends: anyio warns (ResourceWarning) about a stream end dropped open.
        self.close()
        self.receive.close()

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> ProgressEvent:
        try:
            return await self.areceive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def areceive(self) -> ProgressEvent:
        """The next event (waits for one).

        Raises:
            EndOfStream: After :meth:`close`, once the buffered events are read.
        """
        try:
            return await self.receive.receive()
        except anyio.EndOfStream:
            self.receive.close()  # read to its end: nothing more can come
            raise
        except anyio.ClosedResourceError:  # closed at its end, or by the with block
            raise anyio.EndOfStream from None


class EventEmitter:
    """Fan-out of :class:`ProgressEvent` records to callbacks and bounded streams.

    Thread-safe to subscribe and emit; see the module docstring for the guarantees.

    Attributes:
        dropped: Events dropped because a subscriber's buffer was full (all subscribers).
        errors: Callback invocations that raised (logged and ignored).
    """

    def __init__(self) -> None:
        self._subs: tuple[Subscription, ...] = ()
        self._lock = threading.Lock()
        self.dropped = 0
        self.errors = 0

    def __len__(self) -> int:
        """Number of current subscriptions."""
        return len(self._subs)

    def _add(self, sub: Subscription) -> None:
        with self._lock:
            if len(self._subs) >= MAX_SUBSCRIBERS:
                raise UsageError(
                    f"this EventEmitter already has {MAX_SUBSCRIBERS} subscribers; "
                    "close unused subscriptions"
                )
            self._subs = (*self._subs, sub)

    def _remove(self, sub: Subscription) -> None:
        with self._lock:
            self._subs = tuple(s for s in self._subs if s is not sub)

    def _count_drop(self) -> None:
        with self._lock:
            self.dropped += 1

    @staticmethod
    def _types(
        types: type[ProgressEvent] | tuple[type[ProgressEvent], ...] | None,
    ) -> tuple[type[ProgressEvent], ...] | None:
        if types is None:
            return None
        if isinstance(types, type):
            types = (types,)
        if (
            not isinstance(types, tuple)
            or not types
            or not all(isinstance(t, type) and issubclass(t, ProgressEvent) for t in types)
        ):
            raise UsageError("types must be a ProgressEvent subclass or a tuple of them")
        return types

    def subscribe(
        self,
        callback: EventCallback,
        *,
        types: type[ProgressEvent] | tuple[type[ProgressEvent], ...] | None = None,
    ) -> Subscription:
        """Call ``callback(event)`` for every event emitted (inline; keep it quick).

        Args:
            callback: A plain function; what it returns is ignored, what it raises is
                logged and ignored.
            types: Only these event classes (None: all).

        Returns:
            The :class:`Subscription` (close it to unsubscribe).

        Raises:
            UsageError: For a non-callable, bad ``types``, or too many subscribers.
        """
        if not callable(callback):
            raise UsageError("callback must be callable")
        selected = self._types(types)

        def deliver(event: ProgressEvent) -> bool:
            try:
                callback(event)
            except Exception:
                with self._lock:
                    self.errors += 1
                _logger.exception("progress event callback raised; ignored")
            return True

        sub = Subscription(self, deliver, selected)
        self._add(sub)
        return sub

    def open_stream(
        self,
        *,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        types: type[ProgressEvent] | tuple[type[ProgressEvent], ...] | None = None,
    ) -> EventStream:
        """Subscribe with a bounded anyio memory stream.

        When ``max_buffer`` events are unread, further events for this subscriber are
        dropped (counted in its ``dropped``) instead of blocking the emitter.

        Args:
            max_buffer: Unread events kept, at least 1.
            types: Only these event classes (None: all).

        Returns:
            The :class:`EventStream`: use it as a context manager and ``async for`` it.
        """
        if isinstance(max_buffer, bool) or not isinstance(max_buffer, int) or max_buffer < 1:
            raise UsageError("max_buffer must be a positive integer")
        selected = self._types(types)
        send, receive = anyio.create_memory_object_stream[ProgressEvent](max_buffer)
        sub = EventStream(self, send, receive, selected)
        self._add(sub)
        return sub

    def wants(self, event_type: type[ProgressEvent]) -> bool:
        """Whether any subscriber would receive events of ``event_type`` (cheap).

        Raises:
            UsageError: When ``event_type`` is not a :class:`ProgressEvent` subclass.
        """
        _check_event_type(event_type)
        return any(s._accepts(event_type) for s in self._subs)

    def emit(self, event: ProgressEvent) -> None:
        """Deliver ``event`` to every matching subscriber; never blocks, never raises.

        Args:
            event: The event.

        Raises:
            UsageError: When ``event`` is not a :class:`ProgressEvent`.
        """
        subs = self._subs
        if not subs:
            return
        if not isinstance(event, ProgressEvent):
            raise UsageError("emit takes a ProgressEvent")
        for sub in subs:
            sub._offer(event)
