"""OpenAI (and OpenAI-compatible servers: vLLM, Ollama, ...) on the official ``openai`` SDK."""

from __future__ import annotations

import json
import re
from typing import Any

from converge.core import MetricsCollector
from converge.errors import UsageError
from converge.extensions.llm._base import (
    SDKProvider,
    StreamState,
    UsageCounter,
    field_of,
    shared_ssl_context,
    str_or_none,
)
from converge.extensions.llm._errors import bad_response, classify_stainless
from converge.extensions.llm._request import OPTIONS as _ALL_OPTIONS
from converge.extensions.llm._request import (
    ChatRequest,
    ToolSpec,
    data_url,
    tool_call_arguments_json,
)
from converge.extensions.llm._retry import Failure, RetryPolicy
from converge.extensions.llm.protocol import ChatResult, ToolCall
from converge.extensions.llm.telemetry import Telemetry

__all__ = ["OpenAIProvider", "is_reasoning_model"]

_OPTIONS = frozenset(_ALL_OPTIONS) - {"thinking"}
# Options sent as they are, under OpenAI's names (max tokens and tools are mapped apart).
_OPTION_NAMES = {
    "temperature": "temperature",
    "top_p": "top_p",
    "stop": "stop",
    "seed": "seed",
    "response_format": "response_format",
    "reasoning_effort": "reasoning_effort",
}
_REASONING_MODEL = re.compile(r"^(o\d|gpt-5)")
_STOP = {
    "stop": "stop",
    "length": "length",
    "content_filter": "content_filter",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
}


def is_reasoning_model(model: str) -> bool:
    """Whether ``model`` is an OpenAI reasoning model (o1, o3, o4-mini, gpt-5, ...), which
    takes ``max_completion_tokens`` and refuses ``max_tokens``."""
    return bool(_REASONING_MODEL.match(model.rsplit("/", 1)[-1]))


def _normalise_stop(raw: str | None) -> str:
    """Chat Completions' ``finish_reason`` as a converge stop reason."""
    return _STOP.get(raw or "", "other")


def _part(part: dict[str, Any]) -> dict[str, Any]:
    kind = part["type"]
    if kind == "text":
        return {"type": "text", "text": part["text"]}
    if kind == "image":
        return {"type": "image_url", "image_url": {"url": part.get("url") or data_url(part)}}
    if "url" in part:
        raise UsageError(
            "openai takes documents as base64 data, not by URL: pass {'type': 'document', "
            "'data': ..., 'media_type': 'application/pdf'}"
        )
    name = part.get("name", "document.pdf")
    return {"type": "file", "file": {"filename": name, "file_data": data_url(part)}}


def _tool_calls(calls: tuple[ToolCall, ...]) -> list[dict[str, Any]]:
    return [
        {
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": tool_call_arguments_json(call)},
        }
        for call in calls
    ]


def _openai_messages(request: ChatRequest) -> list[dict[str, Any]]:
    """The request's messages in the Chat Completions shape (also Mistral's, but for
    content parts)."""
    out: list[dict[str, Any]] = []
    for message in request.messages:
        role, content = message["role"], message["content"]
        if role == "tool":
            out.append(
                {"role": "tool", "tool_call_id": message["tool_call_id"], "content": content}
            )
            continue
        if isinstance(content, tuple):
            content = [_part(p) for p in content]
        mapped: dict[str, Any] = {"role": role, "content": content}
        if "tool_calls" in message:
            mapped["tool_calls"] = _tool_calls(message["tool_calls"])
        out.append(mapped)
    return out


def _function_tool(tool: ToolSpec) -> dict[str, Any]:
    """A tool in the Chat Completions ``tools`` shape."""
    return {
        "type": "function",
        "function": {
            "name": tool.name,
            "description": tool.description,
            "parameters": tool.parameters,
        },
    }


