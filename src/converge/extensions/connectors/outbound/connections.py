"""Outbound keep-alive connections: a stack of idle connections per origin.

httpx2's own pool (httpcore2's ``AsyncConnectionPool``) walks every connection it holds
twice per request, and probes each idle one for a close by the server (a ``poll`` per
idle socket). With 16 connections to one receiver, that was about a third of the
600-730 µs of client CPU per delivery (perf, issue 17.5). :class:`ConnectionStack`
gives a request the most recently used idle connection of its origin, probes only that
one (httpcore2 probes it as the request is about to go out from 2.17 on, before that in
``has_expired``), and takes it back once the response is read: constant work per request.

A kept connection can be closed by the server just as a request is sent on it (a server
whose keep-alive ends a moment before ours: Node's and uvicorn's is 5 s, gunicorn's 2 s),
so that the request fails without an answer. When a reused connection fails before any
byte of an answer came, the request is sent once more on a new connection, as Go's
``net/http`` does for requests that carry an idempotency key: every outbound delivery
does, and the receiver cannot have answered it.

Its connections also send a request's head and a small body in one write, as
``http.client`` does: one TCP segment instead of two, which on loopback saved another
60 µs or so of CPU per delivery (the kernel's receive path runs in the sender's system
call) and on a network avoids a delayed-ACK wait where Nagle's algorithm is on.

It is an httpx2 transport (an ``AsyncClient`` can use it), but made for the outbound
transport, which calls it directly and needs only a response's status and headers: it
reads at most :data:`BODY_READ_MAX` bytes of a body, for at most :data:`BODY_READ_SEC`,
before returning the response. The rest of a longer or slower body is not read, and its
connection is closed rather than kept, so a target that answers with gigabytes, or
trickles its body, or never ends it, costs neither memory nor time.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncGenerator, Iterable, Iterator
from contextlib import aclosing, contextmanager
from contextvars import ContextVar
from typing import Any

import anyio
import httpcore2
import httpx2

from converge._http import ip_literal
from converge._tls import ashared_ssl_context

__all__ = ["BODY_READ_MAX", "BODY_READ_SEC", "ConnectionStack", "read_body"]

_Key = tuple[bytes, bytes, int | None]
# A request's head and body are sent in one write up to this size.
_COALESCED_MAX = 64 * 1024
#: The bytes of a response body read at most.
BODY_READ_MAX = 64 * 1024
#: The seconds a response body is read at most, once its head has come.
BODY_READ_SEC = 1.0
# Set by a request's task; a connection's stream marks it once a byte of the answer came.
_ANSWERED: ContextVar[list[bool]] = ContextVar("converge_answered")
# What a request on a connection the server had just closed fails with.
_STALE = (httpcore2.ReadError, httpcore2.WriteError, httpcore2.RemoteProtocolError)
# What httpcore2 (2.17 on) raises, having sent nothing, for a kept connection it finds
# closed by the server as a request is about to go out (it probed in has_expired before).
_UNSENT = httpcore2.ConnectionNotAvailable


async def read_body(chunks: AsyncGenerator[bytes]) -> bytes:
    """The body ``chunks`` make, cut at :data:`BODY_READ_MAX` bytes or after
    :data:`BODY_READ_SEC` seconds: no more is read.

    ``chunks`` is closed when this returns (a response left unread past the cut closes
    its connection when it is closed itself).
    """
    parts: list[bytes] = []
    size = 0
    async with aclosing(chunks):
        with anyio.move_on_after(BODY_READ_SEC):
            async for chunk in chunks:
                parts.append(chunk)
                size += len(chunk)
                if size >= BODY_READ_MAX:
                    break
    return b"".join(parts)[:BODY_READ_MAX]


class ConnectionStack(httpx2.AsyncBaseTransport):
    """An httpx2 transport over HTTP/1.1 keep-alive connections, reused newest first.

    Args:
        max_connections: Open connections at most (busy and idle, every origin); a
            request beyond it waits for one to be free.
        keepalive_expiry: Seconds an idle connection is kept.
        ssl_context: For ``https`` origins; None: the process's shared one (the system's
            trust store).
    """

    def __init__(
        self,
        *,
        max_connections: int,
        keepalive_expiry: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._ssl_context = ssl_context
        self._backend = _CoalescingBackend()
        self._max = max_connections
        self._keepalive = keepalive_expiry
        self._slots = anyio.Semaphore(max_connections)
        # Per origin, (idle since, connection), the oldest first.
        self._idle: dict[_Key, list[tuple[float, httpcore2.AsyncHTTPConnection]]] = {}
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
        # A body given as bytes can be sent again; a stream of chunks cannot.
        resendable = isinstance(request.stream, httpx2.ByteStream)
        answered = [False]
        token = _ANSWERED.set(answered)
        async with self._slots:
            connection, reused = await self._take(key, core.url.origin)
            try:
                with _as_httpx_errors():
                    try:
                        response = await connection.handle_async_request(core)
                    except (*_STALE, _UNSENT) as exc:
                        sent = not isinstance(exc, _UNSENT)
                        if not reused or (sent and (not resendable or answered[0])):
                            raise
                        await _close(connection)  # closed by the server before or as we sent
                        connection = await self._open(key, core.url.origin)
                        response = await connection.handle_async_request(core)
                    try:
                        body = await read_body(response.aiter_stream())
                    finally:
                        await response.aclose()
            except BaseException:  # cancelled or failed mid-exchange: its state is unknown
                await _close(connection)
                raise
            finally:
                _ANSWERED.reset(token)
            await self._give_back(key, connection)
        return httpx2.Response(
            status_code=response.status,
            headers=response.headers,
            content=body,
            extensions=response.extensions,
        )

    async def _take(
        self, key: _Key, origin: httpcore2.Origin
    ) -> tuple[httpcore2.AsyncHTTPConnection, bool]:
        """A kept connection of ``key`` (and True), else a new one (and False)."""
        stack = self._idle.get(key)
        while stack:
            _, connection = stack.pop()
            # One probe: the keep-alive ran out, or the server closed it meanwhile.
            if not connection.has_expired() and connection.is_idle():
                return connection, True
            await _close(connection)
        # Only when a new connection opens: the idle ones of every origin, counted.
        busy = self._max - self._slots.value  # this request included
        while busy + sum(map(len, self._idle.values())) > self._max:
            await self._close_oldest()
        return await self._open(key, origin), False

    async def _open(self, key: _Key, origin: httpcore2.Origin) -> httpcore2.AsyncHTTPConnection:
        return httpcore2.AsyncHTTPConnection(
            origin,
            ssl_context=await self._tls(key),
            keepalive_expiry=self._keepalive,
            network_backend=self._backend,
        )

    async def _tls(self, key: _Key) -> ssl.SSLContext | None:
        if key[0] != b"https":
            return None
        return self._ssl_context or await ashared_ssl_context()

    async def _give_back(self, key: _Key, connection: httpcore2.AsyncHTTPConnection) -> None:
        if self._closed or not connection.is_idle():  # e.g. the server said close
            await _close(connection)
            return
        now = anyio.current_time()
        self._idle.setdefault(key, []).append((now, connection))
        if now >= self._next_sweep:
            self._next_sweep = now + self._keepalive
            await self._sweep(now)

    async def _sweep(self, now: float) -> None:
        # Connections idle past the keep-alive, of every origin (one the dispatcher no
        # longer sends to included), so their sockets do not linger.
        for key, stack in list(self._idle.items()):
            while stack and now - stack[0][0] >= self._keepalive:
                _, connection = stack.pop(0)
                await _close(connection)
            if not stack:
                del self._idle[key]

    async def _close_oldest(self) -> None:
        oldest = min(
            (key for key, stack in self._idle.items() if stack),
            key=lambda key: self._idle[key][0][0],
        )
        _, connection = self._idle[oldest].pop(0)
        await _close(connection)

    async def aclose(self) -> None:
        """Close every idle connection; busy ones close when their response is read."""
        self._closed = True
        stacks, self._idle = self._idle, {}
        for stack in stacks.values():
            for _, connection in stack:
                await _close(connection)


class _CoalescingStream(httpcore2.AsyncNetworkStream):
    # Holds the first write after each read (a request's head) until the next write
    # (its body) or read (a request without one), and sends both at once when small.
    # (httpcore2's network interface takes timeouts as arguments: ASYNC109.)
    def __init__(self, inner: httpcore2.AsyncNetworkStream) -> None:
        self._inner = inner
        self._hold = True
        self._held: bytes | None = None

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        if not buffer:
            return
        if self._hold:
            self._hold = False
            self._held = buffer
            return
        held, self._held = self._held, None
        if held is not None:
            if len(held) + len(buffer) <= _COALESCED_MAX:
                buffer = held + buffer
            else:  # no full-size copy of a large body
                await self._inner.write(held, timeout)
        await self._inner.write(buffer, timeout)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        held, self._held = self._held, None
        if held is not None:
            await self._inner.write(held, timeout)
        self._hold = True
        data = await self._inner.read(max_bytes, timeout)
        if data:
            answered = _ANSWERED.get(None)
            if answered is not None:
                answered[0] = True
        return data

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> httpcore2.AsyncNetworkStream:
        return _CoalescingStream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _Lookup:
    """One name's address lookup, awaited by every connection that needs it meanwhile."""

    __slots__ = ("addresses", "done", "error")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.addresses: list[str] | None = None
        self.error: OSError | None = None


