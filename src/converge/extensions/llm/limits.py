""":class:`LimitedProvider`: concurrency, requests- and tokens-per-minute limits shared by
every agent that uses one provider.

The per-minute limits are token buckets (the GCRA math of
:mod:`converge.extensions.rate_limit.bucket`, in integer nanoseconds): a bucket holds a
minute's worth and refills continuously. Before a call, its token cost is estimated
(about four characters a token for the prompt, plus ``max_tokens`` or
``max_completion_tokens`` when given, as OpenAI's own limiter counts) and reserved,
waiting if needed; after the call the bucket is corrected by the tokens the provider
reported (``Usage.total_tokens``: cache reads and writes are part of the input, reasoning
part of the output). A call costing more than a whole bucket is charged a full bucket, so
it runs when the bucket is full rather than never.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Any

import anyio

from converge import _sync
from converge._numbers import check_positive, wait_seconds
from converge.core.memory import approximate_tokens
from converge.errors import RateLimitTimeoutError, UsageError
from converge.extensions.llm._calls import (
    ResultSurface,
    acomplete_with,
    stream_with,
)
from converge.extensions.llm.protocol import ChatResult, Usage
from converge.extensions.llm.stream import ChatStream
from converge.extensions.rate_limit.bucket import NEVER as _NEVER
from converge.extensions.rate_limit.bucket import BucketParams, TokenBucketConfig, reserve

__all__ = ["LimitedProvider", "estimate_tokens"]

_NS = 1_000_000_000


#: Longest ``max_wait`` kept as a bound (2**62 ns, about 146 years); longer means none.
_MAX_WAIT_S = (1 << 62) / _NS


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list | tuple):
        texts = (p.get("text") if isinstance(p, Mapping) else p for p in content)
        return " ".join(t for t in texts if isinstance(t, str))
    return ""


def _calls_size(calls: Any) -> int:
    try:
        return approximate_tokens(repr(calls))
    except Exception:  # nested too deeply, or a broken __repr__: the provider refuses it
        return 0


def estimate_tokens(messages: Any, kwargs: Mapping[str, Any]) -> int:
    """A call's token cost before it runs: the prompt at about four characters a token
    (text only; tool calls by their size as text), plus the output limit asked for.

    Never fails on malformed messages (what it cannot read counts nothing): validating
    them is the provider's job.

    Args:
        messages: The call's messages.
        kwargs: Its options (``max_tokens`` / ``max_completion_tokens`` are read).

    Raises:
        UsageError: If ``kwargs`` is not a mapping.
    """
    if not isinstance(kwargs, Mapping):
        raise UsageError("kwargs must be a mapping of call options")
    total = 0
    for message in messages if isinstance(messages, list | tuple) else ():
        if not isinstance(message, Mapping):
            continue
        total += approximate_tokens(_text_of(message.get("content")))
        calls = message.get("tool_calls")
        if calls:
            total += _calls_size(calls)
    for key in ("max_completion_tokens", "max_tokens"):
        limit = kwargs.get(key)
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            return total + limit
    return total


class _Bucket:
    """One per-minute token bucket: pure state under the limiter's lock."""

    __slots__ = ("capacity", "params", "tat")

    def __init__(self, per_minute: float) -> None:
        config = TokenBucketConfig(capacity=per_minute, refill_tokens_per_sec=per_minute / 60)
        self.params = config.params()
        self.capacity = max(1, math.floor(per_minute))
        self.tat = 0

    def scaled(self, cost: int) -> BucketParams:
        """Parameters under which ``cost`` tokens are one reservation."""
        cost = max(1, min(cost, self.capacity))
        return BucketParams(self.params.interval * cost, self.params.tolerance, True)

    def charge(self, tokens: int, now: int) -> None:
        """Add (or, when negative, refund) ``tokens`` after the fact."""
        self.tat = max(self.tat + tokens * self.params.interval, 0)
        if tokens < 0 and self.tat < now:
            self.tat = 0  # full again: forget the history