def _request_kwargs(request: ChatRequest, *, stream: bool) -> dict[str, Any]:
    """Chat Completions arguments for ``request``."""
    kwargs: dict[str, Any] = {"model": request.model, "messages": _openai_messages(request)}
    kwargs.update(request.options(_OPTION_NAMES))
    if request.max_completion_tokens is not None:
        kwargs["max_completion_tokens"] = request.max_completion_tokens
    elif request.max_tokens is not None:
        # Reasoning models refuse max_tokens; max_completion_tokens is its successor.
        reasoning = request.reasoning_effort is not None or is_reasoning_model(request.model)
        kwargs["max_completion_tokens" if reasoning else "max_tokens"] = request.max_tokens
    tools = request.all_tools
    if tools:
        kwargs["tools"] = [_function_tool(t) for t in tools]
        choice = request.tool.name if request.tool is not None else request.tool_choice
        if choice in ("auto", "none", "required"):
            kwargs["tool_choice"] = choice
        elif choice is not None:
            kwargs["tool_choice"] = {"type": "function", "function": {"name": choice}}
        if request.parallel_tool_calls is not None:
            kwargs["parallel_tool_calls"] = request.parallel_tool_calls
    if request.extra_body is not None:
        kwargs["extra_body"] = request.extra_body
    if request.extra_headers is not None:
        kwargs["extra_headers"] = request.extra_headers
    if stream:
        kwargs["stream"] = True
        kwargs["stream_options"] = {"include_usage": True}
    return kwargs


def _openai_usage(usage: Any, counter: UsageCounter) -> None:
    """Chat Completions usage (with its cached / reasoning details) into ``counter``."""
    if usage is None:
        return
    counter.update(
        input_tokens=field_of(usage, "prompt_tokens"),
        output_tokens=field_of(usage, "completion_tokens"),
        cache_read_tokens=field_of(usage, "prompt_tokens_details", "cached_tokens"),
        reasoning_tokens=field_of(usage, "completion_tokens_details", "reasoning_tokens"),
    )


def _parse_tool_calls(calls: Any, provider: str) -> tuple[ToolCall, ...]:
    """Chat Completions ``tool_calls`` (arguments as a JSON string, or an object as
    Mistral may send) as :class:`ToolCall` records."""
    out = []
    for i, call in enumerate(calls or ()):
        function = getattr(call, "function", None)
        name = getattr(function, "name", None)
        arguments = getattr(function, "arguments", None)
        if not isinstance(name, str) or not name:
            raise bad_response(provider, f"tool call {i} has no function name")
        raw: str | None = None
        if isinstance(arguments, dict):
            decoded: Any = arguments
        elif isinstance(arguments, str):
            raw = arguments
            try:
                decoded = json.loads(arguments) if arguments.strip() else {}
            except ValueError:  # kept raw: truncated or invalid JSON is the caller's to see
                decoded = {}
        else:
            raise bad_response(provider, "tool call arguments are not JSON")
        call_id = getattr(call, "id", None)
        out.append(
            ToolCall(
                call_id if isinstance(call_id, str) else "",
                name,
                decoded if isinstance(decoded, dict) else {},
                raw,
            )
        )
    return tuple(out)


def _parse_completion(response: Any, provider: str) -> ChatResult:
    """The :class:`ChatResult` of a ``chat.completion``."""
    choices = getattr(response, "choices", None)
    if not isinstance(choices, list) or not choices:
        raise bad_response(provider, "no choices in the completion")
    choice = choices[0]
    message = getattr(choice, "message", None)
    if message is None:
        raise bad_response(provider, "the first choice has no message")
    counter = UsageCounter()
    _openai_usage(getattr(response, "usage", None), counter)
    raw_stop = str_or_none(getattr(choice, "finish_reason", None))
    stop = _normalise_stop(raw_stop)
    calls = _parse_tool_calls(getattr(message, "tool_calls", None), provider)
    content = getattr(message, "content", None)
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise bad_response(provider, "message content is not a string")
    refusal = getattr(message, "refusal", None)
    if isinstance(refusal, str) and refusal:
        stop, content = "refusal", content or refusal
    elif calls and stop == "stop":  # a forced tool_choice finishes with "stop"
        stop = "tool_calls"
    return ChatResult(
        text=content,
        usage=counter.usage(),
        stop_reason=stop,
        raw_stop_reason=raw_stop,
        model=str_or_none(getattr(response, "model", None)),
        response_id=str_or_none(getattr(response, "id", None)),
        tool_calls=calls,
    )


