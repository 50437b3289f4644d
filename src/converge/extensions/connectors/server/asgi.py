"""A pure ASGI app for WebhookGateway: ``(scope, receive, send)``, no framework."""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio

from converge._http import ip_literal
from converge._numbers import positive_float
from converge.errors import ClosedError, ConfigurationError, StoreError, WebhookSecurityError
from converge.extensions.connectors.inbound.security import (
    _REJECTION_HEADERS,
    identity_coded,
    parse_json_object,
)

if TYPE_CHECKING:
    from converge.extensions.connectors.server.gateway import WebhookGateway

__all__ = ["GatewayApp"]

_log = logging.getLogger("converge.connectors")

_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]

_PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
# Seconds between restarts of a dispatcher that crashed.
_RESTART_DELAY_SEC = 1.0
# Seconds a client is asked to wait after a 503 (store down, closing).
_RETRY_AFTER = "1"
# The header of an answer after which the server closes the connection.
_CLOSE = {"connection": "close"}
# X-Forwarded-For entries read at most (a proxy chain longer than this is abuse).
_MAX_FORWARDED = 16

_IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address(text: str) -> _IPAddress | None:
    return ip_literal(text.strip())


class _Disconnected(Exception):
    pass


class _BodyTimeout(Exception):
    pass


def _framed_twice(scope: _Scope) -> bool:
    """Whether a request carries both ``Transfer-Encoding`` and ``Content-Length``."""
    names = [name for name, _ in scope.get("headers", ())]
    return b"transfer-encoding" in names and b"content-length" in names


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


