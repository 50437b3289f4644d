"""The outbound transport: builds, signs and sends one attempt, and classifies it."""

from __future__ import annotations

import base64
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import anyio
import httpx2

from converge import _http, _sync
from converge._chain import exception_chain
from converge._tls import ashared_ssl_context
from converge.core.metrics import MetricsCollector
from converge.extensions.connectors.inbound.schemes import compute_signature
from converge.extensions.connectors.outbound.connections import ConnectionStack, read_body
from converge.extensions.connectors.outbound.dispatcher import AttemptResult
from converge.extensions.connectors.outbound.outbox import OutboxRecord
from converge.extensions.connectors.outbound.retry import (
    RetrySchedule,
    WebhookRetryPolicy,
    classify_status,
    counts_as_breaker_failure,
    parse_retry_after,
)

__all__ = [
    "OutboundRequest",
    "OutboundResponse",
    "OutboundSender",
    "OutboundTransport",
    "unsendable_reason",
]

_USER_AGENT = "converge-webhook/0.1"
# Requests are built here, not by ``AsyncClient.build_request``, whose URL parse and
# merge of the client's defaults cost about 30 µs per attempt (perf, issue 17.5): these
# are the defaults it would add (no cookies: a target's cookie is never sent back).
_CLIENT_HEADERS = {"accept": "*/*", "accept-encoding": "gzip, deflate", "connection": "keep-alive"}
_PARSED_URLS_KEPT = 1024


def unsendable_reason(request: OutboundRequest) -> str | None:
    """Why ``request`` can never be sent (a header RFC 9110 refuses), or None."""
    for name, value in request.headers.items():
        if not isinstance(name, str) or not _http.HEADER_NAME.fullmatch(name):
            return "invalid header name"
        if not isinstance(value, str) or not _http.HEADER_VALUE.fullmatch(value):
            return f"invalid value of header {name}"
    return None


@dataclass(frozen=True, slots=True)
class OutboundRequest:
    """One outbound HTTP attempt, as handed to an ``outbound_sender``.

    Attributes:
        method: HTTP method.
        url: Absolute URL.
        headers: Every header to send (signature and ``Idempotency-Key`` included).
        content: The exact body bytes.
        timeout: Seconds the attempt may take.
        action_id: The outbox id of the action.
        attempt: Attempt number, from 1.
    """

    method: str
    url: str
    headers: dict[str, str]
    content: bytes
    timeout: float
    action_id: str
    attempt: int


@dataclass(frozen=True, slots=True)
class OutboundResponse:
    """What an ``outbound_sender`` reports back.

    Attributes:
        status_code: The HTTP status.
        headers: Response headers (``Retry-After`` is honoured on 429 and 503).
    """

    status_code: int
    headers: Mapping[str, str] = field(default_factory=dict)


#: ``async def sender(request: OutboundRequest) -> OutboundResponse | int``: replaces the
#: HTTP send (for tests, or another transport). Raising means "no answer" and is retried.
OutboundSender = Callable[[OutboundRequest], Awaitable["OutboundResponse | int"]]


class _ClientBox:
    # One per event loop, filled on its first send: the loop's connection stack, or,
    # with a proxy set in the environment, an httpx2 client (whose own transport
    # applies the proxy; a client given a transport ignores the environment).
    __slots__ = ("client", "stack")

    def __init__(self) -> None:
        self.stack: ConnectionStack | None = None
        self.client: httpx2.AsyncClient | None = None


