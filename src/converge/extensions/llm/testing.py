"""Providers for testing agents without a network.

:class:`FunctionProvider` answers with a Python function of the messages;
:class:`ScriptedProvider` replays a list of replies (or exceptions) in order. Both record
every call, report approximate token usage, and support ``acomplete``, ``achat``,
``chat``, ``complete``, ``achat_with_usage`` and ``chat_stream`` like the real
providers::

    from converge.extensions.llm import ChatResult, LLMAgent, Usage
    from converge.extensions.llm.testing import ScriptedProvider

    provider = ScriptedProvider([
        '[{"type": "UpdateTask", "task_id": "t1", "state": "completed"}]',
        ChatResult('[{"type": "Upd', Usage(900, 1024), stop_reason="length"),  # truncated
    ])
    agent = LLMAgent(identity, provider)
    decisions = await agent.adecide([], [task])
    assert provider.calls[0].messages[0]["role"] == "system"

A reply is the text, ``(text, Usage)``, or a full
:class:`~converge.extensions.llm.ChatResult` (stop reason, usage, tool calls, ...). Like
the real providers, ``acomplete`` raises
:class:`~converge.errors.ResponseTruncatedError`,
:class:`~converge.errors.ContentFilteredError`,
:class:`~converge.errors.ResponseRefusedError` or
:class:`~converge.errors.ResponseIncompleteError` for a ``"length"``,
``"content_filter"``, ``"refusal"`` or ``"incomplete"`` stop unless
``allow_partial=True``; and with
``use_structured_output=True`` plus ``emit_decisions_tool``, a text reply that is a JSON
object comes back as a native call of that tool (``stop_reason="tool_calls"``).
"""

from __future__ import annotations

import copy
import inspect
import itertools
import json
import re
import threading
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from converge import _sync
from converge.core.memory import approximate_tokens
from converge.errors import UsageError
from converge.extensions.llm._errors import check_result
from converge.extensions.llm._request import build_request
from converge.extensions.llm.protocol import STOP_REASONS, ChatResult, ToolCall, Usage
from converge.extensions.llm.stream import ChatStream

__all__ = ["FunctionProvider", "ProviderCall", "ScriptedProvider"]

Reply = str | tuple[str, Usage] | ChatResult
_CHUNK = re.compile(r"\s*\S+|\s+")


@dataclass(frozen=True, slots=True)
class ProviderCall:
    """One recorded call.

    Attributes:
        messages: The messages sent (copies).
        kwargs: The options passed.
    """

    messages: tuple[dict[str, Any], ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.messages, tuple):
            raise UsageError("ProviderCall.messages must be a tuple")


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list | tuple):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return ""


def _validate(messages: Any) -> tuple[dict[str, Any], ...]:
    """Check messages exactly as the real providers do; return deep copies as given."""
    build_request(messages, {}, default_model="test")
    return tuple(copy.deepcopy(dict(m)) for m in messages)


def _estimate(messages: Iterable[dict[str, Any]], text: str) -> Usage:
    return Usage(
        sum(approximate_tokens(_content_text(m.get("content"))) for m in messages),
        approximate_tokens(text),
    )


