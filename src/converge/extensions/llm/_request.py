"""Validation of what callers hand a provider: messages and call options.

Pure functions shared by every provider; each provider then translates the validated,
provider-neutral :class:`ChatRequest` into its SDK's call. Messages are normalised here
once (content parts, assistant tool calls, tool results: the shapes of contract D in
``docs/llm.md``); a provider only maps shapes, it never re-validates them.
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from converge import _http
from converge._numbers import finite_float
from converge._repr import safe_repr
from converge.errors import UsageError
from converge.extensions.llm.protocol import ToolCall

__all__ = [
    "OPTIONS",
    "ROLES",
    "ChatRequest",
    "ToolSpec",
    "build_request",
    "data_url",
    "tool_call_arguments_json",
]

ROLES = frozenset({"system", "user", "assistant", "tool"})

#: Every option some provider takes, with what it is (for error messages).
OPTIONS: Mapping[str, str] = {
    "model": "model name",
    "temperature": "sampling temperature",
    "max_tokens": "output token limit",
    "max_completion_tokens": "output token limit (OpenAI's name; reasoning included)",
    "top_p": "nucleus sampling",
    "stop": "stop sequences",
    "seed": "sampling seed",
    "response_format": "JSON mode / JSON schema output",
    "parallel_tool_calls": "allow several tool calls in one turn",
    "reasoning_effort": "reasoning effort of reasoning models",
    "thinking": "Anthropic extended thinking",
    "tools": "native function tools",
    "tool_choice": "which tool the model must call",
    "use_structured_output": "emit decisions through a native tool call",
    "emit_decisions_tool": "the structured-output tool",
    "extra_body": "extra JSON fields merged into the request body",
    "extra_headers": "extra HTTP headers",
}
_TOOL_CHOICES = frozenset({"auto", "none", "required"})
_IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
_PART_TYPES = frozenset({"text", "image", "document"})


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A function tool offered to the model.

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
    """A validated call: normalised messages plus options, provider-neutral.

    ``tool`` is the structured-output tool the model is forced to call; ``tools`` the
    native tools it may call (``tool_choice``: ``"auto"``, ``"none"``, ``"required"`` or
    a tool name).
    """

    messages: tuple[dict[str, Any], ...]
    model: str
    temperature: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    top_p: float | None = None
    stop: tuple[str, ...] | None = None
    seed: int | None = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None
    thinking: dict[str, Any] | None = None
    tool: ToolSpec | None = None
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: str | None = None
    extra_body: dict[str, Any] | None = None
    extra_headers: dict[str, str] | None = None

    @property
    def system(self) -> str | None:
        """System messages joined by blank lines, or None."""
        parts = [m["content"] for m in self.messages if m["role"] == "system"]
        return "\n\n".join(parts) if parts else None

    @property
    def dialogue(self) -> list[dict[str, Any]]:
        """The non-system messages, in order."""
        return [m for m in self.messages if m["role"] != "system"]

    @property
    def all_tools(self) -> tuple[ToolSpec, ...]:
        """``tools`` plus the structured-output tool, if any."""
        return self.tools + ((self.tool,) if self.tool is not None else ())

    @property
    def output_limit(self) -> int | None:
        """The output token limit asked for, under whichever name."""
        return self.max_completion_tokens or self.max_tokens

    def options(self, names: Mapping[str, str]) -> dict[str, Any]:
        """The options that are set, under a provider's names (``{ours: theirs}``);
        stop sequences as a list."""
        out: dict[str, Any] = {}
        for ours, theirs in names.items():
            value = getattr(self, ours)
            if value is not None:
                out[theirs] = list(value) if ours == "stop" else value
        return out


def data_url(part: Mapping[str, Any]) -> str:
    """``data:<media_type>;base64,<data>`` for a part carrying base64 data."""
    return f"data:{part['media_type']};base64,{part['data']}"


def tool_call_arguments_json(call: ToolCall) -> str:
    """A tool call's arguments as the JSON string OpenAI-style APIs want back."""
    if call.raw_arguments is not None:
        return call.raw_arguments
    return json.dumps(call.arguments, separators=(",", ":"))


# -- messages --------------------------------------------------------------------------


