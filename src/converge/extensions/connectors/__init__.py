"""Connectors extension: strict webhook ingress, durable egress, gateway and ASGI app.

* Inbound: :class:`WebhookConnector` verifies requests with :class:`WebhookSecurity`
  for :class:`ProviderProfile` schemes (generic HMAC, Standard Webhooks/Svix, Stripe,
  GitHub, Slack), deduplicates event ids, and hands events on as messages or tasks.
* Outbound: actions are persisted in an outbox and delivered by a dispatcher with
  retries (:class:`WebhookRetryPolicy`), a :class:`CircuitBreaker` per target, and
  dead letters.
* Serving: :class:`WebhookGateway` and its ASGI app (:class:`GatewayApp`), or
  ``converge gateway --config FILE.toml``.
"""

from __future__ import annotations

from converge.errors import (
    DeliveryError,
    DuplicateEventError,
    IdempotencyConflictError,
    WebhookSecurityError,
)
from converge.extensions.connectors.connector import INBOUND_TOPIC, OUTBOUND_TOPIC, WebhookConnector
from converge.extensions.connectors.inbound.schemes import sign_webhook
from converge.extensions.connectors.inbound.security import VerifiedWebhook, WebhookSecurity
from converge.extensions.connectors.models import (
    InboundWebhookEvent,
    OutboundTarget,
    OutboundWebhookAction,
    ProviderProfile,
    WebhookSecurityPolicy,
)
from converge.extensions.connectors.outbound.breaker import CircuitBreaker
from converge.extensions.connectors.outbound.outbox import DeadLetter, Outbox, OutboxRecord
from converge.extensions.connectors.outbound.retry import RetrySchedule, WebhookRetryPolicy
from converge.extensions.connectors.outbound.transport import (
    OutboundRequest,
    OutboundResponse,
    OutboundSender,
)
from converge.extensions.connectors.server.asgi import GatewayApp
from converge.extensions.connectors.server.gateway import WebhookGateway

__all__ = [
    "INBOUND_TOPIC",
    "OUTBOUND_TOPIC",
    "CircuitBreaker",
    "DeadLetter",
    "DeliveryError",
    "DuplicateEventError",
    "GatewayApp",
    "IdempotencyConflictError",
    "InboundWebhookEvent",
    "OutboundRequest",
    "OutboundResponse",
    "OutboundSender",
    "OutboundTarget",
    "OutboundWebhookAction",
    "Outbox",
    "OutboxRecord",
    "ProviderProfile",
    "RetrySchedule",
    "VerifiedWebhook",
    "WebhookConnector",
    "WebhookGateway",
    "WebhookRetryPolicy",
    "WebhookSecurity",
    "WebhookSecurityError",
    "WebhookSecurityPolicy",
    "sign_webhook",
]
