"""Mistral AI on the official ``mistralai`` SDK (3.x: ``from mistralai.client import Mistral``).

The SDK's async path calls ``asyncio`` directly, so it only runs on asyncio. On trio this
provider drives the SDK's synchronous client instead, one worker-thread hop per request
(and per stream event), which keeps the event loop free on both backends. Those threads
come from the provider's own limiter (``thread_limit``), and a cancelled hop abandons its
thread rather than waiting for the blocked read.
"""

from __future__ import annotations

import contextvars
import functools
import json
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import sniffio

from converge import _sync
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
from converge.extensions.llm._errors import bad_response, classify_mistral
from converge.extensions.llm._request import ChatRequest, data_url
from converge.extensions.llm._retry import Failure, RetryPolicy
from converge.extensions.llm.openai import (
    _function_tool,
    _openai_messages,
    _openai_usage,
    _parse_tool_calls,
)
from converge.extensions.llm.protocol import ChatResult
from converge.extensions.llm.telemetry import Telemetry

__all__ = ["MistralProvider"]

T = TypeVar("T")
# Options sent as they are, under Mistral's names (max tokens and tools are mapped apart).
_OPTION_NAMES = {
    "temperature": "temperature",
    "top_p": "top_p",
    "stop": "stop",
    "seed": "random_seed",
    "response_format": "response_format",
    "reasoning_effort": "reasoning_effort",
}
_END = object()
_OPTIONS = frozenset(
    {
        "model",
        "temperature",
        "top_p",
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "seed",
        "response_format",
        "parallel_tool_calls",
        "reasoning_effort",
        "tools",
        "tool_choice",
        "use_structured_output",
        "emit_decisions_tool",
        "extra_body",
        "extra_headers",
    }
)
_STOP = {
    "stop": "stop",
    "length": "length",
    "model_length": "length",
    "tool_calls": "tool_calls",
}
#: Seconds a trio stream's close may take in its worker thread before it is abandoned.
_CLOSE_GRACE = 2.0
# The extra_body of the call in progress, for the SDK hook that merges it (the SDK's
# chat methods take no extra body). A context variable: worker threads inherit it.
_EXTRA_BODY: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "converge_mistral_extra_body", default=None
)


def _on_asyncio() -> bool:
    return sniffio.current_async_library() == "asyncio"


def _normalise_stop(raw: str | None) -> str:
    """Mistral's ``finish_reason`` as a converge stop reason (``error`` is ``other``)."""
    return _STOP.get(raw or "", "other")


def _messages(request: ChatRequest) -> list[dict[str, Any]]:
    out = _openai_messages(request)
    for mapped, message in zip(out, request.messages, strict=True):
        if message["role"] == "tool" and message["name"] is not None:
            mapped["name"] = message["name"]
        content = message["content"]
        if isinstance(content, tuple):
            mapped["content"] = [_part(p) for p in content]
    return out


def _part(part: dict[str, Any]) -> dict[str, Any]:
    kind = part["type"]
    if kind == "text":
        return {"type": "text", "text": part["text"]}
    url = part.get("url") or data_url(part)
    if kind == "image":
        return {"type": "image_url", "image_url": url}
    chunk = {"type": "document_url", "document_url": url}
    if "name" in part:
        chunk["document_name"] = part["name"]
    return chunk


def _request_kwargs(request: ChatRequest, timeout: float | None) -> dict[str, Any]:
    """``chat.complete``/``chat.stream`` arguments for ``request`` (SDK retries off)."""
    kwargs: dict[str, Any] = {
        "model": request.model,
        "messages": _messages(request),
        "retries": None,
    }
    if timeout is not None:
        kwargs["timeout_ms"] = max(1, int(timeout * 1000))
    kwargs.update(request.options(_OPTION_NAMES))
    if request.output_limit is not None:
        kwargs["max_tokens"] = request.output_limit
    tools = request.all_tools
    if tools:
        kwargs["tools"] = [_function_tool(t) for t in tools]
        if request.tool is not None:
            kwargs["tool_choice"] = (
                "any"
                if not request.tools
                else {"type": "function", "function": {"name": request.tool.name}}
            )
        elif request.tool_choice in ("auto", "none", "required"):
            kwargs["tool_choice"] = request.tool_choice
        elif request.tool_choice is not None:
            kwargs["tool_choice"] = {"type": "function", "function": {"name": request.tool_choice}}
        if request.parallel_tool_calls is not None:
            kwargs["parallel_tool_calls"] = request.parallel_tool_calls
    if request.extra_headers is not None:
        kwargs["http_headers"] = request.extra_headers
    return kwargs


