"""WebhookConnector: strict inbound verification and durable outbound delivery."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Protocol

import anyio
import anyio.lowlevel
import anyio.to_thread

from converge._numbers import finite_float, positive_float
from converge.core.message import Message, Topic, now_ms
from converge.core.metrics import MetricsCollector
from converge.core.store import Store
from converge.core.task import Task
from converge.durable import Attempt, DurableQueue, Record
from converge.errors import (
    BusFullError,
    ClosedError,
    ConfigurationError,
    DuplicateRecordError,
    FormatError,
    IdempotencyConflictError,
    QueueFullError,
    StoreError,
    UsageError,
    WebhookSecurityError,
)
from converge.extensions.connectors.inbound.inbox import (
    INBOUND_TOPIC,
    Consumer,
    InboxHolds,
    event_uid,
    forward_key,
    item_data,
    item_of,
    message_of,
    record_event,
)
from converge.extensions.connectors.inbound.schemes import decode_secret
from converge.extensions.connectors.inbound.security import (
    _REJECTION_HEADERS,
    VerifiedWebhook,
    WebhookSecurity,
    _lower_headers,
)
from converge.extensions.connectors.logs import log_accepted, log_dead, log_rejected
from converge.extensions.connectors.models import (
    OutboundTarget,
    OutboundWebhookAction,
    ProviderProfile,
    WebhookSecurityPolicy,
    forwardable_headers,
)
from converge.extensions.connectors.outbound.breaker import CircuitBreaker
from converge.extensions.connectors.outbound.dispatcher import OutboundDispatcher
from converge.extensions.connectors.outbound.outbox import (
    DeadLetter,
    Outbox,
    OutboxRecord,
    action_id,
)
from converge.extensions.connectors.outbound.retry import RetrySchedule, WebhookRetryPolicy
from converge.extensions.connectors.outbound.transport import (
    OutboundSender,
    OutboundTransport,
)

__all__ = ["INBOUND_TOPIC", "OUTBOUND_TOPIC", "InboundBus", "WebhookConnector"]

_log = logging.getLogger("converge.connectors")

_INBOUND_TOPICS = (Topic(INBOUND_TOPIC),)
#: Topic whose messages a bus hands to the outbox (a sink, when the bus supports sinks).
OUTBOUND_TOPIC = "bridge.webhook.outbound"
_ID_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}\Z")
# Bodies larger than this are verified in a worker thread (about 0.1 ms of work inline).
_INLINE_VERIFY_BYTES = 64 * 1024
# Seconds a sender is asked to wait when the inbox is full or the store is down.
_RETRY_AFTER = "1"
# How often receive_inbound() looks in the store for records to take over (at most once
# per interval, however many events arrive meanwhile).
_RECEIVE_POLL_SEC = 0.5
# After storing an accepted event or action failed, :attr:`WebhookConnector.store_ok` is
# False until one is stored again, or for this long: a load balancer that took the
# gateway out of rotation sends nothing that could succeed, so it is let back in to try.
_STORE_FAILURE_HOLD_SEC = 30.0
# Records leased per pass of the inbox pump. A full batch means more are waiting (a
# backlog after a restart, a bulk replay): the next pass follows at once while this
# process holds fewer records than the bound (forwarded ones are let go at once; a
# slow receive_inbound or bus consumer keeps its own and so slows the pump down).
_PUMP_BATCH = 64
_PUMP_HOLDS = 4 * _PUMP_BATCH


class InboundBus(Protocol):
    """What the connector needs of a bus (:class:`converge.runtime.MessageBus` fits)."""

    def has_subscribers(self, message: Message) -> bool:
        """True if someone would receive ``message``."""

    async def publish(self, message: Message, *, wait: bool = True) -> int:
        """Deliver ``message``; with ``wait=False`` raise BusFullError rather than wait."""


class _BusAcks:
    """The connector's ack listener on a bus: settles or buries inbox records."""

    def __init__(self, connector: WebhookConnector) -> None:
        self._connector = connector

    async def on_settled(self, message: Message) -> None:
        """Every acking subscriber is done with ``message``: acknowledge its record."""
        await self._connector._settle(message.id)

    async def on_dead(self, message: Message, consumer: str, reason: str) -> None:
        """A subscriber gave ``message`` up: its record becomes an inbound dead letter."""
        await self._connector._bury(message.id, f"{consumer}: {reason}")


def _pump_interval(poll_interval_sec: object) -> float:
    seconds = finite_float(poll_interval_sec)
    return 0.5 if seconds is None else max(seconds, 0.5)


