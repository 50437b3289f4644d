"""Machinery shared by the SDK-backed providers: auth, clients per loop, retries, shims.

A provider subclass supplies the SDK import, the client factory and the protocol
translation (request kwargs, response and stream-event parsing); everything else (option
validation, the retry policy, error mapping, usage bookkeeping, the sync surface and
closing) lives here once.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import ssl
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from types import ModuleType
from typing import Any, ClassVar, Generic, TypeVar

import anyio
import anyio.to_thread

from converge import _sync
from converge.errors import (
    ClosedError,
    ConfigurationError,
    MissingDependencyError,
    ProviderError,
    UsageError,
)
from converge.extensions.llm._errors import bad_response
from converge.extensions.llm._request import ChatRequest, build_request
from converge.extensions.llm._retry import Failure, RetryPolicy, acall_with_retry
from converge.extensions.llm.protocol import ChatResult, Usage
from converge.extensions.llm.stream import ChatStream

__all__ = ["SDKProvider", "UsageCounter", "import_sdk", "shared_ssl_context", "usage_from"]

C = TypeVar("C")


def import_sdk(module: str, extra: str) -> ModuleType:
    """Import an optional SDK, or raise an error naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"the {module!r} package is needed for this provider; "
            f"install it with: pip install 'converge[{extra}]'"
        ) from exc


_ssl_lock = threading.Lock()
_ssl_context: ssl.SSLContext | None = None


def shared_ssl_context() -> ssl.SSLContext:
    """One TLS context for every HTTP client the providers create.

    Building a context (loading the trust store) costs tens of milliseconds; httpx
    recommends sharing one, and it is safe across threads and loops.
    """
    global _ssl_context
    with _ssl_lock:
        if _ssl_context is None:
            import httpx2  # every supported SDK's HTTP dependency

            _ssl_context = httpx2.create_ssl_context()
        return _ssl_context


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def usage_from(obj: Any, input_attr: str, output_attr: str) -> Usage:
    """A :class:`Usage` from an SDK usage object; missing or odd counts read as 0."""
    if obj is None:
        return Usage()
    return Usage(_count(getattr(obj, input_attr, 0)), _count(getattr(obj, output_attr, 0)))


