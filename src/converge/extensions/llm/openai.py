"""OpenAI (and OpenAI-compatible servers: vLLM, Ollama, ...) on the official ``openai`` SDK."""

from __future__ import annotations

from typing import Any

from converge.errors import UsageError
from converge.extensions.llm._base import SDKProvider, UsageCounter, shared_ssl_context, usage_from
from converge.extensions.llm._errors import bad_response, classify_stainless
from converge.extensions.llm._request import ChatRequest
from converge.extensions.llm._retry import Failure, RetryPolicy
from converge.extensions.llm.protocol import Usage

__all__ = ["OpenAIProvider"]


def _request_kwargs(request: ChatRequest, *, stream: bool) -> dict[str, Any]:
    """Chat Completions arguments for ``request``."""
    kwargs: dict[str, Any] = {"model": request.model, "messages": list(request.messages)}
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
        kwargs["tool_choice"] = {"type": "function", "function": {"name": tool.name}}
    if request.extra_body is not None:
        kwargs["extra_body"] = request.extra_body
    if stream:
        kwargs["stream"] = True
        kwargs["stream_options"] = {"include_usage": True}
    return kwargs


def _parse_completion(response: Any, request: ChatRequest, provider: str) -> tuple[str, Usage]:
    """Reply text (or the tool call's arguments) and usage of a ``chat.completion``."""
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
                if not isinstance(arguments, str):
                    raise bad_response(provider, "tool call arguments are not a string")
                return arguments, usage
    content = getattr(message, "content", None)
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise bad_response(provider, "message content is not a string")
    return content, usage


class OpenAIProvider(SDKProvider):
    """LLM provider using the OpenAI API (``pip install "converge[llm-openai]"``).

    Also speaks to OpenAI-compatible servers (vLLM, Ollama, LM Studio, ...) through
    ``base_url``. The SDK's own retries are off; :class:`~converge.extensions.llm.RetryPolicy`
    applies instead.

    Args:
        api_key: OpenAI API key. If None, uses the ``OPENAI_API_KEY`` env var.
        model: Model name (e.g. gpt-4o-mini, gpt-4o).
        base_url: API root, e.g. ``http://localhost:11434/v1`` for Ollama.
        timeout: Seconds per HTTP attempt (None: the SDK's default).
        max_retries: Retries after the first attempt (overrides ``retry_policy``'s).
        client: An ``openai.AsyncOpenAI`` to use instead of creating clients (no API key
            needed then; it is used from whatever loop calls, and not closed by us).
        retry_policy: Backoff, ``Retry-After`` cap and overall deadline.

    Raises:
        MissingDependencyError: When the ``openai`` package is not installed.
        ConfigurationError: When no API key is given or found (before any network call).
    """

    provider_name = "openai"
    env_var = "OPENAI_API_KEY"
    extra = "llm-openai"
    sdk_module = "openai"
    extra_options = frozenset({"extra_body"})

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

    async def _complete(self, client: Any, request: ChatRequest) -> tuple[str, Usage]:
        response = await client.chat.completions.create(**_request_kwargs(request, stream=False))
        return _parse_completion(response, request, self.provider_name)

    async def _open_stream(self, client: Any, request: ChatRequest) -> Any:
        return await client.chat.completions.create(**_request_kwargs(request, stream=True))

    def _delta(self, event: Any, counter: UsageCounter) -> str | None:
        counter.update(getattr(event, "usage", None), "prompt_tokens", "completion_tokens")
        choices = getattr(event, "choices", None)
        if not choices:
            return None
        content = getattr(getattr(choices[0], "delta", None), "content", None)
        if content is not None and not isinstance(content, str):
            raise TypeError("delta content is not a string")
        return content
