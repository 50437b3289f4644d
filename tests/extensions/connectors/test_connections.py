"""The outbound connection stack: reuse, limits, expiry, coalesced writes, TLS and
failures, over real sockets."""

from __future__ import annotations

import datetime
import re
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx2
import pytest
from anyio.streams.tls import TLSListener
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from outbound_helpers import action, dispatching, make

from converge.extensions.connectors import OutboundTarget, WebhookRetryPolicy
from converge.extensions.connectors.outbound.connections import (
    BODY_READ_MAX,
    BODY_READ_SEC,
    ConnectionStack,
    _CoalescingBackend,
)
from loop_stall import eventually, spy_on_tls_builds
from redis_server import free_port

pytestmark = pytest.mark.anyio

_LENGTH = re.compile(rb"(?im)^content-length:\s*(\d+)")


class RawServer:
    """HTTP/1.1 in the test's own loop: answers ``200 {}``, counts connections."""

    def __init__(self) -> None:
        self.url = ""
        self.connections = 0
        self.open = 0
        self.max_open = 0
        self.closed_by_client = 0
        self.request_lines: list[bytes] = []
        self.delay = 0.0
        self.say_close = False  # answer "connection: close", then close
        self.hang_up = False  # close right after answering, without saying so
        # Requests (by number, from 1) read and then left: the connection is closed
        # after ``vanish_with`` bytes of an answer (none: a keep-alive closed as it came).
        self.vanish: set[int] = set()
        self.vanish_with = b""

    async def handle(self, stream: anyio.abc.SocketStream) -> None:
        self.connections += 1
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        buffer = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    buffer += await stream.receive()
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                found = _LENGTH.search(head)
                length = int(found.group(1)) if found else 0
                while len(buffer) < length:
                    buffer += await stream.receive()
                buffer = buffer[length:]
                self.request_lines.append(head.split(b"\r\n", 1)[0])
                if len(self.request_lines) in self.vanish:
                    if self.vanish_with:
                        await stream.send(self.vanish_with)
                    return
                if self.delay:
                    await anyio.sleep(self.delay)
                close = b"connection: close\r\n" if self.say_close else b""
                await stream.send(b"HTTP/1.1 200 OK\r\n" + close + b"content-length: 2\r\n\r\n{}")
                if self.say_close or self.hang_up:
                    return
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            self.closed_by_client += 1
        finally:
            self.open -= 1
            await stream.aclose()


@asynccontextmanager
async def serving(
    handler: Callable[[Any], Awaitable[None]], tls: ssl.SSLContext | None = None
) -> AsyncIterator[int]:
    """``handler`` serving each connection on 127.0.0.1 (over TLS with ``tls``): its port."""
    tcp = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = tcp.extra(anyio.abc.SocketAttribute.local_port)
    listener = tcp if tls is None else TLSListener(tcp, tls, standard_compatible=False)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handler)
        try:
            yield port
        finally:
            tg.cancel_scope.cancel()


@asynccontextmanager
async def raw_servers(count: int = 1) -> AsyncIterator[list[RawServer]]:
    servers = [RawServer() for _ in range(count)]
    async with AsyncExitStack() as stack:
        for server in servers:
            port = await stack.enter_async_context(serving(server.handle))
            server.url = f"http://127.0.0.1:{port}"
        yield servers


async def post(client: httpx2.AsyncClient, url: str) -> int:
    response = await client.post(f"{url}/hook", content=b'{"n":1}')
    return response.status_code


def stack_client(**kw: float) -> httpx2.AsyncClient:
    transport = ConnectionStack(
        max_connections=int(kw.pop("max_connections", 8)), keepalive_expiry=kw.pop("keep", 5.0)
    )
    return httpx2.AsyncClient(transport=transport, timeout=5.0)


