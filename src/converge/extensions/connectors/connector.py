"""WebhookConnector: strict inbound verification and durable outbound delivery."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import anyio
import anyio.to_thread
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from converge.core.message import Message, Topic
from converge.core.metrics import MetricsCollector
from converge.core.store import Store
from converge.core.task import Task
from converge.errors import (
    BusFullError,
    ClosedError,
    ConfigurationError,
    DuplicateEventError,
    StoreError,
    UsageError,
    WebhookSecurityError,
)
from converge.extensions.connectors.breaker import CircuitBreaker
from converge.extensions.connectors.dispatcher import OutboundDispatcher
from converge.extensions.connectors.models import (
    InboundWebhookEvent,
    OutboundTarget,
    OutboundWebhookAction,
    ProviderProfile,
    WebhookSecurityPolicy,
)
from converge.extensions.connectors.outbox import DeadLetter, Outbox, OutboxRecord, action_id
from converge.extensions.connectors.retry import RetrySchedule, WebhookRetryPolicy
from converge.extensions.connectors.schemes import decode_secret
from converge.extensions.connectors.security import (
    VerifiedWebhook,
    WebhookSecurity,
    _lower_headers,
)
from converge.extensions.connectors.transport import (
    OutboundSender,
    OutboundTransport,
)

__all__ = ["INBOUND_TOPIC", "InboundBus", "WebhookConnector"]

_log = logging.getLogger("converge.connectors")

#: Topic of the messages accepted inbound events become.
INBOUND_TOPIC = "bridge.webhook.inbound"
_INBOUND_TOPICS = (Topic(INBOUND_TOPIC),)
_ID_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
# Bodies larger than this are verified in a worker thread (about 0.1 ms of work inline).
_INLINE_VERIFY_BYTES = 64 * 1024
# Seconds a sender is asked to wait when the consumer is full or the store is down.
_RETRY_AFTER = "1"


class InboundBus(Protocol):
    """What the connector needs of a bus (:class:`converge.runtime.MessageBus` fits)."""

    def has_subscribers(self, message: Message) -> bool:
        """True if someone would receive ``message``."""

    async def publish(self, message: Message, *, wait: bool = True) -> int:
        """Deliver ``message``; with ``wait=False`` raise BusFullError rather than wait."""


class _Unavailable(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _json_response(
    status: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    out = {"content-type": "application/json"}
    if headers:
        out.update(headers)
    return status, out, json.dumps(body, separators=(",", ":")).encode()


def _event_uid(provider: str, event_id: str) -> str:
    return hashlib.sha256(f"{provider}\0{event_id}".encode()).hexdigest()[:32]


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


class WebhookConnector:
    """Generic webhook bridge with strict inbound verification and reliable outbound dispatch.

    **Inbound**: :meth:`accept_inbound_http` verifies a request (see
    :class:`WebhookSecurity`), claims its event id, and hands the event on: to the
    target named in ``inbound_routes`` (durably, through the outbox), else to the
    attached bus as a :class:`~converge.core.message.Message` on
    :data:`INBOUND_TOPIC`, else to a bounded in-memory queue read with
    :meth:`receive_inbound`. If it cannot be handed on, its claim is released and the
    sender is told 503 with ``Retry-After``.

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
        store: Idempotency claims, outbox and dead letters; a ``MemoryStore`` when None
            (nothing survives a restart: use ``SQLiteStore``/``FileStore`` for that).
        metrics_collector: Where counters and gauges go; a private one when None.
        connector_id: Names this connector in store keys and as message sender.
        outbound_sender: ``async (OutboundRequest) -> OutboundResponse | int`` replacing
            the HTTP send (test your code without a server; see :data:`OutboundSender`).
        targets: Configured outbound targets (a mapping by name or a sequence).
        inbound_routes: Provider name -> target name: forward accepted events there.
        bus: A message bus to publish accepted events on (see :meth:`attach_bus`).
        inbound_queue_size: Capacity of the in-memory queue used without a bus.
        max_in_flight: Outbound attempts in flight at most, over all targets.
        breaker_failure_threshold: Consecutive failures that open a target's circuit.
        breaker_recovery_timeout_sec: Seconds an open circuit waits before a probe.
        dead_letter_ttl_sec: How long dead letters are kept.
        clock: Unix seconds; injectable for tests.

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
        inbound_queue_size: int = 1000,
        max_in_flight: int = 64,
        breaker_failure_threshold: int = 5,
        breaker_recovery_timeout_sec: float = 30.0,
        dead_letter_ttl_sec: float = 7 * 24 * 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(connector_id, str) or not _ID_RE.match(connector_id):
            raise ConfigurationError("connector_id must be 1-64 letters, digits, '_', '.', '-'")
        if retry_policy is not None and not isinstance(
            retry_policy, WebhookRetryPolicy | RetrySchedule
        ):
            raise ConfigurationError("retry_policy must be a WebhookRetryPolicy or RetrySchedule")
        if metrics_collector is not None and not isinstance(metrics_collector, MetricsCollector):
            raise ConfigurationError("metrics_collector must be a MetricsCollector")
        if outbound_sender is not None and not callable(outbound_sender):
            raise ConfigurationError("outbound_sender must be an async callable")
        for name, value in (
            ("inbound_queue_size", inbound_queue_size),
            ("max_in_flight", max_in_flight),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name} must be an integer >= 1")
        if (
            isinstance(dead_letter_ttl_sec, bool)
            or not isinstance(dead_letter_ttl_sec, int | float)
            or not math.isfinite(dead_letter_ttl_sec)
            or dead_letter_ttl_sec <= 0
        ):
            raise ConfigurationError("dead_letter_ttl_sec must be a positive number")
        if store is None:
            from converge.extensions.storage import MemoryStore

            store = MemoryStore()
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
        self._bus = bus
        send, receive = anyio.create_memory_object_stream[Message | Task](inbound_queue_size)
        self._inbound_send: MemoryObjectSendStream[Message | Task] = send
        self._inbound_receive: MemoryObjectReceiveStream[Message | Task] = receive
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
        found = self._breakers.get(target)
        if found is None:
            found = self._breakers[target] = CircuitBreaker(
                self._breaker_threshold, self._breaker_timeout, clock=self._clock
            )
        return found

    def attach_bus(self, bus: InboundBus | None) -> None:
        """Publish accepted events on ``bus`` (None: back to the in-memory queue).

        Publishing never waits: when a receiver's inbox is full the sender gets 503 and
        retries later, and when nobody subscribes the event is not accepted either.
        """
        if bus is not None and not (
            callable(getattr(bus, "publish", None))
            and callable(getattr(bus, "has_subscribers", None))
        ):
            raise UsageError("bus must have publish() and has_subscribers()")
        self._bus = bus

    # -- inbound ----------------------------------------------------------------------

    def rejection(
        self, provider: str, exc: WebhookSecurityError
    ) -> tuple[int, dict[str, str], bytes]:
        """The JSON response for a rejected request (and count it by reason)."""
        label = provider if provider in self.security.profiles else "_unknown"
        self.metrics.inc(
            "webhook_inbound_rejected_total",
            labels={"provider": label, "reason": exc.reason},
            help="Inbound requests rejected, by reason.",
        )
        headers = {"allow": "POST"} if exc.status == 405 else None
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
        return await self._admit(profile.name, verified)

    async def _admit(
        self, provider: str, verified: VerifiedWebhook
    ) -> tuple[int, dict[str, str], bytes]:
        if verified.challenge is not None:
            return _json_response(200, {"challenge": verified.challenge})
        labels = {"provider": provider}
        try:
            token = await self.security.aclaim(verified)
        except DuplicateEventError:
            self.metrics.inc(
                "webhook_inbound_duplicates_total", labels=labels, help="Replays answered 200."
            )
            return _json_response(200, {"status": "duplicate", "event_id": verified.event_id})
        except StoreError as exc:
            return self._unavailable(provider, "store_unavailable", exc)
        try:
            await self._hand_on(verified)
        except (_Unavailable, StoreError) as exc:
            await self._release(verified, token)
            reason = exc.reason if isinstance(exc, _Unavailable) else "store_unavailable"
            return self._unavailable(provider, reason, exc)
        except BaseException:
            await self._release(verified, token)
            raise
        self.metrics.inc("webhook_inbound_accepted_total", labels=labels, help="Events accepted.")
        # The hot path: the event id is printable ASCII, so this is the JSON encoding.
        body = b'{"status":"accepted","event_id":' + json.dumps(verified.event_id).encode()
        return 202, {"content-type": "application/json"}, body + b"}"

    async def _release(self, verified: VerifiedWebhook, token: str) -> None:
        # Shielded: a cancelled request must still free its claim, or the sender's retry
        # would be answered "duplicate" and the event lost.
        with anyio.CancelScope(shield=True), anyio.move_on_after(5.0):
            try:
                await self.security.arelease(verified, token)
            except StoreError as exc:
                _log.warning("could not release the claim of %s: %s", verified.event_id, exc)

    def _unavailable(
        self, provider: str, reason: str, exc: BaseException
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

    def _event(self, verified: VerifiedWebhook) -> InboundWebhookEvent:
        profile, payload, headers = verified.profile, verified.payload, verified.headers
        scheme = profile.canonical_scheme
        subject = _text(payload.get(profile.subject_field))
        if subject is None:
            if scheme == "github":
                subject = headers.get("x-github-event")
            elif scheme == "slack":
                inner = payload.get("event")
                subject = _text(inner.get("type")) if isinstance(inner, dict) else None
                subject = subject or _text(payload.get("type"))
            elif scheme in ("stripe", "standard-webhooks"):
                subject = _text(payload.get("type"))
        source = _text(payload.get(profile.source_field)) or profile.name
        trace_id = None
        parent = headers.get("traceparent", "").split("-")
        if len(parent) == 4 and len(parent[1]) == 32:
            trace_id = parent[1]
        return InboundWebhookEvent(
            provider=profile.name,
            source=source,
            event_id=verified.event_id,
            occurred_at=verified.timestamp,
            subject=subject or "",
            payload=payload,
            headers=headers,
            trace_id=trace_id,
        )

    async def _hand_on(self, verified: VerifiedWebhook) -> None:
        event = self._event(verified)
        route = self._routes.get(event.provider)
        if route is not None:
            target = self.targets[route]
            action = OutboundWebhookAction(
                target=target.name,
                method="POST",
                url=target.url,
                body=event.to_dict(),
                idempotency_key=f"inbound:{event.provider}:{event.event_id}",
            )
            await self.enqueue(action, namespace="inbound")
            return
        uid = _event_uid(event.provider, event.event_id)
        item: Message | Task
        if verified.profile.emit_as == "task":
            objective = f"handle {event.provider} webhook {event.subject}".strip()
            item = Task(objective=objective, inputs=event.to_dict(), id=uid)
        else:
            item = Message(
                sender=self.connector_id,
                topics=_INBOUND_TOPICS,
                payload=event.to_dict(),
                id=uid,
            )
        bus = self._bus
        if bus is not None:
            message = item
            if isinstance(item, Task):
                message = Message(
                    sender=self.connector_id,
                    topics=_INBOUND_TOPICS,
                    payload={"task": item.to_dict()},
                    task_id=item.id,
                    id=uid,
                )
            assert isinstance(message, Message)
            if not bus.has_subscribers(message):
                raise _Unavailable("no_consumer")
            try:
                delivered = await bus.publish(message, wait=False)
            except BusFullError:
                raise _Unavailable("consumer_full") from None
            if not delivered:
                raise _Unavailable("no_consumer")
            return
        try:
            self._inbound_send.send_nowait(item)
        except anyio.WouldBlock:
            raise _Unavailable("consumer_full") from None

    @property
    def inbound_events(self) -> MemoryObjectReceiveStream[Message | Task]:
        """The bounded queue of accepted events when no bus is attached (``async for``)."""
        return self._inbound_receive

    async def receive_inbound(self) -> Message | Task:
        """Wait for the next accepted event (used when no bus is attached).

        Returns:
            A :class:`~converge.core.message.Message` on :data:`INBOUND_TOPIC` whose
            payload is :meth:`InboundWebhookEvent.to_dict`, or a
            :class:`~converge.core.task.Task` with that dict as ``inputs`` for profiles
            with ``emit_as="task"``.
        """
        return await self._inbound_receive.receive()

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
        ``"inbound"``; see :meth:`Outbox.add`): the same action again returns the
        original record, a different action under a kept key raises
        :class:`~converge.errors.IdempotencyConflictError`.
        """
        self._check_open()
        if not isinstance(action, OutboundWebhookAction):
            raise UsageError("submit_outbound_action takes an OutboundWebhookAction")
        record = await self.outbox.add(action, namespace=namespace)
        self.metrics.inc(
            "webhook_outbound_submitted_total",
            labels={"target": action.target},
            help="Outbound actions accepted into the outbox.",
        )
        self.dispatcher.notify(record)
        return record

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
        actions submitted by other processes sharing it.

        Raises:
            UsageError: If the dispatcher is already running or the interval is bad.
        """
        self._check_open()
        try:
            await self.dispatcher.run(poll_interval_sec)
        finally:
            with anyio.CancelScope(shield=True):
                await self.transport.aclose()

    def stop_dispatcher(self) -> None:
        """Ask the running dispatcher to finish its in-flight attempts and return.

        Call it from the dispatcher's event loop; from another thread the dispatcher
        notices within one poll interval.
        """
        self.dispatcher.stop()

    async def alist_dead_letters(self) -> list[DeadLetter]:
        """Every dead letter still kept, oldest first."""
        return await self.outbox.dead_letters()

    async def areplay_dead_letter(self, action_id: str) -> bool:
        """Move a dead letter back to the outbox with a fresh attempt budget.

        Returns:
            True if it was replayed, False if there is no such dead letter.
        """
        if not isinstance(action_id, str) or not action_id:
            raise UsageError("action_id must be a non-empty string")
        record = await self.outbox.replay(action_id)
        if record is None:
            return False
        self.dispatcher.notify(record)
        return True

    async def adiscard_dead_letter(self, action_id: str) -> None:
        """Delete a dead letter for good."""
        if not isinstance(action_id, str) or not action_id:
            raise UsageError("action_id must be a non-empty string")
        await self.outbox.discard(action_id)

    async def apending_count(self) -> int:
        """How many actions wait in the outbox (read from the store)."""
        return await self.outbox.apending_count()

    # -- lifecycle --------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True after :meth:`aclose`."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this WebhookConnector was closed")

    async def aclose(self) -> None:
        """Stop the dispatcher, close the HTTP client and the inbound queue. Idempotent.

        The store is the caller's and stays open.
        """
        if self._closed:
            return
        self._closed = True
        self.dispatcher.stop()
        self._inbound_send.close()
        await self.transport.aclose()