class OutboundTransport:
    """Sends outbound attempts: over HTTP (one :class:`ConnectionStack` per event loop,
    or an ``httpx2.AsyncClient`` when the environment sets a proxy; redirects are never
    followed), or through an ``outbound_sender``.

    Args:
        retry_policy: Supplies ``request_timeout_sec``, the limit of each attempt.
        signing_keys: Standard Webhooks key bytes by target name.
        sender: Replaces the HTTP send when given.
        clock: Unix seconds (signature timestamps, HTTP-date ``Retry-After``).
        metrics: Where attempt durations go.
        max_connections: Size of each HTTP connection pool.
    """

    def __init__(
        self,
        *,
        retry_policy: WebhookRetryPolicy | RetrySchedule,
        signing_keys: Mapping[str, bytes],
        sender: OutboundSender | None,
        clock: Callable[[], float],
        metrics: MetricsCollector,
        max_connections: int,
    ) -> None:
        self._policy = retry_policy
        self._signing_keys = dict(signing_keys)
        self._sender = sender
        self._clock = clock
        self._metrics = metrics
        self._max_connections = max_connections
        self._clients: _sync.LoopLocal[_ClientBox] = _sync.LoopLocal(_ClientBox)
        self._urls: dict[str, httpx2.URL] = {}
        self._timeouts = httpx2.Timeout(retry_policy.request_timeout_sec).as_dict()

    def build_request(self, record: OutboxRecord) -> OutboundRequest:
        """The request one attempt of ``record`` sends (signed when its target has a secret)."""
        action = record.action
        content = action.body_bytes()
        headers = {
            "content-type": "application/json",
            "user-agent": _USER_AGENT,
            **action.headers,
            "idempotency-key": record.idempotency_key,
        }
        key = self._signing_keys.get(action.target)
        if key is not None:
            ts = str(int(self._clock()))
            signature = compute_signature(key, f"{record.id}.{ts}.".encode(), content)
            headers["webhook-id"] = record.id
            headers["webhook-timestamp"] = ts
            headers["webhook-signature"] = "v1," + base64.b64encode(signature).decode()
        return OutboundRequest(
            method=action.method,
            url=action.url,
            headers=headers,
            content=content,
            timeout=self._policy.request_timeout_sec,
            action_id=record.id,
            attempt=record.attempts + 1,
        )

    async def _box(self) -> _ClientBox:
        box = self._clients.get()
        if box.stack is None and box.client is None:
            if urllib.request.getproxies():
                verify = await ashared_ssl_context()  # not built on the loop
                if box.client is None:  # another first send may have made it meanwhile
                    limits = httpx2.Limits(
                        max_connections=self._max_connections,
                        max_keepalive_connections=self._max_connections,
                    )
                    box.client = httpx2.AsyncClient(
                        follow_redirects=False,
                        limits=limits,
                        timeout=self._policy.request_timeout_sec,
                        verify=verify,
                    )
            else:
                box.stack = ConnectionStack(max_connections=self._max_connections)
        return box

    async def _send(
        self, request: OutboundRequest, prepared: httpx2.Request | None
    ) -> OutboundResponse:
        if prepared is None:
            assert self._sender is not None
            answer = await self._sender(request)
            if isinstance(answer, int) and not isinstance(answer, bool):
                return OutboundResponse(answer)
            if not isinstance(answer, OutboundResponse):
                raise TypeError("outbound_sender must return OutboundResponse or int")
            return answer
        box = await self._box()
        if box.stack is not None:
            # The requests are built whole here, redirects are never followed and no
            # cookie is ever sent back: nothing the client layer adds is needed (it cost
            # about 45 µs per attempt). Either way, at most BODY_READ_MAX bytes of an
            # answer's body are read: only its status and headers count.
            response = await box.stack.handle_async_request(prepared)
        else:
            assert box.client is not None
            response = await box.client.send(prepared, stream=True)
            try:
                await read_body(response.aiter_raw())
            finally:
                await response.aclose()
        return OutboundResponse(response.status_code, response.headers)

    def _url(self, url: str) -> httpx2.URL:
        parsed = self._urls.get(url)
        if parsed is None:
            parsed = httpx2.URL(url)
            if len(self._urls) >= _PARSED_URLS_KEPT:
                self._urls.clear()
            self._urls[url] = parsed
        return parsed

    def _prepare(self, record: OutboxRecord) -> tuple[OutboundRequest, httpx2.Request | None]:
        """Build (and for HTTP, encode) the request; raises _Unsendable if it never can be."""
        try:
            request = self.build_request(record)
        except (TypeError, ValueError) as exc:  # e.g. a body with a lone surrogate
            raise _Unsendable(f"unsendable action: body {type(exc).__name__}") from exc
        reason = unsendable_reason(request)
        if reason is not None:
            raise _Unsendable(f"unsendable action: {reason}")
        if self._sender is not None:
            return request, None
        headers = request.headers
        named = {name.lower() for name in headers}
        try:
            prepared = httpx2.Request(
                request.method,
                self._url(request.url),
                headers={
                    **{k: v for k, v in _CLIENT_HEADERS.items() if k not in named},
                    **headers,
                },
                content=request.content,
                extensions={"timeout": self._timeouts},
            )
        except (TypeError, ValueError, httpx2.InvalidURL) as exc:
            raise _Unsendable(f"unsendable action: {type(exc).__name__}") from exc
        return request, prepared

    async def attempt(self, record: OutboxRecord) -> AttemptResult:
        """Make one delivery attempt of ``record`` and classify the outcome.

        An action that can never be sent (a header RFC 9110 refuses, a body that does not
        encode) is ``"dead"`` at once with ``sent=False``: nothing reached the target, so
        its circuit breaker learns nothing from it.
        """
        try:
            request, prepared = self._prepare(record)
        except _Unsendable as exc:
            return AttemptResult("dead", error=str(exc), sent=False)
        labels = {"target": record.action.target}
        started = anyio.current_time()

        def took() -> float:
            return (anyio.current_time() - started) * 1000.0

        try:
            with anyio.fail_after(request.timeout):
                response = await self._send(request, prepared)
        except TimeoutError:
            return AttemptResult("retry", error="timeout", breaker_failure=True, latency_ms=took())
        except httpx2.LocalProtocolError as exc:  # h11 refused to write the request
            return AttemptResult(
                "dead", error=f"unsendable action: {exc}"[:200], sent=False, latency_ms=took()
            )
        except (httpx2.HTTPError, OSError) as exc:
            return AttemptResult(
                "retry", error=_failure(exc), breaker_failure=True, latency_ms=took()
            )
        except Exception as exc:  # an outbound_sender may raise anything: no answer
            return AttemptResult(
                "retry",
                error=f"sender: {type(exc).__name__}",
                breaker_failure=True,
                latency_ms=took(),
            )
        finally:
            self._metrics.observe(
                "webhook_outbound_attempt_seconds",
                anyio.current_time() - started,
                labels=labels,
                help="Duration of outbound attempts.",
            )
        status = response.status_code
        retry_after = None
        if status in (429, 503):
            retry_after = parse_retry_after(
                _header(response.headers, "retry-after"), now=self._clock()
            )
        verdict = classify_status(status)
        error = "" if verdict == "delivered" else f"status {status}"
        return AttemptResult(
            verdict,
            status=status,
            retry_after=retry_after,
            error=error,
            breaker_failure=counts_as_breaker_failure(status),
            latency_ms=took(),
        )

    async def aclose(self) -> None:
        """Close this event loop's connections (new ones are made on the next send)."""
        box = self._clients.get()
        stack, client, box.stack, box.client = box.stack, box.client, None, None
        if stack is not None:
            await stack.aclose()
        if client is not None:
            await client.aclose()


class _Unsendable(Exception):
    pass


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        for key, candidate in headers.items():
            if key.lower() == name:
                return candidate
    return value


def _failure(exc: BaseException) -> str:
    """``ConnectError: [Errno 111] Connection refused``: what an operator needs to tell a
    refused connection from a name that does not resolve or a certificate that fails.

    httpx2 and anyio wrap what the socket or TLS said in generic messages ("All
    connection attempts failed"), so the text is the innermost of the exception's chain;
    at most 200 characters.
    """
    texts = [text for text in map(str, exception_chain(exc)) if text]
    name = type(exc).__name__
    return f"{name}: {texts[-1]}"[:200] if texts else name
