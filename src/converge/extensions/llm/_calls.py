"""Calling any provider shape for a :class:`ChatResult`, and back (for the wrappers).

:class:`~converge.extensions.llm.FallbackProvider` and
:class:`~converge.extensions.llm.LimitedProvider` wrap providers that may offer only
part of the surface (a user's provider with just ``chat``); these helpers give every
wrapper one full surface over them.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import anyio.to_thread

from converge.errors import UsageError
from converge.extensions.llm._errors import bad_response, check_result
from converge.extensions.llm.protocol import ChatResult, ToolCall, Usage
from converge.extensions.llm.stream import ChatStream

__all__ = [
    "ResultSurface",
    "acomplete_with",
    "complete_with",
    "pop_allow_partial",
    "result_text",
    "stream_with",
]

_UNKNOWN = Usage(None, None)


def pop_allow_partial(kwargs: dict[str, Any]) -> bool:
    """Remove and check ``allow_partial`` from call options."""
    allow_partial = kwargs.pop("allow_partial", False)
    if not isinstance(allow_partial, bool):
        raise UsageError("allow_partial must be a bool")
    return allow_partial


def _wrap(text: Any, usage: Any) -> ChatResult:
    if not isinstance(text, str):
        raise UsageError(f"the provider returned {type(text).__name__}, not str")
    return ChatResult(text, usage if isinstance(usage, Usage) else _UNKNOWN)


async def acomplete_with(
    provider: Any, messages: Any, *, allow_partial: bool, kwargs: Mapping[str, Any]
) -> ChatResult:
    """``provider.acomplete``, or the best older method it has, as a ChatResult.

    Providers without ``acomplete`` cannot report stop reasons; their answers read as
    ``"stop"``.
    """
    acomplete = getattr(provider, "acomplete", None)
    if callable(acomplete):
        result = await acomplete(messages, allow_partial=allow_partial, **kwargs)
        if not isinstance(result, ChatResult):
            raise UsageError(f"{type(provider).__name__}.acomplete did not return a ChatResult")
        return result
    with_usage = getattr(provider, "achat_with_usage", None)
    if callable(with_usage):
        text, usage = await with_usage(messages, **kwargs)
        return _wrap(text, usage)
    achat = getattr(provider, "achat", None)
    if callable(achat):
        text = achat(messages, **kwargs)
        if inspect.isawaitable(text):
            text = await text
    else:
        text = await anyio.to_thread.run_sync(
            functools.partial(provider.chat, messages, **kwargs), abandon_on_cancel=True
        )
    return _wrap(text, getattr(provider, "last_usage", None))


def complete_with(
    provider: Any, messages: Any, *, allow_partial: bool, kwargs: Mapping[str, Any]
) -> ChatResult:
    """Synchronous :func:`acomplete_with`, through the provider's own sync surface."""
    complete = getattr(provider, "complete", None)
    if callable(complete):
        result = complete(messages, allow_partial=allow_partial, **kwargs)
        if not isinstance(result, ChatResult):
            raise UsageError(f"{type(provider).__name__}.complete did not return a ChatResult")
        return result
    with_usage = getattr(provider, "chat_with_usage", None)
    if callable(with_usage):
        text, usage = with_usage(messages, **kwargs)
        return _wrap(text, usage)
    chat = getattr(provider, "chat", None)
    if not callable(chat):
        raise UsageError(f"{type(provider).__name__} has no synchronous chat()")
    return _wrap(chat(messages, **kwargs), getattr(provider, "last_usage", None))


