"""Value objects of the connectors extension: provider profiles, policies, events, actions."""

from __future__ import annotations

import base64
import functools
import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx2

from converge._numbers import finite_float
from converge._repr import safe_repr
from converge.errors import ConfigurationError, UsageError

__all__ = [
    "CANONICALIZATIONS",
    "MAX_OUTBOUND_HEADERS",
    "SCHEMES",
    "SIGNATURE_ALGORITHMS",
    "InboundWebhookEvent",
    "OutboundTarget",
    "OutboundWebhookAction",
    "ProviderProfile",
    "WebhookSecurityPolicy",
    "forwardable_headers",
]

#: Signature schemes a :class:`ProviderProfile` may name (``"svix"`` is an alias of
#: ``"standard-webhooks"`` that also reads ``svix-*`` headers).
SCHEMES: tuple[str, ...] = ("hmac", "standard-webhooks", "svix", "stripe", "github", "slack")
#: What the generic ``"hmac"`` scheme signs: the raw body, or ``"{timestamp}." + body``.
CANONICALIZATIONS: tuple[str, ...] = ("raw_body", "timestamp_body")
#: Digests the generic ``"hmac"`` scheme accepts.
SIGNATURE_ALGORITHMS: tuple[str, ...] = ("sha256", "sha384", "sha512")

_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}\Z")
_HEADER_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,64}\Z")
_METHODS = ("POST", "PUT", "PATCH", "DELETE")
# Headers an outbound action may not set itself: the transport or the signer owns them.
# RFC 9110 field-value, restricted to ASCII: visible characters, with spaces and tabs
# inside only (no controls such as \x01 or \x7f, no obs-text, no leading/trailing blanks).
_MAX_HEADER_VALUE = 8192
_HEADER_VALUE_RE = re.compile(r"(?:[\x21-\x7e](?:[\x20\x09\x21-\x7e]{0,8190}[\x21-\x7e])?)?\Z")
#: Most headers an outbound action may set.
MAX_OUTBOUND_HEADERS = 64
_RESERVED_OUTBOUND_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "idempotency-key",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
    }
)


def _require_str(owner: str, name: str, value: object, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value):
        raise ConfigurationError(
            f"{owner}.{name} must be a non-empty string, got {safe_repr(value)}"
        )
    return value


def _require_number(owner: str, name: str, value: object, *, minimum: float = 0.0) -> float:
    number = finite_float(value)
    if number is None:
        raise ConfigurationError(f"{owner}.{name} must be a finite number, got {safe_repr(value)}")
    if number < minimum:
        raise ConfigurationError(f"{owner}.{name} must be >= {minimum}, got {safe_repr(value)}")
    return number