def _base64(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise UsageError(f"{where}['data'] must be a non-empty base64 string")
    try:
        binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise UsageError(f"{where}['data'] is not valid base64: {exc}") from exc
    return value


def _text(where: str, text: str) -> str:
    """``text`` if it can be sent: a lone surrogate has no UTF-8 form (the SDKs would
    fail to encode the request, or send JSON the API refuses)."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise UsageError(
                f"{where} holds a lone surrogate at position {exc.start}: not valid Unicode"
            ) from None
    return text


def _json(where: str, value: Mapping[str, Any]) -> dict[str, Any]:
    """``value`` as a dict if it can be sent as JSON: nothing ``json`` cannot encode, no
    NaN or infinity, no lone surrogate (the SDKs would fail to encode the request), no
    nesting too deep to encode."""
    try:
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{where} holds a lone surrogate: not valid Unicode") from None
    except RecursionError:
        raise UsageError(f"{where} cannot be sent as JSON: nested too deeply") from None
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{where} cannot be sent as JSON: {exc}") from None
    return dict(value)


def _shown(value: Any) -> str:
    """``value`` for an error message: a string or None as its repr, anything else by its
    type's name (its repr may be huge, or fail)."""
    return repr(value) if value is None or isinstance(value, str) else type(value).__name__


def _part(where: str, part: Any) -> dict[str, Any]:
    if isinstance(part, str):
        return {"type": "text", "text": _text(where, part)}
    if not isinstance(part, Mapping):
        raise UsageError(f"{where} must be a dict or a string")
    kind = part.get("type")
    if not isinstance(kind, str) or kind not in _PART_TYPES:
        raise UsageError(
            f"{where}['type'] must be one of {sorted(_PART_TYPES)}, not {_shown(kind)}"
        )
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise UsageError(f"{where}['text'] must be a string")
        return {"type": "text", "text": _text(f"{where}['text']", text)}
    url, data = part.get("url"), part.get("data")
    if (url is None) == (data is None):
        raise UsageError(f"{where} needs exactly one of 'url' or 'data' (base64)")
    out: dict[str, Any] = {"type": kind}
    if url is not None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise UsageError(f"{where}['url'] must be an http:// or https:// URL")
        out["url"] = _text(f"{where}['url']", url)
    else:
        out["data"] = _base64(where, data)
        media_type = part.get("media_type")
        if kind == "image" and (not isinstance(media_type, str) or media_type not in _IMAGE_TYPES):
            raise UsageError(f"{where}['media_type'] must be one of {sorted(_IMAGE_TYPES)}")
        if kind == "document" and media_type != "application/pdf":
            raise UsageError(f"{where}['media_type'] must be 'application/pdf'")
        out["media_type"] = media_type
    name = part.get("name")
    if name is not None:
        if not isinstance(name, str) or not name:
            raise UsageError(f"{where}['name'] must be a non-empty string")
        out["name"] = _text(f"{where}['name']", name)
    return out


def _content(where: str, content: Any, *, rich: bool, optional: bool = False) -> Any:
    """A message's content: a string, or (``rich``) a tuple of normalised parts."""
    if content is None and optional:
        return None
    if isinstance(content, str):
        return _text(where, content)
    if not isinstance(content, list | tuple):
        raise UsageError(f"{where} must be a string or a list of content parts")
    parts = tuple(_part(f"{where}[{i}]", p) for i, p in enumerate(content))
    if not rich:
        if any(p["type"] != "text" for p in parts):
            raise UsageError(f"{where} may only hold text parts")
        return "".join(p["text"] for p in parts)
    return parts


def _tool_calls(where: str, calls: Any) -> tuple[ToolCall, ...]:
    if not isinstance(calls, list | tuple):
        raise UsageError(f"{where} must be a list of {{'id', 'name', 'arguments'}} dicts")
    out = []
    for i, call in enumerate(calls):
        at = f"{where}[{i}]"
        if not isinstance(call, ToolCall):
            if not isinstance(call, Mapping):
                raise UsageError(f"{at} must be a dict or a ToolCall")
            call_id, name = call.get("id"), call.get("name")
            arguments = call.get("arguments", {})
            if not isinstance(call_id, str) or not call_id:
                raise UsageError(f"{at}['id'] must be a non-empty string")
            if not isinstance(name, str) or not name:
                raise UsageError(f"{at}['name'] must be a non-empty string")
            if not isinstance(arguments, Mapping):
                raise UsageError(f"{at}['arguments'] must be a dict")
            call = ToolCall(call_id, name, dict(arguments))
        _text(f"{at}['id']", call.id)
        _text(f"{at}['name']", call.name)
        _json(f"{at}['arguments']", call.arguments)
        if call.raw_arguments is not None:
            _text(f"{at}['raw_arguments']", call.raw_arguments)
        out.append(call)
    return tuple(out)


def _message(i: int, message: Any) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(message, Mapping):
        raise UsageError(f"{where} must be a dict, not {type(message).__name__}")
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise UsageError(f"{where}['role'] must be one of {sorted(ROLES)}, not {_shown(role)}")
    content = message.get("content")
    if type(content) is str and role in ("system", "user") and len(message) == 2:
        # the common case, without the detours
        return {"role": role, "content": _text(f"{where}['content']", content)}
    if role == "system":
        return {"role": role, "content": _content(f"{where}['content']", content, rich=False)}
    if role == "user":
        return {"role": role, "content": _content(f"{where}['content']", content, rich=True)}
    if role == "tool":
        call_id, name = message.get("tool_call_id"), message.get("name")
        if not isinstance(call_id, str) or not call_id:
            raise UsageError(f"{where}['tool_call_id'] must be a non-empty string")
        if name is not None and (not isinstance(name, str) or not name):
            raise UsageError(f"{where}['name'] must be a non-empty string or absent")
        return {
            "role": role,
            "tool_call_id": _text(f"{where}['tool_call_id']", call_id),
            "name": name if name is None else _text(f"{where}['name']", name),
            "content": _content(f"{where}['content']", content, rich=False),
        }
    raw_calls = message.get("tool_calls")
    calls = _tool_calls(f"{where}['tool_calls']", raw_calls) if raw_calls else ()
    text = _content(f"{where}['content']", content, rich=False, optional=bool(calls))
    out: dict[str, Any] = {"role": role, "content": text}
    if calls:
        out["tool_calls"] = calls
    return out


def _messages(messages: Any) -> tuple[dict[str, Any], ...]:
    if not isinstance(messages, list | tuple) or not messages:
        raise UsageError("messages must be a non-empty list of {'role', 'content'} dicts")
    return tuple(_message(i, m) for i, m in enumerate(messages))


# -- options ---------------------------------------------------------------------------


def _tool(value: Any, what: str = "emit_decisions_tool") -> ToolSpec:
    """Accept ``{"name", "description", "parameters"}`` or OpenAI's ``{"type": "function",
    "function": {...}}`` wrapper."""
    if isinstance(value, Mapping) and value.get("type") == "function":
        value = value.get("function")
    if not isinstance(value, Mapping):
        raise UsageError(f"{what} must be a dict with 'name' and 'parameters'")
    name, params = value.get("name"), value.get("parameters", value.get("input_schema"))
    description = value.get("description", "")
    if not isinstance(name, str) or not name:
        raise UsageError(f"{what}['name'] must be a non-empty string")
    if not isinstance(params, Mapping) or params.get("type") != "object":
        raise UsageError(f"{what}['parameters'] must be a JSON object schema")
    if not isinstance(description, str):
        raise UsageError(f"{what}['description'] must be a string")
    return ToolSpec(
        _text(f"{what}['name']", name),
        _text(f"{what}['description']", description),
        _json(f"{what}['parameters']", params),
    )


def _number(name: str, value: Any, low: float, high: float) -> float:
    number = finite_float(value)
    if number is None:
        raise UsageError(f"{name} must be a number")
    if not low <= number <= high:
        raise UsageError(f"{name} must be between {low} and {high}")
    return number


def _positive_int(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{name} must be a positive integer")
    return value


def _dict(name: str, value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise UsageError(f"{name} must be a dict")
    return _json(name, value)


def _headers(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise UsageError("extra_headers must be a dict of header name -> string value")
    for name, text in value.items():
        if not isinstance(name, str) or not isinstance(text, str):
            raise UsageError("extra_headers must be a dict of header name -> string value")
        if _http.HEADER_NAME.fullmatch(name) is None:
            raise UsageError(f"extra_headers: {safe_repr(name)} is not a valid HTTP header name")
        if _http.HEADER_VALUE.fullmatch(text) is None:
            raise UsageError(
                f"extra_headers[{safe_repr(name)}] must be printable ASCII (no line breaks or "
                "control characters)"
            )
    return dict(value)


def _tools(value: Any) -> tuple[ToolSpec, ...]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise UsageError("tools must be a list of {'name', 'description', 'parameters'} dicts")
    tools = tuple(_tool(t, f"tools[{i}]") for i, t in enumerate(value))
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise UsageError("tools must have distinct names")
    return tools


def _tool_choice(value: Any, tools: tuple[ToolSpec, ...]) -> str | None:
    if value is None:
        return None
    if isinstance(value, Mapping):  # OpenAI's {"type": "function", "function": {"name"}}
        function = value.get("function")
        named = function.get("name") if isinstance(function, Mapping) else None
        value = named or value.get("name")
    if not isinstance(value, str) or not value:
        raise UsageError("tool_choice must be 'auto', 'none', 'required' or a tool name")
    if value not in _TOOL_CHOICES and value not in {t.name for t in tools}:
        raise UsageError(f"tool_choice {safe_repr(value)} names no tool in tools")
    return value


def _check_names(kwargs: Mapping[str, Any], provider: str, accepted: frozenset[str]) -> None:
    if kwargs.keys() <= accepted:
        return
    unknown = sorted(set(kwargs) - set(OPTIONS))
    if unknown:
        allowed = ", ".join(sorted(accepted))
        raise UsageError(f"unknown option(s) {unknown}; {provider} accepts: {allowed}")
    refused = sorted(set(kwargs) - accepted)
    if refused:
        raise UsageError(
            f"{provider} does not take {refused} "
            f"({'; '.join(OPTIONS[n] for n in refused)}); pass it in extra_body if your "
            f"endpoint accepts it. {provider} accepts: {', '.join(sorted(accepted))}"
        )


def build_request(
    messages: Any,
    kwargs: Mapping[str, Any],
    *,
    default_model: str,
    provider: str = "this provider",
    accepted: frozenset[str] = frozenset(OPTIONS),
) -> ChatRequest:
    """Validate ``messages`` and ``kwargs`` into a :class:`ChatRequest`.

    Args:
        messages: The caller's message list.
        kwargs: The caller's options.
        default_model: Model used when ``kwargs`` names none.
        provider: Provider name, for error messages.
        accepted: The options this provider takes.

    Raises:
        UsageError: For malformed messages, unknown or unsupported options, or invalid
            option values.
    """
    _check_names(kwargs, provider, accepted)
    model = kwargs.get("model", default_model)
    if not isinstance(model, str) or not model:
        raise UsageError("model must be a non-empty string")
    _text("model", model)
    temperature = kwargs.get("temperature")
    if temperature is not None:
        temperature = _number("temperature", temperature, 0.0, 2.0)
    top_p = kwargs.get("top_p")
    if top_p is not None:
        top_p = _number("top_p", top_p, 0.0, 1.0)
    stop = kwargs.get("stop")
    if stop is not None:
        stop = (stop,) if isinstance(stop, str) else stop
        if not isinstance(stop, list | tuple) or not all(isinstance(s, str) for s in stop):
            raise UsageError("stop must be a string or a list of strings")
        stop = tuple(_text(f"stop[{i}]", s) for i, s in enumerate(stop))
    seed = kwargs.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise UsageError("seed must be an integer")
    parallel = kwargs.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise UsageError("parallel_tool_calls must be a bool")
    effort = kwargs.get("reasoning_effort")
    if effort is not None:
        if not isinstance(effort, str) or not effort:
            raise UsageError("reasoning_effort must be a string such as 'low', 'medium', 'high'")
        _text("reasoning_effort", effort)
    structured = kwargs.get("use_structured_output", False)
    if not isinstance(structured, bool):
        raise UsageError("use_structured_output must be a bool")
    # As the seed documents: native tool calling when use_structured_output=True AND a
    # tool is given; a tool given alone is still validated, then unused.
    raw_tool = kwargs.get("emit_decisions_tool")
    tool = _tool(raw_tool) if raw_tool is not None else None
    if not structured:
        tool = None
    if kwargs.get("max_tokens") is not None and kwargs.get("max_completion_tokens") is not None:
        raise UsageError("give max_tokens or max_completion_tokens, not both")
    tools = _tools(kwargs.get("tools"))
    if tool is not None and tool.name in {t.name for t in tools}:
        raise UsageError(f"tools already has a tool named {tool.name!r}")
    return ChatRequest(
        messages=_messages(messages),
        model=model,
        temperature=temperature,
        max_tokens=_positive_int("max_tokens", kwargs.get("max_tokens")),
        max_completion_tokens=_positive_int(
            "max_completion_tokens", kwargs.get("max_completion_tokens")
        ),
        top_p=top_p,
        stop=stop,
        seed=seed,
        response_format=_dict("response_format", kwargs.get("response_format")),
        parallel_tool_calls=parallel,
        reasoning_effort=effort,
        thinking=_dict("thinking", kwargs.get("thinking")),
        tool=tool,
        tools=tools,
        tool_choice=_tool_choice(kwargs.get("tool_choice"), tools),
        extra_body=_dict("extra_body", kwargs.get("extra_body")),
        extra_headers=_headers(kwargs.get("extra_headers")),
    )