def _json_response(
    status: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    out = {"content-type": "application/json"}
    if headers:
        out.update(headers)
    return status, out, json.dumps(body, separators=(",", ":")).encode()


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _raw_forwards(formats: Mapping[str, str] | None, routes: Mapping[str, str]) -> frozenset[str]:
    """The providers forwarded raw; checks ``forward_formats``."""
    raw = set()
    for provider, kind in (formats or {}).items():
        if kind not in ("envelope", "raw"):
            raise ConfigurationError(f"forward_formats[{provider!r}] must be 'envelope' or 'raw'")
        if provider not in routes:
            raise ConfigurationError(f"forward_formats names {provider!r}, which has no route")
        if kind == "raw":
            raw.add(provider)
    return frozenset(raw)


class WebhookConnector:
    """Generic webhook bridge with strict inbound verification and reliable outbound dispatch.

    **Inbound**: :meth:`accept_inbound_http` verifies a request (see
    :class:`WebhookSecurity`), then writes its replay claims and its record in the
    durable inbox (:attr:`inbox`) in one atomic store update, before the ``202``. The
    record stays open until its consumer acknowledges it: the target named in
    ``inbound_routes`` (the durable forward into the outbox acknowledges it), else
    the attached bus (its subscribers' acknowledgements, see
    :meth:`attach_bus`), else whoever calls :meth:`receive_inbound` and
    :meth:`aack_inbound`. A consumer that dies, or a process restart, leaves the
    record to be handed out again after ``inbox_lease_sec``, with the same message
    id. When ``max_pending`` events are open, the sender is told 503 with
    ``Retry-After`` and nothing is stored. With ``acknowledge_on_accept``, events
    without a route are recorded already acknowledged (the record is the consumer:
    the standalone gateway's event log).

    **Outbound**: :meth:`submit_outbound_action` persists the action in the outbox
    before returning; :meth:`run_outbound_dispatcher` delivers it with global and
    per-target concurrency limits, capped exponential backoff, ``Retry-After``, a
    circuit breaker per target and dead letters. Every attempt carries the same
    ``Idempotency-Key``; targets with a signing secret get Standard Webhooks signatures.

    Args:
        provider_profiles: Inbound providers by name.
        secrets: Secret value(s) by ``secret_ref``; a sequence of values allows rotation.
        security_policy: Inbound limits; defaults to :class:`WebhookSecurityPolicy()`.
        retry_policy: Outbound retries; defaults to :class:`WebhookRetryPolicy()`.
        store: Idempotency claims, outbox and dead letters; a pickling ``MemoryStore``
            when None (records stay out of the garbage collector's way; nothing
            survives a restart: use ``SQLiteStore``/``FileStore`` for that).
        metrics_collector: Where counters and gauges go; a private one when None.
        connector_id: Names this connector in store keys and as message sender.
        outbound_sender: ``async (OutboundRequest) -> OutboundResponse | int`` replacing
            the HTTP send (test your code without a server; see :data:`OutboundSender`).
        targets: Configured outbound targets (a mapping by name or a sequence).
        inbound_routes: Provider name -> target name: forward accepted events there.
        bus: A message bus to publish accepted events on (see :meth:`attach_bus`).
        inbound_queue_size: Former name of ``max_pending`` (used when that is None).
        max_in_flight: Outbound attempts in flight at most, over all targets.
        breaker_failure_threshold: Consecutive failures that open a target's circuit.
        breaker_recovery_timeout_sec: Seconds an open circuit waits before a probe.
        dead_letter_ttl_sec: How long dead letters are kept.
        clock: Unix seconds; injectable for tests (the inbox then uses it for its
            leases instead of the store's clock).
        max_pending: Most accepted events waiting for their consumer (10,000 by
            default); beyond it senders get 503 with ``Retry-After``.
        inbox_lease_sec: How long a consumer has to acknowledge an event before it is
            handed out again (bus consumers in this process get it extended).
        inbox_retention_sec: How long acknowledged events stay in the inbox (the
            event log); the store sweeps them afterwards.
        acknowledge_on_accept: Record events without a route already acknowledged:
            no consumer is waited for (the event log is the consumer).
        forward_formats: Provider name -> ``"envelope"`` (the default: the event as
            converge's JSON envelope) or ``"raw"`` (the sender's exact body bytes and
            its own headers, plus converge's signature), for routed providers.

    Raises:
        ConfigurationError: For invalid configuration.
    """

    def __init__(
        self,
        *,
        provider_profiles: dict[str, ProviderProfile],
        secrets: Mapping[str, str | Sequence[str]],
        security_policy: WebhookSecurityPolicy | None = None,
        retry_policy: WebhookRetryPolicy | RetrySchedule | None = None,
        store: Store | None = None,
        metrics_collector: MetricsCollector | None = None,
        connector_id: str = "webhook-connector",
        outbound_sender: OutboundSender | None = None,
        targets: Mapping[str, OutboundTarget] | Sequence[OutboundTarget] | None = None,
        inbound_routes: Mapping[str, str] | None = None,
        bus: InboundBus | None = None,
        inbound_queue_size: int | None = None,
        max_in_flight: int = 64,
        breaker_failure_threshold: int = 5,
        breaker_recovery_timeout_sec: float = 30.0,
        dead_letter_ttl_sec: float = 7 * 24 * 3600.0,
        clock: Callable[[], float] = time.time,
        max_pending: int | None = None,
        inbox_lease_sec: float = 60.0,
        inbox_retention_sec: float = 7 * 24 * 3600.0,
        acknowledge_on_accept: bool = False,
        forward_formats: Mapping[str, str] | None = None,
    ) -> None:
        if not isinstance(connector_id, str) or not _ID_RE.fullmatch(connector_id):
            raise ConfigurationError("connector_id must be 1-64 letters, digits, '_', '.', '-'")
        if retry_policy is not None and not isinstance(
            retry_policy, WebhookRetryPolicy | RetrySchedule
        ):
            raise ConfigurationError("retry_policy must be a WebhookRetryPolicy or RetrySchedule")
        if metrics_collector is not None and not isinstance(metrics_collector, MetricsCollector):
            raise ConfigurationError("metrics_collector must be a MetricsCollector")
        if outbound_sender is not None and not callable(outbound_sender):
            raise ConfigurationError("outbound_sender must be an async callable")
        if max_pending is None:
            max_pending = 10_000 if inbound_queue_size is None else inbound_queue_size
        for name, value in (
            ("max_pending", max_pending),
            ("max_in_flight", max_in_flight),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name} must be an integer >= 1")
        for name, seconds in (
            ("dead_letter_ttl_sec", dead_letter_ttl_sec),
            ("inbox_lease_sec", inbox_lease_sec),
            ("inbox_retention_sec", inbox_retention_sec),
        ):
            if positive_float(seconds) is None:
                raise ConfigurationError(f"{name} must be a positive number")
        if not isinstance(acknowledge_on_accept, bool):
            raise ConfigurationError("acknowledge_on_accept must be a bool")
        if store is None:
            from converge.extensions.storage import MemoryStore

            store = MemoryStore(serializer="pickle")
        self.connector_id = connector_id
        self.store = store
        self.metrics = metrics_collector or MetricsCollector()
        self.retry_policy: WebhookRetryPolicy | RetrySchedule = retry_policy or WebhookRetryPolicy()
        self._clock = clock
        prefix = f"converge:webhook:{connector_id}"
        self.security = WebhookSecurity(
            security_policy if security_policy is not None else WebhookSecurityPolicy(),
            provider_profiles,
            secrets,
            store=store,
            clock=clock,
            key_prefix=prefix,
        )
        self.targets = self._targets(targets)
        self.transport = OutboundTransport(
            retry_policy=self.retry_policy,
            signing_keys={
                name: decode_secret("standard-webhooks", t.signing_secret)
                for name, t in self.targets.items()
                if t.signing_secret is not None
            },
            sender=outbound_sender,
            clock=clock,
            metrics=self.metrics,
            max_connections=max_in_flight,
        )
        self._routes = dict(inbound_routes or {})
        for provider, target in self._routes.items():
            if provider not in self.security.profiles:
                raise ConfigurationError(f"inbound_routes names unknown provider {provider!r}")
            if target not in self.targets:
                raise ConfigurationError(f"inbound_routes names unknown target {target!r}")
        self._raw_forward = _raw_forwards(forward_formats, self._routes)
        #: The durable inbox: every accepted event, open until its consumer is done.
        self.inbox = DurableQueue(
            store,
            prefix=f"{prefix}:inbox",
            kind="inbound",
            retention_sec=float(inbox_retention_sec),
            dead_retention_sec=float(dead_letter_ttl_sec),
            max_pending=max_pending,
            clock=None if clock is time.time else clock,
        )
        self._holds = InboxHolds(
            self.inbox,
            owner=f"{connector_id}:{os.getpid()}:{os.urandom(4).hex()}",
            lease_sec=float(inbox_lease_sec),
        )
        self.acknowledge_on_accept = acknowledge_on_accept
        self._listeners: list[Callable[[Record], None]] = []
        self._bus: InboundBus | None = None
        self._ack_listener = _BusAcks(self)
        self._pump_running = False
        if bus is not None:
            self.attach_bus(bus)
        self._breaker_threshold = breaker_failure_threshold
        self._breaker_timeout = breaker_recovery_timeout_sec
        CircuitBreaker(breaker_failure_threshold, breaker_recovery_timeout_sec)  # validates
        self._breakers: dict[str, CircuitBreaker] = {}
        self._max_in_flight = max_in_flight
        self.outbox = Outbox(
            store, prefix=prefix, clock=clock, dead_letter_ttl_sec=float(dead_letter_ttl_sec)
        )
        self.dispatcher = OutboundDispatcher(
            outbox=self.outbox,
            attempt=self.transport.attempt,
            retry_policy=self.retry_policy,
            breaker_for=self.breaker,
            metrics=self.metrics,
            clock=clock,
            max_in_flight=max_in_flight,
            target_limit=self._target_limit,
        )
        self._closed = False
        self._store_failed_at: float | None = None  # see store_ok

    # -- configuration helpers ---------------------------------------------------------

    @staticmethod
    def _targets(
        targets: Mapping[str, OutboundTarget] | Sequence[OutboundTarget] | None,
    ) -> dict[str, OutboundTarget]:
        if targets is None:
            return {}
        items = (
            list(targets.items())
            if isinstance(targets, Mapping)
            else [(getattr(t, "name", None), t) for t in targets]
        )
        out: dict[str, OutboundTarget] = {}
        for name, target in items:
            if not isinstance(target, OutboundTarget):
                raise ConfigurationError("targets must be OutboundTarget objects")
            if name != target.name or name in out:
                raise ConfigurationError(f"target {target.name!r} is misnamed or duplicated")
            out[target.name] = target
        return out

    def _target_limit(self, name: str) -> int:
        target = self.targets.get(name)
        return target.max_concurrency if target is not None else self._max_in_flight

    def breaker(self, target: str) -> CircuitBreaker:
        """The circuit breaker of ``target`` (created on first use)."""
        if not isinstance(target, str):
            raise UsageError(f"target must be a target name, not {type(target).__name__}")
        found = self._breakers.get(target)
        if found is None:
            found = self._breakers[target] = CircuitBreaker(
                self._breaker_threshold, self._breaker_timeout, clock=self._clock
            )
        return found

    @property
    def inbound_routes(self) -> Mapping[str, str]:
        """Provider name -> target name of the events forwarded to a target."""
        return dict(self._routes)

    def attach_bus(self, bus: InboundBus | None) -> None:
        """Publish accepted events on ``bus`` (None: back to :meth:`receive_inbound`).

        Publishing never waits: events are in the inbox already, so when a receiver's
        inbox is full the event waits in the store and is published again later (see
        :meth:`run_inbox`). A bus with acknowledgements (``add_ack_listener``, as
        :class:`converge.runtime.MessageBus` has) settles each inbox record when every
        acking subscriber acknowledged the message, and buries it as a dead letter when
        one gives it up; a bus without them settles it when ``publish`` delivered it.
        A bus with sinks (``add_sink``) also gets one on :data:`OUTBOUND_TOPIC` that
        hands each message to :meth:`submit_outbound_message`. Events are refused
        (503) while nobody subscribes to :data:`INBOUND_TOPIC`.
        """
        if bus is not None and not (
            callable(getattr(bus, "publish", None))
            and callable(getattr(bus, "has_subscribers", None))
        ):
            raise UsageError("bus must have publish() and has_subscribers()")
        old = self._bus
        if old is not None and callable(getattr(old, "remove_ack_listener", None)):
            old.remove_ack_listener(self._ack_listener)  # type: ignore[attr-defined]
        if old is not None and callable(getattr(old, "remove_sink", None)):
            old.remove_sink(self.submit_outbound_message)  # type: ignore[attr-defined]
        self._bus = bus
        if bus is None:
            return
        if callable(getattr(bus, "add_ack_listener", None)):
            bus.add_ack_listener(self._ack_listener)  # type: ignore[attr-defined]
        if callable(getattr(bus, "add_sink", None)):
            bus.add_sink(OUTBOUND_TOPIC, self.submit_outbound_message)  # type: ignore[attr-defined]

    def add_inbound_listener(self, listener: Callable[[Record], None]) -> None:
        """Call ``listener(record)`` for every accepted event, once it is stored.

        Listeners run on the request path: keep them quick (a log line, a counter).
        An exception in one is logged and does not affect the answer.
        """
        if not callable(listener):
            raise UsageError("an inbound listener must be callable")
        self._listeners.append(listener)

    # -- inbound ----------------------------------------------------------------------

    def rejection(
        self, provider: str, exc: WebhookSecurityError
    ) -> tuple[int, dict[str, str], bytes]:
        """The JSON response for a rejected request (and count it by reason)."""
        if not isinstance(provider, str) or not isinstance(exc, WebhookSecurityError):
            raise UsageError("rejection takes a provider name and a WebhookSecurityError")
        label = provider if provider in self.security.profiles else "_unknown"
        self.metrics.inc(
            "webhook_inbound_rejected_total",
            labels={"provider": label, "reason": exc.reason},
            help="Inbound requests rejected, by reason.",
        )
        log_rejected(label, exc.reason, status_code=exc.status)  # ops: rate-limited INFO line
        headers = _REJECTION_HEADERS.get(exc.reason)
        return _json_response(exc.status, {"status": "rejected", "reason": exc.reason}, headers)

    def precheck_inbound(
        self,
        provider: str,
        *,
        method: str,
        headers: Mapping[str, str],
        remote_addr: str | None = None,
        client_cert_present: bool = False,
    ) -> tuple[int, dict[str, str], bytes] | None:
        """Run the checks that need no body; return the rejection response, or None.

        Servers call this before reading the body, so strangers cost nothing.
        """
        try:
            self.security.check_request(
                provider,
                method=method,
                headers=headers,
                remote_addr=remote_addr,
                client_cert_present=client_cert_present,
            )
        except WebhookSecurityError as exc:
            return self.rejection(provider, exc)
        return None

    async def accept_inbound_http(
        self,
        provider: str,
        *,
        method: str,
        headers: dict[str, str],
        raw_body: bytes,
        remote_addr: str | None = None,
        client_cert_present: bool = False,
    ) -> tuple[int, dict[str, str], bytes]:
        """Verify, deduplicate and hand on one inbound webhook request.

        Args:
            provider: Provider name (from ``/webhook/{provider}``).
            method: HTTP method.
            headers: Request headers (any case).
            raw_body: The exact body bytes.
            remote_addr: Peer IP address (no port), for the allowlist.
            client_cert_present: Whether a verified client certificate was presented.

        Returns:
            ``(status, headers, body)``: 202 ``{"status":"accepted"}``; 200
            ``{"status":"duplicate"}``; 4xx ``{"status":"rejected","reason":...}``; 503
            with ``Retry-After`` when the consumer is full or the store is failing.
            The body is always JSON and never contains exception text.

        Raises:
            UsageError: If an argument has the wrong type (a programming error).
        """
        self._check_open()
        if not isinstance(raw_body, bytes | bytearray | memoryview):
            raise UsageError(f"raw_body must be bytes, not {type(raw_body).__name__}")
        lowered = _lower_headers(headers)
        checked = self._precheck(provider, method, lowered, remote_addr, client_cert_present)
        if isinstance(checked, tuple):
            return checked
        return await self._accept_checked(checked, lowered, bytes(raw_body))

    def _precheck(
        self,
        provider: str,
        method: str,
        lowered: dict[str, str],
        remote_addr: str | None,
        client_cert_present: bool,
    ) -> ProviderProfile | tuple[int, dict[str, str], bytes]:
        # For the ASGI app: lower-cased headers, the body not read yet.
        try:
            return self.security._check_request(
                provider, method, lowered, remote_addr, client_cert_present
            )
        except WebhookSecurityError as exc:
            return self.rejection(provider, exc)

    async def _accept_checked(
        self, profile: ProviderProfile, lowered: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        # For the ASGI app, after _precheck() passed: the body checks, claim, hand-on.
        self._check_open()
        started = time.perf_counter()
        try:
            if len(body) > _INLINE_VERIFY_BYTES:
                # Hashing and parsing a large body takes milliseconds: not on the loop.
                verified = await anyio.to_thread.run_sync(
                    self.security._verify_body, profile, lowered, body
                )
            else:
                verified = self.security._verify_body(profile, lowered, body)
        except WebhookSecurityError as exc:
            return self.rejection(profile.name, exc)
        answer = await self._admit(profile.name, verified)
        if answer[0] == 202:  # ops: one INFO line per accepted event, no payload
            elapsed = (time.perf_counter() - started) * 1000.0
            forward = self._routes.get(profile.name)
            log_accepted(profile.name, verified.event_id, latency_ms=elapsed, forwarded_to=forward)
        return answer

    async def _admit(
        self, provider: str, verified: VerifiedWebhook
    ) -> tuple[int, dict[str, str], bytes]:
        if verified.challenge is not None:
            return _json_response(200, {"challenge": verified.challenge})
        labels = {"provider": provider}
        consumer = self._consumer(provider)
        uid = event_uid(provider, verified.event_id)
        item: Message | Task | None = None
        if consumer == "bus" or verified.profile.emit_as == "task":
            item = self._item(verified, uid)
            data = item_data(item)
            bus = self._bus
            if consumer == "bus" and (
                bus is None or not bus.has_subscribers(message_of(item, self.connector_id))
            ):
                return self._unavailable(provider, "no_consumer", None)
        else:
            data = self._message_data(verified, uid)
        if provider in self._raw_forward:  # ops 14.6: keep the verified bytes to forward
            data["raw"] = {
                "body": base64.b64encode(verified.body).decode(),
                "headers": forwardable_headers(verified.headers),
            }
        claims, claim_ttl = self._claims(verified, uid)
        forwarded: OutboxRecord | None = None
        try:
            added = None
            if consumer == "forward":
                added = await self._add_forwarded(provider, uid, data, claims, claim_ttl)
            if added is not None:
                record, forwarded = added
            elif consumer == "record":
                record = await self.inbox.aadd(
                    data,
                    id=uid,
                    key=provider,
                    status="acknowledged",
                    claims=claims,
                    claim_ttl=claim_ttl,
                )
            else:
                record = await self.inbox.aadd(
                    data,
                    id=uid,
                    key=provider,
                    status="leased",
                    lease_owner=self._holds.owner,
                    lease_sec=self._holds.lease_sec,
                    claims=claims,
                    claim_ttl=claim_ttl,
                )
        except DuplicateRecordError:
            self.metrics.inc(
                "webhook_inbound_duplicates_total", labels=labels, help="Replays answered 200."
            )
            return _json_response(200, {"status": "duplicate", "event_id": verified.event_id})
        except QueueFullError as exc:
            return self._unavailable(provider, "inbox_full", exc)
        except StoreError as exc:
            self._store_failed_at = time.monotonic()
            return self._unavailable(provider, "store_unavailable", exc)
        # Stored: from here on the event is accepted whatever happens to its hand-off.
        self._store_failed_at = None
        self.metrics.inc("webhook_inbound_accepted_total", labels=labels, help="Events accepted.")
        for listener in self._listeners:
            try:
                listener(record)
            except Exception:
                _log.exception("inbound listener %r failed", listener)
        if forwarded is not None:
            self._submitted(forwarded)
        elif consumer != "record":
            await self._deliver(record, consumer, item)
        # The hot path: the event id is printable ASCII, so this is the JSON encoding.
        body = b'{"status":"accepted","event_id":' + json.dumps(verified.event_id).encode()
        return 202, {"content-type": "application/json"}, body + b"}"

    def _claims(self, verified: VerifiedWebhook, uid: str) -> tuple[dict[str, Any], float]:
        # WebhookSecurity says which keys make an event new (the event id, and the signed
        # bytes where the id is unsigned); they are written with the inbox record.
        security = self.security
        value = security.claim_record(verified, uid)
        return dict.fromkeys(security.claim_keys(verified), value), float(security.claim_ttl_sec)

    def _consumer(self, provider: str) -> Consumer:
        if provider in self._routes:
            return "forward"
        if self.acknowledge_on_accept:
            return "record"
        if self._bus is not None:
            return "bus"
        return "queue"

    def _unavailable(
        self, provider: str, reason: str, exc: BaseException | None
    ) -> tuple[int, dict[str, str], bytes]:
        if isinstance(exc, StoreError):
            _log.warning("inbound %s: store failed: %s", provider, exc)
        self.metrics.inc(
            "webhook_inbound_unavailable_total",
            labels={"provider": provider, "reason": reason},
            help="Inbound requests answered 503.",
        )
        return _json_response(
            503, {"status": "unavailable", "reason": reason}, {"retry-after": _RETRY_AFTER}
        )

    def _event(self, verified: VerifiedWebhook) -> dict[str, Any]:
        """``InboundWebhookEvent(...).to_dict()`` of a verified request, built directly:
        every field was checked by the verification already."""
        profile, payload, headers = verified.profile, verified.payload, verified.headers
        scheme = profile.canonical_scheme
        subject = _text(payload.get(profile.subject_field))
        if subject is None:
            if scheme == "github":
                subject = headers.get("x-github-event")
            elif scheme == "slack":
                inner = payload.get("event")
                subject = _text(inner.get("type")) if isinstance(inner, dict) else None
                # Events API: event.type; interactivity: type; slash commands: command
                subject = subject or _text(payload.get("type")) or _text(payload.get("command"))
            elif scheme in ("stripe", "standard-webhooks"):
                subject = _text(payload.get("type"))
        source = _text(payload.get(profile.source_field)) or profile.name
        trace_id = None
        parent = headers.get("traceparent", "").split("-")
        if len(parent) == 4 and len(parent[1]) == 32:
            trace_id = parent[1]
        return {
            "provider": profile.name,
            "source": source,
            "event_id": verified.event_id,
            "occurred_at": verified.timestamp,
            "subject": subject or "",
            "payload": payload,
            "headers": dict(headers),
            "trace_id": trace_id,
        }

    def _message_data(self, verified: VerifiedWebhook, uid: str) -> dict[str, Any]:
        # item_data(self._item(...)) of a message, built without the Message: freezing
        # the payload and thawing it back costs more than the rest of the record. The
        # parsed JSON and the lower-cased str headers are JSON values already.
        return {
            "emit": "message",
            "item": {
                "id": uid,
                "sender": self.connector_id,
                "recipient": None,
                "topics": [INBOUND_TOPIC],
                "payload": self._event(verified),
                "task_id": None,
                "timestamp": now_ms(),
                "signature": None,
            },
        }

    def _item(self, verified: VerifiedWebhook, uid: str) -> Message | Task:
        event = self._event(verified)
        if verified.profile.emit_as == "task":
            objective = f"handle {event['provider']} webhook {event['subject']}".strip()
            return Task(objective=objective, inputs=event, id=uid)
        return Message(sender=self.connector_id, topics=_INBOUND_TOPICS, payload=event, id=uid)

    async def _deliver(
        self, record: Record, consumer: Consumer, item: Message | Task | None = None
    ) -> None:
        """Hand a record this process leased to its consumer; never raises StoreError.

        Whatever fails leaves the record open: the lease runs out and it is handed on
        again (by :meth:`run_inbox` or :meth:`receive_inbound`).
        """
        holds = self._holds
        holds.hold(record, consumer)
        try:
            if consumer == "record":
                await self._settle(record.id)
            elif consumer == "forward":
                await self._forward(record)  # reads the event in place: no item built
            elif consumer == "queue":
                holds.ready(record, item if item is not None else item_of(record))
            else:
                await self._publish(record, item if item is not None else item_of(record))
        except (FormatError, UsageError, IdempotencyConflictError) as exc:
            # It can never be handed on (e.g. the route's target changed its URL).
            try:
                await self._bury(record.id, f"undeliverable: {exc}")
            except StoreError as store_exc:
                _log.warning("inbound event %s stays in the inbox: %s", record.id, store_exc)
        except StoreError as exc:
            _log.warning("inbound event %s stays in the inbox: %s", record.id, exc)
        except Exception:
            # Accepted and stored: whatever failed, it is handed on again after the lease.
            _log.exception("inbound event %s: hand-off failed; it stays in the inbox", record.id)

    async def _forward(self, record: Record) -> None:
        await self.enqueue(self._forward_action(record), namespace="inbound")
        await self._settle(record.id)

    def _forward_action(self, record: Record) -> OutboundWebhookAction:
        """The outbox action forwarding the event ``record`` holds to its route."""
        target = self.targets[self._routes[record.key]]
        raw = record.data.get("raw")
        if isinstance(raw, dict):  # forward_format = "raw": the sender's bytes and headers
            action = OutboundWebhookAction(
                target=target.name,
                method="POST",
                url=target.url,
                body=record_event(record),
                headers=forwardable_headers(raw.get("headers") or {}),
                idempotency_key=forward_key(record.id, record.replays),
                raw_body=raw.get("body"),
            )
        else:
            action = OutboundWebhookAction(
                target=target.name,
                method="POST",
                url=target.url,
                body=record_event(record),
                idempotency_key=forward_key(record.id, record.replays),
            )
        return action

    async def _add_forwarded(
        self,
        provider: str,
        uid: str,
        data: dict[str, Any],
        claims: dict[str, Any],
        claim_ttl: float,
    ) -> tuple[Record, OutboxRecord] | None:
        """Record a new event already acknowledged, with its forward, in one update.

        The outbox record is the one :meth:`_forward` adds and the inbox record what
        acknowledging the forwarded event leaves, so the ``202`` waits for one commit
        instead of three (add, forward, acknowledge). No inbox lease is written, and the
        forward is added leased to the local dispatcher, so its first attempt writes no
        lease either. None (nothing written) when the outbox holds that forward already
        or is full: the caller then takes the general path.

        Raises:
            DuplicateRecordError: A claim key or the record exists (a replay).
            StoreError: The store failed (nothing was written).
        """
        inbox, outbox = self.inbox, self.outbox.queue
        done = inbox.transitions.done_status
        record = await inbox.anew_record(data, id=uid, key=provider, status=done)
        # Leased at once to this process's running dispatcher: its attempt then writes
        # no lease of its own (None: added pending, for whichever dispatcher comes).
        out = await self.outbox.anew_record(
            self._forward_action(record), namespace="inbound", lease=self.dispatcher.lease_at_add()
        )
        keys = [*inbox.transitions.add_keys(record, claims), *outbox.transitions.add_keys(out, {})]

        def add(current: dict[str, Any]) -> tuple[dict[str, Any], str]:
            changes, outcome = inbox.transitions.add(current, record, claims, claim_ttl)
            if outcome != "added":
                return {}, outcome
            forward, added = outbox.transitions.add(current, out, {}, None)
            if added != "added":
                return {}, "general"
            # The forward first: a store that writes key by key (FileStore) and crashes
            # midway leaves an action to deliver, never an acknowledged event without it.
            return {**forward, **changes}, "added"

        outcome = await self.store.aupdate(keys, add)
        if outcome == "duplicate":
            raise DuplicateRecordError(f"inbound event {uid!r} or one of its claims exists")
        if outcome != "added":
            return None
        inbox.note_finished(record)
        return record, OutboxRecord.of(out)

    async def _publish(self, record: Record, item: Message | Task) -> None:
        bus = self._bus
        if bus is None:  # detached meanwhile: to receive_inbound
            self._holds.hold(record, "queue")
            self._holds.ready(record, item)
            return
        message = message_of(item, self.connector_id)
        try:
            delivered = await bus.publish(message, wait=False)
        except BusFullError:
            delivered = 0
        if not delivered:
            # Nobody could take it now: due again in a moment, published by run_inbox().
            token = self._holds.drop(record.id)
            if token is not None:
                now = await self.inbox.anow()
                await self.inbox.arelease(record.id, token, due=now + 1.0)
            return
        self.metrics.inc(
            "webhook_inbound_published_total",
            labels={"provider": record.key},
            help="Inbound events published on the bus.",
        )
        if not callable(getattr(bus, "add_ack_listener", None)):
            await self._settle(record.id)  # a bus without acknowledgements: hand-off is all

    async def _settle(self, record_id: str) -> bool:
        token = self._holds.drop(record_id)
        if token is None:
            return False
        return await self.inbox.aack(record_id, token) is not None

    async def _bury(self, record_id: str, reason: str) -> bool:
        token = self._holds.drop(record_id)
        if token is None:
            return False
        buried = await self.inbox.abury(record_id, token, reason)
        if buried is not None:  # ops: the WARNING line of an inbound dead letter
            log_dead(buried.key, record_id, reason=reason, kind="inbound")
        return buried is not None

    async def areceive_inbound(self) -> Message | Task:
        """Like :meth:`receive_inbound` (the ``a``-prefixed name)."""
        return await self.receive_inbound()

    async def receive_inbound(self) -> Message | Task:
        """Wait for the next accepted event (used when no bus is attached).

        The event stays in the inbox, leased to this process, until
        :meth:`aack_inbound`; if that does not happen within ``inbox_lease_sec`` (the
        consumer crashed, the process restarted), it is handed out again, with the same
        id. Events accepted by another process sharing the store, or left by a
        previous one, are taken over here too.

        Returns:
            A :class:`~converge.core.message.Message` on :data:`INBOUND_TOPIC` whose
            payload is :meth:`InboundWebhookEvent.to_dict`, or a
            :class:`~converge.core.task.Task` with that dict as ``inputs`` for profiles
            with ``emit_as="task"``.

        Raises:
            ClosedError: If the connector is (or gets) closed.
            StoreError: If the store failed.
        """
        holds = self._holds
        while True:
            self._check_open()
            ready = holds.take()
            if ready is not None:
                record, item = ready
                if holds.token(record.id) != record.lease_token:
                    continue  # taken over meanwhile
                now = await self.inbox.anow()
                if (record.lease_until or 0.0) - now < holds.lease_sec / 2:
                    # Waited in the ready queue: give the consumer a whole lease.
                    renewed = await self.inbox.aextend(
                        record.id, record.lease_token, lease_sec=holds.lease_sec
                    )
                    if renewed is None:
                        holds.drop(record.id)
                        continue
                    holds.hold(renewed, "queue")
                    record = renewed
                if item is not None:
                    return item
                try:
                    return item_of(record)
                except FormatError as exc:
                    await self._bury(record.id, f"unreadable: {exc}")
                    continue
            started = holds.poll_start()
            if started is not None:
                found = await self._take_over()
                holds.polled(started, found, _RECEIVE_POLL_SEC)
                if found:
                    continue
            await holds.wait(holds.until_poll())

    async def _take_over(self) -> int:
        """Lease open records nobody holds (left by a dead consumer or process)."""
        now = await self.inbox.anow()
        self._holds.expired(now)
        records = await self.inbox.alease(
            self._holds.owner,
            lease_sec=self._holds.lease_sec,
            limit=_PUMP_BATCH,
            exclude=self._holds.live(now),
        )
        for record in records:
            if record.key not in self.security.profiles:
                await self.inbox.abury(record.id, record.lease_token, "unknown provider")
                log_dead(record.key, record.id, reason="unknown provider", kind="inbound")
                continue
            await self._deliver(record, self._consumer(record.key))
        if records:
            self.metrics.inc(
                "webhook_inbound_redelivered_total",
                value=len(records),
                help="Inbox records handed out again after their lease ran out.",
            )
        return len(records)

    async def aack_inbound(self, item: Message | Task) -> bool:
        """Acknowledge an event from :meth:`receive_inbound`: it is done for good.

        Returns:
            True if acknowledged; False if this process no longer holds it (its lease
            ran out and it was handed out again, or it was acknowledged already).
        """
        if not isinstance(item, Message | Task):
            raise UsageError("aack_inbound takes the Message or Task receive_inbound returned")
        return await self._settle(item.id)

    async def arelease_inbound(
        self, item: Message | Task, *, delay_sec: float = 0.0, error: str | None = None
    ) -> bool:
        """Give an event from :meth:`receive_inbound` back, to be received again later.

        Args:
            item: The event.
            delay_sec: Seconds before it is handed out again.
            error: Why (kept in the record's attempts); None counts no attempt.

        Returns:
            True if released; False if this process no longer holds it.
        """
        if not isinstance(item, Message | Task):
            raise UsageError("arelease_inbound takes the Message or Task receive_inbound returned")
        delay = finite_float(delay_sec)
        if delay is None or delay < 0:
            raise UsageError("delay_sec must be a number >= 0")
        token = self._holds.drop(item.id)
        if token is None:
            return False
        now = await self.inbox.anow()
        attempt = None if error is None else Attempt(at=now, error=error, outcome="released")
        released = await self.inbox.aretry(item.id, token, now + delay, attempt) is not None
        if released:
            self._holds.poll_within(delay)
        return released

    @property
    def inbound_events(self) -> AsyncIterator[Message | Task]:
        """``async for item in connector.inbound_events``: :meth:`receive_inbound` in a loop.

        Ends when the connector is closed. Acknowledge each item with :meth:`aack_inbound`.
        """
        return self._iterate_inbound()

    async def _iterate_inbound(self) -> AsyncIterator[Message | Task]:
        while True:
            try:
                item = await self.receive_inbound()
            except ClosedError:
                return
            yield item

    async def run_inbox(self, *, poll_interval_sec: float = 1.0) -> None:
        """Hand on inbox records left unacknowledged, until the connector is closed.

        Every ``poll_interval_sec``: extends the leases of events bus consumers in this
        process still work on, and leases the open events nobody holds (their
        consumer died, the process restarted, or a bus was full) and hands them on
        again: forwards them, publishes them, or queues them for
        :meth:`receive_inbound`. :meth:`run_outbound_dispatcher` runs this too.

        Raises:
            UsageError: If the interval is not a positive number.
        """
        if positive_float(poll_interval_sec) is None:
            raise UsageError("poll_interval_sec must be a positive number")
        self._pump_running = True
        try:
            try:
                await self.inbox.aupgrade_counts()
            except StoreError as exc:
                _log.warning("inbox pump: store failed: %s", exc)
            while not self._closed:
                taken = 0
                try:
                    await self._renew()
                    taken = await self._take_over()
                except StoreError as exc:
                    _log.warning("inbox pump: store failed: %s", exc)
                if taken == _PUMP_BATCH and len(self._holds) < _PUMP_HOLDS:
                    await anyio.lowlevel.checkpoint()
                else:
                    await anyio.sleep(poll_interval_sec)
        finally:
            self._pump_running = False

    async def _renew(self) -> None:
        now = await self.inbox.anow()
        for record_id, token in self._holds.renewable(now):
            record = await self.inbox.aextend(record_id, token, lease_sec=self._holds.lease_sec)
            if record is None:
                self._holds.drop(record_id)
            else:
                self._holds.renewed(record)

    # -- outbound ---------------------------------------------------------------------

    async def submit_outbound_action(self, action: OutboundWebhookAction) -> None:
        """Persist ``action`` in the outbox; it is delivered by the dispatcher.

        When this returns, the action is in the store and survives a restart (given a
        durable store). Submitting an action whose ``idempotency_key`` matches a pending
        one is a no-op.

        Raises:
            UsageError: If ``action`` is not an :class:`OutboundWebhookAction`.
            StoreError: If the store failed (the action was not accepted).
        """
        await self.enqueue(action)

    async def enqueue(
        self, action: OutboundWebhookAction, *, namespace: str = "api"
    ) -> OutboxRecord:
        """Like :meth:`submit_outbound_action`, returning the persisted outbox record.

        Idempotency keys are unique per ``namespace`` (``"api"``, ``"agent"``,
        ``"inbound"``; see :meth:`Outbox.aadd`): the same action again returns the
        original record, a different action under a kept key raises
        :class:`~converge.errors.IdempotencyConflictError`.
        """
        self._check_open()
        if not isinstance(action, OutboundWebhookAction):
            raise UsageError("submit_outbound_action takes an OutboundWebhookAction")
        lease = self.dispatcher.lease_at_add()  # its attempt then writes no lease
        try:
            record = await self.outbox.aadd(action, namespace=namespace, lease=lease)
        except StoreError:
            self._store_failed_at = time.monotonic()
            raise
        self._store_failed_at = None
        self._submitted(record)
        return record

    def _submitted(self, record: OutboxRecord) -> None:
        self.metrics.inc(
            "webhook_outbound_submitted_total",
            labels={"target": record.action.target},
            help="Outbound actions accepted into the outbox.",
        )
        self.dispatcher.notify(record)

    def action_from_message(self, message: Message) -> OutboundWebhookAction:
        """The action :meth:`submit_outbound_message` makes of ``message``.

        The target is ``payload["target"]`` or else ``message.recipient`` and must be a
        configured target; the body is ``payload["body"]`` (a JSON object) or else the
        whole message (:meth:`~converge.core.message.Message.to_dict`); the idempotency
        key is the message id.

        Raises:
            UsageError: If the message names no configured target or the body is bad.
        """
        if not isinstance(message, Message):
            raise UsageError("expected a converge Message")
        payload = message.to_dict()["payload"]
        name = payload.get("target", message.recipient)
        target = self.targets.get(name) if isinstance(name, str) else None
        if target is None:
            raise UsageError(
                "the message must name a configured target in payload['target'] or recipient"
            )
        body = payload["body"] if "body" in payload else message.to_dict()
        if not isinstance(body, dict):
            raise UsageError("payload['body'] must be a JSON object")
        return OutboundWebhookAction(
            target=target.name,
            method="POST",
            url=target.url,
            body=body,
            idempotency_key=message.id,
        )

    async def submit_outbound_message(self, message: Message) -> None:
        """Persist the outbound action for ``message`` (see :meth:`action_from_message`).

        Raises:
            UsageError: If the message does not describe a deliverable action.
            StoreError: If the store failed.
        """
        await self.enqueue(self.action_from_message(message), namespace="agent")

    async def dispatch_outbound_action(self, action: OutboundWebhookAction) -> bool:
        """Make one delivery attempt of ``action`` now, bypassing the outbox.

        No retry, no persistence: use :meth:`submit_outbound_action` for reliable
        delivery. The request is built exactly as the dispatcher builds it.

        Returns:
            True if the target answered 2xx.

        Raises:
            UsageError: If ``action`` is not an :class:`OutboundWebhookAction`.
        """
        self._check_open()
        if not isinstance(action, OutboundWebhookAction):
            raise UsageError("dispatch_outbound_action takes an OutboundWebhookAction")
        now = self._clock()
        record = OutboxRecord(id=action_id(action), action=action, due=now, created=now)
        result = await self.transport.attempt(record)
        return result.verdict == "delivered"

    async def run_outbound_dispatcher(self, *, poll_interval_sec: float = 0.1) -> None:
        """Deliver pending actions until :meth:`stop_dispatcher` (or cancellation).

        Loads every pending action from the store first, so a restarted connector
        resumes where the last one stopped. Actions submitted in this process are
        scheduled at once; the store is rescanned every ``poll_interval_sec`` for
        actions submitted by other processes sharing it. Unless :meth:`run_inbox`
        runs already, it runs alongside (every ``poll_interval_sec``, at least 0.5 s),
        so inbound events left unacknowledged are handed on again.

        Raises:
            UsageError: If the dispatcher is already running or the interval is bad.
        """
        self._check_open()
        failure: Exception | None = None
        try:
            async with anyio.create_task_group() as tg:
                if not self._pump_running:
                    tg.start_soon(self._run_inbox_quietly, _pump_interval(poll_interval_sec))
                try:
                    await self.dispatcher.run(poll_interval_sec)
                except Exception as exc:  # raised below, not wrapped in an exception group
                    failure = exc
                tg.cancel_scope.cancel()
            if failure is not None:
                raise failure
        finally:
            with anyio.CancelScope(shield=True):
                await self.transport.aclose()

    async def _run_inbox_quietly(self, poll_interval_sec: float) -> None:
        try:
            await self.run_inbox(poll_interval_sec=poll_interval_sec)
        except Exception:  # the dispatcher must not die with it
            _log.exception("the inbox pump crashed")

    def stop_dispatcher(self) -> None:
        """Ask the running dispatcher to finish its in-flight attempts and return.

        Call it from the dispatcher's event loop; from another thread the dispatcher
        notices within one poll interval.
        """
        self.dispatcher.stop()

    async def alist_dead_letters(self) -> list[DeadLetter]:
        """Every dead letter still kept, oldest first."""
        return await self.outbox.alist_dead_letters()

    async def areplay_dead_letter(self, action_id: str) -> bool:
        """Move a dead letter back to the outbox with a fresh attempt budget.

        Returns:
            True if it was replayed, False if there is no such dead letter.
        """
        if not isinstance(action_id, str) or not action_id:
            raise UsageError("action_id must be a non-empty string")
        record = await self.outbox.areplay_dead_letter(action_id)
        if record is None:
            return False
        self.dispatcher.notify(record)
        return True

    async def adiscard_dead_letter(self, action_id: str) -> None:
        """Delete a dead letter for good."""
        if not isinstance(action_id, str) or not action_id:
            raise UsageError("action_id must be a non-empty string")
        await self.outbox.adiscard_dead_letter(action_id)

    async def apending_count(self) -> int:
        """How many actions wait in the outbox (read from the store)."""
        return await self.outbox.apending_count()

    # -- lifecycle --------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True after :meth:`aclose`."""
        return self._closed

    @property
    def store_ok(self) -> bool:
        """False when storing the last accepted event or outbound action failed, for
        30 s or until one is stored: the gateway's readiness (``GET /readyz``) follows it,
        so a replica whose store takes no more writes (a full disk) leaves rotation."""
        failed = self._store_failed_at
        return failed is None or time.monotonic() - failed >= _STORE_FAILURE_HOLD_SEC

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this WebhookConnector was closed")

    async def aclose(self) -> None:
        """Stop the dispatcher and the inbox pump, close the HTTP client. Idempotent.

        Waiting :meth:`receive_inbound` calls raise ClosedError. Events this process
        held and did not see acknowledged stay in the inbox (handed out again after
        their lease). The store is the caller's and stays open.
        """
        if self._closed:
            return
        self._closed = True
        self.dispatcher.stop()
        self._holds.wake()
        await self.transport.aclose()