def _require_int(owner: str, name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(
            f"{owner}.{name} must be an integer >= {minimum}, got {safe_repr(value)}"
        )
    return value


@dataclass(frozen=True, slots=True)
class ProviderProfile:
    """How one webhook sender signs and shapes its requests.

    With ``scheme="hmac"`` (the default) the profile's own fields describe the format: a
    hex HMAC (optionally prefixed ``"sha256="``) of the canonical bytes in
    ``signature_header``, the timestamp in ``timestamp_header``, the event id in the JSON
    field ``event_id_field``. ``canonicalization="raw_body"`` signs the body alone and so
    leaves the timestamp **unsigned** (an attacker can re-date a captured request within
    the idempotency window); ``"timestamp_body"`` signs ``"{timestamp}." + body``.

    The presets follow the senders' documented formats and ignore ``signature_header``,
    ``timestamp_header`` and ``event_id_field``:

    * ``"standard-webhooks"`` (alias ``"svix"``, which also reads ``svix-*`` headers):
      ``webhook-id`` / ``webhook-timestamp`` / ``webhook-signature: v1,<base64>`` over
      ``"{id}.{timestamp}.{body}"``; the secret is ``whsec_<base64>``; the event id is the
      ``webhook-id`` header.
    * ``"stripe"``: ``Stripe-Signature: t=<ts>,v1=<hex>`` over ``"{t}.{body}"``; the whole
      ``whsec_...`` string is the key; the event id is the payload's ``id``.
    * ``"github"``: ``X-Hub-Signature-256: sha256=<hex>`` over the body; the event id is
      the ``X-GitHub-Delivery`` header. GitHub signs no timestamp, so replays are refused
      only inside the idempotency window.
    * ``"slack"``: ``X-Slack-Signature: v0=<hex>`` over ``"v0:{ts}:{body}"`` with
      ``X-Slack-Request-Timestamp``; the event id is the payload's ``event_id``.

    Args:
        name: Provider name, used in the URL (``/webhook/{name}``): 1-64 characters from
            letters, digits, ``_``, ``.`` and ``-``.
        secret_ref: Key into the connector's ``secrets`` mapping.
        signature_header: Header carrying the signature (``"hmac"`` scheme).
        timestamp_header: Header carrying the Unix timestamp (``"hmac"`` scheme).
        event_id_field: JSON field holding the event id (``"hmac"`` scheme).
        signature_algorithm: ``"sha256"``, ``"sha384"`` or ``"sha512"`` (``"hmac"`` scheme;
            the presets use SHA-256).
        canonicalization: ``"raw_body"`` or ``"timestamp_body"`` (``"hmac"`` scheme).
        required_payload_fields: Top-level JSON fields every event must carry.
        subject_field: JSON field copied to the event's ``subject`` (falls back to the
            scheme's event type: Stripe/Standard Webhooks ``type``, the GitHub event
            header, Slack's ``event.type``).
        source_field: JSON field copied to the event's ``source`` (falls back to ``name``).
        emit_as: ``"message"`` or ``"task"``: what an accepted event becomes.
        scheme: One of :data:`SCHEMES`.

    Raises:
        ConfigurationError: If a field is invalid.
    """

    name: str
    secret_ref: str
    signature_header: str = "X-Webhook-Signature"
    timestamp_header: str = "X-Webhook-Timestamp"
    event_id_field: str = "event_id"
    signature_algorithm: str = "sha256"
    canonicalization: str = "raw_body"
    required_payload_fields: tuple[str, ...] = ()
    subject_field: str = "subject"
    source_field: str = "source"
    emit_as: str = "message"
    scheme: str = field(default="hmac", kw_only=True)

    def __post_init__(self) -> None:
        owner = "ProviderProfile"
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ConfigurationError(
                f"{owner}.name {safe_repr(self.name)} must be 1-64 letters, digits, '_', '.' or '-'"
            )
        _require_str(owner, "secret_ref", self.secret_ref)
        for attr in ("signature_header", "timestamp_header"):
            value = getattr(self, attr)
            if not isinstance(value, str) or not _HEADER_RE.match(value):
                raise ConfigurationError(f"{owner}.{attr} {safe_repr(value)} is not a header name")
        for attr in ("event_id_field", "subject_field", "source_field"):
            _require_str(owner, attr, getattr(self, attr))
        if self.scheme not in SCHEMES:
            raise ConfigurationError(
                f"{owner}.scheme {safe_repr(self.scheme)} is not one of {SCHEMES}"
            )
        if self.signature_algorithm not in SIGNATURE_ALGORITHMS:
            raise ConfigurationError(
                f"{owner}.signature_algorithm {safe_repr(self.signature_algorithm)} is not one of "
                f"{SIGNATURE_ALGORITHMS}"
            )
        if self.canonicalization not in CANONICALIZATIONS:
            raise ConfigurationError(
                f"{owner}.canonicalization {safe_repr(self.canonicalization)} is not one of "
                f"{CANONICALIZATIONS}"
            )
        if self.scheme != "hmac" and (
            self.signature_algorithm != "sha256" or self.canonicalization != "raw_body"
        ):
            raise ConfigurationError(
                f"scheme {self.scheme!r} fixes its own algorithm and signed bytes; leave "
                "signature_algorithm and canonicalization at their defaults"
            )
        if self.emit_as not in ("message", "task"):
            raise ConfigurationError(f"{owner}.emit_as must be 'message' or 'task'")
        fields = self.required_payload_fields
        if isinstance(fields, str) or not isinstance(fields, tuple | list):
            raise ConfigurationError(f"{owner}.required_payload_fields must be a tuple of names")
        for name in fields:
            _require_str(owner, "required_payload_fields[]", name)
        object.__setattr__(self, "required_payload_fields", tuple(fields))

    @property
    def canonical_scheme(self) -> str:
        """The scheme with aliases resolved (``"svix"`` -> ``"standard-webhooks"``)."""
        return "standard-webhooks" if self.scheme == "svix" else self.scheme


@dataclass(frozen=True, slots=True)
class WebhookSecurityPolicy:
    """Limits every inbound request is held to.

    Args:
        timestamp_skew_limit_sec: Largest accepted distance between a signed timestamp
            and the receiver's clock, either way.
        idempotency_ttl_sec: How long an accepted event id is remembered. The claim is
            kept for at least twice the skew window, so no replay with an acceptable
            timestamp can outlive it.
        max_payload_bytes: Largest accepted body; the ASGI app stops reading past it.
        allowed_content_types: Exact media types accepted (parameters such as
            ``charset`` are allowed; ``application/jsonx`` is not ``application/json``).
        require_mtls: Refuse requests without a verified client certificate.
        ip_allowlist: CIDR networks or single addresses (IPv4 or IPv6); empty allows all.
        strict_mode: Require the timestamp header of the ``"hmac"`` scheme and an event
            id. When False, a request without a timestamp skips the skew check and one
            without an event id is deduplicated by the SHA-256 of its body.

    Raises:
        ConfigurationError: If a field is invalid.
    """

    timestamp_skew_limit_sec: int = 300
    idempotency_ttl_sec: int = 3600
    max_payload_bytes: int = 1048576
    allowed_content_types: tuple[str, ...] = ("application/json",)
    require_mtls: bool = False
    ip_allowlist: tuple[str, ...] = ()
    strict_mode: bool = True

    def __post_init__(self) -> None:
        owner = "WebhookSecurityPolicy"
        _require_int(owner, "timestamp_skew_limit_sec", self.timestamp_skew_limit_sec, minimum=1)
        _require_int(owner, "idempotency_ttl_sec", self.idempotency_ttl_sec, minimum=1)
        _require_int(owner, "max_payload_bytes", self.max_payload_bytes, minimum=1)
        types = self.allowed_content_types
        if isinstance(types, str) or not isinstance(types, tuple | list) or not types:
            raise ConfigurationError(f"{owner}.allowed_content_types must be a non-empty tuple")
        normalized = []
        for media in types:
            text = _require_str(owner, "allowed_content_types[]", media).strip().lower()
            if not re.match(r"^[a-z0-9!#$&^_.+\-]+/[a-z0-9!#$&^_.+\-]+\Z", text):
                raise ConfigurationError(f"{owner}: {media!r} is not a media type")
            normalized.append(text)
        object.__setattr__(self, "allowed_content_types", tuple(normalized))
        for flag in ("require_mtls", "strict_mode"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigurationError(f"{owner}.{flag} must be a bool")
        allow = self.ip_allowlist
        if isinstance(allow, str) or not isinstance(allow, tuple | list):
            raise ConfigurationError(f"{owner}.ip_allowlist must be a tuple of networks")
        for entry in allow:
            try:
                ipaddress.ip_network(_require_str(owner, "ip_allowlist[]", entry), strict=False)
            except ValueError as exc:
                raise ConfigurationError(
                    f"{owner}.ip_allowlist: {safe_repr(entry)} is not an address or CIDR network"
                ) from exc
        object.__setattr__(self, "ip_allowlist", tuple(allow))

    @property
    def replay_ttl_sec(self) -> int:
        """TTL of an idempotency claim: the TTL, but never less than the skew window twice.

        An event dated ``t`` is acceptable while the clock reads ``t - skew`` to
        ``t + skew``; a claim made at the start must live through the end.
        """
        return max(self.idempotency_ttl_sec, 2 * self.timestamp_skew_limit_sec)


@dataclass(frozen=True, slots=True)
class InboundWebhookEvent:
    """A verified inbound event, as handed to the bus or the inbound queue.

    Args:
        provider: The provider profile's name.
        source: The payload's ``source_field`` (or the provider name).
        event_id: The sender's event id (deduplicated).
        occurred_at: The signed timestamp (Unix seconds), or the receive time.
        subject: The payload's ``subject_field`` or the scheme's event type.
        payload: The parsed JSON object.
        headers: Request headers, lower-cased, without credentials.
        trace_id: The W3C ``traceparent`` trace id, when the sender sent one.
    """

    provider: str
    source: str
    event_id: str
    occurred_at: float
    subject: str
    payload: dict[str, Any]
    headers: dict[str, str]
    trace_id: str | None = None

    def __post_init__(self) -> None:
        owner = "InboundWebhookEvent"
        for attr in ("provider", "event_id"):
            if not isinstance(getattr(self, attr), str) or not getattr(self, attr):
                raise UsageError(f"{owner}.{attr} must be a non-empty string")
        for attr in ("source", "subject"):
            if not isinstance(getattr(self, attr), str):
                raise UsageError(f"{owner}.{attr} must be a string")
        occurred = self.occurred_at
        if isinstance(occurred, bool) or not isinstance(occurred, int | float):
            raise UsageError(f"{owner}.occurred_at must be a number")
        if finite_float(occurred) is None:
            raise UsageError(f"{owner}.occurred_at must be finite")
        if not isinstance(self.payload, dict) or not isinstance(self.headers, dict):
            raise UsageError(f"{owner}.payload and headers must be dicts")
        if self.trace_id is not None and not isinstance(self.trace_id, str):
            raise UsageError(f"{owner}.trace_id must be a string or None")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dict of every field."""
        return {
            "provider": self.provider,
            "source": self.source,
            "event_id": self.event_id,
            "occurred_at": self.occurred_at,
            "subject": self.subject,
            "payload": self.payload,
            "headers": dict(self.headers),
            "trace_id": self.trace_id,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InboundWebhookEvent:
        """Rebuild an event from :meth:`to_dict` output.

        Raises:
            UsageError: On missing or mistyped fields.
        """
        if not isinstance(data, Mapping):
            raise UsageError("an inbound event is a mapping")
        try:
            return cls(
                provider=data["provider"],
                source=data["source"],
                event_id=data["event_id"],
                occurred_at=data["occurred_at"],
                subject=data["subject"],
                payload=data["payload"],
                headers=data["headers"],
                trace_id=data.get("trace_id"),
            )
        except KeyError as exc:
            raise UsageError(f"inbound event is missing {exc.args[0]!r}") from exc


@functools.lru_cache(maxsize=4096)
def _url_problem(url: str) -> str | None:
    # Parsing a URL costs more than the rest of an action's checks; targets repeat.
    try:
        parsed = httpx2.URL(url)
    except (httpx2.InvalidURL, TypeError, ValueError):
        return f"url {safe_repr(url)} is not a URL"
    if parsed.scheme not in ("http", "https") or not parsed.host:
        return f"url must be an absolute http(s) URL, got {safe_repr(url)}"
    if parsed.userinfo:
        return "url must not embed credentials"
    return None


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_url(owner: str, url: object) -> str:
    if not isinstance(url, str) or not url:
        raise UsageError(f"{owner}.url must be a non-empty string")
    problem = _url_problem(url)
    if problem is not None:
        raise UsageError(f"{owner}.{problem}")
    return url


def _check_headers(owner: str, headers: object) -> dict[str, str]:
    if not isinstance(headers, Mapping):
        raise UsageError(f"{owner}.headers must be a mapping (a JSON object) of str to str")
    if len(headers) > MAX_OUTBOUND_HEADERS:
        raise UsageError(f"{owner}.headers: at most {MAX_OUTBOUND_HEADERS} headers")
    out: dict[str, str] = {}
    for key, value in headers.items():
        if not isinstance(key, str) or not _HEADER_RE.match(key):
            raise UsageError(
                f"{owner}.headers: {_short(key)} is not a header name (RFC 9110 token)"
            )
        if not isinstance(value, str) or not _HEADER_VALUE_RE.match(value):
            raise UsageError(
                f"{owner}.headers[{key!r}] must be visible ASCII with inner spaces or tabs "
                f"(RFC 9110 field value, at most {_MAX_HEADER_VALUE} characters)"
            )
        if key.lower() in _RESERVED_OUTBOUND_HEADERS:
            raise UsageError(
                f"{owner}.headers may not set {key!r}: the transport or the signer owns it"
            )
        out[key] = value
    return out


# Headers of an inbound request that are about the hop, not the sender's message.
_HOP_HEADERS = frozenset(
    {"forwarded", "via", "x-real-ip", "expect", "accept-encoding", "proxy-connection"}
)


def forwardable_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers of an inbound request that a raw forward passes on.

    The sender's own headers (``X-GitHub-Event``, ``Stripe-Signature``, ``User-Agent``,
    ``Content-Type``, ...) stay; hop-by-hop, proxy and transport headers, the ones
    converge's signer sets (``webhook-*``, ``Idempotency-Key``), and any header an
    :class:`OutboundWebhookAction` could not carry are left out.

    Args:
        headers: The inbound request's headers.

    Returns:
        At most :data:`MAX_OUTBOUND_HEADERS` headers, names lower-cased.
    """
    out: dict[str, str] = {}
    for name, value in headers.items():
        key = name.lower()
        if (
            key in _RESERVED_OUTBOUND_HEADERS
            or key in _HOP_HEADERS
            or key.startswith("x-forwarded-")
            or not _HEADER_RE.match(key)
            or not _HEADER_VALUE_RE.match(value)
        ):
            continue
        out[key] = value
        if len(out) == MAX_OUTBOUND_HEADERS:
            break
    return out


@dataclass(frozen=True, slots=True)
class OutboundWebhookAction:
    """An HTTP request to deliver, reliably, to an outside service.

    Args:
        target: Name of the destination (a configured :class:`OutboundTarget` or any
            label); retries, concurrency limits and the circuit breaker are per target.
        method: ``"POST"``, ``"PUT"``, ``"PATCH"`` or ``"DELETE"``.
        url: Absolute http(s) URL; redirects are never followed.
        body: JSON object sent as the request body; it must have a UTF-8 encoding (no
            lone surrogates such as ``"\\ud800"``).
        headers: Extra headers (at most :data:`MAX_OUTBOUND_HEADERS`): names are RFC 9110
            tokens, values visible ASCII with inner spaces or tabs (no controls, no
            non-ASCII), so every accepted action can be sent. ``Idempotency-Key``,
            ``webhook-*`` and transport headers are set by converge and may not be given.
        idempotency_key: Sent as ``Idempotency-Key`` on every attempt (1-255 visible
            ASCII characters); defaults to the action's id. While an action with this
            key is pending, submitting another with the same key is a no-op.
        deadline: Unix time after which no further attempt is made (dead letter).
        raw_body: The exact body bytes to send instead of ``body``'s JSON, base64-encoded
            (``forward_format = "raw"`` forwards a provider's own bytes this way);
            ``body`` then only describes the event.

    Raises:
        UsageError: If a field is invalid or the body is not JSON-serializable.
    """

    target: str
    method: str
    url: str
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    idempotency_key: str | None = None
    deadline: float | None = None
    raw_body: str | None = None

    def __post_init__(self) -> None:
        owner = "OutboundWebhookAction"
        if not isinstance(self.target, str) or not _NAME_RE.match(self.target):
            raise UsageError(f"{owner}.target {_short(self.target)} must be 1-64 name characters")
        if not isinstance(self.method, str) or self.method.upper() not in _METHODS:
            raise UsageError(f"{owner}.method must be one of {_METHODS}, got {_short(self.method)}")
        object.__setattr__(self, "method", self.method.upper())
        _check_url(owner, self.url)
        if not isinstance(self.body, dict):
            raise UsageError(f"{owner}.body must be a dict (a JSON object)")
        try:
            # The bytes body_bytes() sends: a lone surrogate (JSON "\\ud800") has no
            # UTF-8 form, so such a body could never be sent; refuse it now.
            json.dumps(self.body, ensure_ascii=False, allow_nan=False).encode()
        except (TypeError, ValueError, RecursionError) as exc:
            raise UsageError(f"{owner}.body cannot be sent as UTF-8 JSON: {exc}") from exc
        object.__setattr__(self, "headers", _check_headers(owner, self.headers))
        key = self.idempotency_key
        if key is not None and (
            not isinstance(key, str) or not key or len(key) > 255 or not _HEADER_VALUE_RE.match(key)
        ):
            # Sent as the Idempotency-Key header: a header value, so ASCII only.
            raise UsageError(
                f"{owner}.idempotency_key must be 1-255 visible ASCII characters "
                "(inner spaces allowed)"
            )
        if self.deadline is not None and finite_float(self.deadline) is None:
            raise UsageError(f"{owner}.deadline must be a finite Unix time or None")
        if self.raw_body is not None:
            try:
                base64.b64decode(self.raw_body, validate=True)
            except (TypeError, ValueError) as exc:
                raise UsageError(f"{owner}.raw_body must be base64 text or None") from exc

    def body_bytes(self) -> bytes:
        """The exact bytes sent as the request body: ``raw_body`` decoded when it is set,
        else compact UTF-8 JSON of ``body``."""
        if self.raw_body is not None:
            return base64.b64decode(self.raw_body)
        return json.dumps(self.body, separators=(",", ":"), ensure_ascii=False).encode()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dict of every field."""
        return {
            "target": self.target,
            "method": self.method,
            "url": self.url,
            "body": self.body,
            "headers": dict(self.headers),
            "idempotency_key": self.idempotency_key,
            "deadline": self.deadline,
            **({"raw_body": self.raw_body} if self.raw_body is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OutboundWebhookAction:
        """Build an action from :meth:`to_dict` output (or an ``/outbound`` request).

        Raises:
            UsageError: On unknown, missing or invalid fields.
        """
        if not isinstance(data, Mapping):
            raise UsageError("an outbound action is a JSON object")
        allowed = {
            "target",
            "method",
            "url",
            "body",
            "headers",
            "idempotency_key",
            "deadline",
            "raw_body",
        }
        unknown = set(data) - allowed
        if unknown:
            raise UsageError(f"unknown outbound action fields: {sorted(map(str, unknown))}")
        for required in ("target", "url", "body"):
            if required not in data:
                raise UsageError(f"outbound action is missing {required!r}")
        headers = data.get("headers")
        if headers is None:
            headers = {}
        if not isinstance(headers, Mapping):
            raise UsageError("outbound action headers must be a JSON object of strings")
        return cls(
            target=data["target"],
            method=data.get("method", "POST"),
            url=data["url"],
            body=data["body"],
            headers=dict(headers),
            idempotency_key=data.get("idempotency_key"),
            deadline=data.get("deadline"),
            raw_body=data.get("raw_body"),
        )


@dataclass(frozen=True, slots=True)
class OutboundTarget:
    """A configured destination for outbound actions.

    Args:
        name: Target name used in actions and the ``/outbound`` endpoint.
        url: Base URL. ``/outbound`` only reaches this URL or paths below it.
        signing_secret: When set (``whsec_<base64>`` or raw text), every request is
            signed with Standard Webhooks headers (``webhook-id``, ``webhook-timestamp``,
            ``webhook-signature``).
        max_concurrency: Requests in flight to this target at most.

    Raises:
        ConfigurationError: If a field is invalid.
    """

    name: str
    url: str
    signing_secret: str | None = None
    max_concurrency: int = 16

    def __post_init__(self) -> None:
        owner = "OutboundTarget"
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ConfigurationError(
                f"{owner}.name {safe_repr(self.name)} must be 1-64 name characters"
            )
        try:
            _check_url(owner, self.url)
        except UsageError as exc:
            raise ConfigurationError(str(exc)) from exc
        if self.signing_secret is not None:
            _require_str(owner, "signing_secret", self.signing_secret)
        _require_int(owner, "max_concurrency", self.max_concurrency, minimum=1)

    def allows(self, url: str) -> bool:
        """Return True if ``url`` is this target's URL or a path below it.

        Scheme, host and port must match exactly; the path must equal the target's path
        or extend it past a ``/``. Refused, raw or percent-encoded: dot segments,
        ``;`` path parameters (``/..;/`` reaches a parent on some servers), backslashes
        (some servers read them as ``/``), control characters, and credentials.
        """
        if not isinstance(url, str):
            return False
        try:
            base, candidate = httpx2.URL(self.url), httpx2.URL(url)
        except (httpx2.InvalidURL, TypeError, ValueError):
            return False
        if candidate.userinfo or (candidate.scheme, candidate.host, candidate.port) != (
            base.scheme,
            base.host,
            base.port,
        ):
            return False
        raw = candidate.raw_path.split(b"?", 1)[0].decode("ascii", "replace")
        # Both the raw and the decoded path: "%2F..%2F" decodes to a traversal.
        for text in (raw, candidate.path):
            if any(c in text for c in ";\\") or not text.isprintable():
                return False
            lowered = text.lower()
            if "%2e" in lowered or "%3b" in lowered or "%5c" in lowered:
                return False
            if any(s in (".", "..") for s in text.split("/")):
                return False
        root = base.path.rstrip("/")
        path = candidate.path
        return path == base.path or path == root or path.startswith(root + "/")
