"""Anthropic's Messages API on the official ``anthropic`` SDK."""

from __future__ import annotations

import inspect
from typing import Any

from converge.core import MetricsCollector
from converge.errors import UsageError
from converge.extensions.llm._base import (
    SDKProvider,
    StreamState,
    UsageCounter,
    field_of,
    import_sdk,
    shared_ssl_context,
    str_or_none,
)
from converge.extensions.llm._errors import bad_response, classify_stainless
from converge.extensions.llm._request import ChatRequest
from converge.extensions.llm._retry import Failure, RetryPolicy
from converge.extensions.llm.protocol import ChatResult, ToolCall
from converge.extensions.llm.telemetry import Telemetry

__all__ = ["AnthropicProvider"]

# Options sent as they are, under Anthropic's names (temperature is capped at 1.0 apart).
_OPTION_NAMES = {"top_p": "top_p", "stop": "stop_sequences", "thinking": "thinking"}
_DEFAULT_MAX_TOKENS = 1024
_OPTIONS = frozenset(
    {
        "model",
        "temperature",
        "top_p",
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "thinking",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "use_structured_output",
        "emit_decisions_tool",
        "extra_body",
        "extra_headers",
    }
)
_STOP = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "refusal",
}


def _normalise_stop(raw: str | None) -> str:
    """The Messages API's ``stop_reason`` as a converge stop reason."""
    return _STOP.get(raw or "", "other")


def _source(part: dict[str, Any]) -> dict[str, Any]:
    if "url" in part:
        return {"type": "url", "url": part["url"]}
    return {"type": "base64", "media_type": part["media_type"], "data": part["data"]}


def _block(part: dict[str, Any]) -> dict[str, Any]:
    if part["type"] == "text":
        return {"type": "text", "text": part["text"]}
    block = {"type": part["type"], "source": _source(part)}
    if part["type"] == "document" and "name" in part:
        block["title"] = part["name"]
    return block