class LimitedProvider(ResultSurface):
    """A provider behind limits that every caller shares.

    Wrap a provider once and hand the wrapper to every agent that should share its
    quota::

        shared = LimitedProvider(OpenAIProvider(), max_concurrency=8,
                                 tokens_per_minute=200_000, requests_per_minute=500)
        agents = [LLMAgent(Identity(), shared) for _ in range(20)]

    ``max_concurrency`` bounds the calls in flight on one event loop (callers queue in
    arrival order); the per-minute buckets are shared by all loops and threads. A call
    waits for capacity unless the wait would exceed ``max_wait``: then it raises
    :class:`~converge.errors.RateLimitTimeoutError` (with ``retry_after``) at once, which
    a :class:`~converge.extensions.llm.FallbackProvider` treats as a reason to move to
    its next provider.

    Args:
        provider: The wrapped provider.
        max_concurrency: Most calls (and open streams) in flight per event loop; None
            for no bound.
        tokens_per_minute: Token budget per minute; None for none.
        requests_per_minute: Calls per minute; None for none.
        max_wait: Longest wait for the per-minute buckets, in seconds; None waits as
            long as needed, and so does ``inf`` or any wait over 2**62 ns (about 146
            years).
        clock: Monotonic seconds (injectable for tests).
        sleep: Async sleep of seconds (injectable for tests).

    Attributes:
        provider: The wrapped provider.
        last_usage: The latest call's usage.
    """

    def __init__(
        self,
        provider: Any,
        *,
        max_concurrency: int | None = None,
        tokens_per_minute: float | None = None,
        requests_per_minute: float | None = None,
        max_wait: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = anyio.sleep,
    ) -> None:
        if not any(callable(getattr(provider, m, None)) for m in ("acomplete", "achat", "chat")):
            raise UsageError("provider must have an acomplete(), achat() or chat() method")
        for name, value, integer in (
            ("max_concurrency", max_concurrency, True),
            ("tokens_per_minute", tokens_per_minute, False),
            ("requests_per_minute", requests_per_minute, False),
        ):
            if value is not None:  # None: no bound
                check_positive(name, value, integer=integer)
        wait = None if max_wait is None else wait_seconds(max_wait)
        if max_wait is not None and wait is None:
            raise UsageError("max_wait must be a number of seconds >= 0 or None")
        if not callable(clock) or not callable(sleep):
            raise UsageError("clock and sleep must be callable")
        self.provider = provider
        self.max_concurrency = max_concurrency
        # inf, or a bound too long to count in nanoseconds: no limit
        self.max_wait = None if wait is None or wait > _MAX_WAIT_S else wait
        self.last_usage: Usage | None = None
        self._clock = clock
        self._sleep = sleep
        self._tokens = _Bucket(tokens_per_minute) if tokens_per_minute is not None else None
        self._requests = _Bucket(requests_per_minute) if requests_per_minute is not None else None
        self._lock = threading.Lock()
        self._slots: _sync.LoopLocal[anyio.Semaphore | None] = _sync.LoopLocal(
            lambda: None if max_concurrency is None else anyio.Semaphore(max_concurrency)
        )
        self._portal: _sync.Portal | None = None
        self._portal_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LimitedProvider({self.provider!r})"

    @property
    def model(self) -> str | None:
        """The wrapped provider's model."""
        model = getattr(self.provider, "model", None)
        return model if isinstance(model, str) else None

    # -- the buckets (sans-I/O under the lock) ------------------------------------------

    def _now(self) -> int:
        return int(self._clock() * _NS)

    def _reserve(self, cost: int) -> tuple[int, int]:
        """Reserve one request and ``cost`` tokens; return ``(wait_ns, charged_tokens)``.

        Raises:
            RateLimitTimeoutError: When the wait would exceed ``max_wait``.
        """
        buckets: list[tuple[_Bucket, BucketParams]] = []
        charged = 0
        if self._requests is not None:
            buckets.append((self._requests, self._requests.scaled(1)))
        if self._tokens is not None:
            charged = max(1, min(cost, self._tokens.capacity))
            buckets.append((self._tokens, self._tokens.scaled(charged)))
        if not buckets:
            return 0, 0
        max_wait = None if self.max_wait is None else int(self.max_wait * _NS)
        with self._lock:
            now = self._now()
            wait, tats = reserve(
                [b.tat for b, _ in buckets], now, [p for _, p in buckets], max_wait
            )
            if tats is None:
                retry_after = math.inf if wait == _NEVER else wait / _NS
                raise RateLimitTimeoutError(
                    f"{type(self.provider).__name__}: the shared limits admit this call only in "
                    f"{retry_after:.3f}s, over max_wait={self.max_wait}s",
                    retry_after=retry_after,
                )
            for (bucket, _), tat in zip(buckets, tats, strict=True):
                bucket.tat = tat
        return wait, charged

    def _settle(self, charged: int, usage: Usage | None) -> None:
        """Correct the token bucket by what the call really used (when reported)."""
        if self._tokens is None or usage is None:
            return
        if usage.input_tokens is None and usage.output_tokens is None:
            return
        with self._lock:
            self._tokens.charge(usage.total_tokens - charged, self._now())

    def _refund(self, charged: int) -> None:
        if self._requests is not None:
            with self._lock:
                self._requests.charge(-1, self._now())
        if self._tokens is not None and charged:
            with self._lock:
                self._tokens.charge(-charged, self._now())

    @property
    def tokens_available(self) -> float | None:
        """Tokens the per-minute token bucket could give now (None without one)."""
        if self._tokens is None:
            return None
        with self._lock:
            now = self._now()
            params = self._tokens.params
            held = params.tolerance - max(self._tokens.tat - now, 0)
            return max(held, 0) / params.interval

    # -- calls ---------------------------------------------------------------------------

    async def _admit(self, messages: Any, kwargs: Mapping[str, Any]) -> int:
        cost = estimate_tokens(messages, kwargs) if self._tokens is not None else 0
        wait, charged = self._reserve(cost)
        if wait > 0:
            try:
                await self._sleep(wait / _NS)
            except BaseException:  # cancelled while queued: give the reservation back
                self._refund(charged)
                raise
        return charged

    async def acomplete(
        self, messages: list[dict[str, Any]], *, allow_partial: bool = False, **kwargs: Any
    ) -> ChatResult:
        """The wrapped provider's ``acomplete``, once the limits admit it.

        Args:
            messages: As for the wrapped provider.
            allow_partial: As for the wrapped provider.
            **kwargs: As for the wrapped provider.

        Raises:
            RateLimitTimeoutError: When the wait would exceed ``max_wait``.
        """
        slots = self._slots.get()
        if slots is not None:
            await slots.acquire()
        try:
            charged = await self._admit(messages, kwargs)
            try:
                result = await acomplete_with(
                    self.provider, messages, allow_partial=allow_partial, kwargs=kwargs
                )
            except UsageError:  # refused before any request: the call used nothing
                self._refund(charged)
                raise
            except BaseException as exc:
                self._settle(charged, getattr(getattr(exc, "result", None), "usage", None))
                raise
        finally:
            if slots is not None:
                slots.release()
        self._settle(charged, result.usage)
        self.last_usage = result.usage
        return result

    def chat_stream(self, messages: list[dict[str, Any]], **kwargs: Any) -> ChatStream:
        """The wrapped provider's stream, once the limits admit it; the stream holds a
        concurrency slot until it ends or is closed. A provider without ``chat_stream``
        answers in one delta.

        Args:
            messages: As for the wrapped provider.
            **kwargs: As for the wrapped provider.
        """
        return ChatStream(lambda out: self._stream(out, messages, kwargs))

    async def _stream(
        self, out: ChatStream, messages: list[dict[str, Any]], kwargs: dict[str, Any]
    ) -> AsyncGenerator[str, None]:
        slots = self._slots.get()
        if slots is not None:
            await slots.acquire()
        inner: Any = None
        charged: int | None = None  # None until admitted
        refused = False
        try:
            charged = await self._admit(messages, kwargs)
            started = False
            try:
                inner = stream_with(self.provider, messages, kwargs)
                async for delta in inner:
                    started = True
                    yield delta
            except UsageError:
                refused = not started  # refused before any request: the call used nothing
                raise
        finally:
            usage = None
            if inner is not None:
                close = getattr(inner, "aclose", None)
                if callable(close):
                    with anyio.CancelScope(shield=True):
                        await close()
                usage = getattr(inner, "usage", None)
                usage = usage if isinstance(usage, Usage) else None
            if charged is not None:
                if refused:
                    self._refund(charged)
                else:
                    self._settle(charged, usage)
            if usage is not None:
                result = getattr(inner, "result", None)
                self.last_usage = usage
                out.finish(usage, result if isinstance(result, ChatResult) else None)
            if slots is not None:
                slots.release()

    # -- sync surface and closing ----------------------------------------------------------

    def _sync_portal(self) -> _sync.Portal:
        with self._portal_lock:
            if self._portal is None:
                self._portal = _sync.Portal()
            return self._portal

    def complete(
        self, messages: list[dict[str, Any]], *, allow_partial: bool = False, **kwargs: Any
    ) -> ChatResult:
        """Synchronous :meth:`acomplete`, on a background loop owned by this wrapper (so
        scripts share the limits with each other, and the wrapped provider's async
        client is reused).

        Args:
            messages: As for :meth:`acomplete`.
            allow_partial: As for :meth:`acomplete`.
            **kwargs: As for :meth:`acomplete`.

        Raises:
            SyncInEventLoopError: When called on an event-loop thread.
        """
        return self._sync_portal().call(
            self.acomplete,
            messages,
            async_name="LimitedProvider.acomplete",
            allow_partial=allow_partial,
            **kwargs,
        )

    def chat_with_usage(self, messages: list[dict[str, Any]], **kwargs: Any) -> tuple[str, Usage]:
        """Synchronous :meth:`achat_with_usage`.

        Args:
            messages: As for :meth:`acomplete`.
            **kwargs: As for :meth:`acomplete`.
        """
        return self._sync_portal().call(
            self.achat_with_usage, messages, async_name="LimitedProvider.achat", **kwargs
        )

    async def arelease_loop(self) -> None:
        """Release the wrapped provider's connections on the running loop."""
        release = getattr(self.provider, "arelease_loop", None)
        if callable(release):
            await release()

    def close(self) -> None:
        """Stop the sync surface's background loop (releasing the wrapped provider's
        connections on it first); the wrapped provider itself stays open.

        Raises:
            SyncInEventLoopError: When called on an event-loop thread.
        """
        _sync.check_sync_allowed("LimitedProvider.aclose")
        with self._portal_lock:
            portal, self._portal = self._portal, None
        if portal is not None:
            try:
                portal.call(self.arelease_loop, async_name="LimitedProvider.close")
            finally:
                portal.close()
