"""The one place where SDK and transport exceptions become ``converge.errors`` Provider*.

Every provider call site hands its exception to :func:`classify` (through the provider's
``_classify``); the result says which converge error to raise (always ``from`` the
original) and whether the retry policy may try again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from converge.errors import (
    ContentFilteredError,
    ProviderAuthError,
    ProviderConnectionError,
    ProviderError,
    ProviderOverloadedError,
    ProviderRateLimitError,
    ProviderResponseError,
    ProviderTimeoutError,
    ResponseIncompleteError,
    ResponseRefusedError,
    ResponseTruncatedError,
)
from converge.extensions.llm._retry import Failure, parse_retry_after
from converge.extensions.llm.protocol import ChatResult

__all__ = [
    "bad_response",
    "check_result",
    "classify_mistral",
    "classify_stainless",
    "from_status",
    "stream_error_event",
]

#: HTTP status Anthropic uses for "overloaded" (and the one given to overload events).
OVERLOADED = 529

_DETAIL_CAP = 300


def _detail(body: Any) -> str:
    """A short human reason from an error body (JSON dict or text)."""
    if isinstance(body, str | bytes):
        try:
            body = json.loads(body)
        except (ValueError, RecursionError):
            text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
            return text.strip()[:_DETAIL_CAP]
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping):
            message = inner.get("message") or inner.get("detail")
            if isinstance(message, str):
                return message[:_DETAIL_CAP]
        for key in ("message", "detail"):
            if isinstance(body.get(key), str):
                return str(body[key])[:_DETAIL_CAP]
    return ""


def from_status(
    provider: str, status: int, headers: Mapping[str, str], body: Any, now: float
) -> Failure:
    """Classify an HTTP error answer.

    Args:
        provider: Provider name for the error.
        status: HTTP status code.
        headers: Response headers (``Retry-After`` is read from them).
        body: The parsed or raw error body, for the message.
        now: Epoch seconds, for ``Retry-After`` HTTP dates.
    """
    detail = _detail(body)
    message = f"{provider}: HTTP {status}" + (f": {detail}" if detail else "")
    retry_after = parse_retry_after(headers, now)
    if status in (401, 403):
        hint = " (check the API key and its permissions)"
        return Failure(
            ProviderAuthError(message + hint, provider=provider, status_code=status), False
        )
    if status == 429:
        error: ProviderError = ProviderRateLimitError(
            message, provider=provider, status_code=status, retry_after=retry_after
        )
        return Failure(error, True, retry_after)
    if status == OVERLOADED:
        error = ProviderOverloadedError(message, provider=provider, status_code=status)
        return Failure(error, True, retry_after)
    if status == 408:
        error = ProviderTimeoutError(message, provider=provider, status_code=status)
        return Failure(error, True, retry_after)
    retryable = status == 409 or status >= 500
    error = ProviderResponseError(message, provider=provider, status_code=status)
    return Failure(error, retryable, retry_after if retryable else None)


def bad_response(provider: str, reason: str, status: int | None = 200) -> ProviderResponseError:
    """The error for a 2xx answer whose body is not what the API promises."""
    return ProviderResponseError(
        f"{provider}: malformed response: {reason}", provider=provider, status_code=status
    )


def unparsable(provider: str, exc: Exception, status: int | None = 200) -> Failure:
    """A 2xx body that does not parse (``json`` or, in ``mistralai``, pydantic).

    A body whose JSON runs out mid-document was cut short (by a proxy, or read until the
    connection closed): it is retried like a dropped connection. Any other is malformed.
    """
    if isinstance(exc, json.JSONDecodeError):
        cut = exc.msg.startswith("Unterminated string") or exc.pos >= len(exc.doc.rstrip())
        detail = f"body is not JSON ({exc})"
    else:
        cut = "EOF while parsing" in str(exc)  # pydantic-core's JSON parser
        detail = str(exc)[:_DETAIL_CAP]
    if cut:
        detail = f"the body ends before its JSON does (cut short): {detail}"
    return Failure(bad_response(provider, detail, status), cut)


def _transport(exc: Exception, provider: str) -> Failure | None:
    """Timeouts, connection failures and undecodable bodies, whatever the SDK."""
    if isinstance(exc, json.JSONDecodeError):
        return unparsable(provider, exc)
    try:
        import httpx2
    except ImportError:  # pragma: no cover - every supported SDK depends on httpx2
        return None
    if isinstance(exc, httpx2.TimeoutException):
        error: ProviderError = ProviderTimeoutError(
            f"{provider}: request timed out ({type(exc).__name__})", provider=provider
        )
        return Failure(error, True)
    if isinstance(exc, httpx2.TransportError):
        error = ProviderConnectionError(
            f"{provider}: connection failed: {exc or type(exc).__name__}", provider=provider
        )
        return Failure(error, True)
    return None


def stream_error_event(provider: str, body: Any, fallback: str) -> Failure:
    """Classify an ``error`` event inside a 200 event stream.

    Anthropic sends ``{"type": "error", "error": {"type": "overloaded_error", ...}}``:
    an overload or rate limit is retryable (the provider retries it when no text has been
    streamed yet); anything else is a malformed response.
    """
    kind = None
    if isinstance(body, Mapping) and isinstance(body.get("error"), Mapping):
        kind = body["error"].get("type")
    detail = _detail(body) or fallback
    message = f"{provider}: error event in the stream: {detail}"
    if kind == "overloaded_error":
        return Failure(
            ProviderOverloadedError(message, provider=provider, status_code=OVERLOADED), True
        )
    if kind == "rate_limit_error":
        return Failure(ProviderRateLimitError(message, provider=provider), True)
    if kind == "api_error":
        return Failure(ProviderResponseError(message, provider=provider, status_code=500), True)
    return Failure(bad_response(provider, f"error event in the stream: {detail}"), False)


def check_result(result: ChatResult, provider: str, *, allow_partial: bool) -> ChatResult:
    """Raise the typed error for a truncated, filtered or refused result.

    Args:
        result: The call's result.
        provider: Provider name for the error.
        allow_partial: Return such results instead of raising.

    Raises:
        ResponseTruncatedError: ``stop_reason == "length"``.
        ContentFilteredError: ``stop_reason == "content_filter"``.
        ResponseRefusedError: ``stop_reason == "refusal"``.
        ResponseIncompleteError: ``stop_reason == "incomplete"``.
    """
    reason = result.stop_reason
    if allow_partial or reason not in ("length", "content_filter", "refusal", "incomplete"):
        return result
    if reason == "incomplete":
        raise incomplete(provider, result)
    raw = f" ({result.raw_stop_reason})" if result.raw_stop_reason else ""
    if reason == "length":
        raise ResponseTruncatedError(
            f"{provider}: the answer was cut off at the output token limit{raw} after "
            f"{result.usage.output_tokens} tokens; raise max_tokens "
            "(max_completion_tokens), or pass allow_partial=True to accept partial text",
            provider=provider,
            result=result,
        )
    if reason == "content_filter":
        raise ContentFilteredError(
            f"{provider}: the provider's content filter stopped the answer{raw}; "
            "pass allow_partial=True to get what was generated",
            provider=provider,
            result=result,
        )
    detail = f": {result.text[:_DETAIL_CAP]}" if result.text else ""
    raise ResponseRefusedError(
        f"{provider}: the model refused to answer{raw}{detail}", provider=provider, result=result
    )


def incomplete(provider: str, result: ChatResult) -> ResponseIncompleteError:
    """The error for a stream that ended with no stop reason (``result``: its text)."""
    return ResponseIncompleteError(
        f"{provider}: the stream ended before the provider said the answer was complete "
        f"(no stop reason), after {len(result.text)} characters of text: a proxy, a load "
        "balancer or the provider cut it short; call again, or pass allow_partial=True to "
        "accept the partial text",
        provider=provider,
        result=result,
    )


def classify_stainless(
    exc: Exception, sdk: ModuleType, provider: str, now: float
) -> Failure | None:
    """Classify an exception from the ``openai`` or ``anthropic`` SDK (same error tree).

    Args:
        exc: The exception raised by the SDK call.
        sdk: The imported SDK module (``openai`` or ``anthropic``).
        provider: Provider name for the error.
        now: Epoch seconds, for ``Retry-After`` HTTP dates.
    """
    if isinstance(exc, sdk.APIStatusError):
        if exc.status_code < 300:  # an error event inside a 200 SSE stream
            return stream_error_event(provider, exc.body, str(exc))
        return from_status(provider, exc.status_code, exc.response.headers, exc.body, now)
    if isinstance(exc, sdk.APITimeoutError):
        error: ProviderError = ProviderTimeoutError(
            f"{provider}: request timed out", provider=provider
        )
        return Failure(error, True)
    if isinstance(exc, sdk.APIConnectionError):
        cause = exc.__cause__ or exc
        error = ProviderConnectionError(
            f"{provider}: connection failed: {cause or type(cause).__name__}", provider=provider
        )
        return Failure(error, True)
    if isinstance(exc, sdk.APIResponseValidationError):
        return Failure(bad_response(provider, str(exc), exc.status_code), False)
    if isinstance(exc, sdk.APIError):
        # e.g. an error event inside an SSE stream
        return Failure(bad_response(provider, _detail(exc.body) or str(exc), None), False)
    return _transport(exc, provider)


def classify_mistral(
    exc: Exception, errors: ModuleType, provider: str, now: float
) -> Failure | None:
    """Classify an exception from the ``mistralai`` SDK.

    Args:
        exc: The exception raised by the SDK call.
        errors: The SDK's ``mistralai.client.errors`` module.
        provider: Provider name for the error.
        now: Epoch seconds, for ``Retry-After`` HTTP dates.
    """
    if isinstance(exc, errors.ResponseValidationError):
        return unparsable(provider, exc, exc.status_code)
    if isinstance(exc, errors.MistralError):
        if 200 <= exc.status_code < 300:  # e.g. an unexpected content type
            return Failure(bad_response(provider, str(exc)[:_DETAIL_CAP], exc.status_code), False)
        return from_status(provider, exc.status_code, exc.headers, exc.body, now)
    if isinstance(exc, errors.NoResponseError):
        error = ProviderConnectionError(f"{provider}: no response received", provider=provider)
        return Failure(error, True)
    return _transport(exc, provider)