async def test_sequential_requests_share_one_connection() -> None:
    async with raw_servers() as (server,), stack_client() as client:
        assert [await post(client, server.url) for _ in range(20)] == [200] * 20
    assert server.connections == 1
    assert len(server.request_lines) == 20


async def test_concurrent_requests_never_hold_more_than_max_connections() -> None:
    async with raw_servers() as (server,), stack_client(max_connections=4) as client:
        server.delay = 0.02
        statuses: list[int] = []

        async def one() -> None:
            statuses.append(await post(client, server.url))

        async with anyio.create_task_group() as tg:
            for _ in range(24):
                tg.start_soon(one)
    assert statuses == [200] * 24
    assert server.max_open <= 4
    assert server.connections <= 4  # the four are reused, never replaced


async def test_a_connection_the_server_closed_is_never_reused() -> None:
    async with raw_servers() as (server,), stack_client() as client:
        server.say_close = True
        assert [await post(client, server.url) for _ in range(3)] == [200] * 3
        assert server.connections == 3
        # Closed without a word, after the answer: the probe before reuse sees it.
        server.say_close, server.hang_up = False, True
        for expected in (4, 5, 6):
            assert await post(client, server.url) == 200
            await eventually(lambda: server.open == 0)
            assert server.connections == expected

        async def chunks() -> AsyncIterator[bytes]:
            yield b"{}"

        # A streamed body cannot be sent twice, but none of it went out on the closed
        # connection (httpcore2 2.17 on finds the close only as it is about to send).
        response = await client.post(
            f"{server.url}/hook", content=chunks(), headers={"content-length": "2"}
        )
        assert response.status_code == 200
        assert server.connections == 7


async def test_a_kept_connection_closed_as_a_request_came_sends_it_again_on_a_new_one() -> None:
    # The server's keep-alive ran out as the request arrived: it was never answered, so
    # it goes once more on a new connection instead of failing the delivery.
    async with raw_servers() as (server,), stack_client() as client:
        server.vanish = {2, 4}
        assert [await post(client, server.url) for _ in range(3)] == [200] * 3
    assert len(server.request_lines) == 5
    assert server.connections == 3


