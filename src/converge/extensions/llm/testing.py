"""Providers for testing agents without a network.

:class:`FunctionProvider` answers with a Python function of the messages;
:class:`ScriptedProvider` replays a list of replies (or exceptions) in order. Both record
every call, report approximate token usage, and support ``achat``, ``chat``,
``achat_with_usage`` and ``chat_stream`` like the real providers::

    from converge.extensions.llm import LLMAgent
    from converge.extensions.llm.testing import ScriptedProvider

    provider = ScriptedProvider(['[{"type": "UpdateTask", "task_id": "t1", "state": "completed"}]'])
    agent = LLMAgent(identity, provider)
    decisions = await agent.adecide([], [task])
    assert provider.calls[0].messages[0]["role"] == "system"
"""

from __future__ import annotations

import inspect
import re
import threading
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from converge import _sync
from converge.core.memory import approximate_tokens
from converge.errors import UsageError
from converge.extensions.llm._request import build_request
from converge.extensions.llm.protocol import Usage
from converge.extensions.llm.stream import ChatStream

__all__ = ["FunctionProvider", "ProviderCall", "ScriptedProvider"]

Reply = str | tuple[str, Usage]
_CHUNK = re.compile(r"\s*\S+|\s+")


@dataclass(frozen=True, slots=True)
class ProviderCall:
    """One recorded call.

    Attributes:
        messages: The messages sent (copies).
        kwargs: The options passed.
    """

    messages: tuple[dict[str, str], ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.messages, tuple):
            raise UsageError("ProviderCall.messages must be a tuple")


def _estimate(messages: Iterable[dict[str, str]], text: str) -> Usage:
    return Usage(sum(approximate_tokens(m["content"]) for m in messages), approximate_tokens(text))


class FunctionProvider:
    """A provider whose replies come from ``func(messages, **kwargs)``.

    ``func`` may be sync or async and returns the reply text, or ``(text, Usage)`` to
    control the reported usage (otherwise it is estimated at about four characters a
    token). Raise from it to simulate provider failures. Messages are validated like the
    real providers do; options are passed through unchecked.

    Args:
        func: Produces the reply.
    """

    def __init__(self, func: Callable[..., Reply | Awaitable[Reply]]) -> None:
        if not callable(func):
            raise UsageError("func must be callable")
        self._func = func
        self.calls: list[ProviderCall] = []
        self.last_usage: Usage | None = None
        self._lock = threading.Lock()

    def _record(self, messages: Any, kwargs: dict[str, Any]) -> tuple[dict[str, str], ...]:
        validated = build_request(messages, {}, default_model="test").messages
        with self._lock:
            self.calls.append(ProviderCall(validated, dict(kwargs)))
        return validated

    def _finish(self, messages: tuple[dict[str, str], ...], result: Any) -> tuple[str, Usage]:
        if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], Usage):
            text, usage = result
        else:
            text, usage = result, None
        if not isinstance(text, str):
            raise UsageError(f"the reply function returned {type(text).__name__}, not str")
        usage = usage or _estimate(messages, text)
        self.last_usage = usage
        return text, usage

    async def achat_with_usage(
        self, messages: list[dict[str, Any]], **kwargs: Any
    ) -> tuple[str, Usage]:
        """Reply and usage for ``messages``.

        Args:
            messages: ``[{"role", "content"}, ...]``.
            **kwargs: Passed to the function.

        Returns:
            ``(text, usage)``.
        """
        validated = self._record(messages, kwargs)
        result = self._func([dict(m) for m in validated], **kwargs)
        if inspect.isawaitable(result):
            result = await result
        return self._finish(validated, result)

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
        """
        if inspect.iscoroutinefunction(self._func):
            return _sync.run(
                self.achat_with_usage,
                messages,
                async_name="FunctionProvider.achat_with_usage",
                **kwargs,
            )
        validated = self._record(messages, kwargs)
        result = self._func([dict(m) for m in validated], **kwargs)
        if inspect.isawaitable(result):
            raise UsageError("the reply function returned an awaitable; use achat()")
        return self._finish(validated, result)

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
        """The reply as a stream of word-sized deltas; usage set at the end.

        Args:
            messages: ``[{"role", "content"}, ...]``.
            **kwargs: Passed to the function.

        Returns:
            A :class:`~converge.extensions.llm.ChatStream`.
        """

        build_request(messages, {}, default_model="test")  # fail here, like real providers

        async def deltas(out: ChatStream) -> AsyncGenerator[str, None]:
            text, usage = await self.achat_with_usage(messages, **kwargs)
            for match in _CHUNK.finditer(text):
                yield match.group()
            out.finish(usage)

        return ChatStream(deltas)


class ScriptedProvider(FunctionProvider):
    """A provider that replays ``replies`` in order, one per call.

    An item is the reply text, ``(text, Usage)``, or an exception instance to raise for
    that call. Running out of replies raises :class:`~converge.errors.UsageError`.

    Args:
        replies: The script.
    """

    def __init__(self, replies: Iterable[str | tuple[str, Usage] | BaseException]) -> None:
        script = list(replies)
        for item in script:
            if not isinstance(item, str | tuple | BaseException):
                raise UsageError("replies are strings, (text, Usage) pairs or exceptions")
        self._script: deque[str | tuple[str, Usage] | BaseException] = deque(script)
        self._script_lock = threading.Lock()
        super().__init__(self._next)

    @property
    def remaining(self) -> int:
        """Replies not yet used."""
        return len(self._script)

    def _next(self, messages: list[dict[str, str]], **kwargs: Any) -> Reply:
        with self._script_lock:
            if not self._script:
                raise UsageError(
                    f"ScriptedProvider ran out of replies after {len(self.calls) - 1} call(s)"
                )
            item = self._script.popleft()
        if isinstance(item, BaseException):
            raise item
        return item
