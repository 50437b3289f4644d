"""What a model provider is: the :class:`LLMProvider` protocol, and the records a call
returns: :class:`Usage`, :class:`ToolCall` and :class:`ChatResult`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from converge._repr import safe_repr
from converge.errors import UsageError

__all__ = ["STOP_REASONS", "ChatResult", "LLMProvider", "ToolCall", "Usage"]

#: The normalised stop reasons of :attr:`ChatResult.stop_reason`.
STOP_REASONS = frozenset(
    {"stop", "length", "content_filter", "refusal", "tool_calls", "other", "incomplete"}
)

_COUNTS = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
)


def _add(a: int | None, b: int | None) -> int | None:
    if a is None and b is None:
        return None
    return (a or 0) + (b or 0)


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens one call (or several, added with ``+``) consumed.

    A count the provider did not report is ``None`` (unknown), never a made-up ``0``: a
    server that omits usage does not look free. Adding two records adds the known counts;
    a sum stays ``None`` only where both sides are unknown.

    The breakdowns are *included in* the two main counts, as OpenAI reports them:
    ``input_tokens`` counts every prompt token, cached or not (for Anthropic, which
    reports them apart, converge adds ``input_tokens + cache_read_input_tokens +
    cache_creation_input_tokens``), and ``output_tokens`` includes reasoning/thinking
    tokens.

    Attributes:
        input_tokens: Prompt tokens, cache reads and writes included (None: not reported).
        output_tokens: Completion tokens, reasoning included (None: not reported).
        cache_read_tokens: Prompt tokens served from the provider's prompt cache
            (OpenAI ``cached_tokens``, Anthropic ``cache_read_input_tokens``).
        cache_write_tokens: Prompt tokens written to the prompt cache (Anthropic
            ``cache_creation_input_tokens``; billed above the base rate).
        reasoning_tokens: Output tokens spent on hidden reasoning (OpenAI
            ``reasoning_tokens``).
    """

    input_tokens: int | None = 0
    output_tokens: int | None = 0
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None
    reasoning_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in _COUNTS:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UsageError(
                    f"Usage.{name} must be a non-negative integer or None, not {safe_repr(value)}"
                )

    @property
    def total_tokens(self) -> int:
        """``input_tokens + output_tokens``, unknown counts as 0.

        Each token is counted once: cache reads and writes are inside ``input_tokens``,
        reasoning inside ``output_tokens``. This is what ReAct token budgets compare.
        """
        return (self.input_tokens or 0) + (self.output_tokens or 0)

    @property
    def known(self) -> bool:
        """True when the provider reported both input and output counts."""
        return self.input_tokens is not None and self.output_tokens is not None

    def __add__(self, other: object) -> Usage:
        if not isinstance(other, Usage):
            return NotImplemented
        return Usage(*(_add(getattr(self, n), getattr(other, n)) for n in _COUNTS))


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One function call the model asked for.

    Attributes:
        id: The provider's call id (send it back as a tool message's ``tool_call_id``).
        name: The tool's name.
        arguments: The decoded arguments (``{}`` when they were not a JSON object: then
            ``raw_arguments`` holds what the model sent).
        raw_arguments: The arguments as the model wrote them, when it wrote a string
            (OpenAI, Mistral); None when the provider sent structured JSON (Anthropic).
    """

    id: str
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    raw_arguments: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str):
            raise UsageError("ToolCall.id must be a string")
        if not isinstance(self.name, str) or not self.name:
            raise UsageError("ToolCall.name must be a non-empty string")
        if not isinstance(self.arguments, Mapping):
            raise UsageError("ToolCall.arguments must be a dict")
        if self.raw_arguments is not None and not isinstance(self.raw_arguments, str):
            raise UsageError("ToolCall.raw_arguments must be a string or None")


@dataclass(frozen=True, slots=True)
class ChatResult:
    """Everything one model call returned.

    Attributes:
        text: The reply text (``""`` when the model only called tools; the refusal
            message for a refusal).
        usage: Tokens the call consumed.
        stop_reason: Why the model stopped, normalised: ``"stop"`` (natural end or a stop
            sequence), ``"length"`` (output token limit), ``"content_filter"``,
            ``"refusal"``, ``"tool_calls"``, ``"other"`` or ``"incomplete"`` (a stream
            that ended with no stop reason: cut short).
        raw_stop_reason: The provider's own value (``"end_turn"``, ``"max_tokens"``,
            ``"model_length"``, ...), or None when it sent none.
        model: The model that answered, as the provider named it.
        response_id: The provider's id of this response.
        tool_calls: Function calls the model asked for, in order.
    """

    text: str
    usage: Usage = field(default_factory=Usage)
    stop_reason: str = "stop"
    raw_stop_reason: str | None = None
    model: str | None = None
    response_id: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise UsageError("ChatResult.text must be a string")
        if not isinstance(self.usage, Usage):
            raise UsageError("ChatResult.usage must be a Usage")
        if not isinstance(self.stop_reason, str) or self.stop_reason not in STOP_REASONS:
            raise UsageError(
                f"ChatResult.stop_reason must be one of {sorted(STOP_REASONS)}, "
                f"not {safe_repr(self.stop_reason)}"
            )
        calls = self.tool_calls
        if type(calls) is not tuple or (calls and not all(isinstance(c, ToolCall) for c in calls)):
            raise UsageError("ChatResult.tool_calls must be a tuple of ToolCall")

    @property
    def truncated(self) -> bool:
        """True when the model stopped at the output token limit."""
        return self.stop_reason == "length"


@runtime_checkable
class LLMProvider(Protocol):
    """Protocol for LLM providers: text completions from a list of messages.

    Only :meth:`chat` is required of a user-written provider; :class:`LLMAgent
    <converge.extensions.llm.LLMAgent>` runs it in a worker thread when :meth:`achat` is
    missing. converge's own providers also offer ``acomplete(messages, *,
    allow_partial=False, **kwargs) -> ChatResult`` (sync ``complete``),
    ``achat_with_usage(messages, **kwargs) -> (text, Usage)``, ``last_usage``, and
    ``chat_stream(messages, **kwargs)``, an async iterator of text deltas (see
    :class:`~converge.extensions.llm.ChatStream`). For
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