class _CoalescingBackend(httpcore2.AsyncNetworkBackend):
    # Connections to one name that open at the same time share one lookup. On asyncio a
    # lookup holds a thread of the loop's default executor (6 on 2 cores) until the name
    # server answers: a target whose name server hangs, with many deliveries due, held
    # them all and every other target's connections waited behind it. Now it holds one.
    def __init__(self) -> None:
        self._inner = httpcore2.AnyIOBackend()
        self._lookups: dict[tuple[str, int], _Lookup] = {}

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        address = host
        if ip_literal(host) is None:
            started = anyio.current_time()
            try:
                with anyio.fail_after(timeout):
                    found = await self._addresses(host, port)
            except TimeoutError as exc:
                raise httpcore2.ConnectTimeout(exc) from exc
            except OSError as exc:
                raise httpcore2.ConnectError(exc) from exc
            if timeout is not None:
                timeout = max(0.0, timeout - (anyio.current_time() - started))
            if len(found) == 1:
                address = found[0]  # else anyio tries each (Happy Eyeballs), looking up again
        stream = await self._inner.connect_tcp(
            address, port, timeout, local_address, socket_options
        )
        return _CoalescingStream(stream)

    async def _addresses(self, host: str, port: int) -> list[str]:
        key = (host, port)
        while (lookup := self._lookups.get(key)) is not None:
            await lookup.done.wait()
            if lookup.error is not None:
                raise type(lookup.error)(*lookup.error.args) from lookup.error
            if lookup.addresses is not None:
                return lookup.addresses
            # the task looking it up was cancelled: look it up anew
        lookup = self._lookups[key] = _Lookup()
        try:
            infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            lookup.addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
            return lookup.addresses
        except OSError as exc:
            lookup.error = exc
            raise
        finally:
            del self._lookups[key]
            lookup.done.set()

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


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
