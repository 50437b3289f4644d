"""Anthropic's Messages API on the official ``anthropic`` SDK."""

from __future__ import annotations

import inspect
import json
from typing import Any

from converge.errors import UsageError
from converge.extensions.llm._base import (
    SDKProvider,
    UsageCounter,
    import_sdk,
    shared_ssl_context,
    usage_from,
)
from converge.extensions.llm._errors import bad_response, classify_stainless
from converge.extensions.llm._request import ChatRequest
from converge.extensions.llm._retry import Failure, RetryPolicy
from converge.extensions.llm.protocol import Usage

__all__ = ["AnthropicProvider"]

_DEFAULT_MAX_TOKENS = 1024


def _request_kwargs(request: ChatRequest, *, stream: bool) -> dict[str, Any]:
    """Messages API arguments for ``request``: system messages go to ``system``."""
    kwargs: dict[str, Any] = {
        "model": request.model,
        "messages": request.dialogue,
        "max_tokens": request.max_tokens or _DEFAULT_MAX_TOKENS,
    }
    system = request.system
    if system is not None:
        kwargs["system"] = system
    if request.temperature is not None:
        kwargs["temperature"] = min(request.temperature, 1.0)
    if request.top_p is not None:
        kwargs["top_p"] = request.top_p
    if request.stop is not None:
        kwargs["stop_sequences"] = list(request.stop)
    if request.tool is not None:
        tool = request.tool
        kwargs["tools"] = [
            {"name": tool.name, "description": tool.description, "input_schema": tool.parameters}
        ]
        kwargs["tool_choice"] = {"type": "tool", "name": tool.name}
    if request.extra_body is not None:
        kwargs["extra_body"] = request.extra_body
    if stream:
        kwargs["stream"] = True
    return kwargs


def _parse_message(response: Any, request: ChatRequest, provider: str) -> tuple[str, Usage]:
    """Reply text (or the tool_use input as JSON) and usage of a ``message``."""
    content = getattr(response, "content", None)
    if not isinstance(content, list):
        raise bad_response(provider, "the message has no content list")
    usage = usage_from(getattr(response, "usage", None), "input_tokens", "output_tokens")
    texts = []
    for block in content:
        kind = getattr(block, "type", None)
        if (
            request.tool is not None
            and kind == "tool_use"
            and getattr(block, "name", None) == request.tool.name
        ):
            try:
                return json.dumps(getattr(block, "input", None), allow_nan=False), usage
            except (TypeError, ValueError) as exc:
                raise bad_response(provider, f"tool_use input is not JSON: {exc}") from exc
        if kind == "text":
            text = getattr(block, "text", None)
            if not isinstance(text, str):
                raise bad_response(provider, "a text block holds no string")
            texts.append(text)
    return "".join(texts), usage


class AnthropicProvider(SDKProvider):
    """LLM provider using the Anthropic API (``pip install "converge[llm-anthropic]"``).

    System messages are joined into the ``system`` parameter; ``max_tokens`` defaults to
    1024 (the API requires one). ``temperature`` (capped at 1.0) and ``top_p`` are passed
    only to SDK versions whose Messages API still takes them (anthropic 2.x does not: a
    :class:`~converge.errors.UsageError` says so).

    Args:
        api_key: Anthropic API key. If None, uses the ``ANTHROPIC_API_KEY`` env var.
        model: Model name (e.g. claude-sonnet-4-20250514, claude-3-5-haiku).
        base_url: API root (a proxy or a compatible server).
        timeout: Seconds per HTTP attempt (None: the SDK's default).
        max_retries: Retries after the first attempt (overrides ``retry_policy``'s).
        client: An ``anthropic.AsyncAnthropic`` to use instead of creating clients (no API
            key needed then; it is used from whatever loop calls, and not closed by us).
        retry_policy: Backoff, ``Retry-After`` cap and overall deadline.

    Raises:
        MissingDependencyError: When the ``anthropic`` package is not installed.
        ConfigurationError: When no API key is given or found (before any network call).
    """

    provider_name = "anthropic"
    env_var = "ANTHROPIC_API_KEY"
    extra = "llm-anthropic"
    sdk_module = "anthropic"
    extra_options = frozenset({"extra_body"})

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

    async def _complete(self, client: Any, request: ChatRequest) -> tuple[str, Usage]:
        response = await client.messages.create(**_request_kwargs(request, stream=False))
        return _parse_message(response, request, self.provider_name)

    async def _open_stream(self, client: Any, request: ChatRequest) -> Any:
        return await client.messages.create(**_request_kwargs(request, stream=True))

    def _delta(self, event: Any, counter: UsageCounter) -> str | None:
        kind = getattr(event, "type", None)
        if kind == "message_start":
            counter.update(
                getattr(getattr(event, "message", None), "usage", None),
                "input_tokens",
                "output_tokens",
            )
        elif kind == "message_delta":
            counter.update(getattr(event, "usage", None), "input_tokens", "output_tokens")
        elif kind == "content_block_delta":
            delta = getattr(event, "delta", None)
            if getattr(delta, "type", None) == "text_delta":
                text = getattr(delta, "text", None)
                if not isinstance(text, str):
                    raise TypeError("text_delta holds no string")
                return text
        return None