class FunctionProvider:
    """A provider whose replies come from ``func(messages, **kwargs)``.

    ``func`` may be sync or async and returns the reply text, ``(text, Usage)`` to
    control the reported usage (otherwise it is estimated at about four characters a
    token), or a :class:`~converge.extensions.llm.ChatResult` to control everything
    (stop reason, tool calls, ...). Raise from it to simulate provider failures.
    Messages are validated like the real providers do; options are passed through
    unchecked (``allow_partial`` is not passed on).

    Args:
        func: Produces the reply.
        stop_reason: Stop reason of replies given as text (``"stop"`` by default;
            ``"length"`` makes every such reply a truncated one).
        model: Reported as ``model`` (also the ``ChatResult.model``).
    """

    def __init__(
        self,
        func: Callable[..., Reply | Awaitable[Reply]],
        *,
        stop_reason: str = "stop",
        model: str = "test",
    ) -> None:
        if not callable(func):
            raise UsageError("func must be callable")
        if not isinstance(stop_reason, str) or stop_reason not in STOP_REASONS:
            raise UsageError(f"stop_reason must be one of {sorted(STOP_REASONS)}")
        if not isinstance(model, str) or not model:
            raise UsageError("model must be a non-empty string")
        self._func = func
        self.stop_reason = stop_reason
        self.model = model
        self.calls: list[ProviderCall] = []
        self.last_usage: Usage | None = None
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def _record(self, messages: Any, kwargs: dict[str, Any]) -> tuple[dict[str, Any], ...]:
        validated = _validate(messages)
        with self._lock:
            self.calls.append(ProviderCall(validated, dict(kwargs)))
        return validated

    def _result(
        self, messages: tuple[dict[str, Any], ...], reply: Any, kwargs: Mapping[str, Any]
    ) -> ChatResult:
        if isinstance(reply, ChatResult):
            result = reply
        else:
            if isinstance(reply, tuple) and len(reply) == 2 and isinstance(reply[1], Usage):
                text, usage = reply
            else:
                text, usage = reply, None
            if not isinstance(text, str):
                raise UsageError(f"the reply function returned {type(text).__name__}, not str")
            result = ChatResult(
                text,
                usage or _estimate(messages, text),
                stop_reason=self.stop_reason,
                model=self.model,
                response_id=f"resp_{next(self._ids)}",
            )
            result = self._as_tool_call(result, kwargs)
        self.last_usage = result.usage
        return result

    def _as_tool_call(self, result: ChatResult, kwargs: Mapping[str, Any]) -> ChatResult:
        """A JSON-object reply on the structured path, as the forced tool's native call."""
        tool = kwargs.get("emit_decisions_tool")
        if not kwargs.get("use_structured_output") or not isinstance(tool, Mapping):
            return result
        try:
            arguments = json.loads(result.text)
        except ValueError:
            return result
        if not isinstance(arguments, dict):
            return result
        call = ToolCall(
            f"call_{next(self._ids)}", str(tool.get("name")), arguments, raw_arguments=result.text
        )
        stop = "tool_calls" if result.stop_reason == "stop" else result.stop_reason
        return replace(result, text="", tool_calls=(call,), stop_reason=stop)

    @staticmethod
    def _text(result: ChatResult) -> str:
        """What ``achat`` returns: the forced tool call's arguments, else the text."""
        if result.tool_calls:
            call = result.tool_calls[0]
            if call.raw_arguments is not None:
                return call.raw_arguments
            try:
                return json.dumps(call.arguments)
            except RecursionError:
                raise UsageError(
                    f"the reply's tool call {call.name!r} has arguments nested too deeply for JSON"
                ) from None
            except (TypeError, ValueError) as exc:
                raise UsageError(
                    f"the reply's tool call {call.name!r} has arguments JSON cannot encode: {exc}"
                ) from None
        return result.text

    @staticmethod
    def _check_stop(result: ChatResult, allow_partial: Any) -> ChatResult:
        if not isinstance(allow_partial, bool):
            raise UsageError("allow_partial must be a bool")
        return check_result(result, "test", allow_partial=allow_partial)

    async def _acall(self, messages: Any, kwargs: dict[str, Any]) -> ChatResult:
        validated = self._record(messages, kwargs)
        reply = self._func([dict(m) for m in validated], **kwargs)
        if inspect.isawaitable(reply):
            reply = await reply
        return self._result(validated, reply, kwargs)

    def _call(self, messages: Any, kwargs: dict[str, Any]) -> ChatResult:
        if inspect.iscoroutinefunction(self._func):
            result: ChatResult = _sync.run(
                self._acall, messages, kwargs, async_name="FunctionProvider.acomplete"
            )
            return result
        validated = self._record(messages, kwargs)
        reply = self._func([dict(m) for m in validated], **kwargs)
        if inspect.isawaitable(reply):
            raise UsageError("the reply function returned an awaitable; use the async methods")
        return self._result(validated, reply, kwargs)

    async def acomplete(
        self, messages: list[dict[str, Any]], *, allow_partial: bool = False, **kwargs: Any
    ) -> ChatResult:
        """Everything the reply carries, as a :class:`~converge.extensions.llm.ChatResult`.

        Args:
            messages: Chat messages (contract D shapes: content parts, tool calls, tool
                results).
            allow_partial: Return truncated, filtered or refused answers instead of
                raising.
            **kwargs: Passed to the function.

        Raises:
            ResponseTruncatedError: For a ``"length"`` stop (``.result`` holds it).
            ContentFilteredError: For a ``"content_filter"`` stop.
            ResponseRefusedError: For a ``"refusal"`` stop.
        """
        return self._check_stop(await self._acall(messages, kwargs), allow_partial)

    def complete(
        self, messages: list[dict[str, Any]], *, allow_partial: bool = False, **kwargs: Any
    ) -> ChatResult:
        """Synchronous :meth:`acomplete` (a sync function is called directly).

        Args:
            messages: As for :meth:`acomplete`.
            allow_partial: As for :meth:`acomplete`.
            **kwargs: Passed to the function.
        """
        return self._check_stop(self._call(messages, kwargs), allow_partial)

    async def achat_with_usage(
        self, messages: list[dict[str, Any]], **kwargs: Any
    ) -> tuple[str, Usage]:
        """Reply and usage for ``messages``.

        Args:
            messages: ``[{"role", "content"}, ...]``.
            **kwargs: Passed to the function.

        Returns:
            ``(text, usage)``.

        Raises:
            UsageError: For malformed messages, or a reply whose tool call arguments
                JSON cannot encode (an object, nesting too deep).
        """
        allow_partial = kwargs.pop("allow_partial", False)
        result = self._check_stop(await self._acall(messages, kwargs), allow_partial)
        return self._text(result), result.usage

    async def achat(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        """Reply text for ``messages``.

        Args:
            messages: ``[{"role", "content"}, ...]``.
            **kwargs: Passed to the function.

        Returns:
            The reply text.
        """
        text, _ = await self.achat_with_usage(messages, **kwargs)
        return text

    def chat_with_usage(self, messages: list[dict[str, Any]], **kwargs: Any) -> tuple[str, Usage]:
        """Synchronous :meth:`achat_with_usage` (a sync function is called directly).

        Args:
            messages: ``[{"role", "content"}, ...]``.
            **kwargs: Passed to the function.

        Returns:
            ``(text, usage)``.

        Raises:
            UsageError: For malformed messages, or a reply whose tool call arguments
                JSON cannot encode (an object, nesting too deep).
        """
        allow_partial = kwargs.pop("allow_partial", False)
        result = self._check_stop(self._call(messages, kwargs), allow_partial)
        return self._text(result), result.usage

    def chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        """Synchronous :meth:`achat`.

        Args:
            messages: ``[{"role", "content"}, ...]``.
            **kwargs: Passed to the function.

        Returns:
            The reply text.
        """
        text, _ = self.chat_with_usage(messages, **kwargs)
        return text

    def chat_stream(self, messages: list[dict[str, Any]], **kwargs: Any) -> ChatStream:
        """The reply as a stream of word-sized deltas; usage and result set at the end.

        Like the real providers, a truncated, filtered or refused reply raises its typed
        error after the last delta unless ``allow_partial=True``.

        Args:
            messages: ``[{"role", "content"}, ...]``.
            **kwargs: Passed to the function.

        Returns:
            A :class:`~converge.extensions.llm.ChatStream`.
        """
        _validate(messages)  # fail here, like real providers
        allow_partial = kwargs.pop("allow_partial", False)
        if not isinstance(allow_partial, bool):
            raise UsageError("allow_partial must be a bool")

        async def deltas(out: ChatStream) -> AsyncGenerator[str, None]:
            result = await self._acall(messages, kwargs)
            for match in _CHUNK.finditer(result.text):
                yield match.group()
            out.finish(result.usage, result)
            self._check_stop(result, allow_partial)

        return ChatStream(deltas)


class ScriptedProvider(FunctionProvider):
    """A provider that replays ``replies`` in order, one per call.

    An item is the reply text, ``(text, Usage)``, a
    :class:`~converge.extensions.llm.ChatResult`, or an exception instance to raise for
    that call. Running out of replies raises :class:`~converge.errors.UsageError`, and
    so does a ``replies`` that is not a list (or other iterable) of such items.

    Args:
        replies: The script.
        stop_reason: Stop reason of the text replies (see :class:`FunctionProvider`).
        model: Reported as ``model``.
    """

    def __init__(
        self,
        replies: Iterable[str | tuple[str, Usage] | ChatResult | BaseException],
        *,
        stop_reason: str = "stop",
        model: str = "test",
    ) -> None:
        if isinstance(replies, str | bytes) or not isinstance(replies, Iterable):
            raise UsageError(f"replies must be a list of replies, not {type(replies).__name__}")
        script = list(replies)
        for item in script:
            if not isinstance(item, str | tuple | ChatResult | BaseException):
                raise UsageError(
                    "replies are strings, (text, Usage) pairs, ChatResults or exceptions"
                )
        self._script: deque[str | tuple[str, Usage] | ChatResult | BaseException] = deque(script)
        self._script_lock = threading.Lock()
        super().__init__(self._next, stop_reason=stop_reason, model=model)

    @property
    def remaining(self) -> int:
        """Replies not yet used."""
        return len(self._script)

    def _next(self, messages: list[dict[str, Any]], **kwargs: Any) -> Reply:
        with self._script_lock:
            if not self._script:
                raise UsageError(
                    f"ScriptedProvider ran out of replies after {len(self.calls) - 1} call(s)"
                )
            item = self._script.popleft()
        if isinstance(item, BaseException):
            raise item
        return item
