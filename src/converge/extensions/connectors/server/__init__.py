"""Serving the connectors: the ASGI app, the gateway facade and the operators' tools.

* :class:`~.gateway.WebhookGateway` and its ASGI app (:class:`~.asgi.GatewayApp`):
  the webhook routes, health, readiness, metrics and the outbound relay (both are
  importable from :mod:`converge.extensions.connectors`).
* :class:`EventLog`: inbound events and outbound deliveries (the connector's durable
  queues) as operators see them: list, show, replay, purge dead letters, a count bound.
* :class:`AdminApp`: the admin JSON API and the inspector page under ``/admin/``,
  behind a bearer token; ``GatewayApp`` serves it when its ``admin`` attribute is set.
"""

from __future__ import annotations

from converge.extensions.connectors.server.admin import ADMIN_PREFIX, AdminApp
from converge.extensions.connectors.server.eventlog import (
    SECTIONS,
    EventLog,
    RecordQueue,
    parse_since,
    record_view,
)

__all__ = [
    "ADMIN_PREFIX",
    "SECTIONS",
    "AdminApp",
    "EventLog",
    "RecordQueue",
    "parse_since",
    "record_view",
]
