"""``converge gateway``: serve the webhook gateway with uvicorn."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio

from converge.cli.config import GatewayConfig, build_gateway, open_store
from converge.core.message import Message
from converge.core.task import Task
from converge.errors import MissingDependencyError
from converge.extensions.connectors import GatewayApp, WebhookGateway

__all__ = ["EventLoggingApp", "make_app", "serve", "summary"]

_log = logging.getLogger("converge.gateway")

_Scope = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
_Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class EventLoggingApp:
    """Wraps a :class:`GatewayApp`; its lifespan also logs accepted, unforwarded events.

    A standalone gateway has no in-process consumer: events of providers without
    ``forward_to`` are written to the ``converge.gateway`` log as JSON lines, so the
    queue never fills up.

    Args:
        app: The gateway app.
    """

    def __init__(self, app: GatewayApp) -> None:
        self.app = app

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        """The ASGI 3 entry point."""
        if scope.get("type") != "lifespan":
            await self.app(scope, receive, send)
            return
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._drain)
            try:
                await self.app(scope, receive, send)
            finally:
                tg.cancel_scope.cancel()

    async def _drain(self) -> None:
        async for item in self.app.gateway.connector.inbound_events:
            record = item.to_dict()
            kind = "task" if isinstance(item, Task) else "message"
            if isinstance(item, Message):
                record = record["payload"]
            _log.info("accepted %s %s", kind, json.dumps(record, separators=(",", ":")))


def summary(config: GatewayConfig) -> str:
    """A human-readable description of what the gateway will serve."""
    lines = [f"converge gateway on http://{config.bind}:{config.port}  store={config.store}"]
    for name, provider in config.providers.items():
        route = f" -> target {provider.forward_to}" if provider.forward_to else ""
        lines.append(
            f"  POST /webhook/{name}  scheme={provider.profile.scheme}"
            f"  secrets={len(provider.secrets)}{route}"
        )
    for name, target in config.targets.items():
        signed = "signed" if target.target.signing_secret else "unsigned"
        lines.append(f"  target {name}: {target.target.url} ({signed})")
    outbound = "enabled (bearer token)" if config.outbound_token else "disabled (no token)"
    lines.append(f"  POST /outbound: {outbound}")
    lines.append("  GET /healthz  GET /readyz  GET /metrics")
    return "\n".join(lines)


def make_app(config: GatewayConfig) -> tuple[WebhookGateway, Any]:
    """Open the store and build the gateway and its (event-logging) ASGI app."""
    store = open_store(config.store, config.base_dir)
    gateway = build_gateway(config, store)
    app: Any = gateway.asgi_app(
        poll_interval_sec=config.poll_interval_sec,
        client_cert_header=config.client_cert_header,
        trusted_proxies=config.trusted_proxies,
        body_timeout_sec=config.body_timeout_sec,
    )
    if config.log_events:
        app = EventLoggingApp(app)
    return gateway, app


def serve(config: GatewayConfig) -> None:
    """Serve ``config`` with uvicorn until interrupted.

    Raises:
        MissingDependencyError: If uvicorn is not installed (the ``server`` extra).
    """
    try:
        import uvicorn
    except ImportError as exc:
        raise MissingDependencyError(
            'converge gateway needs uvicorn: pip install "converge[server]"'
        ) from exc
    from converge.cli._server import fit_open_files, guarded_protocol, install_repeat_filter

    _gateway, app = make_app(config)
    print(summary(config), flush=True)
    install_repeat_filter()
    max_connections, backlog = fit_open_files(
        config.max_connections, config.backlog, reserve=config.max_in_flight
    )
    uvicorn.run(
        app,
        host=config.bind,
        port=config.port,
        lifespan="on",
        log_level=config.log_level,
        access_log=config.log_level == "debug",
        # Slow and idle clients: see converge.cli._server. The app reads X-Forwarded-For
        # itself, from trusted_proxies only.
        http=guarded_protocol(
            header_timeout_sec=config.header_timeout_sec, max_connections=max_connections
        ),
        timeout_keep_alive=config.keep_alive_timeout_sec,
        backlog=backlog,
        h11_max_incomplete_event_size=config.max_header_bytes,
        proxy_headers=False,
    )
