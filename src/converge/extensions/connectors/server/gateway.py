"""WebhookGateway: the HTTP-facing facade (health, readiness, metrics, outbound relay)."""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from converge.errors import (
    ConfigurationError,
    IdempotencyConflictError,
    QueueFullError,
    StoreError,
    UsageError,
)
from converge.extensions.connectors.connector import WebhookConnector
from converge.extensions.connectors.models import OutboundWebhookAction

if TYPE_CHECKING:
    from converge.extensions.connectors.server.asgi import GatewayApp

__all__ = ["WebhookGateway"]

_MIN_TOKEN_LENGTH = 16


def _dump(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def _invalid(detail: str) -> tuple[int, bytes]:
    # The caller holds the outbound token: tell it what to fix (bounded, our own text).
    return 400, _dump({"status": "rejected", "reason": "invalid_action", "detail": detail[:300]})


class WebhookGateway:
    """HTTP-oriented facade around WebhookConnector.

    Serve it with :meth:`asgi_app` (mountable in any Starlette/FastAPI app) or with
    ``converge gateway --config FILE.toml``.

    Args:
        connector: The connector doing the work.
        outbound_token: Bearer token that ``POST /outbound`` requires (at least 16
            characters). Without one, ``/outbound`` is disabled: an unguarded relay
            would let anyone send requests from your network.
        require_dispatcher: Whether readiness needs the outbound dispatcher running;
            by default, when the connector has targets.
        ready_check_interval_sec: Seconds a store probe of :meth:`acheck_ready` is
            reused: ``GET /readyz`` needs no authentication, so it must not cost a store
            write per request.

    Raises:
        ConfigurationError: For a bad connector or token.
    """

    def __init__(
        self,
        connector: WebhookConnector,
        *,
        outbound_token: str | None = None,
        require_dispatcher: bool | None = None,
        ready_check_interval_sec: float = 1.0,
    ) -> None:
        if not isinstance(connector, WebhookConnector):
            raise ConfigurationError("WebhookGateway needs a WebhookConnector")
        if outbound_token is not None and (
            not isinstance(outbound_token, str) or len(outbound_token) < _MIN_TOKEN_LENGTH
        ):
            raise ConfigurationError(
                f"outbound_token must be a string of at least {_MIN_TOKEN_LENGTH} characters"
            )
        if require_dispatcher is not None and not isinstance(require_dispatcher, bool):
            raise ConfigurationError("require_dispatcher must be a bool or None")
        if (
            isinstance(ready_check_interval_sec, bool)
            or not isinstance(ready_check_interval_sec, int | float)
            or not 0 <= ready_check_interval_sec < 3600
        ):
            raise ConfigurationError("ready_check_interval_sec must be a number from 0 to 3600")
        self.connector = connector
        self._token = outbound_token.encode() if outbound_token else None
        self._require_dispatcher = (
            bool(connector.targets) if require_dispatcher is None else require_dispatcher
        )
        self._store_ok = True
        self._ready_interval = float(ready_check_interval_sec)
        self._ready_checked: float | None = None  # monotonic time of the last probe

    # -- health ----------------------------------------------------------------------

    def is_healthy(self) -> bool:
        """True while the connector is open (the process is alive and serving)."""
        return not self.connector.closed

    def is_ready(self) -> bool:
        """True when the store works and the dispatcher runs (if needed).

        The store works when it passed the last check, the dispatcher's last outbox
        write succeeded and so did the last write of an accepted event or action
        (:attr:`WebhookConnector.store_ok`): a small probe can still pass on a full disk.
        :meth:`acheck_ready` refreshes the check; the ASGI app calls it on each
        ``GET /readyz``.
        """
        if not self.is_healthy() or not self._store_works():
            return False
        return self.connector.dispatcher.running or not self._require_dispatcher

    def _store_works(self) -> bool:
        connector = self.connector
        return self._store_ok and connector.store_ok and connector.dispatcher.store_ok

    async def acheck_ready(self) -> bool:
        """Probe the store with a write and a read, then return :meth:`is_ready`.

        A probe younger than ``ready_check_interval_sec`` is reused (concurrent calls
        share one probe), so readiness checks cannot load the store.
        """
        now = time.monotonic()
        last = self._ready_checked
        if last is not None and now - last < self._ready_interval:
            return self.is_ready()
        self._ready_checked = now
        key = f"converge:webhook:{self.connector.connector_id}:ready"
        try:
            await self.connector.store.aput(key, 1, ttl=60)
            self._store_ok = await self.connector.store.aget(key) == 1
        except (StoreError, OSError):
            self._store_ok = False
        return self.is_ready()

    def health_payload(self) -> bytes:
        """JSON body of ``GET /healthz``."""
        return _dump({"status": "ok" if self.is_healthy() else "closed"})

    def ready_payload(self) -> bytes:
        """JSON body of ``GET /readyz``: overall status plus the store and dispatcher."""
        dispatcher = self.connector.dispatcher
        return _dump(
            {
                "status": "ready" if self.is_ready() else "not_ready",
                "store": self._store_works(),
                "dispatcher": dispatcher.running,
                "dispatcher_required": self._require_dispatcher,
            }
        )

    def metrics_payload(self) -> bytes:
        """Prometheus text exposition of the connector's metrics."""
        return self.connector.metrics.format_prometheus().encode()

    # -- inbound ---------------------------------------------------------------------

    async def handle_post(
        self,
        provider: str,
        *,
        headers: dict[str, str],
        body: bytes,
        remote_addr: str | None = None,
        client_cert_present: bool = False,
    ) -> tuple[int, dict[str, str], bytes]:
        """Handle ``POST /webhook/{provider}`` (see ``WebhookConnector.accept_inbound_http``)."""
        return await self.connector.accept_inbound_http(
            provider,
            method="POST",
            headers=headers,
            raw_body=body,
            remote_addr=remote_addr,
            client_cert_present=client_cert_present,
        )

    # -- outbound --------------------------------------------------------------------

    @property
    def outbound_enabled(self) -> bool:
        """True when an outbound token is configured."""
        return self._token is not None

    def authorize_outbound(self, authorization: str | None) -> tuple[int, bytes] | None:
        """Check an ``Authorization`` header for ``/outbound``; return a refusal or None.

        Returns:
            None if authorized; ``(403, body)`` when ``/outbound`` is disabled;
            ``(401, body)`` for a missing or wrong bearer token (compared in constant time).
        """
        if self._token is None:
            return 403, _dump({"status": "rejected", "reason": "outbound_disabled"})
        scheme, _, presented = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            presented.strip().encode("utf-8", "replace"), self._token
        ):
            return 401, _dump({"status": "rejected", "reason": "unauthorized"})
        return None

    async def handle_outbound_payload(self, payload: dict[str, Any]) -> tuple[int, bytes]:
        """Queue an outbound action described by a ``POST /outbound`` JSON body.

        The body is ``{"target": name, "body": {...}}`` plus optional ``url`` (the
        target's URL or a path below it), ``method``, ``headers``, ``idempotency_key``
        and ``deadline``. Only configured targets are reachable. Authorization is the
        caller's job (:meth:`authorize_outbound`).

        Returns:
            ``(202, {"status":"queued","id":...})`` (the original id when the same action
            was queued before under its key); 400 ``invalid_action`` (with a ``detail``
            saying what to fix) for a malformed action, e.g. ``headers`` that are not an
            object of RFC 9110 names and ASCII values, or 400 ``unknown_target``; 403 for
            a URL outside the target; 409 when the idempotency key names a different
            action; 503 if the store failed.
        """
        if not isinstance(payload, dict):
            return 400, _dump({"status": "rejected", "reason": "not_an_object"})
        name = payload.get("target")
        target = self.connector.targets.get(name) if isinstance(name, str) else None
        if target is None:
            return 400, _dump({"status": "rejected", "reason": "unknown_target"})
        fields = dict(payload)
        url = fields.setdefault("url", target.url)
        if not isinstance(url, str):
            return _invalid("url must be a string")
        if not target.allows(url):
            return 403, _dump({"status": "rejected", "reason": "url_not_allowed"})
        try:
            # Validates the whole body: fields, header names and values (RFC 9110),
            # a body with a UTF-8 form; what passes can be sent.
            action = OutboundWebhookAction.from_dict(fields)
        except UsageError as exc:
            return _invalid(str(exc))
        try:
            record = await self.connector.enqueue(action)
        except IdempotencyConflictError as exc:
            body = {"status": "rejected", "reason": "idempotency_conflict", "id": exc.existing_id}
            return 409, _dump(body)
        except StoreError:
            return 503, _dump({"status": "unavailable", "reason": "store_unavailable"})
        except QueueFullError:
            return 503, _dump({"status": "unavailable", "reason": "outbox_full"})
        except UsageError as exc:
            return _invalid(str(exc))
        return 202, _dump({"status": "queued", "id": record.id})

    # -- serving ---------------------------------------------------------------------

    def asgi_app(
        self,
        *,
        run_dispatcher: bool = True,
        poll_interval_sec: float = 0.1,
        client_cert_header: str | None = None,
        trusted_proxies: Sequence[str] = (),
        body_timeout_sec: float | None = 30.0,
    ) -> GatewayApp:
        """A pure ASGI app serving this gateway (see :class:`~.asgi.GatewayApp`)."""
        from converge.extensions.connectors.server.asgi import GatewayApp

        return GatewayApp(
            self,
            run_dispatcher=run_dispatcher,
            poll_interval_sec=poll_interval_sec,
            client_cert_header=client_cert_header,
            trusted_proxies=trusted_proxies,
            body_timeout_sec=body_timeout_sec,
        )
