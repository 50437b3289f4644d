"""``converge gateway``: serve the webhook gateway with uvicorn."""

from __future__ import annotations

import gc
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from converge.cli.config import GatewayConfig, build_gateway, masked_store, open_store
from converge.core.store import Store
from converge.durable import Record
from converge.errors import MissingDependencyError
from converge.extensions.connectors import GatewayApp, WebhookGateway
from converge.extensions.connectors.logs import EVENT_LOGGER as _EVENT_LOGGER
from converge.extensions.connectors.logs import log_payload

__all__ = ["EventLoggingApp", "StoreScope", "make_app", "serve", "summary"]

_log = logging.getLogger("converge.gateway")

_Scope = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
_Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class EventLoggingApp:
    """Wraps a :class:`GatewayApp` and logs each accepted event that has no route.

    A standalone gateway has no in-process consumer: an event of a provider without
    ``forward_to`` is recorded in the inbox already acknowledged (the event log is its
    consumer, see :func:`make_app`). The connector logs one INFO line per accepted event
    (no payload); this wrapper adds the payload, redacted, at DEBUG. Logging never holds
    an event back.

    Args:
        app: The gateway app.
    """

    def __init__(self, app: GatewayApp) -> None:
        self.app = app
        connector = app.gateway.connector
        self._routed = set(connector.inbound_routes)
        connector.add_inbound_listener(self._log)

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        """The ASGI 3 entry point."""
        await self.app(scope, receive, send)

    def _log(self, record: Record) -> None:
        # The INFO line (no payload) comes from the connector; the payload, redacted, only
        # at DEBUG (ops: issue 14.5).
        if record.key in self._routed or not logging.getLogger(_EVENT_LOGGER).isEnabledFor(
            logging.DEBUG
        ):
            return
        kind = "task" if record.data.get("emit") == "task" else "message"
        item = record.data.get("item")
        if kind == "message" and isinstance(item, dict):
            item = item.get("payload")
        log_payload("inbound", record.key, record.id, item)


class StoreScope:
    """Holds the gateway's store open for the whole ASGI lifespan.

    A Redis store keeps its connection pool in a task that lives as long as the
    ``async with`` around it; entered here, every request on the server's loop shares one
    pool instead of connecting per call. Other stores are released at shutdown.

    Args:
        app: The app to serve.
        store: The store to hold open.
    """

    def __init__(self, app: Any, store: Store) -> None:
        self.app = app
        self.store = store

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        """The ASGI 3 entry point."""
        if scope.get("type") != "lifespan":
            await self.app(scope, receive, send)
            return
        async with self.store:
            await self.app(scope, receive, send)


def summary(config: GatewayConfig) -> str:
    """A human-readable description of what the gateway will serve (no secrets)."""
    store = masked_store(config.store)
    lines = [f"converge gateway on http://{config.bind}:{config.port}  store={store}"]
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
    admin = "enabled (admin token)" if config.admin_token else "disabled (no admin token)"
    lines.append(f"  /admin/ inspector and API: {admin}")
    return "\n".join(lines)


def make_app(config: GatewayConfig, *, server_timeouts: bool = False) -> tuple[WebhookGateway, Any]:
    """Open the store and build the gateway and its (event-logging) ASGI app.

    Events of providers without ``forward_to`` have no consumer in a standalone
    gateway: they are recorded in the inbox already acknowledged (inspectable for the
    inbox retention), whether or not ``log_events`` also logs them, so the gateway
    accepts them as fast as the store writes.

    Args:
        config: The gateway configuration.
        server_timeouts: True when the server enforces ``body_timeout_sec`` itself
            (:func:`serve`'s protocol); the app then arms no timer per request.
    """
    store = open_store(config.store, config.base_dir, password=config.store_password)
    gateway = build_gateway(config, store)
    gateway.connector.acknowledge_on_accept = True
    app: Any = gateway.asgi_app(
        poll_interval_sec=config.poll_interval_sec,
        client_cert_header=config.client_cert_header,
        trusted_proxies=config.trusted_proxies,
        body_timeout_sec=None if server_timeouts else config.body_timeout_sec,
    )
    core = app
    if config.log_events:
        app = EventLoggingApp(app)
    from converge.cli.operations import with_operations  # admin API, inspector, log trim

    return gateway, StoreScope(with_operations(app, core, config), store)