@pytest.mark.parametrize(
    ("vanish", "vanish_with", "content"),
    [
        ({1}, b"", b"{}"),  # a new connection: the server failed, not a stale keep-alive
        ({2}, b"HTTP/1.1 2", b"{}"),  # an answer had begun: the request was read
        ({2}, b"", None),  # a streamed body cannot be sent again
    ],
    ids=["new-connection", "answer-begun", "streamed-body"],
)
async def test_a_failure_the_request_may_have_caused_is_not_sent_again(
    vanish: set[int], vanish_with: bytes, content: bytes | None
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"{}"

    async with raw_servers() as (server,), stack_client() as client:
        server.vanish, server.vanish_with = vanish, vanish_with
        for number in range(1, max(vanish) + 1):
            body = content if content is not None else chunks()
            request = client.post(
                f"{server.url}/hook", content=body, headers={"content-length": "2"}
            )
            if number in vanish:
                with pytest.raises(httpx2.TransportError):
                    await request
            else:
                assert (await request).status_code == 200
    assert len(server.request_lines) == max(vanish)


async def test_connections_idle_past_the_keepalive_are_closed() -> None:
    async with raw_servers(2) as (first, second), stack_client(keep=0.2) as client:
        assert await post(client, first.url) == 200
        await anyio.sleep(0.3)
        # Giving back the second origin's connection sweeps the first's, idle too long.
        assert await post(client, second.url) == 200
        await eventually(lambda: first.open == 0)
        assert (first.closed_by_client, second.open) == (1, 1)


async def test_a_new_origin_closes_the_oldest_idle_connection_at_the_limit() -> None:
    async with raw_servers(2) as (first, second), stack_client(max_connections=1) as client:
        assert await post(client, first.url) == 200
        assert await post(client, second.url) == 200
        await eventually(lambda: first.open == 0)
        assert (first.closed_by_client, second.open) == (1, 1)


async def test_a_cancelled_request_closes_its_connection_and_frees_its_slot() -> None:
    async with raw_servers() as (server,), stack_client(max_connections=1) as client:
        server.delay = 0.5
        with anyio.move_on_after(0.1):
            await post(client, server.url)
        server.delay = 0.0
        with anyio.fail_after(2):
            assert await post(client, server.url) == 200
        assert server.connections == 2
        await eventually(lambda: server.closed_by_client == 1)


async def test_errors_are_raised_as_httpx_errors() -> None:
    port = free_port()  # nothing listens on it
    async with stack_client() as client:
        with pytest.raises(httpx2.ConnectError):
            await post(client, f"http://127.0.0.1:{port}")


async def test_closing_the_client_closes_its_idle_connections() -> None:
    async with raw_servers() as (server,):
        client = stack_client()
        assert await post(client, server.url) == 200
        assert server.open == 1
        await client.aclose()
        await eventually(lambda: server.open == 0)
        assert server.closed_by_client == 1


async def test_a_request_head_and_small_body_leave_in_one_write() -> None:
    received: list[bytes] = []
    got_more = anyio.Event()

    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            while True:
                received.append(await stream.receive())
                got_more.set()

    head, body = b"POST /hook HTTP/1.1\r\nhost: x\r\ncontent-length: 7\r\n\r\n", b'{"n":1}'
    big = b"x" * 100_000
    async with serving(handle) as port:
        stream = await _CoalescingBackend().connect_tcp("127.0.0.1", port)
        await stream.write(head)
        await anyio.sleep(0.05)
        assert received == []  # the head waits for its body
        await stream.write(body)
        with anyio.fail_after(5):
            await got_more.wait()
        assert received == [head + body]  # one segment, read at once
        # A large body is not copied onto its head: both still arrive, in order.
        await stream.write(head)
        await stream.write(big)
        total = len(head + body + head + big)
        await eventually(lambda: sum(map(len, received)) == total)
        assert b"".join(received) == head + body + head + big
        await stream.aclose()


async def test_https_targets_are_reached_over_tls(tmp_path: Path) -> None:
    server = RawServer()
    async with tls_server(tmp_path, server.handle) as (url, cert):
        trusting = ssl.create_default_context(cafile=str(cert))
        transport = ConnectionStack(max_connections=2, ssl_context=trusting)
        async with httpx2.AsyncClient(transport=transport, timeout=5.0) as client:
            statuses = [await post(client, url) for _ in range(3)]
    assert statuses == [200] * 3
    assert server.connections == 1
    assert server.request_lines == [b"POST /hook HTTP/1.1"] * 3


async def test_the_shared_tls_context_is_built_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without a context of its own, the stack uses the process's shared one (the
    # system's trust store, which does not know the test's certificate), built in a
    # worker thread the first time: 20-130 ms that must not stall the loop.
    built_on = spy_on_tls_builds(monkeypatch)

    async def hang_up(stream: anyio.abc.ByteStream) -> None:
        await stream.aclose()

    async with tls_server(tmp_path, hang_up) as (url, _):
        transport = ConnectionStack(max_connections=2)
        async with httpx2.AsyncClient(transport=transport, timeout=5.0) as client:
            with pytest.raises(httpx2.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await post(client, url)
    assert len(built_on) == 1
    assert built_on[0] is not threading.current_thread()


async def test_a_failed_attempt_is_recorded_with_what_the_socket_or_tls_said(
    tmp_path: Path,
) -> None:
    # It used to be the class name alone, "ConnectError", for a refused port and a
    # certificate that fails alike.
    port = free_port()  # nothing listens on it

    async def hang_up(stream: anyio.abc.ByteStream) -> None:
        await stream.aclose()

    async with tls_server(tmp_path, hang_up) as (tls_url, _):
        urls = {"refused": f"http://127.0.0.1:{port}/hook", "tls": f"{tls_url}/hook"}
        c = make(
            retry_policy=WebhookRetryPolicy(max_attempts=1, request_timeout_sec=5.0),
            targets=[OutboundTarget(name, url) for name, url in urls.items()],
        )
        async with dispatching(c):
            for name, url in urls.items():
                await c.submit_outbound_action(action(target=name, url=url))
            await eventually(lambda: c.dispatcher.backlog == 0)
    reasons = {d.action.target: d.reason for d in await c.alist_dead_letters()}
    assert reasons["refused"].startswith("max attempts; last: ConnectError: ")
    assert "111" in reasons["refused"]
    assert "CERTIFICATE_VERIFY_FAILED" in reasons["tls"]


@asynccontextmanager
async def tls_server(
    directory: Path, handler: Callable[[Any], Awaitable[None]]
) -> AsyncIterator[tuple[str, Path]]:
    """``handler`` serving TLS on 127.0.0.1 with a self-signed certificate for
    ``localhost``: (its ``https://localhost:port`` URL, the certificate's PEM file)."""
    cert, key = self_signed_certificate(directory)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    async with serving(handler, context) as port:
        yield f"https://localhost:{port}", cert


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for ``localhost`` signed by its own key: (certificate, key) PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def send_through_proxy(monkeypatch: pytest.MonkeyPatch, proxy_url: str) -> None:
    """Set the environment's HTTP proxy for this test (and no exceptions to it)."""
    monkeypatch.setenv("HTTP_PROXY", proxy_url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)


async def test_deliveries_go_through_a_proxy_set_in_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    built_on = spy_on_tls_builds(monkeypatch)
    async with raw_servers() as (proxy,):
        send_through_proxy(monkeypatch, proxy.url)
        url = "http://hooks.example.invalid/hook"
        c = make(targets=[OutboundTarget("app", url)])
        async with dispatching(c):
            await c.submit_outbound_action(action(1, url=url))
            await eventually(lambda: c.dispatcher.backlog == 0)
        await c.aclose()
    assert proxy.request_lines == [b"POST http://hooks.example.invalid/hook HTTP/1.1"]
    # httpx2's client (for https targets) took the shared TLS context, built off the loop.
    assert len(built_on) == 1
    assert built_on[0] is not threading.current_thread()


class EndlessServer:
    """Answers every request ``200`` and a body that never ends (a megabyte at a time,
    until the client closes, or with ``trickle`` a byte every 50 ms); counts
    connections and the bytes it sent."""

    def __init__(self, *, trickle: bool = False) -> None:
        self.connections = 0
        self.sent = 0
        self.trickle = trickle

    async def handle(self, stream: anyio.abc.SocketStream) -> None:
        self.connections += 1
        chunk = b"x" if self.trickle else b"x" * (1 << 20)
        try:
            buffer = b""
            while b"\r\n\r\n" not in buffer:
                buffer += await stream.receive()
            await stream.send(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000000000\r\n\r\n")
            while True:
                await stream.send(chunk)
                self.sent += len(chunk)
                if self.trickle:
                    await anyio.sleep(0.05)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()


async def test_a_body_past_the_read_limit_is_cut_and_its_connection_closed() -> None:
    # Before, the whole body was read: a target answering with gigabytes filled the
    # gateway's memory (1.5 GB held for one answer of 1.5 GB) until the attempt timed out.
    server = EndlessServer()
    async with serving(server.handle) as port, stack_client() as client:
        with anyio.fail_after(5):
            first = await client.post(f"http://127.0.0.1:{port}/hook", content=b"{}")
            second = await client.post(f"http://127.0.0.1:{port}/hook", content=b"{}")
    assert (first.status_code, second.status_code) == (200, 200)
    assert len(first.content) == len(second.content) == BODY_READ_MAX
    assert server.connections == 2  # the first was closed, not kept
    assert server.sent < 64 << 20  # what the socket buffers held, not the body


async def test_a_body_slower_than_the_read_time_is_cut_and_its_connection_closed() -> None:
    server = EndlessServer(trickle=True)
    async with serving(server.handle) as port, stack_client() as client:
        with anyio.fail_after(5):  # the client's timeout: it would have run out first
            started = anyio.current_time()
            first = await client.post(f"http://127.0.0.1:{port}/hook", content=b"{}")
            took = anyio.current_time() - started
            second = await client.post(f"http://127.0.0.1:{port}/hook", content=b"{}")
    assert (first.status_code, second.status_code) == (200, 200)
    assert BODY_READ_SEC <= took < BODY_READ_SEC + 1.0
    assert 0 < len(first.content) < 100
    assert server.connections == 2


@pytest.mark.parametrize("trickle", [False, True])
@pytest.mark.parametrize("proxy", [False, True])
async def test_a_target_answering_an_endless_body_is_delivered_at_once(
    proxy: bool, trickle: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = EndlessServer(trickle=trickle)
    async with serving(server.handle) as port:
        url = f"http://127.0.0.1:{port}/hook"
        if proxy:  # httpx2's client, through the proxy, which answers itself
            send_through_proxy(monkeypatch, f"http://127.0.0.1:{port}")
            url = "http://hooks.example.invalid/hook"
        c = make(targets=[OutboundTarget("app", url)])
        async with dispatching(c):
            await c.submit_outbound_action(action(1, url=url))
            # An attempt reading the whole body would time out (after 5 s) and retry.
            await eventually(lambda: c.dispatcher.backlog == 0, within=4.0)
        (record,) = await c.outbox.alist_actions()
        await c.aclose()
    assert (record.status, record.attempts) == ("delivered", 1)
    assert server.sent < 64 << 20


class NameServer:
    """``socket.getaddrinfo`` for two made-up names: ``stalled.test`` answers nothing for
    ``stall`` seconds and then fails, as a name server that does not answer makes it;
    ``receiver.test`` is 127.0.0.1. The lookups run in the resolver's real threads."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, stall: float) -> None:
        self.stalled_lookups = 0
        self._stall = stall
        self._real = socket.getaddrinfo
        monkeypatch.setattr(socket, "getaddrinfo", self.getaddrinfo)

    def getaddrinfo(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        flags = args[3] if len(args) > 3 else kwargs.get("flags", 0)
        if flags & socket.AI_NUMERICHOST:  # trio's first try, on the loop: numbers only
            return self._real(host, port, *args, **kwargs)
        if host in ("stalled.test", b"stalled.test"):
            self.stalled_lookups += 1
            threading.Event().wait(self._stall)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        if host in ("receiver.test", b"receiver.test"):
            host = "127.0.0.1"
        return self._real(host, port, *args, **kwargs)


async def test_a_name_server_that_hangs_holds_up_no_other_target(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # On asyncio, lookups run on the loop's default executor (6 threads on 2 cores): 16
    # connections to a stalled name each held one, and other targets waited behind them.
    names = NameServer(monkeypatch, stall=1.5)
    failures: list[BaseException] = []

    async def stalled(client: httpx2.AsyncClient) -> None:
        try:
            await post(client, "http://stalled.test:9")
        except httpx2.ConnectError as exc:
            failures.append(exc)

    async with raw_servers() as (server,), stack_client(max_connections=64) as client:
        port = server.url.rsplit(":", 1)[1]
        async with anyio.create_task_group() as tg:
            for _ in range(16):
                tg.start_soon(stalled, client)
            await anyio.sleep(0.1)  # every stalled lookup has begun
            started = anyio.current_time()
            assert await post(client, f"http://receiver.test:{port}") == 200
            took = anyio.current_time() - started
    assert took < 1.0
    assert names.stalled_lookups == 1
    assert len(failures) == 16
    assert "Temporary failure in name resolution" in str(failures[0])