class OpenAIProvider(SDKProvider):
    """LLM provider using the OpenAI API (``pip install -e ".[llm-openai]"``).

    Also speaks to OpenAI-compatible servers (vLLM, Ollama, LM Studio, ...) through
    ``base_url``. The SDK's own retries are off; :class:`~converge.extensions.llm.RetryPolicy`
    applies instead.

    Args:
        api_key: OpenAI API key. If None, uses the ``OPENAI_API_KEY`` env var.
        model: Model name (e.g. gpt-4o-mini, gpt-4o).
        base_url: API root, e.g. ``http://localhost:11434/v1`` for Ollama.
        timeout: Seconds per HTTP attempt (None: the SDK's default; above 30 days, 30
            days).
        max_retries: Retries after the first attempt (overrides ``retry_policy``'s).
        client: An ``openai.AsyncOpenAI`` to use instead of creating clients (no API key
            needed then; it is used from whatever loop calls, and not closed by us).
        retry_policy: Backoff, ``Retry-After`` cap and overall deadline.
        telemetry: Where spans and metrics go (default: OpenTelemetry's global providers,
            a no-op without the ``otel`` extra).
        metrics_collector: Also count calls, errors, tokens and latency here.

    Raises:
        MissingDependencyError: When the ``openai`` package is not installed.
        ConfigurationError: When no API key is given or found, or the environment's
            cannot be sent in a header (before any network call).
        UsageError: For a bad argument: ``base_url`` not an http(s) URL with a valid host
            and port, ``api_key`` not printable ASCII, ...
    """

    provider_name = "openai"
    env_var = "OPENAI_API_KEY"
    extra = "llm-openai"
    sdk_module = "openai"
    default_host = "api.openai.com"
    options = _OPTIONS

    def __init__(
        self,
        api_key: str | None = None,
        model: str = "gpt-4o-mini",
        *,
        base_url: str | None = None,
        timeout: float | None = 60.0,
        max_retries: int | None = None,
        client: Any = None,
        retry_policy: RetryPolicy | None = None,
        telemetry: Telemetry | None = None,
        metrics_collector: MetricsCollector | None = None,
    ) -> None:
        super().__init__(
            api_key,
            model,
            base_url=base_url,
            timeout=timeout,
            max_retries=max_retries,
            client=client,
            retry_policy=retry_policy,
            telemetry=telemetry,
            metrics_collector=metrics_collector,
        )

    def _adopt_client(self, client: Any) -> Any:
        if not isinstance(client, self._sdk.AsyncOpenAI):
            raise UsageError("client must be an openai.AsyncOpenAI instance")
        if self.timeout is None:
            return client.with_options(max_retries=0)
        return client.with_options(max_retries=0, timeout=self.timeout)

    def _new_client(self) -> Any:
        kwargs: dict[str, Any] = {
            "api_key": self._api_key,
            "max_retries": 0,
            "http_client": self._sdk.DefaultAsyncHttpxClient(verify=shared_ssl_context()),
        }
        if self.base_url is not None:
            kwargs["base_url"] = self.base_url
        if self.timeout is not None:
            kwargs["timeout"] = self.timeout
        return self._sdk.AsyncOpenAI(**kwargs)

    def _classify_sdk(self, exc: Exception, now: float) -> Failure | None:
        return classify_stainless(exc, self._sdk, self.provider_name, now)

    async def _complete(self, client: Any, request: ChatRequest) -> ChatResult:
        response = await client.chat.completions.create(**_request_kwargs(request, stream=False))
        return _parse_completion(response, self.provider_name)

    async def _open_stream(self, client: Any, request: ChatRequest) -> Any:
        return await client.chat.completions.create(**_request_kwargs(request, stream=True))

    def _delta(self, event: Any, state: StreamState) -> str | None:
        _openai_usage(getattr(event, "usage", None), state.usage)
        state.model = state.model or getattr(event, "model", None)
        state.response_id = state.response_id or getattr(event, "id", None)
        choices = getattr(event, "choices", None)
        if not choices:
            return None
        choice = choices[0]
        state.stop(getattr(choice, "finish_reason", None), _normalise_stop)
        delta = getattr(choice, "delta", None)
        refusal = getattr(delta, "refusal", None)
        if isinstance(refusal, str) and refusal:
            state.refusal.append(refusal)
        content = getattr(delta, "content", None)
        if content is not None and not isinstance(content, str):
            raise TypeError("delta content is not a string")
        return content
