"""Machinery shared by the SDK-backed providers: auth, clients per loop, retries, shims.

A provider subclass supplies the SDK import, the client factory and the protocol
translation (request kwargs, response and stream-event parsing); everything else (option
validation, the retry policy, error mapping, usage bookkeeping, the sync surface and
closing) lives here once.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import threading
import time
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from types import ModuleType
from typing import Any, ClassVar, Generic, TypeVar

import anyio
import anyio.to_thread

from converge import _sync
from converge._numbers import positive_float
from converge._tls import ashared_ssl_context, shared_ssl_context
from converge.core import MetricsCollector
from converge.errors import (
    ClosedError,
    ConfigurationError,
    MissingDependencyError,
    ProviderError,
    ResponseIncompleteError,
    UsageError,
)
from converge.extensions.llm._calls import arguments_text
from converge.extensions.llm._errors import bad_response, check_result, incomplete
from converge.extensions.llm._request import ChatRequest, build_request
from converge.extensions.llm._retry import Failure, RetryPolicy, acall_with_retry
from converge.extensions.llm.protocol import ChatResult, Usage
from converge.extensions.llm.stream import ChatStream
from converge.extensions.llm.telemetry import CallRecord, Telemetry, default_telemetry

__all__ = [
    "SDKProvider",
    "StreamState",
    "UsageCounter",
    "count",
    "field_of",
    "import_sdk",
    "shared_ssl_context",
    "str_or_none",
]

C = TypeVar("C")


def import_sdk(module: str, extra: str) -> ModuleType:
    """Import an optional SDK, or raise an error naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"the {module!r} package is needed for this provider; "
            f"install it with: pip install -e '.[{extra}]' (from a converge checkout)"
        ) from exc


_MAX_COUNT = 2**63 - 1

_MAX_TIMEOUT = 30 * 86_400.0
"""Longest per-attempt ``timeout``, in seconds (30 days); a longer one is taken as this.

Far longer values overflow the clocks the SDKs' HTTP libraries compute deadlines with.
"""

_KEY_CHARS = "{} must be printable ASCII without surrounding spaces (it is sent in a header)"


def _header_safe(value: str) -> bool:
    """Whether ``value`` can be an HTTP header value as is: printable ASCII, not starting
    or ending with a space (a key pasted with its line break is refused here, not by the
    HTTP library at the first call)."""
    return value.isascii() and value.isprintable() and value == value.strip()


def count(value: Any) -> int | None:
    """A token count as reported, or None when absent or not an integer from 0 to 2**63 - 1
    (an API's 64-bit counter: a larger number is a broken answer, not a count)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_COUNT:
        return value
    return None


def field_of(obj: Any, *path: str) -> Any:
    """``obj.a.b`` (or ``obj["a"]["b"]`` for dicts, as SDK extras are), None if absent."""
    for name in path:
        if obj is None:
            return None
        obj = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
    return obj


class UsageCounter:
    """Token counts gathered from a response or piecemeal from stream events (the latest
    reported value of each count wins; unreported counts stay None)."""

    __slots__ = ("counts", "input_excludes_cache")

    def __init__(self, *, input_excludes_cache: bool = False) -> None:
        #: Whether the API reports cache reads/writes apart from the input count
        #: (Anthropic); :meth:`usage` then adds them in.
        self.input_excludes_cache = input_excludes_cache
        self.counts: dict[str, int | None] = dict.fromkeys(
            (
                "input_tokens",
                "output_tokens",
                "cache_read_tokens",
                "cache_write_tokens",
                "reasoning_tokens",
            )
        )

    def update(self, **counts: Any) -> None:
        """Take the counts given (absent or invalid ones leave the count alone)."""
        for name, value in counts.items():
            value = count(value)
            if value is not None:
                self.counts[name] = value

    def usage(self) -> Usage:
        """The counts as a :class:`Usage` (``input_tokens`` including cache reads and
        writes)."""
        counts = self.counts
        if self.input_excludes_cache and counts["input_tokens"] is not None:
            counts = dict(counts)
            counts["input_tokens"] = (
                (counts["input_tokens"] or 0)
                + (counts["cache_read_tokens"] or 0)
                + (counts["cache_write_tokens"] or 0)
            )
        return Usage(**counts)


class StreamState:
    """What a stream's events reported besides text: usage, stop reason, model, id."""

    __slots__ = ("model", "raw_stop_reason", "refusal", "response_id", "stop_reason", "usage")

    def __init__(self) -> None:
        self.usage = UsageCounter()
        self.raw_stop_reason: str | None = None
        self.stop_reason: str | None = None
        self.model: str | None = None
        self.response_id: str | None = None
        self.refusal: list[str] = []

    def stop(self, raw: Any, normalise: Callable[[str | None], str]) -> None:
        """Record the provider's stop reason ``raw`` (ignored when absent)."""
        if isinstance(raw, str) and raw:
            self.raw_stop_reason = raw
            self.stop_reason = normalise(raw)

    def result(self, text: str) -> ChatResult:
        """The stream's :class:`ChatResult` once it ended, ``text`` being all deltas
        (``"incomplete"`` when no stop reason came: the stream was cut short)."""
        stop_reason = self.stop_reason or "incomplete"
        if self.refusal:
            stop_reason, text = "refusal", text or "".join(self.refusal)
        return ChatResult(
            text=text,
            usage=self.usage.usage(),
            stop_reason=stop_reason,
            raw_stop_reason=self.raw_stop_reason,
            model=self.model if isinstance(self.model, str) else None,
            response_id=self.response_id if isinstance(self.response_id, str) else None,
        )


