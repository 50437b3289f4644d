"""Validation of what callers hand a provider: messages and call options.

Pure functions shared by every provider; each provider then translates the validated
:class:`ChatRequest` into its SDK's call.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from converge.errors import UsageError

__all__ = ["ROLES", "ChatRequest", "ToolSpec", "build_request"]

ROLES = frozenset({"system", "user", "assistant"})
_COMMON_OPTIONS = frozenset(
    {
        "model",
        "temperature",
        "max_tokens",
        "top_p",
        "stop",
        "use_structured_output",
        "emit_decisions_tool",
    }
)


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A function tool the model is made to call (the structured-output path).

    Attributes:
        name: Tool name.
        description: What it is for.
        parameters: JSON schema of its arguments (an object schema).
    """

    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A validated call: messages plus options, provider-neutral."""

    messages: tuple[dict[str, str], ...]
    model: str
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    stop: tuple[str, ...] | None = None
    tool: ToolSpec | None = None
    extra_body: dict[str, Any] | None = None

    @property
    def system(self) -> str | None:
        """System messages joined by blank lines, or None."""
        parts = [m["content"] for m in self.messages if m["role"] == "system"]
        return "\n\n".join(parts) if parts else None

    @property
    def dialogue(self) -> list[dict[str, str]]:
        """The non-system messages, in order."""
        return [dict(m) for m in self.messages if m["role"] != "system"]


def _messages(messages: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(messages, list | tuple) or not messages:
        raise UsageError("messages must be a non-empty list of {'role', 'content'} dicts")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise UsageError(f"messages[{i}] must be a dict, not {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise UsageError(f"messages[{i}]['role'] must be one of {sorted(ROLES)}, not {role!r}")
        if not isinstance(content, str):
            raise UsageError(f"messages[{i}]['content'] must be a string")
        out.append({"role": role, "content": content})
    return tuple(out)


def _tool(value: Any) -> ToolSpec:
    """Accept ``{"name", "description", "parameters"}`` or OpenAI's ``{"type": "function",
    "function": {...}}`` wrapper."""
    if isinstance(value, Mapping) and value.get("type") == "function":
        value = value.get("function")
    if not isinstance(value, Mapping):
        raise UsageError("emit_decisions_tool must be a dict with 'name' and 'parameters'")
    name, params = value.get("name"), value.get("parameters", value.get("input_schema"))
    description = value.get("description", "")
    if not isinstance(name, str) or not name:
        raise UsageError("emit_decisions_tool['name'] must be a non-empty string")
    if not isinstance(params, Mapping) or params.get("type") != "object":
        raise UsageError("emit_decisions_tool['parameters'] must be a JSON object schema")
    if not isinstance(description, str):
        raise UsageError("emit_decisions_tool['description'] must be a string")
    return ToolSpec(name, description, dict(params))


def _number(name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UsageError(f"{name} must be a number")
    if not low <= value <= high:
        raise UsageError(f"{name} must be between {low} and {high}")
    return float(value)


def build_request(
    messages: Any,
    kwargs: Mapping[str, Any],
    *,
    default_model: str,
    extra_options: frozenset[str] = frozenset(),
) -> ChatRequest:
    """Validate ``messages`` and ``kwargs`` into a :class:`ChatRequest`.

    Args:
        messages: The caller's message list.
        kwargs: The caller's options.
        default_model: Model used when ``kwargs`` names none.
        extra_options: Options this provider accepts beyond the common ones.

    Raises:
        UsageError: For malformed messages, unknown options or invalid option values.
    """
    unknown = set(kwargs) - _COMMON_OPTIONS - extra_options
    if unknown:
        allowed = ", ".join(sorted(_COMMON_OPTIONS | extra_options))
        raise UsageError(f"unknown option(s) {sorted(unknown)}; accepted: {allowed}")
    model = kwargs.get("model", default_model)
    if not isinstance(model, str) or not model:
        raise UsageError("model must be a non-empty string")
    temperature = kwargs.get("temperature")
    if temperature is not None:
        temperature = _number("temperature", temperature, 0.0, 2.0)
    top_p = kwargs.get("top_p")
    if top_p is not None:
        top_p = _number("top_p", top_p, 0.0, 1.0)
    max_tokens = kwargs.get("max_tokens")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise UsageError("max_tokens must be a positive integer")
    stop = kwargs.get("stop")
    if stop is not None:
        stop = (stop,) if isinstance(stop, str) else stop
        if not isinstance(stop, list | tuple) or not all(isinstance(s, str) for s in stop):
            raise UsageError("stop must be a string or a list of strings")
        stop = tuple(stop)
    structured = kwargs.get("use_structured_output", False)
    if not isinstance(structured, bool):
        raise UsageError("use_structured_output must be a bool")
    # As the seed documents: native tool calling when use_structured_output=True AND a
    # tool is given; a tool given alone is still validated, then unused.
    raw_tool = kwargs.get("emit_decisions_tool")
    tool = _tool(raw_tool) if raw_tool is not None else None
    if not structured:
        tool = None
    extra_body = kwargs.get("extra_body")
    if extra_body is not None and not isinstance(extra_body, Mapping):
        raise UsageError("extra_body must be a dict")
    return ChatRequest(
        messages=_messages(messages),
        model=model,
        temperature=temperature,
        max_tokens=max_tokens,
        top_p=top_p,
        stop=stop,
        tool=tool,
        extra_body=dict(extra_body) if extra_body is not None else None,
    )