def _text(content: Any) -> str | None:
    """Message content as text: a string, or the text of a list of chunks."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for chunk in content:
            if getattr(chunk, "type", None) == "text":
                text = getattr(chunk, "text", None)
                if not isinstance(text, str):
                    raise TypeError("a text chunk holds no string")
                parts.append(text)
        return "".join(parts)
    raise TypeError("message content is neither text nor chunks")


def _mistral_usage(usage: Any, counter: UsageCounter) -> None:
    _openai_usage(usage, counter)  # same counts; cached tokens when the API reports them
    if usage is not None and counter.counts["cache_read_tokens"] is None:
        counter.update(cache_read_tokens=field_of(usage, "num_cached_tokens"))


def _parse_completion(response: Any, provider: str) -> ChatResult:
    """The :class:`ChatResult` of a chat completion."""
    choices = getattr(response, "choices", None)
    if not isinstance(choices, list) or not choices:
        raise bad_response(provider, "no choices in the completion")
    choice = choices[0]
    message = getattr(choice, "message", None)
    if message is None:
        raise bad_response(provider, "the first choice has no message")
    counter = UsageCounter()
    _mistral_usage(getattr(response, "usage", None), counter)
    calls = _parse_tool_calls(getattr(message, "tool_calls", None), provider)
    try:
        text = _text(getattr(message, "content", None))
    except TypeError as exc:
        raise bad_response(provider, str(exc)) from exc
    raw_stop = str_or_none(getattr(choice, "finish_reason", None))
    stop = _normalise_stop(raw_stop)
    if calls and stop == "stop":
        stop = "tool_calls"
    return ChatResult(
        text=text or "",
        usage=counter.usage(),
        stop_reason=stop,
        raw_stop_reason=raw_stop,
        model=str_or_none(getattr(response, "model", None)),
        response_id=str_or_none(getattr(response, "id", None)),
        tool_calls=calls,
    )


def _refused_arguments(exc: Any) -> str:
    """The UsageError message for arguments the SDK's request model refused (its first
    problem, located)."""
    try:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        detail = f"{where}: {first['msg']}"
    except Exception:  # pragma: no cover - a pydantic without errors()
        detail = type(exc).__name__
    return f"mistral: the SDK refused the request's arguments ({detail[:300]})"


class _ExtraBodyHook:
    """SDK before-request hook merging the call's ``extra_body`` into the JSON body."""

    def before_request(self, hook_ctx: Any, request: Any) -> Any:
        extra = _EXTRA_BODY.get()
        if not extra:
            return request
        import httpx2  # the SDK's own HTTP dependency

        body = json.loads(request.content or b"{}")
        body.update(extra)
        content = json.dumps(body).encode()
        headers = request.headers.copy()
        headers["content-length"] = str(len(content))
        return httpx2.Request(
            request.method,
            request.url,
            headers=headers,
            content=content,
            extensions=request.extensions,
        )


_HOOK = _ExtraBodyHook()


def _install_hook(sdk: Any) -> None:
    """Register the extra-body hook on an SDK object (once)."""
    hooks = getattr(getattr(sdk, "sdk_configuration", None), "__dict__", {}).get("_hooks")
    registered = getattr(hooks, "before_request_hooks", None)
    if hooks is None or not isinstance(registered, list):
        raise UsageError("this mistralai SDK has no request hooks; extra_body is unavailable")
    if _HOOK not in registered:
        hooks.register_before_request_hook(_HOOK)


class _Clients:
    """One loop's SDK object with the HTTP clients we created for it (and close)."""

    def __init__(self, sdk: Any, http: Any, ahttp: Any) -> None:
        self.sdk = sdk
        self.http = http
        self.ahttp = ahttp


