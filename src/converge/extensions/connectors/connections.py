"""Outbound keep-alive connections: a stack of idle connections per origin.

httpx2's own pool (httpcore2's ``AsyncConnectionPool``) walks every connection it holds
twice per request, and probes each idle one for a close by the server (a ``poll`` per
idle socket). With 16 connections to one receiver, that was about a third of the
650-700 µs of client CPU per delivery (perf, issue 17.5). :class:`ConnectionStack`
gives a request the most recently used idle connection of its origin, probes only that
one, and takes it back once the response is read: constant work per request.

It serves the outbound transport's ``AsyncClient`` (which reads every response whole),
not general use: it reads each response body before returning it.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager

import anyio
import httpcore2
import httpx2

from converge._tls import shared_ssl_context

__all__ = ["ConnectionStack"]

_Key = tuple[bytes, bytes, int | None]


class ConnectionStack(httpx2.AsyncBaseTransport):
    """An httpx2 transport over HTTP/1.1 keep-alive connections, reused newest first.

    Args:
        max_connections: Open connections at most (busy and idle, every origin); a
            request beyond it waits for one to be free.
        keepalive_expiry: Seconds an idle connection is kept.
    """

    def __init__(self, *, max_connections: int, keepalive_expiry: float = 5.0) -> None:
        self._max = max_connections
        self._keepalive = keepalive_expiry
        self._slots = anyio.Semaphore(max_connections)
        # Per origin, (idle since, connection), the oldest first.
        self._idle: dict[_Key, list[tuple[float, httpcore2.AsyncHTTPConnection]]] = {}
        self._idle_count = 0
        self._next_sweep = 0.0
        self._closed = False

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        """Send ``request`` on a kept connection of its origin (or a new one)."""
        url = request.url
        key = (url.raw_scheme, url.raw_host, url.port)
        core = httpcore2.Request(
            method=request.method,
            url=httpcore2.URL(
                scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        async with self._slots:
            connection = await self._take(key, core.url.origin)
            try:
                with _as_httpx_errors():
                    response = await connection.handle_async_request(core)
                    try:
                        body = await response.aread()
                    finally:
                        await response.aclose()
            except BaseException:  # cancelled or failed mid-exchange: its state is unknown
                await _close(connection)
                raise
            await self._give_back(key, connection)
        return httpx2.Response(
            status_code=response.status,
            headers=response.headers,
            content=body,
            extensions=response.extensions,
        )

    async def _take(self, key: _Key, origin: httpcore2.Origin) -> httpcore2.AsyncHTTPConnection:
        stack = self._idle.get(key)
        while stack:
            _, connection = stack.pop()
            self._idle_count -= 1
            # One probe: the keep-alive ran out, or the server closed it meanwhile.
            if not connection.has_expired() and connection.is_idle():
                return connection
            await _close(connection)
        busy = self._max - self._slots.value  # this request included
        while self._idle_count and busy + self._idle_count > self._max:
            await self._close_oldest()
        return httpcore2.AsyncHTTPConnection(
            origin,
            ssl_context=_tls(key),
            keepalive_expiry=self._keepalive,
        )

    async def _give_back(self, key: _Key, connection: httpcore2.AsyncHTTPConnection) -> None:
        if self._closed or not connection.is_idle():  # e.g. the server said close
            await _close(connection)
            return
        now = anyio.current_time()
        self._idle.setdefault(key, []).append((now, connection))
        self._idle_count += 1
        if now >= self._next_sweep:
            self._next_sweep = now + self._keepalive
            await self._sweep(now)

    async def _sweep(self, now: float) -> None:
        # Connections idle past the keep-alive, of every origin (one the dispatcher no
        # longer sends to included), so their sockets do not linger.
        for key, stack in list(self._idle.items()):
            while stack and now - stack[0][0] >= self._keepalive:
                _, connection = stack.pop(0)
                self._idle_count -= 1
                await _close(connection)
            if not stack:
                del self._idle[key]

    async def _close_oldest(self) -> None:
        oldest = min(
            (key for key, stack in self._idle.items() if stack),
            key=lambda key: self._idle[key][0][0],
        )
        _, connection = self._idle[oldest].pop(0)
        self._idle_count -= 1
        await _close(connection)

    async def aclose(self) -> None:
        """Close every idle connection; busy ones close when their response is read."""
        self._closed = True
        stacks, self._idle, self._idle_count = self._idle, {}, 0
        for stack in stacks.values():
            for _, connection in stack:
                await _close(connection)


def _tls(key: _Key) -> ssl.SSLContext | None:
    return shared_ssl_context() if key[0] == b"https" else None


async def _close(connection: httpcore2.AsyncHTTPConnection) -> None:
    with anyio.CancelScope(shield=True):
        await connection.aclose()


@contextmanager
def _as_httpx_errors() -> Iterator[None]:
    # httpcore2's errors as the httpx2 errors of the same name, as httpx2's own
    # transport raises them (the outbound transport classifies those).
    try:
        yield
    except Exception as exc:
        for cls in type(exc).__mro__:
            if cls.__module__.startswith("httpcore2"):
                mapped = getattr(httpx2, cls.__name__, None)
                if isinstance(mapped, type) and issubclass(mapped, httpx2.TransportError):
                    raise mapped(str(exc)) from exc
        raise
