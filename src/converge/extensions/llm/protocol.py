"""What a model provider is: the :class:`LLMProvider` protocol and the :class:`Usage` record."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from converge.errors import UsageError

__all__ = ["LLMProvider", "Usage"]


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens one call (or several, added with ``+``) consumed.

    Attributes:
        input_tokens: Prompt tokens the provider billed.
        output_tokens: Completion tokens the provider billed.
    """

    input_tokens: int = 0
    output_tokens: int = 0

    def __post_init__(self) -> None:
        for name in ("input_tokens", "output_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UsageError(f"Usage.{name} must be a non-negative integer, not {value!r}")

    @property
    def total_tokens(self) -> int:
        """``input_tokens + output_tokens``."""
        return self.input_tokens + self.output_tokens

    def __add__(self, other: object) -> Usage:
        if not isinstance(other, Usage):
            return NotImplemented
        return Usage(
            self.input_tokens + other.input_tokens, self.output_tokens + other.output_tokens
        )


@runtime_checkable
class LLMProvider(Protocol):
    """Protocol for LLM providers: text completions from a list of messages.

    Only :meth:`chat` is required of a user-written provider; :class:`LLMAgent
    <converge.extensions.llm.LLMAgent>` runs it in a worker thread when :meth:`achat` is
    missing. converge's own providers also offer ``achat_with_usage(messages, **kwargs)
    -> (text, Usage)``, ``last_usage``, and ``chat_stream(messages, **kwargs)``, an async
    iterator of text deltas (see :class:`~converge.extensions.llm.ChatStream`). For
    streaming UIs, put hints in a message's ``payload["streaming"]`` or
    ``payload["progress"]``.
    """

    def chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        """Send messages to the model and return the completion text.

        Args:
            messages: Message dicts with ``"role"`` and ``"content"`` keys.
            **kwargs: Provider options (``model``, ``temperature``, ...).

        Returns:
            The model's reply text.
        """
        ...

    async def achat(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        """Async form of :meth:`chat`, for event-loop friendly providers.

        Args:
            messages: Message dicts with ``"role"`` and ``"content"`` keys.
            **kwargs: Provider options (``model``, ``temperature``, ...).

        Returns:
            The model's reply text.
        """
        ...