class MistralProvider(SDKProvider):
    """LLM provider using the Mistral AI API (``pip install -e ".[llm-mistral]"``).

    Runs on asyncio through the SDK's async client and on trio through its sync client in
    worker threads (the SDK's async path is asyncio-only).

    Args:
        api_key: Mistral API key. If None, uses the ``MISTRAL_API_KEY`` env var.
        model: Model name (e.g. mistral-small-latest, mistral-large-latest).
        base_url: API root (the SDK's ``server_url``).
        timeout: Seconds per HTTP attempt (None: the SDK's default; above 30 days, 30
            days).
        max_retries: Retries after the first attempt (overrides ``retry_policy``'s).
        client: A ``mistralai.client.Mistral`` to use instead of creating clients (no API
            key needed then; not closed by us).
        retry_policy: Backoff, ``Retry-After`` cap and overall deadline.
        telemetry: Where spans and metrics go (default: OpenTelemetry's global providers,
            a no-op without the ``otel`` extra).
        metrics_collector: Also count calls, errors, tokens and latency here.
        thread_limit: On trio, the most worker threads this provider's calls and stream
            reads occupy at once (its own limiter, not anyio's default one shared with
            sync tools).

    Raises:
        MissingDependencyError: When the ``mistralai`` package is not installed.
        ConfigurationError: When no API key is given or found, or the environment's
            cannot be sent in a header (before any network call).
        UsageError: For a bad argument: ``base_url`` not an http(s) URL with a valid host
            and port, ``api_key`` not printable ASCII, ...
    """

    provider_name = "mistral"
    env_var = "MISTRAL_API_KEY"
    extra = "llm-mistral"
    sdk_module = "mistralai.client"
    default_host = "api.mistral.ai"
    options = _OPTIONS

    def __init__(
        self,
        api_key: str | None = None,
        model: str = "mistral-small-latest",
        *,
        base_url: str | None = None,
        timeout: float | None = 60.0,
        max_retries: int | None = None,
        client: Any = None,
        retry_policy: RetryPolicy | None = None,
        telemetry: Telemetry | None = None,
        metrics_collector: MetricsCollector | None = None,
        thread_limit: int = 64,
    ) -> None:
        if isinstance(thread_limit, bool) or not isinstance(thread_limit, int) or thread_limit < 1:
            raise UsageError("thread_limit must be a positive integer")
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
        self.thread_limit = thread_limit
        self._errors = import_sdk("mistralai.client.errors", self.extra)
        self._pydantic = import_sdk("pydantic", self.extra)  # the SDK's own dependency
        self._limiters: _sync.LoopLocal[anyio.CapacityLimiter] = _sync.LoopLocal(
            lambda: anyio.CapacityLimiter(self.thread_limit)
        )

    def _adopt_client(self, client: Any) -> Any:
        if not isinstance(client, self._sdk.Mistral):
            raise UsageError("client must be a mistralai.client.Mistral instance")
        return _Clients(client, None, None)

    def _new_client(self) -> Any:
        import httpx2  # the SDK's own HTTP dependency

        http = httpx2.Client(follow_redirects=True, verify=shared_ssl_context())
        ahttp = httpx2.AsyncClient(follow_redirects=True, verify=shared_ssl_context())
        sdk = self._sdk.Mistral(
            api_key=self._api_key,
            server_url=self.base_url,
            client=http,
            async_client=ahttp,
            retry_config=None,
        )
        return _Clients(sdk, http, ahttp)

    def _classify_sdk(self, exc: Exception, now: float) -> Failure | None:
        return classify_mistral(exc, self._errors, self.provider_name, now)

    async def _in_thread(self, func: Callable[..., T], *args: Any) -> T:
        """``func(*args)`` in a worker thread of this provider's own limiter, abandoned
        (left to finish on its own) when the caller is cancelled."""
        return await anyio.to_thread.run_sync(
            func, *args, abandon_on_cancel=True, limiter=self._limiters.get()
        )

    async def _call(self, client: Any, request: ChatRequest, *, stream: bool) -> Any:
        kwargs = _request_kwargs(request, self.timeout)
        chat = client.sdk.chat
        if request.extra_body:
            _install_hook(client.sdk)
        token = _EXTRA_BODY.set(request.extra_body)
        try:
            if _on_asyncio():
                if stream:
                    return await chat.stream_async(**kwargs)
                return await chat.complete_async(**kwargs)
            method = chat.stream if stream else chat.complete
            return await self._in_thread(functools.partial(method, **kwargs))
        except self._pydantic.ValidationError as exc:
            # The SDK checks the arguments with pydantic before sending; a response it
            # cannot read is its ResponseValidationError instead, mapped as a bad answer.
            raise UsageError(_refused_arguments(exc)) from None
        finally:
            _EXTRA_BODY.reset(token)

    async def _complete(self, client: Any, request: ChatRequest) -> ChatResult:
        response = await self._call(client, request, stream=False)
        return _parse_completion(response, self.provider_name)

    async def _open_stream(self, client: Any, request: ChatRequest) -> Any:
        return await self._call(client, request, stream=True)

    async def _events(self, stream: Any) -> AsyncIterator[Any]:
        if hasattr(stream, "__aiter__"):
            async for event in stream:
                yield event
            return
        while True:
            event = await self._in_thread(next, stream, _END)
            if event is _END:
                return
            yield event

    def _delta(self, event: Any, state: StreamState) -> str | None:
        data = getattr(event, "data", None)
        _mistral_usage(getattr(data, "usage", None), state.usage)
        state.model = state.model or getattr(data, "model", None)
        state.response_id = state.response_id or getattr(data, "id", None)
        choices = getattr(data, "choices", None)
        if not choices:
            return None
        state.stop(getattr(choices[0], "finish_reason", None), _normalise_stop)
        return _text(getattr(getattr(choices[0], "delta", None), "content", None))

    async def _close_stream(self, stream: Any) -> None:
        if hasattr(stream, "__aiter__"):
            await stream.close()
            return
        # A worker thread abandoned on cancel may still be reading this stream; do not
        # let closing it wait for that read.
        with anyio.move_on_after(_CLOSE_GRACE):
            await self._in_thread(stream.close)

    async def _close_client(self, client: Any) -> None:
        if client.http is not None:
            await anyio.to_thread.run_sync(client.http.close)
        if client.ahttp is not None:
            await client.ahttp.aclose()
