"""Mistral AI on the official ``mistralai`` SDK (3.x: ``from mistralai.client import Mistral``).

The SDK's async path calls ``asyncio`` directly, so it only runs on asyncio. On trio this
provider drives the SDK's synchronous client instead, one worker-thread hop per request
(and per stream event), which keeps the event loop free on both backends.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.to_thread
import sniffio

from converge.errors import UsageError
from converge.extensions.llm._base import (
    SDKProvider,
    UsageCounter,
    import_sdk,
    shared_ssl_context,
    usage_from,
)
from converge.extensions.llm._errors import bad_response, classify_mistral
from converge.extensions.llm._request import ChatRequest
from converge.extensions.llm._retry import Failure, RetryPolicy
from converge.extensions.llm.protocol import Usage

__all__ = ["MistralProvider"]

_END = object()


def _on_asyncio() -> bool:
    return sniffio.current_async_library() == "asyncio"


def _request_kwargs(request: ChatRequest, timeout: float | None) -> dict[str, Any]:
    """``chat.complete``/``chat.stream`` arguments for ``request`` (SDK retries off)."""
    kwargs: dict[str, Any] = {
        "model": request.model,
        "messages": list(request.messages),
        "retries": None,
    }
    if timeout is not None:
        kwargs["timeout_ms"] = max(1, int(timeout * 1000))
    if request.temperature is not None:
        kwargs["temperature"] = request.temperature
    if request.max_tokens is not None:
        kwargs["max_tokens"] = request.max_tokens
    if request.top_p is not None:
        kwargs["top_p"] = request.top_p
    if request.stop is not None:
        kwargs["stop"] = list(request.stop)
    if request.tool is not None:
        tool = request.tool
        kwargs["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": tool.name,
                    "description": tool.description,
                    "parameters": tool.parameters,
                },
            }
        ]
        kwargs["tool_choice"] = "any"
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


def _parse_completion(response: Any, request: ChatRequest, provider: str) -> tuple[str, Usage]:
    """Reply text (or the tool call's arguments) and usage of a chat completion."""
    choices = getattr(response, "choices", None)
    if not isinstance(choices, list) or not choices:
        raise bad_response(provider, "no choices in the completion")
    message = getattr(choices[0], "message", None)
    if message is None:
        raise bad_response(provider, "the first choice has no message")
    usage = usage_from(getattr(response, "usage", None), "prompt_tokens", "completion_tokens")
    if request.tool is not None:
        for call in getattr(message, "tool_calls", None) or ():
            function = getattr(call, "function", None)
            if getattr(function, "name", None) == request.tool.name:
                arguments = getattr(function, "arguments", None)
                if isinstance(arguments, dict):
                    arguments = json.dumps(arguments)
                if not isinstance(arguments, str):
                    raise bad_response(provider, "tool call arguments are not JSON")
                return arguments, usage
    try:
        text = _text(getattr(message, "content", None))
    except TypeError as exc:
        raise bad_response(provider, str(exc)) from exc
    return text or "", usage


class _Clients:
    """One loop's SDK object with the HTTP clients we created for it (and close)."""

    def __init__(self, sdk: Any, http: Any, ahttp: Any) -> None:
        self.sdk = sdk
        self.http = http
        self.ahttp = ahttp


class MistralProvider(SDKProvider):
    """LLM provider using the Mistral AI API (``pip install "converge[llm-mistral]"``).

    Runs on asyncio through the SDK's async client and on trio through its sync client in
    worker threads (the SDK's async path is asyncio-only).

    Args:
        api_key: Mistral API key. If None, uses the ``MISTRAL_API_KEY`` env var.
        model: Model name (e.g. mistral-small-latest, mistral-large-latest).
        base_url: API root (the SDK's ``server_url``).
        timeout: Seconds per HTTP attempt (None: the SDK's default).
        max_retries: Retries after the first attempt (overrides ``retry_policy``'s).
        client: A ``mistralai.client.Mistral`` to use instead of creating clients (no API
            key needed then; not closed by us).
        retry_policy: Backoff, ``Retry-After`` cap and overall deadline.

    Raises:
        MissingDependencyError: When the ``mistralai`` package is not installed.
        ConfigurationError: When no API key is given or found (before any network call).
    """

    provider_name = "mistral"
    env_var = "MISTRAL_API_KEY"
    extra = "llm-mistral"
    sdk_module = "mistralai.client"

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
    ) -> None:
        super().__init__(
            api_key,
            model,
            base_url=base_url,
            timeout=timeout,
            max_retries=max_retries,
            client=client,
            retry_policy=retry_policy,
        )
        self._errors = import_sdk("mistralai.client.errors", self.extra)

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

    async def _complete(self, client: Any, request: ChatRequest) -> tuple[str, Usage]:
        kwargs = _request_kwargs(request, self.timeout)
        chat = client.sdk.chat
        if _on_asyncio():
            response = await chat.complete_async(**kwargs)
        else:
            response = await anyio.to_thread.run_sync(
                functools.partial(chat.complete, **kwargs), abandon_on_cancel=True
            )
        return _parse_completion(response, request, self.provider_name)

    async def _open_stream(self, client: Any, request: ChatRequest) -> Any:
        kwargs = _request_kwargs(request, self.timeout)
        chat = client.sdk.chat
        if _on_asyncio():
            return await chat.stream_async(**kwargs)
        return await anyio.to_thread.run_sync(
            functools.partial(chat.stream, **kwargs), abandon_on_cancel=True
        )

    async def _events(self, stream: Any) -> AsyncIterator[Any]:
        if hasattr(stream, "__aiter__"):
            async for event in stream:
                yield event
            return
        while True:
            event = await anyio.to_thread.run_sync(next, stream, _END)
            if event is _END:
                return
            yield event

    def _delta(self, event: Any, counter: UsageCounter) -> str | None:
        data = getattr(event, "data", None)
        counter.update(getattr(data, "usage", None), "prompt_tokens", "completion_tokens")
        choices = getattr(data, "choices", None)
        if not choices:
            return None
        return _text(getattr(getattr(choices[0], "delta", None), "content", None))

    async def _close_stream(self, stream: Any) -> None:
        if hasattr(stream, "__aiter__"):
            await stream.close()
        else:
            await anyio.to_thread.run_sync(stream.close)

    async def _close_client(self, client: Any) -> None:
        if client.http is not None:
            await anyio.to_thread.run_sync(client.http.close)
        if client.ahttp is not None:
            await client.ahttp.aclose()