class UsageCounter:
    """Usage reported piecemeal by stream events (latest value of each count wins)."""

    def __init__(self) -> None:
        self.input_tokens = 0
        self.output_tokens = 0

    def update(self, obj: Any, input_attr: str, output_attr: str) -> None:
        """Take the counts ``obj`` reports (absent ones are left alone)."""
        if obj is None:
            return
        value = getattr(obj, input_attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            self.input_tokens = value
        value = getattr(obj, output_attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            self.output_tokens = value

    def usage(self) -> Usage:
        """The counts as a :class:`Usage`."""
        return Usage(self.input_tokens, self.output_tokens)


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
    extra_options: ClassVar[frozenset[str]] = frozenset()

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
    ) -> None:
        self._sdk = import_sdk(self.sdk_module, self.extra)
        if not isinstance(model, str) or not model:
            raise UsageError("model must be a non-empty string")
        if base_url is not None and (
            not isinstance(base_url, str) or not base_url.startswith(("http://", "https://"))
        ):
            raise UsageError("base_url must be an http:// or https:// URL")
        if timeout is not None and (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not math.isfinite(timeout)
            or timeout <= 0
        ):
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
        if client is None:
            api_key = api_key or os.environ.get(self.env_var) or None
            if api_key is None:
                raise ConfigurationError(
                    f"no {self.provider_name} API key: pass api_key=... or set {self.env_var} "
                    "(local servers that ignore keys still need a placeholder)"
                )
        self.model = model
        self.base_url = base_url
        self.timeout = float(timeout) if timeout is not None else None
        self.retry_policy = retry_policy
        self.last_usage: Usage | None = None
        self._api_key = api_key
        self._client = None if client is None else self._adopt_client(client)
        self._clients: _sync.LoopLocal[_Lazy[Any]] = _sync.LoopLocal(
            lambda: _Lazy(self._new_client)
        )
        self._portal: _sync.Portal | None = None
        self._portal_lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r}, base_url={self.base_url!r})"

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

    async def _complete(self, client: Any, request: ChatRequest) -> tuple[str, Usage]:
        """One non-streaming call: the reply text (or tool arguments) and usage."""
        raise NotImplementedError

    async def _open_stream(self, client: Any, request: ChatRequest) -> Any:
        """Start one streaming call; returns once the response headers arrived."""
        raise NotImplementedError

    def _events(self, stream: Any) -> AsyncIterator[Any]:
        """The SDK stream's events."""
        return aiter(stream)

    def _delta(self, event: Any, counter: UsageCounter) -> str | None:
        """Text carried by one stream event (usage goes into ``counter``)."""
        raise NotImplementedError

    async def _close_stream(self, stream: Any) -> None:
        await stream.close()

    async def _close_client(self, client: Any) -> None:
        await client.close()

    # -- shared machinery --------------------------------------------------------------

    def _classify(self, exc: Exception, now: float) -> Failure | None:
        if isinstance(exc, ProviderError):  # raised by our own response parsing
            return Failure(exc, False)
        return self._classify_sdk(exc, now)

    def _request(self, messages: Any, kwargs: dict[str, Any]) -> ChatRequest:
        request = build_request(
            messages, kwargs, default_model=self.model, extra_options=self.extra_options
        )
        self._check_request(request)
        return request

    def _current_client(self) -> Any:
        if self._closed:
            raise ClosedError(f"this {type(self).__name__} was closed")
        if self._client is not None:
            return self._client
        return self._clients.get().get()

    async def acomplete(
        self, messages: list[dict[str, Any]], *, allow_partial: bool = False, **kwargs: Any
    ) -> ChatResult:
        """Send ``messages`` and return everything the call returned.

        Args:
            messages: As for :meth:`achat`.
            allow_partial: Return truncated, filtered or refused answers instead of
                raising.
            **kwargs: As for :meth:`achat`.

        Returns:
            The :class:`~converge.extensions.llm.ChatResult`.

        Raises:
            ResponseTruncatedError: The model hit the output token limit.
            ContentFilteredError: A content filter cut the answer.
            ResponseRefusedError: The model refused.
        """
        raise NotImplementedError

    def complete(
        self, messages: list[dict[str, Any]], *, allow_partial: bool = False, **kwargs: Any
    ) -> ChatResult:
        """Synchronous :meth:`acomplete`.

        Args:
            messages: As for :meth:`achat`.
            allow_partial: As for :meth:`acomplete`.
            **kwargs: As for :meth:`achat`.

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

        Args:
            messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.
            **kwargs: ``model``, ``temperature``, ``max_tokens``, ``top_p``, ``stop``,
                ``use_structured_output``, ``emit_decisions_tool`` (and the provider's
                extra options).

        Returns:
            The reply text, or the tool call's arguments as JSON.

        Raises:
            UsageError: For malformed messages or options.
            ProviderAuthError: On 401/403 (never retried).
            ProviderRateLimitError: When 429 answers outlast the retry policy.
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
        request = self._request(messages, kwargs)
        client = self._current_client()
        text, usage = await acall_with_retry(
            self.retry_policy,
            lambda: self._complete(client, request),
            self._classify,
            provider=self.provider_name,
        )
        self.last_usage = usage
        return text, usage

    def chat_stream(self, messages: list[dict[str, Any]], **kwargs: Any) -> ChatStream:
        """Stream the reply as text deltas; usage is set on the stream when it ends.

        Retries (per the policy) cover opening the stream; an error after the first delta
        is raised as is. Structured output is not streamed.

        Args:
            messages: As for :meth:`achat`.
            **kwargs: As for :meth:`achat`, without ``use_structured_output``.

        Returns:
            A :class:`~converge.extensions.llm.ChatStream`; iterate it with ``async for``.

        Raises:
            UsageError: For malformed messages or options (raised here, before any I/O).
        """
        request = self._request(messages, kwargs)
        if request.tool is not None:
            raise UsageError("structured output is not streamed; call achat() instead")
        return ChatStream(lambda stream: self._stream(stream, request))

    async def _stream(self, out: ChatStream, request: ChatRequest) -> AsyncGenerator[str, None]:
        client = self._current_client()
        stream = await acall_with_retry(
            self.retry_policy,
            lambda: self._open_stream(client, request),
            self._classify,
            provider=self.provider_name,
        )
        counter = UsageCounter()
        events = self._events(stream)
        try:
            async for event in events:
                try:
                    delta = self._delta(event, counter)
                except (AttributeError, TypeError, ValueError) as exc:
                    raise bad_response(self.provider_name, f"stream event: {exc}") from exc
                if delta:
                    yield delta
        except Exception as exc:
            failure = self._classify(exc, time.time())
            if failure is None:
                raise
            raise failure.error from exc
        finally:
            with anyio.CancelScope(shield=True):
                close_events = getattr(events, "aclose", None)
                if close_events is not None:  # do not leave it to the garbage collector
                    await close_events()
                await self._close_stream(stream)
        usage = counter.usage()
        self.last_usage = usage
        out.finish(usage)

    # -- sync surface ------------------------------------------------------------------

    def _sync_portal(self) -> _sync.Portal:
        with self._portal_lock:
            if self._closed:
                raise ClosedError(f"this {type(self).__name__} was closed")
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
        later calls raise :class:`~converge.errors.ClosedError`."""
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
