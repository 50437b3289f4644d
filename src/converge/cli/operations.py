"""The operator's parts of ``converge gateway``: the admin API, the inspector page, and
the event log's count bound (a periodic trim while the gateway serves)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio

from converge.cli.config import GatewayConfig
from converge.extensions.connectors import GatewayApp
from converge.extensions.connectors.server import AdminApp, EventLog

__all__ = ["EventLogTrimmer", "with_operations"]

_Scope = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
_Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class EventLogTrimmer:
    """Wraps an ASGI app; during its lifespan, trims the event log now and then.

    Args:
        app: The wrapped app.
        event_log: The log to keep within its ``max_records``.
        interval_sec: Seconds between trims. Short, so that a busy gateway's trim has a
            few seconds of traffic to delete rather than minutes of it (a trim within the
            bound costs two key listings).
    """

    def __init__(self, app: Any, event_log: EventLog, *, interval_sec: float = 10.0) -> None:
        self.app = app
        self.event_log = event_log
        self.interval_sec = interval_sec

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        """The ASGI 3 entry point."""
        if scope.get("type") != "lifespan":
            await self.app(scope, receive, send)
            return
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.event_log.run_trimmer, self.interval_sec)
            try:
                await self.app(scope, receive, send)
            finally:
                tg.cancel_scope.cancel()


def with_operations(app: Any, core: GatewayApp, config: GatewayConfig) -> Any:
    """Add the admin API and inspector (if a token is set) and the event log trim.

    Args:
        app: The app to serve (``core``, possibly wrapped).
        core: The gateway's own app (its ``admin`` attribute is set here).
        config: The gateway configuration.

    Returns:
        The app to serve.
    """
    log = EventLog.for_connector(core.gateway.connector, max_records=config.event_log_max)
    if config.admin_token:
        core.admin = AdminApp(log, token=config.admin_token)
    if not log.sections:
        return app
    return EventLogTrimmer(app, log)