def str_or_none(value: Any) -> str | None:
    """``value`` when it is a non-empty string, else None."""
    return value if isinstance(value, str) and value else None


class _Lazy(Generic[C]):
    """A per-loop slot whose client is made on first use (so closing never creates one)."""

    __slots__ = ("_factory", "value")

    def __init__(self, factory: Callable[[], C]) -> None:
        self._factory = factory
        self.value: C | None = None

    def get(self) -> C:
        if self.value is None:
            self.value = self._factory()
        return self.value


class SDKProvider:
    """Base of the providers built on an official SDK.

    Subclasses set the class attributes and implement the ``_``-prefixed hooks.
    """

    provider_name: ClassVar[str]
    env_var: ClassVar[str]
    extra: ClassVar[str]
    sdk_module: ClassVar[str]
    default_host: ClassVar[str]
    options: ClassVar[frozenset[str]] = frozenset()

    def __init__(
        self,
        api_key: str | None,
        model: str,
        *,
        base_url: str | None,
        timeout: float | None,
        max_retries: int | None,
        client: Any,
        retry_policy: RetryPolicy | None,
        telemetry: Telemetry | None = None,
        metrics_collector: MetricsCollector | None = None,
    ) -> None:
        self._sdk = import_sdk(self.sdk_module, self.extra)
        if not isinstance(model, str) or not model:
            raise UsageError("model must be a non-empty string")
        if base_url is not None:
            self._check_base_url(base_url)
        if timeout is not None and positive_float(timeout) is None:
            raise UsageError("timeout must be a positive number of seconds or None")
        if retry_policy is None:
            retry_policy = RetryPolicy()
        elif not isinstance(retry_policy, RetryPolicy):
            raise UsageError("retry_policy must be a RetryPolicy")
        if max_retries is not None:
            if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
                raise UsageError("max_retries must be an integer >= 0")
            retry_policy = dataclasses.replace(retry_policy, max_retries=max_retries)
        if api_key is not None and (not isinstance(api_key, str) or not api_key):
            raise UsageError("api_key must be a non-empty string")
        if api_key is not None and not _header_safe(api_key):
            raise UsageError(_KEY_CHARS.format("api_key"))
        if telemetry is not None and not isinstance(telemetry, Telemetry):
            raise UsageError("telemetry must be a converge.extensions.llm.telemetry.Telemetry")
        if metrics_collector is not None and not isinstance(metrics_collector, MetricsCollector):
            raise UsageError("metrics_collector must be a MetricsCollector or None")
        if client is None:
            api_key = api_key or os.environ.get(self.env_var) or None
            if api_key is None:
                raise ConfigurationError(
                    f"no {self.provider_name} API key: pass api_key=... or set {self.env_var} "
                    "(local servers that ignore keys still need a placeholder)"
                )
            if not _header_safe(api_key):
                raise ConfigurationError(_KEY_CHARS.format(self.env_var))
        self.model = model
        self.base_url = base_url
        self.timeout = min(float(timeout), _MAX_TIMEOUT) if timeout is not None else None
        self.retry_policy = retry_policy
        self.telemetry = (telemetry or default_telemetry()).with_collector(metrics_collector)
        self.last_usage: Usage | None = None
        self._api_key = api_key
        url = urllib.parse.urlsplit(base_url or f"https://{self.default_host}")
        self._server = (
            url.hostname or self.default_host,
            url.port or (443 if url.scheme == "https" else 80),
        )
        self._client = None if client is None else self._adopt_client(client)
        self._clients: _sync.LoopLocal[_Lazy[Any]] = _sync.LoopLocal(
            lambda: _Lazy(self._new_client)
        )
        self._portal: _sync.Portal | None = None
        self._portal_lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r}, base_url={self.base_url!r})"

    def _check_base_url(self, base_url: Any) -> None:
        """Refuse a ``base_url`` no request could be sent to (before any client exists)."""
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise UsageError("base_url must be an http:// or https:// URL")
        if not base_url.isprintable():  # control characters, lone surrogates
            raise UsageError("base_url holds a control character or a lone surrogate")
        try:
            url = urllib.parse.urlsplit(base_url)
            port = url.port
        except ValueError as exc:  # a bad port, an unclosed IPv6 bracket
            raise UsageError(f"base_url is not a valid URL: {exc}") from None
        if not url.hostname:
            raise UsageError("base_url has no host")
        if port == 0:
            raise UsageError("base_url's port must be from 1 to 65535")
        import httpx2  # not at import: importing converge's LLM layer loads no HTTP stack

        try:  # the HTTP library the SDKs send with has the last word: IDNA, IPv4 forms
            httpx2.URL(base_url)
        except (httpx2.InvalidURL, ValueError) as exc:
            raise UsageError(f"base_url is not a valid URL: {exc}") from None

    # -- hooks for subclasses ----------------------------------------------------------

    def _adopt_client(self, client: Any) -> Any:
        """Check (and reconfigure: retries off, our timeout) an injected SDK client."""
        raise NotImplementedError

    def _new_client(self) -> Any:
        """Create an SDK client for the running loop."""
        raise NotImplementedError

    def _classify_sdk(self, exc: Exception, now: float) -> Failure | None:
        raise NotImplementedError

    def _check_request(self, request: ChatRequest) -> None:
        """Provider-specific checks, before any I/O (raise UsageError)."""

    async def _complete(self, client: Any, request: ChatRequest) -> ChatResult:
        """One non-streaming call's result."""
        raise NotImplementedError

    async def _open_stream(self, client: Any, request: ChatRequest) -> Any:
        """Start one streaming call; returns once the response headers arrived."""
        raise NotImplementedError

    def _events(self, stream: Any) -> AsyncIterator[Any]:
        """The SDK stream's events."""
        return aiter(stream)

    def _delta(self, event: Any, state: StreamState) -> str | None:
        """Text carried by one stream event (anything else it reports goes to ``state``)."""
        raise NotImplementedError

    async def _close_stream(self, stream: Any) -> None:
        await stream.close()

    async def _close_client(self, client: Any) -> None:
        await client.close()

    # -- shared machinery --------------------------------------------------------------

    def _closed_error(self) -> ClosedError:
        return ClosedError(f"this {type(self).__name__} was closed")

    def _classify(self, exc: Exception, now: float) -> Failure | None:
        if self._closed:  # closed during the call: its client is gone, retry nothing
            raise self._closed_error() from exc
        if isinstance(exc, ResponseIncompleteError):  # cut before any text: call again
            return Failure(exc, True)
        if isinstance(exc, ProviderError):  # raised by our own response parsing
            return Failure(exc, False)
        return self._classify_sdk(exc, now)

    def _request(self, messages: Any, kwargs: dict[str, Any]) -> ChatRequest:
        request = build_request(
            messages,
            kwargs,
            default_model=self.model,
            provider=self.provider_name,
            accepted=self.options,
        )
        self._check_request(request)
        return request

    async def _current_client(self) -> Any:
        if self._client is None and not self._closed and self._clients.get().value is None:
            await ashared_ssl_context()  # the new client's, built off the loop the first time
        if self._closed:  # before or during that wait
            raise self._closed_error()
        return self._client if self._client is not None else self._clients.get().get()

    def _start_call(self, request: ChatRequest) -> CallRecord:
        return self.telemetry.start_call(
            provider=self.provider_name,
            model=request.model,
            server=self._server,
            attributes={
                "gen_ai.request.max_tokens": request.output_limit,
                "gen_ai.request.temperature": request.temperature,
                "gen_ai.request.top_p": request.top_p,
                "gen_ai.request.seed": request.seed,
                "gen_ai.request.stop_sequences": list(request.stop) if request.stop else None,
            },
        )

    async def _acomplete(self, request: ChatRequest, allow_partial: bool) -> ChatResult:
        client = await self._current_client()
        record = self._start_call(request)
        try:
            with self.telemetry.current(record):
                result = await acall_with_retry(
                    self.retry_policy,
                    lambda: self._complete(client, request),
                    self._classify,
                    provider=self.provider_name,
                    on_retry=record.retry,
                )
        except BaseException as exc:
            record.end(error=exc)
            raise
        self.last_usage = result.usage
        try:
            check_result(result, self.provider_name, allow_partial=allow_partial)
        except ProviderError as exc:
            record.end(result, exc)
            raise
        record.end(result)
        return result

    async def acomplete(
        self, messages: list[dict[str, Any]], *, allow_partial: bool = False, **kwargs: Any
    ) -> ChatResult:
        """Send ``messages`` and return everything the call returned.

        Args:
            messages: As for :meth:`achat`; content may also be a list of parts, and the
                history may hold assistant tool calls and tool results (see the LLM
                guide).
            allow_partial: Return truncated, filtered or refused answers instead of
                raising (their ``stop_reason`` says which).
            **kwargs: As for :meth:`achat`, plus ``tools`` and ``tool_choice``.

        Returns:
            The :class:`~converge.extensions.llm.ChatResult` (text, usage, stop reason,
            model, response id, tool calls).

        Raises:
            ResponseTruncatedError: The model hit the output token limit.
            ContentFilteredError: A content filter stopped the answer.
            ResponseRefusedError: The model refused.
            UsageError: For malformed messages or options.
            ProviderError: As for :meth:`achat`.
        """
        if not isinstance(allow_partial, bool):
            raise UsageError("allow_partial must be a bool")
        return await self._acomplete(self._request(messages, kwargs), allow_partial)

    def complete(
        self, messages: list[dict[str, Any]], *, allow_partial: bool = False, **kwargs: Any
    ) -> ChatResult:
        """Synchronous :meth:`acomplete`.

        Args:
            messages: As for :meth:`acomplete`.
            allow_partial: As for :meth:`acomplete`.
            **kwargs: As for :meth:`acomplete`.

        Returns:
            The :class:`~converge.extensions.llm.ChatResult`.
        """
        name = f"{type(self).__name__}.acomplete"
        return self._sync_portal().call(
            self.acomplete, messages, async_name=name, allow_partial=allow_partial, **kwargs
        )

    async def achat(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        """Send ``messages`` and return the reply text.

        With ``use_structured_output=True`` and ``emit_decisions_tool=<tool schema>``
        (``{"name", "description", "parameters"}``), the model is made to call that tool
        natively and the call's arguments come back as a JSON string (the reply text when
        the model answered without calling it).

        A truncated, content-filtered or refused answer raises (silently cut text is
        worse than an error): pass ``allow_partial=True`` to get the partial text, or use
        :meth:`acomplete` for the stop reason.

        Args:
            messages: ``[{"role": "system"|"user"|"assistant"|"tool", "content": ...},
                ...]``; see :meth:`acomplete`.
            **kwargs: ``model``, ``temperature``, ``max_tokens``,
                ``max_completion_tokens``, ``top_p``, ``stop``, ``seed``,
                ``response_format``, ``parallel_tool_calls``, ``reasoning_effort``,
                ``thinking``, ``extra_body``, ``extra_headers``, ``use_structured_output``,
                ``emit_decisions_tool``, ``allow_partial`` (each provider takes those its
                API has; others raise UsageError naming the provider).

        Returns:
            The reply text, or the tool call's arguments as JSON.

        Raises:
            UsageError: For malformed messages or options.
            ResponseTruncatedError: The answer hit the output token limit.
            ContentFilteredError: A content filter stopped the answer.
            ResponseRefusedError: The model refused.
            ProviderAuthError: On 401/403 (never retried).
            ProviderRateLimitError: When 429 answers outlast the retry policy.
            ProviderOverloadedError: When overload answers outlast the retry policy.
            ProviderTimeoutError: On timeouts past the policy, or the overall deadline.
            ProviderConnectionError: When the server cannot be reached.
            ProviderResponseError: For other error statuses and malformed bodies.
            ClosedError: After :meth:`aclose`.
        """
        text, _ = await self.achat_with_usage(messages, **kwargs)
        return text

    async def achat_with_usage(
        self, messages: list[dict[str, Any]], **kwargs: Any
    ) -> tuple[str, Usage]:
        """Like :meth:`achat`, also returning this call's token usage.

        Safe under concurrency (``last_usage`` is only the latest call's).

        Args:
            messages: As for :meth:`achat`.
            **kwargs: As for :meth:`achat`.

        Returns:
            ``(text, usage)``.
        """
        allow_partial = kwargs.pop("allow_partial", False)
        if not isinstance(allow_partial, bool):
            raise UsageError("allow_partial must be a bool")
        request = self._request(messages, kwargs)
        result = await self._acomplete(request, allow_partial)
        if request.tool is not None:
            for call in result.tool_calls:
                if call.name == request.tool.name:
                    return arguments_text(call, self.provider_name), result.usage
        return result.text, result.usage

    def chat_stream(self, messages: list[dict[str, Any]], **kwargs: Any) -> ChatStream:
        """Stream the reply as text deltas; usage and the result are set on the stream
        when it ends.

        Retries (per the policy) cover opening the stream and any failure before the
        first delta (e.g. Anthropic's ``overloaded_error`` event); an error after the
        first delta is raised as is. A truncated, filtered or refused answer raises its
        typed error at the end (after every delta was yielded) unless
        ``allow_partial=True``. Structured output and tools are not streamed.

        Args:
            messages: As for :meth:`achat`.
            **kwargs: As for :meth:`achat`, without ``use_structured_output`` and
                ``tools``.

        Returns:
            A :class:`~converge.extensions.llm.ChatStream`; iterate it with ``async for``.

        Raises:
            UsageError: For malformed messages or options (raised here, before any I/O).
        """
        allow_partial = kwargs.pop("allow_partial", False)
        if not isinstance(allow_partial, bool):
            raise UsageError("allow_partial must be a bool")
        request = self._request(messages, kwargs)
        if request.tool is not None or request.tools:
            raise UsageError("structured output and tools are not streamed; call acomplete()")
        return ChatStream(lambda stream: self._stream(stream, request, allow_partial))

    async def _open_until_text(
        self, client: Any, request: ChatRequest
    ) -> tuple[Any, AsyncIterator[Any], StreamState, str | None]:
        """Open a stream and read it up to its first text delta (or its end).

        Failures up to that point (including error events in a 200 stream) are failures
        of the attempt: the retry policy may retry them, nothing was shown yet.
        """
        stream = await self._open_stream(client, request)
        events = self._events(stream)
        state = StreamState()
        try:
            async for event in events:
                delta = self._parse_event(event, state)
                if delta:
                    return stream, events, state, delta
            if state.stop_reason is None and not state.refusal:
                raise incomplete(self.provider_name, state.result(""))
        except BaseException:
            await self._release(stream, events)
            raise
        return stream, events, state, None

    def _parse_event(self, event: Any, state: StreamState) -> str | None:
        try:
            return self._delta(event, state)
        except (AttributeError, TypeError, ValueError) as exc:
            raise bad_response(self.provider_name, f"stream event: {exc}") from exc

    async def _release(self, stream: Any, events: AsyncIterator[Any]) -> None:
        with anyio.CancelScope(shield=True):
            close_events = getattr(events, "aclose", None)
            try:
                if close_events is not None:  # do not leave it to the garbage collector
                    await close_events()
            finally:
                await self._close_stream(stream)

    async def _stream(
        self, out: ChatStream, request: ChatRequest, allow_partial: bool
    ) -> AsyncGenerator[str, None]:
        client = await self._current_client()
        record = self._start_call(request)
        try:
            stream, events, state, first = await acall_with_retry(
                self.retry_policy,
                lambda: self._open_until_text(client, request),
                self._classify,
                provider=self.provider_name,
                on_retry=record.retry,
            )
        except BaseException as exc:
            record.end(error=exc)
            raise
        try:
            if first is not None:
                yield first
                async for event in events:
                    delta = self._parse_event(event, state)
                    if delta:
                        yield delta
        except Exception as exc:
            if self._closed:
                error: Exception = self._closed_error()
            else:
                failure = self._classify(exc, time.time())
                error = exc if failure is None else failure.error
            record.end(error=error)
            if error is exc:
                raise
            raise error from exc
        except GeneratorExit:  # the consumer stopped reading: not a failure
            record.end()
            raise
        except BaseException as exc:  # cancelled
            record.end(error=exc)
            raise
        finally:
            await self._release(stream, events)
        result = state.result(out.text)
        self.last_usage = result.usage
        out.finish(result.usage, result)
        try:
            check_result(result, self.provider_name, allow_partial=allow_partial)
        except ProviderError as exc:
            record.end(result, exc)
            raise
        record.end(result)

    # -- sync surface ------------------------------------------------------------------

    def _sync_portal(self) -> _sync.Portal:
        with self._portal_lock:
            if self._closed:
                raise self._closed_error()
            if self._portal is None:
                self._portal = _sync.Portal()
            return self._portal

    def chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        """Synchronous :meth:`achat`, for scripts.

        Runs on a background event loop owned by this provider (its connection pool is
        reused across calls). In async code, ``await achat(...)`` instead.

        Args:
            messages: As for :meth:`achat`.
            **kwargs: As for :meth:`achat`.

        Returns:
            The reply text, or the tool call's arguments as JSON.

        Raises:
            SyncInEventLoopError: When called on an event-loop thread.
        """
        name = f"{type(self).__name__}.achat"
        return self._sync_portal().call(self.achat, messages, async_name=name, **kwargs)

    def chat_with_usage(self, messages: list[dict[str, Any]], **kwargs: Any) -> tuple[str, Usage]:
        """Synchronous :meth:`achat_with_usage`.

        Args:
            messages: As for :meth:`achat`.
            **kwargs: As for :meth:`achat`.

        Returns:
            ``(text, usage)``.
        """
        name = f"{type(self).__name__}.achat_with_usage"
        return self._sync_portal().call(self.achat_with_usage, messages, async_name=name, **kwargs)

    # -- closing -----------------------------------------------------------------------

    async def arelease_loop(self) -> None:
        """Close the client this provider made for the running loop; the provider stays
        usable (a later call on this loop makes a new client).

        For owners of an event loop that is about to end (a portal, a test's loop), so
        the connection pool does not outlive it.
        """
        if self._client is None:
            slot = self._clients.get()
            if slot.value is not None:
                client, slot.value = slot.value, None
                await self._close_client(client)

    def _stop_portal(self) -> None:
        with self._portal_lock:
            portal, self._portal = self._portal, None
        if portal is not None:
            try:
                portal.call(self.arelease_loop, async_name="aclose")
            finally:
                portal.close()

    async def aclose(self) -> None:
        """Close the clients this provider created for the current loop and its sync
        surface. An injected ``client`` is left open (its owner closes it). Idempotent;
        later calls raise :class:`~converge.errors.ClosedError`, and so do calls it cuts
        short (they are not retried)."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            await self.arelease_loop()
            if self._portal is not None:
                await anyio.to_thread.run_sync(self._stop_portal)

    def close(self) -> None:
        """Synchronous :meth:`aclose` (closes the sync surface's loop and client).

        Raises:
            SyncInEventLoopError: When called on an event-loop thread.
        """
        _sync.check_sync_allowed(f"{type(self).__name__}.aclose")
        self._closed = True
        self._stop_portal()