class GatewayApp:
    """Serves a :class:`~.gateway.WebhookGateway` over ASGI 3.

    Routes:

    * ``POST /webhook/{provider}``: inbound webhooks. The checks that need no body run
      first; the body is then read as a stream and reading stops past
      ``max_payload_bytes`` (413).
    * ``POST /outbound``: queue an outbound action; needs ``Authorization: Bearer
      <outbound_token>`` and only reaches configured targets.
    * ``GET /healthz``, ``GET /readyz`` (503 when the store or a required dispatcher is
      not working), ``GET /metrics`` (Prometheus text).

    Every answer is JSON (``/metrics`` aside), a refused WebSocket handshake's too. The
    ASGI lifespan runs the outbound dispatcher (restarted if it ever crashes) when
    ``run_dispatcher`` is true. Mounted inside another app, whose lifespan does not reach
    mounted apps, run ``connector.run_outbound_dispatcher()`` from that app's lifespan
    instead.

    Args:
        gateway: The gateway to serve.
        run_dispatcher: Run the outbound dispatcher during the ASGI lifespan.
        poll_interval_sec: The dispatcher's store rescan interval.
        client_cert_header: Name of a header set by a TLS-terminating proxy (e.g.
            nginx's ``$ssl_client_verify``): a client certificate counts as presented
            when its value is ``SUCCESS`` **and** the request came from one of
            ``trusted_proxies`` (needs at least one). Servers that report TLS client
            certificates through the ASGI ``tls`` extension need no header.
        trusted_proxies: Addresses or CIDR networks of the proxies in front of the app.
            Only requests whose peer is one of them may set ``client_cert_header`` and
            ``X-Forwarded-For`` (whose rightmost address that is not a trusted proxy is
            then the client address for the IP allowlist). Empty: both headers are
            ignored and the peer address is the client's.
        body_timeout_sec: Seconds a request body may take to arrive in full; a slower
            body is answered ``408`` and its connection closed (None: no limit).

    Raises:
        ConfigurationError: For invalid arguments.
    """

    def __init__(
        self,
        gateway: WebhookGateway,
        *,
        run_dispatcher: bool = True,
        poll_interval_sec: float = 0.1,
        client_cert_header: str | None = None,
        trusted_proxies: Sequence[str] = (),
        body_timeout_sec: float | None = 30.0,
    ) -> None:
        from converge.extensions.connectors.server.gateway import WebhookGateway

        if not isinstance(gateway, WebhookGateway):
            raise ConfigurationError("GatewayApp needs a WebhookGateway")
        if positive_float(poll_interval_sec) is None:
            raise ConfigurationError("poll_interval_sec must be a positive number")
        if client_cert_header is not None and (
            not isinstance(client_cert_header, str) or not client_cert_header
        ):
            raise ConfigurationError("client_cert_header must be a header name or None")
        if isinstance(trusted_proxies, str) or not isinstance(trusted_proxies, Sequence):
            raise ConfigurationError("trusted_proxies must be a sequence of addresses/networks")
        networks: list[_IPNetwork] = []
        for entry in trusted_proxies:
            try:
                networks.append(ipaddress.ip_network(str(entry).strip(), strict=False))
            except ValueError as exc:
                raise ConfigurationError(
                    f"trusted_proxies: {entry!r} is not an address or CIDR network"
                ) from exc
        if client_cert_header is not None and not networks:
            raise ConfigurationError(
                "client_cert_header is trusted only from trusted_proxies: name the proxy "
                "addresses (anyone else could send the header)"
            )
        if body_timeout_sec is not None and positive_float(body_timeout_sec) is None:
            raise ConfigurationError("body_timeout_sec must be a positive number or None")
        self.gateway = gateway
        self.run_dispatcher = bool(run_dispatcher)
        self.poll_interval_sec = float(poll_interval_sec)
        self.trusted_proxies: tuple[_IPNetwork, ...] = tuple(networks)
        self.body_timeout_sec = None if body_timeout_sec is None else float(body_timeout_sec)
        self._cert_header = client_cert_header.lower() if client_cert_header else None
        self._limit = gateway.connector.security.policy.max_payload_bytes
        #: The admin API + inspector (an ASGI app, see ``server.AdminApp``) served under
        #: ``/admin/``; None (the default) keeps those paths 404.
        self.admin: Callable[[_Scope, _Receive, _Send], Awaitable[None]] | None = None

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        """The ASGI 3 entry point."""
        kind = scope.get("type")
        if kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._refuse_websocket(scope, receive, send)

    async def _refuse_websocket(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        """No route takes a WebSocket: answer the handshake ``403`` with a JSON reason.

        The reason rides the ASGI denial-response extension (uvicorn, hypercorn); a server
        without it gets a close before accept, which it answers with its own bare 403.
        """
        if (await receive())["type"] != "websocket.connect":
            return
        if "websocket.http.response" not in (scope.get("extensions") or {}):
            await send({"type": "websocket.close", "code": 1008})
            return

        async def denial(message: _Message) -> None:
            message["type"] = f"websocket.{message['type']}"
            await send(message)

        # The server closes the connection after a denial: say so, so clients do not reuse it.
        await self._reject(denial, 403, "websocket_not_supported", _CLOSE)

    # -- lifespan --------------------------------------------------------------------

    async def _supervise(self) -> None:
        connector = self.gateway.connector
        while not connector.closed:
            try:
                await connector.run_outbound_dispatcher(poll_interval_sec=self.poll_interval_sec)
                return
            except Exception:
                _log.exception("the outbound dispatcher crashed; restarting")
                await anyio.sleep(_RESTART_DELAY_SEC)

    async def _lifespan(self, receive: _Receive, send: _Send) -> None:
        started = False
        try:
            message = await receive()
            if message["type"] != "lifespan.startup":
                return
            async with anyio.create_task_group() as tg:
                if self.run_dispatcher:
                    tg.start_soon(self._supervise)
                await self.gateway.acheck_ready()
                await send({"type": "lifespan.startup.complete"})
                started = True
                while (await receive())["type"] != "lifespan.shutdown":
                    pass
                self.gateway.connector.stop_dispatcher()
            await send({"type": "lifespan.shutdown.complete"})
        except Exception as exc:
            kind = "lifespan.shutdown.failed" if started else "lifespan.startup.failed"
            await send({"type": kind, "message": type(exc).__name__})
            raise

    # -- http ------------------------------------------------------------------------

    async def _http(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        started = False

        async def tracked_send(message: _Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self._route(scope, receive, tracked_send)
        except _Disconnected:
            return
        except _BodyTimeout:
            if not started:
                await self._reject(send, 408, "body_timeout", _CLOSE)
        except (ClosedError, StoreError) as exc:
            # A store that fails (or a connector shutting down) is a temporary condition
            # of this server, never the client's fault: 503 + Retry-After, never 500.
            reason = "closed" if isinstance(exc, ClosedError) else "store_unavailable"
            if isinstance(exc, StoreError):
                _log.warning("gateway request: store failed: %s", exc)
            if not started:
                await self._reply(
                    send,
                    503,
                    {"status": "unavailable", "reason": reason},
                    {"retry-after": _RETRY_AFTER},
                )
        except Exception:
            _log.exception("gateway request failed")
            if not started:
                await self._respond(
                    send,
                    500,
                    {"content-type": "application/json"},
                    _json({"status": "error", "reason": "internal_error"}),
                )

    async def _route(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if _framed_twice(scope):
            # RFC 9112 6.3: a request with both may be a smuggling attempt (a proxy that
            # reads the other length sees a second request in this one's body): refuse
            # it and close the connection, as Node's HTTP parser does.
            await self._reject(send, 400, "malformed_request", _CLOSE)
            return
        path: str = scope.get("path", "/")
        root = scope.get("root_path", "")
        if root and path.startswith(root) and path != root:
            path = path[len(root) :]
        method: str = scope.get("method", "GET")
        if path.startswith("/webhook/"):
            await self._webhook(path[len("/webhook/") :], method, scope, receive, send)
            return
        if path == "/outbound":
            await self._outbound(method, scope, receive, send)
            return
        if path in ("/healthz", "/readyz", "/metrics"):
            if method not in ("GET", "HEAD"):
                await self._reject(send, 405, "method_not_allowed", {"allow": "GET, HEAD"})
                return
            await self._probe(path, send, head=method == "HEAD")
            return
        if self.admin is not None and (path == "/admin" or path.startswith("/admin/")):
            await self.admin(scope, receive, send)  # ops: admin API + inspector (server/admin.py)
            return
        await self._reject(send, 404, "not_found")

    async def _probe(self, path: str, send: _Send, *, head: bool) -> None:
        gateway = self.gateway
        if path == "/healthz":
            status = 200 if gateway.is_healthy() else 503
            body, ctype = gateway.health_payload(), "application/json"
        elif path == "/readyz":
            status = 200 if await gateway.acheck_ready() else 503
            body, ctype = gateway.ready_payload(), "application/json"
        else:
            status, body, ctype = 200, gateway.metrics_payload(), _PROMETHEUS
        headers = {"content-type": ctype, "cache-control": "no-store"}
        await self._respond(send, status, headers, b"" if head else body, length=len(body))

    async def _webhook(
        self, provider: str, method: str, scope: _Scope, receive: _Receive, send: _Send
    ) -> None:
        connector = self.gateway.connector
        headers = self._headers(scope)
        remote, via_proxy = self._peer(scope, headers)
        cert = self._client_cert(scope, headers, via_proxy)
        checked = connector._precheck(provider, method, headers, remote, cert)
        if isinstance(checked, tuple):
            await self._respond(send, *checked)
            return
        body = await self._read_body(receive)
        status, out_headers, data = await connector._accept_checked(checked, headers, body)
        await self._respond(send, status, out_headers, data)

    async def _outbound(self, method: str, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if method != "POST":
            await self._reject(send, 405, "method_not_allowed")
            return
        headers = self._headers(scope)
        refusal = self.gateway.authorize_outbound(headers.get("authorization"))
        if refusal is not None:
            status, body = refusal
            extra = {"www-authenticate": "Bearer"} if status == 401 else {}
            await self._respond(send, status, {"content-type": "application/json", **extra}, body)
            return
        media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != "application/json":
            await self._reject(send, 415, "unsupported_media_type")
            return
        if not identity_coded(headers):
            await self._reject(send, 415, "unsupported_content_encoding")
            return
        body = await self._read_body(receive)
        if len(body) > self._limit:
            await self._reject(send, 413, "payload_too_large")
            return
        try:
            payload = parse_json_object(body, lone_surrogates="reject")
        except WebhookSecurityError as exc:
            await self._reject(send, exc.status, exc.reason)
            return
        status, data = await self.gateway.handle_outbound_payload(payload)
        out = {"content-type": "application/json"}
        if status == 503:
            out["retry-after"] = _RETRY_AFTER
        await self._respond(send, status, out, data)

    # -- plumbing --------------------------------------------------------------------

    @staticmethod
    def _headers(scope: _Scope) -> dict[str, str]:
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope.get("headers", ()):
            name = raw_name.decode("latin-1").lower()
            value = raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        return headers

    def _trusted(self, addr: _IPAddress | None) -> bool:
        return addr is not None and any(
            addr.version == net.version and addr in net for net in self.trusted_proxies
        )

    def _peer(self, scope: _Scope, headers: dict[str, str]) -> tuple[str | None, bool]:
        """The client address, and whether the request came through a trusted proxy."""
        client = scope.get("client")
        peer = client[0] if client else None
        if not self.trusted_proxies or not isinstance(peer, str):
            return peer, False
        if not self._trusted(_address(peer)):
            return peer, False
        forwarded = headers.get("x-forwarded-for")
        if forwarded:
            # Each proxy appends the address it saw: walk from the right past our own
            # proxies; the first other address is the client (left of it is unverified).
            entries = [e.strip() for e in forwarded.split(",")][-_MAX_FORWARDED:]
            for entry in reversed(entries):
                addr = _address(entry)
                if not self._trusted(addr):
                    return (str(addr) if addr is not None else entry), True
            return entries[0], True
        return peer, True

    def _client_cert(self, scope: _Scope, headers: dict[str, str], via_proxy: bool) -> bool:
        tls = (scope.get("extensions") or {}).get("tls") or {}
        if tls.get("client_cert_chain"):
            return True
        if self._cert_header is not None and via_proxy:
            return headers.get(self._cert_header, "").strip() == "SUCCESS"
        return False

    async def _read_body(self, receive: _Receive) -> bytes:
        """Read the body within the body timeout (else :class:`_BodyTimeout`)."""
        if self.body_timeout_sec is None:
            return await self._read_body_now(receive)
        with anyio.move_on_after(self.body_timeout_sec):
            return await self._read_body_now(receive)
        raise _BodyTimeout

    async def _read_body_now(self, receive: _Receive) -> bytes:
        """Read the body; stop once it is past the limit (the caller answers 413)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            if size > self._limit or not message.get("more_body", False):
                return b"".join(chunks)

    async def _reject(
        self, send: _Send, status: int, reason: str, headers: dict[str, str] | None = None
    ) -> None:
        """``{"status": "rejected", "reason": reason}``, with the headers the reason carries
        (``_REJECTION_HEADERS``: ``Allow``, ``Accept-Encoding``) unless given others."""
        if headers is None:
            headers = _REJECTION_HEADERS.get(reason)
        await self._reply(send, status, {"status": "rejected", "reason": reason}, headers)

    async def _reply(
        self, send: _Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        await self._respond(
            send, status, {"content-type": "application/json", **(headers or {})}, _json(body)
        )

    @staticmethod
    async def _respond(
        send: _Send,
        status: int,
        headers: dict[str, str],
        body: bytes,
        *,
        length: int | None = None,
    ) -> None:
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        raw.append((b"content-length", str(len(body) if length is None else length).encode()))
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})