def result_text(
    result: ChatResult, kwargs: Mapping[str, Any], *, provider: str = "provider"
) -> str:
    """What ``achat`` returns for ``result``: the forced structured-output tool call's
    arguments as JSON when there is one, else the text.

    Args:
        result: The call's result.
        kwargs: The call's options (the structured-output ones are read).
        provider: Provider name for the error.

    Raises:
        ProviderResponseError: When the tool call's arguments (the model's output) have
            no JSON form: NaN or infinity, nesting too deep, or values JSON cannot encode.
    """
    tool = kwargs.get("emit_decisions_tool")
    if kwargs.get("use_structured_output") and isinstance(tool, Mapping):
        name = tool.get("name")
        if name is None and isinstance(tool.get("function"), Mapping):
            name = tool["function"].get("name")
        for call in result.tool_calls:
            if call.name == name:
                return arguments_text(call, provider)
    return result.text


def arguments_text(call: ToolCall, provider: str) -> str:
    """A tool call's arguments as JSON text: as received when kept, else encoded.

    Raises:
        ProviderResponseError: When the arguments (the model's output) have no JSON
            form: NaN or infinity, nesting too deep, or values JSON cannot encode.
    """
    if call.raw_arguments is not None:
        return call.raw_arguments
    try:
        return json.dumps(call.arguments, allow_nan=False)
    except RecursionError:
        reason = "nested too deeply"
    except (TypeError, ValueError) as exc:
        reason = str(exc)
    raise bad_response(provider, f"the arguments of tool call {call.name!r} are not JSON: {reason}")


def stream_with(provider: Any, messages: Any, kwargs: Mapping[str, Any]) -> Any:
    """``provider.chat_stream(...)``, or, for a provider that cannot stream, a
    :class:`ChatStream` of its whole answer as one delta (a cut answer raising at the
    end, as real streams do)."""
    if callable(getattr(provider, "chat_stream", None)):
        return provider.chat_stream(messages, **kwargs)
    options = dict(kwargs)
    allow_partial = pop_allow_partial(options)

    async def whole(out: ChatStream) -> AsyncGenerator[str, None]:
        result = await acomplete_with(provider, messages, allow_partial=True, kwargs=options)
        if result.text:
            yield result.text
        out.finish(result.usage, result)
        check_result(result, type(provider).__name__, allow_partial=allow_partial)

    return ChatStream(whole)


class ResultSurface:
    """The text-returning calls of a wrapper, derived from its :meth:`acomplete` and
    :meth:`chat_with_usage` (which each wrapper implements its own way)."""

    async def acomplete(
        self, messages: list[dict[str, Any]], *, allow_partial: bool = False, **kwargs: Any
    ) -> ChatResult:
        """The call every other one goes through (implemented by the wrapper)."""
        raise NotImplementedError

    def chat_with_usage(self, messages: list[dict[str, Any]], **kwargs: Any) -> tuple[str, Usage]:
        """Synchronous :meth:`achat_with_usage` (implemented by the wrapper)."""
        raise NotImplementedError

    async def achat_with_usage(
        self, messages: list[dict[str, Any]], **kwargs: Any
    ) -> tuple[str, Usage]:
        """Like :meth:`acomplete`, as ``(text, usage)``.

        Args:
            messages: As for :meth:`acomplete`.
            **kwargs: As for :meth:`acomplete` (``allow_partial`` included).

        Raises:
            ProviderResponseError: When the structured-output tool call's arguments have
                no JSON form (see :func:`result_text`).
        """
        allow_partial = pop_allow_partial(kwargs)
        result = await self.acomplete(messages, allow_partial=allow_partial, **kwargs)
        return result_text(result, kwargs, provider=type(self).__name__), result.usage

    async def achat(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        """Like :meth:`acomplete`, returning the text (or the structured tool call's
        arguments as JSON, as the providers do).

        Args:
            messages: As for :meth:`acomplete`.
            **kwargs: As for :meth:`acomplete` (``allow_partial`` included).
        """
        text, _ = await self.achat_with_usage(messages, **kwargs)
        return text

    def chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        """Synchronous :meth:`achat`.

        Args:
            messages: As for :meth:`acomplete`.
            **kwargs: As for :meth:`acomplete`.
        """
        text, _ = self.chat_with_usage(messages, **kwargs)
        return text
