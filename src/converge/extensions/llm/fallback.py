""":class:`FallbackProvider`: the next provider takes over when one is down or saturated.

Each provider keeps its own retry policy: the fallback moves on only once a provider has
given up (its retries spent, or a ``Retry-After`` beyond the policy's cap), and only for
failures another provider may not share: overload, 5xx, timeouts, connection errors,
rate limits, and a :class:`~converge.extensions.llm.LimitedProvider` whose wait would be
too long. Authentication errors, bad requests (other 4xx), and answers that were cut,
filtered or refused are raised at once: the next provider would fail the same way, or the
answer is a result, not an outage.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

import anyio

from converge.errors import (
    ProviderConnectionError,
    ProviderOverloadedError,
    ProviderRateLimitError,
    ProviderResponseError,
    ProviderTimeoutError,
    RateLimitTimeoutError,
    ResponseIncompleteError,
    UsageError,
)
from converge.extensions.llm._calls import (
    ResultSurface,
    acomplete_with,
    complete_with,
    pop_allow_partial,
    result_text,
    stream_with,
)
from converge.extensions.llm.protocol import ChatResult, Usage
from converge.extensions.llm.stream import ChatStream

__all__ = ["FallbackProvider", "is_fallback_error"]

_logger = logging.getLogger("converge.llm")


def is_fallback_error(exc: BaseException) -> bool:
    """Whether ``exc`` should hand the call to the next provider (the default policy).

    True for :class:`~converge.errors.ProviderOverloadedError`,
    :class:`~converge.errors.ProviderRateLimitError`,
    :class:`~converge.errors.ProviderTimeoutError`,
    :class:`~converge.errors.ProviderConnectionError`,
    :class:`~converge.errors.ResponseIncompleteError` (a stream cut short), a
    :class:`~converge.errors.ProviderResponseError` with a 5xx status, and
    :class:`~converge.errors.RateLimitTimeoutError` (a local limit's wait too long).
    False for everything else: auth errors, other 4xx, malformed 2xx bodies, truncated,
    filtered or refused answers, usage errors, and exceptions that are not converge's.
    """
    if isinstance(
        exc,
        ProviderOverloadedError
        | ProviderRateLimitError
        | ProviderTimeoutError
        | ProviderConnectionError
        | ResponseIncompleteError
        | RateLimitTimeoutError,
    ):
        return True
    if isinstance(exc, ProviderResponseError):
        status = exc.status_code
        return isinstance(status, int) and status >= 500
    return False


class FallbackProvider(ResultSurface):
    """Several providers tried in order: the first that answers wins.

    Implements the provider surface (``acomplete``, ``achat``, ``achat_with_usage``,
    ``chat_stream`` and the sync ``complete``, ``chat``, ``chat_with_usage``), so an
    :class:`~converge.extensions.llm.LLMAgent` takes it like any provider::

        provider = FallbackProvider([
            AnthropicProvider(model="claude-sonnet-4-20250514"),
            OpenAIProvider(model="gpt-4o-mini"),
        ])

    Options are passed to every provider as given, so leave ``model`` to each provider's
    constructor. A stream falls back only until its first delta; after that, errors are
    raised as they are.

    Args:
        providers: The providers, in order of preference (at least one).
        should_fallback: Decides whether an exception moves the call on;
            :func:`is_fallback_error` by default.
        on_fallback: Called as ``on_fallback(provider, exc)`` each time a provider is
            given up on (for logging or metrics); what it raises is logged and ignored.

    Attributes:
        providers: The providers, as a tuple.
        last_provider: The provider that answered the latest call (None before).
        last_usage: That call's usage.
    """

    def __init__(
        self,
        providers: Sequence[Any],
        *,
        should_fallback: Callable[[BaseException], bool] = is_fallback_error,
        on_fallback: Callable[[Any, BaseException], object] | None = None,
    ) -> None:
        if isinstance(providers, str) or not isinstance(providers, Sequence) or not providers:
            raise UsageError("providers must be a non-empty list of providers")
        for i, provider in enumerate(providers):
            if not any(
                callable(getattr(provider, m, None)) for m in ("acomplete", "achat", "chat")
            ):
                raise UsageError(
                    f"providers[{i}] must have an acomplete(), achat() or chat() method"
                )
        if not callable(should_fallback):
            raise UsageError("should_fallback must be callable")
        if on_fallback is not None and not callable(on_fallback):
            raise UsageError("on_fallback must be callable")
        self.providers: tuple[Any, ...] = tuple(providers)
        self.should_fallback = should_fallback
        self.on_fallback = on_fallback
        self.last_provider: Any = None
        self.last_usage: Usage | None = None

    def __repr__(self) -> str:
        return f"FallbackProvider({list(self.providers)!r})"

    @property
    def model(self) -> str | None:
        """The first provider's model (what a call normally uses)."""
        model = getattr(self.providers[0], "model", None)
        return model if isinstance(model, str) else None

    def _gave_up(self, index: int, exc: BaseException) -> bool:
        """True when the call should move past provider ``index``."""
        if index == len(self.providers) - 1 or not self.should_fallback(exc):
            return False
        provider = self.providers[index]
        _logger.warning(
            "provider %d (%s) failed (%s: %s); falling back to provider %d",
            index,
            type(provider).__name__,
            type(exc).__name__,
            exc,
            index + 1,
        )
        if self.on_fallback is not None:
            try:
                self.on_fallback(provider, exc)
            except Exception:
                _logger.exception("on_fallback raised; ignored")
        return True

    def _done(self, provider: Any, result: ChatResult) -> ChatResult:
        self.last_provider = provider
        self.last_usage = result.usage
        return result

    async def acomplete(
        self, messages: list[dict[str, Any]], *, allow_partial: bool = False, **kwargs: Any
    ) -> ChatResult:
        """The first answer of the providers, tried in order.

        Args:
            messages: Chat messages (see the providers).
            allow_partial: Return truncated, filtered or refused answers instead of
                raising.
            **kwargs: Options passed to every provider.

        Returns:
            The answering provider's :class:`~converge.extensions.llm.ChatResult`.

        Raises:
            ProviderError: The last provider's error, or the first error that is not a
                reason to fall back.
        """
        for index, provider in enumerate(self.providers):
            try:
                result = await acomplete_with(
                    provider, messages, allow_partial=allow_partial, kwargs=kwargs
                )
            except Exception as exc:
                if self._gave_up(index, exc):
                    continue
                raise
            return self._done(provider, result)
        raise AssertionError("unreachable")  # pragma: no cover

    def complete(
        self, messages: list[dict[str, Any]], *, allow_partial: bool = False, **kwargs: Any
    ) -> ChatResult:
        """Synchronous :meth:`acomplete`, through each provider's own sync surface.

        Args:
            messages: As for :meth:`acomplete`.
            allow_partial: As for :meth:`acomplete`.
            **kwargs: As for :meth:`acomplete`.
        """
        for index, provider in enumerate(self.providers):
            try:
                result = complete_with(
                    provider, messages, allow_partial=allow_partial, kwargs=kwargs
                )
            except Exception as exc:
                if self._gave_up(index, exc):
                    continue
                raise
            return self._done(provider, result)
        raise AssertionError("unreachable")  # pragma: no cover

    def chat_with_usage(self, messages: list[dict[str, Any]], **kwargs: Any) -> tuple[str, Usage]:
        """Synchronous :meth:`achat_with_usage`.

        Args:
            messages: As for :meth:`acomplete`.
            **kwargs: As for :meth:`acomplete`.
        """
        allow_partial = pop_allow_partial(kwargs)
        result = self.complete(messages, allow_partial=allow_partial, **kwargs)
        return result_text(result, kwargs), result.usage

    def chat_stream(self, messages: list[dict[str, Any]], **kwargs: Any) -> ChatStream:
        """Stream from the first provider that starts answering.

        A provider that fails before its first delta is given up on like in
        :meth:`acomplete`; a provider without ``chat_stream`` answers in one delta.
        Usage and result are those of the provider that streamed.

        Args:
            messages: As for :meth:`acomplete`.
            **kwargs: As for :meth:`acomplete` (``allow_partial`` included).

        Returns:
            A :class:`~converge.extensions.llm.ChatStream`.
        """
        return ChatStream(lambda out: self._stream(out, messages, kwargs))

    async def _stream(
        self, out: ChatStream, messages: list[dict[str, Any]], kwargs: dict[str, Any]
    ) -> AsyncGenerator[str, None]:
        for index, provider in enumerate(self.providers):
            inner = stream_with(provider, messages, kwargs)
            started = False
            try:
                async for delta in inner:
                    started = True
                    yield delta
            except Exception as exc:
                if started or not self._gave_up(index, exc):
                    self._finish(out, provider, inner)
                    raise
                continue
            finally:
                close = getattr(inner, "aclose", None)
                if callable(close):
                    with anyio.CancelScope(shield=True):
                        await close()
            self._finish(out, provider, inner)
            return

    def _finish(self, out: ChatStream, provider: Any, inner: Any) -> None:
        usage = getattr(inner, "usage", None)
        result = getattr(inner, "result", None)
        if isinstance(usage, Usage) or isinstance(result, ChatResult):
            out.finish(
                usage if isinstance(usage, Usage) else Usage(None, None),
                result if isinstance(result, ChatResult) else None,
            )
        self.last_provider = provider
        self.last_usage = out.usage

    async def arelease_loop(self) -> None:
        """Release every provider's connections on the running loop (see the providers)."""
        for provider in self.providers:
            release = getattr(provider, "arelease_loop", None)
            if callable(release):
                await release()

    async def aclose(self) -> None:
        """Close every provider that has ``aclose``."""
        for provider in self.providers:
            close = getattr(provider, "aclose", None)
            if callable(close):
                await close()