# A young collection per 10,000 net new container objects rather than 700: requests free
# what they allocate by reference counting, so the default threshold mostly re-scans
# live in-flight objects, and each full collection (which walks every retained record of
# a MemoryStore) comes 14 times less often. Not higher: what survives a young collection
# is mostly retained records, and a middle collection walks ten young ones' survivors.
# With a MemoryStore gateway at 50,000 the young pauses reached 25 ms and the middle ones
# 250-320 ms; at 10,000 they stay under 6 ms and 53 ms, for less collector time per event.
# (Measured when the memory store kept records by reference; it now keeps them pickled,
# out of the collector's reach, see docs/gateway.md.)
# A middle collection per 2 young ones rather than 10: under steady load hardly anything
# survives (a memory gateway, from its start through 40,000 requests: 22 young and 2
# middle collections of at most 2.5 ms, at either setting), but an operation that builds
# many records at once (an admin listing of 20,000 dead letters) kept them through ten
# young collections, and a middle one then walked them all: 25-33 ms at 10, 8-15 ms at 2.
_GC_THRESHOLDS = (10_000, 2, 10)


def _raise_mmap_threshold() -> None:
    """Let the C allocator serve asyncio's 256 KiB receive buffers from its heap.

    asyncio reads each socket with ``recv(256 KiB)`` and shrinks the bytes to what
    arrived. Above glibc's mmap threshold (128 KiB until a larger mapped block is freed)
    each read costs an ``mmap``, an ``mremap`` and a ``munmap`` plus page faults: about
    40 µs of system time per request here. Freeing one 2 MiB block raises glibc's
    dynamic threshold above the buffer size once and for all; other allocators ignore it.
    """
    block = bytearray(2 << 20)
    del block


def serve(config: GatewayConfig) -> None:
    """Serve ``config`` with uvicorn until interrupted.

    Raises:
        MissingDependencyError: If uvicorn is not installed (the ``server`` extra).
    """
    try:
        import uvicorn
    except ImportError as exc:
        raise MissingDependencyError(
            'converge gateway needs uvicorn: pip install -e ".[server]" (from a converge checkout)'
        ) from exc
    from converge.cli._server import fit_open_files, guarded_protocol, install_repeat_filter

    _gateway, app = make_app(config, server_timeouts=True)
    print(summary(config), flush=True)
    install_repeat_filter()
    # Everything built so far (modules, classes, the gateway) lives as long as the
    # process: collect once, then move it out of the collector's generations, so that a
    # full collection under load walks only what requests created since.
    gc.collect()
    gc.freeze()
    gc.set_threshold(*_GC_THRESHOLDS)
    _raise_mmap_threshold()
    max_connections, backlog = fit_open_files(
        config.max_connections, config.backlog, reserve=config.max_in_flight
    )
    uvicorn.run(
        app,
        host=config.bind,
        port=config.port,
        lifespan="on",
        log_config=None,  # keep converge's handler (timestamps, text/json) for uvicorn's lines
        log_level=config.log_level,
        access_log=config.log_level == "debug",
        # Slow and idle clients (header and body timeouts, connection cap): see
        # converge.cli._server. The app reads X-Forwarded-For itself, from
        # trusted_proxies only.
        http=guarded_protocol(
            header_timeout_sec=config.header_timeout_sec,
            body_timeout_sec=config.body_timeout_sec,
            max_connections=max_connections,
            max_header_bytes=config.max_header_bytes,
        ),
        timeout_keep_alive=config.keep_alive_timeout_sec,
        backlog=backlog,
        h11_max_incomplete_event_size=config.max_header_bytes,
        proxy_headers=False,
    )