def _messages(request: ChatRequest) -> list[dict[str, Any]]:
    """The dialogue as Messages API turns: tool calls become ``tool_use`` blocks, tool
    results ``tool_result`` blocks in the next user turn (consecutive results share one
    turn, as the API requires)."""
    out: list[dict[str, Any]] = []
    for message in request.dialogue:
        role, content = message["role"], message["content"]
        if role == "tool":
            block = {
                "type": "tool_result",
                "tool_use_id": message["tool_call_id"],
                "content": content,
            }
            previous = out[-1] if out else None
            if previous is not None and previous["role"] == "user" and _has_results(previous):
                previous["content"].append(block)
            else:
                out.append({"role": "user", "content": [block]})
            continue
        if role == "assistant" and "tool_calls" in message:
            blocks: list[dict[str, Any]] = [{"type": "text", "text": content}] if content else []
            blocks += [
                {"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments}
                for c in message["tool_calls"]
            ]
            out.append({"role": "assistant", "content": blocks})
            continue
        mapped: Any = [_block(p) for p in content] if isinstance(content, tuple) else content
        previous = out[-1] if out else None
        if role == "user" and previous is not None and _has_results(previous):
            extra = [{"type": "text", "text": mapped}] if isinstance(mapped, str) else mapped
            previous["content"].extend(extra)
            continue
        out.append({"role": role, "content": mapped})
    return out


def _has_results(message: dict[str, Any]) -> bool:
    content = message["content"]
    return isinstance(content, list) and any(b.get("type") == "tool_result" for b in content)


def _request_kwargs(request: ChatRequest, *, stream: bool) -> dict[str, Any]:
    """Messages API arguments for ``request``: system messages go to ``system``."""
    max_tokens = request.output_limit
    if max_tokens is None:
        budget = field_of(request.thinking, "budget_tokens")
        extra = budget if isinstance(budget, int) and not isinstance(budget, bool) else 0
        max_tokens = _DEFAULT_MAX_TOKENS + max(0, extra)
    kwargs: dict[str, Any] = {
        "model": request.model,
        "messages": _messages(request),
        "max_tokens": max_tokens,
    }
    system = request.system
    if system is not None:
        kwargs["system"] = system
    if request.temperature is not None:
        kwargs["temperature"] = min(request.temperature, 1.0)
    kwargs.update(request.options(_OPTION_NAMES))
    tools = request.all_tools
    if tools:
        kwargs["tools"] = [
            {"name": t.name, "description": t.description, "input_schema": t.parameters}
            for t in tools
        ]
        choice_name = request.tool.name if request.tool is not None else request.tool_choice
        choice: dict[str, Any] | None
        if choice_name is None:
            choice = {"type": "auto"} if request.parallel_tool_calls is False else None
        elif choice_name in ("auto", "none"):
            choice = {"type": choice_name}
        elif choice_name == "required":
            choice = {"type": "any"}
        else:
            choice = {"type": "tool", "name": choice_name}
        if choice is not None:
            if request.parallel_tool_calls is False and choice["type"] != "none":
                choice["disable_parallel_tool_use"] = True
            kwargs["tool_choice"] = choice
    if request.extra_body is not None:
        kwargs["extra_body"] = request.extra_body
    if request.extra_headers is not None:
        kwargs["extra_headers"] = request.extra_headers
    if stream:
        kwargs["stream"] = True
    return kwargs


def _anthropic_usage(usage: Any, counter: UsageCounter) -> None:
    """Messages API usage into ``counter`` (cache reads and writes kept apart, added to
    the input count by the counter)."""
    if usage is None:
        return
    counter.update(
        input_tokens=field_of(usage, "input_tokens"),
        output_tokens=field_of(usage, "output_tokens"),
        cache_read_tokens=field_of(usage, "cache_read_input_tokens"),
        cache_write_tokens=field_of(usage, "cache_creation_input_tokens"),
        reasoning_tokens=field_of(usage, "output_tokens_details", "thinking_tokens"),
    )


def _parse_message(response: Any, provider: str) -> ChatResult:
    """The :class:`ChatResult` of a ``message``."""
    content = getattr(response, "content", None)
    if not isinstance(content, list):
        raise bad_response(provider, "the message has no content list")
    counter = UsageCounter(input_excludes_cache=True)
    _anthropic_usage(getattr(response, "usage", None), counter)
    texts = []
    calls = []
    for block in content:
        kind = getattr(block, "type", None)
        if kind == "tool_use":
            name, arguments = getattr(block, "name", None), getattr(block, "input", None)
            if not isinstance(name, str) or not name:
                raise bad_response(provider, "a tool_use block has no name")
            if not isinstance(arguments, dict):
                raise bad_response(provider, "tool_use input is not a JSON object")
            call_id = getattr(block, "id", None)
            calls.append(ToolCall(call_id if isinstance(call_id, str) else "", name, arguments))
        elif kind == "text":
            text = getattr(block, "text", None)
            if not isinstance(text, str):
                raise bad_response(provider, "a text block holds no string")
            texts.append(text)
    raw_stop = str_or_none(getattr(response, "stop_reason", None))
    return ChatResult(
        text="".join(texts),
        usage=counter.usage(),
        stop_reason=_normalise_stop(raw_stop),
        raw_stop_reason=raw_stop,
        model=str_or_none(getattr(response, "model", None)),
        response_id=str_or_none(getattr(response, "id", None)),
        tool_calls=tuple(calls),
    )


class AnthropicProvider(SDKProvider):
    """LLM provider using the Anthropic API (``pip install -e ".[llm-anthropic]"``).

    System messages are joined into the ``system`` parameter; ``max_tokens`` defaults to
    1024 (the API requires one; plus the ``thinking`` budget when one is given), and
    ``max_completion_tokens`` is taken as its synonym. ``temperature`` (capped at 1.0)
    and ``top_p`` are passed only to SDK versions whose Messages API still takes them
    (anthropic 2.x does not: a :class:`~converge.errors.UsageError` says so).

    Args:
        api_key: Anthropic API key. If None, uses the ``ANTHROPIC_API_KEY`` env var.
        model: Model name (e.g. claude-sonnet-4-20250514, claude-3-5-haiku).
        base_url: API root (a proxy or a compatible server).
        timeout: Seconds per HTTP attempt (None: the SDK's default; above 30 days, 30
            days).
        max_retries: Retries after the first attempt (overrides ``retry_policy``'s).
        client: An ``anthropic.AsyncAnthropic`` to use instead of creating clients (no API
            key needed then; it is used from whatever loop calls, and not closed by us).
        retry_policy: Backoff, ``Retry-After`` cap and overall deadline.
        telemetry: Where spans and metrics go (default: OpenTelemetry's global providers,
            a no-op without the ``otel`` extra).
        metrics_collector: Also count calls, errors, tokens and latency here.

    Raises:
        MissingDependencyError: When the ``anthropic`` package is not installed.
        ConfigurationError: When no API key is given or found, or the environment's
            cannot be sent in a header (before any network call).
        UsageError: For a bad argument: ``base_url`` not an http(s) URL with a valid host
            and port, ``api_key`` not printable ASCII, ...
    """

    provider_name = "anthropic"
    env_var = "ANTHROPIC_API_KEY"
    extra = "llm-anthropic"
    sdk_module = "anthropic"
    default_host = "api.anthropic.com"
    options = _OPTIONS

    def __init__(
        self,
        api_key: str | None = None,
        model: str = "claude-sonnet-4-20250514",
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
        messages = import_sdk("anthropic.resources.messages", self.extra)
        create = messages.AsyncMessages.create
        self._sampling = frozenset(inspect.signature(create).parameters) & {"temperature", "top_p"}

    def _adopt_client(self, client: Any) -> Any:
        if not isinstance(client, self._sdk.AsyncAnthropic):
            raise UsageError("client must be an anthropic.AsyncAnthropic instance")
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
        return self._sdk.AsyncAnthropic(**kwargs)

    def _classify_sdk(self, exc: Exception, now: float) -> Failure | None:
        return classify_stainless(exc, self._sdk, self.provider_name, now)

    def _check_request(self, request: ChatRequest) -> None:
        if not any(m["role"] != "system" for m in request.messages):
            raise UsageError("Anthropic needs at least one user or assistant message")
        for option in ("temperature", "top_p"):
            if getattr(request, option) is not None and option not in self._sampling:
                raise UsageError(
                    f"this anthropic SDK's Messages API takes no {option!r}; "
                    "pass it in extra_body if your endpoint accepts it"
                )

    async def _complete(self, client: Any, request: ChatRequest) -> ChatResult:
        response = await client.messages.create(**_request_kwargs(request, stream=False))
        return _parse_message(response, self.provider_name)

    async def _open_stream(self, client: Any, request: ChatRequest) -> Any:
        return await client.messages.create(**_request_kwargs(request, stream=True))

    def _delta(self, event: Any, state: StreamState) -> str | None:
        kind = getattr(event, "type", None)
        if kind == "message_start":
            message = getattr(event, "message", None)
            state.usage.input_excludes_cache = True
            _anthropic_usage(getattr(message, "usage", None), state.usage)
            state.model = getattr(message, "model", None)
            state.response_id = getattr(message, "id", None)
        elif kind == "message_delta":
            _anthropic_usage(getattr(event, "usage", None), state.usage)
            state.stop(field_of(event, "delta", "stop_reason"), _normalise_stop)
        elif kind == "content_block_delta":
            delta = getattr(event, "delta", None)
            if getattr(delta, "type", None) == "text_delta":
                text = getattr(delta, "text", None)
                if not isinstance(text, str):
                    raise TypeError("text_delta holds no string")
                return text
        return None
