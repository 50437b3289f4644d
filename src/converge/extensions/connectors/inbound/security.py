"""Inbound verification: the checks every webhook request passes, cheapest first."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import itertools
import json
import math
import os
import re
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from converge import _sync
from converge._http import ip_literal
from converge.core.store import Store
from converge.errors import (
    ConfigurationError,
    DuplicateEventError,
    UsageError,
    WebhookSecurityError,
)
from converge.extensions.connectors.inbound.schemes import EVENT_ID_RE as _EVENT_ID_RE
from converge.extensions.connectors.inbound.schemes import (
    decode_secret,
    hmac_state,
    parse_signed_parts,
    parse_timestamp,
    signature_matches,
)
from converge.extensions.connectors.models import ProviderProfile, WebhookSecurityPolicy

__all__ = [
    "FORM_MEDIA_TYPE",
    "MAX_JSON_DEPTH",
    "VerifiedWebhook",
    "WebhookSecurity",
    "identity_coded",
    "parse_form",
    "parse_json_object",
]

#: Deepest JSON nesting an inbound payload may have.
MAX_JSON_DEPTH = 32

# Headers a rejection carries besides its JSON body, by reason (RFC 9110: a 405 names
# the methods allowed, a 415 for a content coding names the codings accepted).
_REJECTION_HEADERS: dict[str, dict[str, str]] = {
    "method_not_allowed": {"allow": "POST"},
    "unsupported_content_encoding": {"accept-encoding": "identity"},
}
#: The media type of HTML form posts (Slack slash commands and interactivity, GitHub's
#: "application/x-www-form-urlencoded" content type).
FORM_MEDIA_TYPE = "application/x-www-form-urlencoded"
# Schemes whose senders post forms: accepted without listing the type in the policy,
# and a ``payload`` field holding a JSON object is the event.
_FORM_SCHEMES = frozenset({"slack", "github"})
_MAX_FORM_FIELDS = 1000
_CREDENTIAL_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})
_PAYLOAD_ID_FIELD = {"stripe": "id", "slack": "event_id"}

_IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _reject(status: int, reason: str, message: str) -> WebhookSecurityError:
    return WebhookSecurityError(message, status=status, reason=reason)


@dataclass(frozen=True, slots=True)
class VerifiedWebhook:
    """A request that passed every check except replay defence.

    Attributes:
        profile: The provider's profile.
        payload: The parsed JSON object.
        event_id: The sender's event id.
        timestamp: The signed timestamp, or the receive time when the scheme has none.
        headers: The request headers, lower-cased, without credentials.
        challenge: Slack's ``url_verification`` challenge, to echo instead of emitting an
            event; None otherwise.
        body: The exact verified body bytes (forward these to pass the sender's bytes on
            unchanged).
        body_digest: SHA-256 hex digest of the signed bytes when the scheme's event id is
            not covered by the signature (GitHub, ``"hmac"`` with ``raw_body``), or is
            read from a body that the profile takes as JSON or as a form (Slack, or
            ``allowed_content_types`` with the form type): the replay claim then covers
            the digest too. None otherwise.
    """

    profile: ProviderProfile
    payload: dict[str, Any]
    event_id: str
    timestamp: float
    headers: dict[str, str]
    challenge: str | None = None
    body: bytes = field(default=b"", repr=False)
    body_digest: str | None = None


def _lower_headers(headers: Mapping[str, str]) -> dict[str, str]:
    if not isinstance(headers, Mapping):
        raise UsageError("headers must be a mapping of str to str")
    out = {}
    for key, value in headers.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise UsageError("header names and values must be str")
        out[key.lower()] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # "1e999" parses to inf
        raise ValueError("numbers must be finite")
    return value


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def parse_json_object(
    raw_body: bytes, max_depth: int = MAX_JSON_DEPTH, *, lone_surrogates: str = "replace"
) -> dict[str, Any]:
    """Parse ``raw_body`` as a UTF-8 JSON object nested at most ``max_depth`` deep.

    JSON may escape a lone UTF-16 surrogate (``"\\ud800"``), which no UTF-8 text can
    hold: such a value could be accepted but never stored, logged or sent as UTF-8.
    With ``lone_surrogates="replace"`` (inbound events) each one becomes U+FFFD in the
    parsed value (the verified bytes stay as they were); with ``"reject"`` (outbound
    actions, whose caller can fix them) the body is refused.

    Raises:
        WebhookSecurityError: 400 ``malformed_json``, ``not_an_object``, ``too_deep`` or
            (``"reject"``) ``lone_surrogate``.
        UsageError: For an unknown ``lone_surrogates`` mode.
    """
    if lone_surrogates not in ("replace", "reject"):
        raise UsageError("lone_surrogates must be 'replace' or 'reject'")
    try:
        value = _DECODER.decode(raw_body.decode("utf-8"))
    except RecursionError as exc:
        raise _reject(400, "too_deep", "the JSON body is nested too deeply") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise _reject(400, "malformed_json", "the body is not UTF-8 JSON") from exc
    if not isinstance(value, dict):
        raise _reject(400, "not_an_object", "the JSON body must be an object")
    if raw_body.count(b"{") + raw_body.count(b"[") > max_depth:
        stack: list[tuple[Any, int]] = [(value, 1)]
        while stack:
            node, depth = stack.pop()
            if depth > max_depth:
                raise _reject(400, "too_deep", f"the JSON body is nested deeper than {max_depth}")
            children = node.values() if isinstance(node, dict) else node
            stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    # Valid UTF-8 holds no surrogates: only a \\uD800-\\uDFFF escape can make one.
    if _SURROGATE_ESCAPE_RE.search(raw_body) is not None and _has_surrogate(value):
        if lone_surrogates == "reject":
            raise _reject(
                400, "lone_surrogate", "the JSON holds a lone surrogate escape (no UTF-8 form)"
            )
        fixed = _replace_surrogates(value)
        assert isinstance(fixed, dict)
        value = fixed
    return value


_SURROGATE_ESCAPE_RE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def _has_surrogate(value: Any) -> bool:
    # Depth is bounded by parse_json_object's check (MAX_JSON_DEPTH) before this runs.
    if isinstance(value, str):
        return _SURROGATE_RE.search(value) is not None
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(v) for v in value)
    return False


def _replace_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return _SURROGATE_RE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_replace_surrogates(k): _replace_surrogates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_surrogates(v) for v in value]
    return value


def _media_type(headers: Mapping[str, str]) -> str:
    content_type = headers.get("content-type")
    return content_type.split(";", 1)[0].strip().lower() if content_type else ""


def identity_coded(headers: Mapping[str, str]) -> bool:
    """Whether the body of a request with these (lower-cased) ``headers`` is sent as is:
    no ``Content-Encoding``, or ``identity``.

    A compressed body is refused rather than decoded: signatures cover the bytes as
    sent, and decoding would let a small request grow into a large one.
    """
    coding = headers.get("content-encoding")
    return coding is None or coding.strip().lower() in ("", "identity")


def parse_form(raw_body: bytes, payload_field: bool = True) -> dict[str, Any]:
    """Decode an ``application/x-www-form-urlencoded`` body into an event payload.

    Each field becomes a string (a list of strings when it is repeated). With
    ``payload_field`` (Slack interactivity, GitHub's form content type), a form with a
    ``payload`` field is that field parsed as a JSON object (see
    :func:`parse_json_object`).

    Raises:
        WebhookSecurityError: 400 ``malformed_form`` for a body that is not UTF-8 or has
            more than 1000 fields, or a ``payload`` field that is not a JSON object (the
            JSON reasons of :func:`parse_json_object`).
    """
    try:
        text = raw_body.decode("utf-8")
        pairs = urllib.parse.parse_qsl(
            text,
            keep_blank_values=True,
            max_num_fields=_MAX_FORM_FIELDS,
            encoding="utf-8",
            errors="replace",
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise _reject(400, "malformed_form", "the body is not a UTF-8 form") from exc
    fields: dict[str, Any] = {}
    for name, value in pairs:
        if name in fields:
            previous = fields[name]
            fields[name] = [*previous, value] if isinstance(previous, list) else [previous, value]
        else:
            fields[name] = value
    payload = fields.get("payload")
    if payload_field and isinstance(payload, str):
        return parse_json_object(payload.encode("utf-8"))
    return fields


class WebhookSecurity:
    """Verifies inbound webhook requests for a set of provider profiles.

    Checks run in an order that does no work for strangers: IP allowlist and mTLS,
    provider, method, media type, size, required headers, timestamp (inside the skew
    window), signature (constant time, any configured secret), then JSON parsing,
    required fields and event id. Replay defence claims the event id with the store's
    atomic ``aput_if_absent`` and a TTL of :attr:`WebhookSecurityPolicy.replay_ttl_sec`.

    Args:
        policy: Limits and switches.
        provider_profiles: Profiles by name (each key must equal its profile's name).
        secrets: Secret values by ``secret_ref``. A value may be a string or a sequence
            of strings (rotation: any one verifying is enough).
        store: Where idempotency claims live; a ``MemoryStore`` when None. Share one
            store between replicas to deduplicate across them.
        clock: Wall-clock time in Unix seconds (injectable for tests).
        key_prefix: Prefix of the store keys this object writes.

    Raises:
        ConfigurationError: For a profile without a usable secret, or mismatched names.
    """

    def __init__(
        self,
        policy: WebhookSecurityPolicy,
        provider_profiles: dict[str, ProviderProfile],
        secrets: Mapping[str, str | Sequence[str]],
        *,
        store: Store | None = None,
        clock: Callable[[], float] = time.time,
        key_prefix: str = "converge:webhook",
    ) -> None:
        if not isinstance(policy, WebhookSecurityPolicy):
            raise ConfigurationError("policy must be a WebhookSecurityPolicy")
        if not isinstance(provider_profiles, Mapping):
            raise ConfigurationError("provider_profiles must map names to ProviderProfile")
        if not isinstance(secrets, Mapping):
            raise ConfigurationError("secrets must map secret_ref to secret value(s)")
        if store is not None and not isinstance(store, Store):
            raise ConfigurationError("store must be a converge Store")
        if not callable(clock):
            raise ConfigurationError("clock must be a callable returning Unix seconds")
        self.policy = policy
        self.profiles: dict[str, ProviderProfile] = {}
        self._keyed: dict[str, tuple[hmac.HMAC, ...]] = {}
        for name, profile in provider_profiles.items():
            if not isinstance(profile, ProviderProfile):
                raise ConfigurationError(f"provider {name!r} is not a ProviderProfile")
            if name != profile.name:
                raise ConfigurationError(
                    f"provider key {name!r} differs from its profile's name {profile.name!r}"
                )
            values = secrets.get(profile.secret_ref)
            if values is None:
                raise ConfigurationError(
                    f"provider {name!r} refers to secret {profile.secret_ref!r}, "
                    "which is not in secrets"
                )
            if isinstance(values, str):
                values = (values,)
            if not values:
                raise ConfigurationError(f"secret {profile.secret_ref!r} has no value")
            self._keyed[name] = tuple(
                hmac_state(decode_secret(profile.scheme, v), profile.signature_algorithm)
                for v in values
            )
            self.profiles[name] = profile
        self._networks: tuple[_IPNetwork, ...] = tuple(
            ipaddress.ip_network(n, strict=False) for n in policy.ip_allowlist
        )
        if store is None:
            from converge.extensions.storage import MemoryStore

            store = MemoryStore()
        self.store = store
        self._clock = clock
        self._prefix = key_prefix
        # Claim tokens: unique per claim (a random prefix per instance, then a count:
        # ``next`` on a count is atomic across threads), without a system call each.
        self._token_prefix = os.urandom(6).hex()
        self._token_count = itertools.count()

    # -- sans-I/O checks ---------------------------------------------------------------

    def _ip_allowed(self, remote_addr: str | None) -> bool:
        if not self._networks:
            return True
        if not isinstance(remote_addr, str):
            return False
        addr = ip_literal(remote_addr)
        if addr is None:
            return False
        return any(addr.version == net.version and addr in net for net in self._networks)

    def check_request(
        self,
        provider: str,
        *,
        method: str,
        headers: Mapping[str, str],
        remote_addr: str | None = None,
        client_cert_present: bool = False,
    ) -> ProviderProfile:
        """The checks that need no body: IP and mTLS, provider, method, media type, size.

        The ASGI app runs these before reading the body, so a stranger costs nothing.

        Args:
            provider: Provider name from the URL.
            method: HTTP method.
            headers: Request headers (any case); a ``Content-Length`` above the limit is
                refused here.
            remote_addr: Peer IP address (no port), for the allowlist.
            client_cert_present: Whether a verified client certificate was presented.

        Returns:
            The provider's profile.

        Raises:
            WebhookSecurityError: 403 ``ip_not_allowed`` / ``mtls_required``, 404
                ``unknown_provider``, 405 ``method_not_allowed``, 415
                ``unsupported_media_type`` / ``unsupported_content_encoding``, 413
                ``payload_too_large``, 400 ``bad_content_length``.
            UsageError: If an argument has the wrong type.
        """
        return self._check_request(
            provider, method, _lower_headers(headers), remote_addr, client_cert_present
        )

    def _check_request(
        self,
        provider: str,
        method: str,
        headers: dict[str, str],
        remote_addr: str | None,
        client_cert_present: bool,
    ) -> ProviderProfile:
        if not isinstance(provider, str) or not isinstance(method, str):
            raise UsageError("provider and method must be str")
        if not self._ip_allowed(remote_addr):
            raise _reject(403, "ip_not_allowed", "the client address is not allowed")
        if self.policy.require_mtls and client_cert_present is not True:
            raise _reject(403, "mtls_required", "a verified client certificate is required")
        profile = self.profiles.get(provider)
        if profile is None:
            raise _reject(404, "unknown_provider", "no such webhook provider")
        if method.upper() != "POST":
            raise _reject(405, "method_not_allowed", "webhooks are delivered with POST")
        media = _media_type(headers)
        if media not in self.policy.allowed_content_types and not (
            media == FORM_MEDIA_TYPE and self._takes_forms(profile)
        ):
            raise _reject(
                415,
                "unsupported_media_type",
                f"content type must be one of {list(self.policy.allowed_content_types)}",
            )
        if not identity_coded(headers):
            raise _reject(
                415,
                "unsupported_content_encoding",
                "the body must be sent as is, with no Content-Encoding (gzip, ...)",
            )
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isascii() or not declared.isdigit() or len(declared) > 18:
                raise _reject(400, "bad_content_length", "Content-Length is not a number")
            if int(declared) > self.policy.max_payload_bytes:
                raise _reject(413, "payload_too_large", self._too_large())
        return profile

    def _too_large(self) -> str:
        return f"the body exceeds {self.policy.max_payload_bytes} bytes"

    def verify(
        self,
        provider: str,
        *,
        method: str,
        headers: Mapping[str, str],
        raw_body: bytes,
        remote_addr: str | None = None,
        client_cert_present: bool = False,
    ) -> VerifiedWebhook:
        """Run every check except replay defence (pure: no store, no I/O).

        Args:
            provider: Provider name from the URL.
            method: HTTP method.
            headers: Request headers (any case).
            raw_body: The exact body bytes.
            remote_addr: Peer IP address (no port).
            client_cert_present: Whether a verified client certificate was presented.

        Returns:
            The verified request.

        Raises:
            WebhookSecurityError: With the HTTP status and reason of the first failed
                check (see :meth:`check_request`; then 413, 400 ``missing_header`` /
                ``bad_timestamp``, 401 ``missing_signature`` / ``stale_timestamp`` /
                ``bad_signature``, 400 ``malformed_json`` / ``not_an_object`` /
                ``too_deep`` / ``missing_field`` / ``missing_event_id`` /
                ``bad_event_id``).
            UsageError: If an argument has the wrong type.
        """
        if not isinstance(raw_body, bytes | bytearray | memoryview):
            raise UsageError(f"raw_body must be bytes, not {type(raw_body).__name__}")
        lowered = _lower_headers(headers)
        profile = self._check_request(provider, method, lowered, remote_addr, client_cert_present)
        return self._verify_body(profile, lowered, bytes(raw_body))

    def _verify_body(
        self, profile: ProviderProfile, lowered: dict[str, str], body: bytes
    ) -> VerifiedWebhook:
        # The checks after check_request(); ``lowered`` has lower-case names only.
        if len(body) > self.policy.max_payload_bytes:
            raise _reject(413, "payload_too_large", self._too_large())
        parts = parse_signed_parts(profile, lowered)
        scheme = profile.canonical_scheme
        now = self._clock()
        if parts.timestamp is None and scheme == "hmac" and self.policy.strict_mode:
            raise _reject(
                400, "missing_header", f"required header {profile.timestamp_header} is missing"
            )
        timestamp = now
        if parts.timestamp is not None:
            timestamp = parse_timestamp(parts.timestamp)
            if abs(now - timestamp) > self.policy.timestamp_skew_limit_sec:
                raise _reject(
                    401,
                    "stale_timestamp",
                    f"the timestamp is more than {self.policy.timestamp_skew_limit_sec} s "
                    "from the receiver's clock",
                )
        if not parts.signatures or not signature_matches(self._keyed[profile.name], parts, body):
            raise _reject(401, "bad_signature", "the signature does not verify")
        form = _media_type(lowered) == FORM_MEDIA_TYPE
        payload = parse_form(body, scheme in _FORM_SCHEMES) if form else parse_json_object(body)
        if not form and scheme == "slack" and payload.get("type") == "url_verification":
            challenge = payload.get("challenge")
            if not isinstance(challenge, str) or not 0 < len(challenge) <= 256:
                raise _reject(400, "missing_field", "url_verification needs a challenge")
            return VerifiedWebhook(
                profile, payload, "url_verification", timestamp, _safe(lowered), challenge, body
            )
        for name in profile.required_payload_fields:
            if name not in payload:
                raise _reject(400, "missing_field", f"the payload lacks the field {name!r}")
        event_id = self._event_id(profile, parts.event_id, payload, body, form)
        digest = None
        if (
            scheme == "github"
            or (scheme == "hmac" and profile.canonicalization == "raw_body")
            or (parts.event_id is None and self._takes_forms(profile))
        ):
            # The event id is not what the signature covers (a header, or re-datable with
            # an unsigned timestamp), or it depends on the unsigned Content-Type (a body
            # read as JSON or as a form has another id: a form's trigger_id, or the
            # body's digest): the replay claim covers the signed bytes too.
            digest = hashlib.sha256(body).hexdigest()
        return VerifiedWebhook(
            profile, payload, event_id, timestamp, _safe(lowered), body=body, body_digest=digest
        )

    def _takes_forms(self, profile: ProviderProfile) -> bool:
        """Whether ``profile`` accepts form bodies (beside JSON ones)."""
        return (
            FORM_MEDIA_TYPE in self.policy.allowed_content_types
            or profile.canonical_scheme in _FORM_SCHEMES
        )

    def _event_id(
        self,
        profile: ProviderProfile,
        from_header: str | None,
        payload: dict[str, Any],
        body: bytes,
        form: bool,
    ) -> str:
        value: Any = from_header
        slack_form = form and profile.canonical_scheme == "slack"
        if value is None:
            if slack_form:
                # Slash commands and interactive payloads carry no event id; trigger_id
                # is unique per invocation (and signed).
                field_name = "trigger_id"
            else:
                field_name = _PAYLOAD_ID_FIELD.get(profile.canonical_scheme, profile.event_id_field)
            value = payload.get(field_name)
        if value is None:
            if self.policy.strict_mode and not slack_form:
                raise _reject(400, "missing_event_id", "the request carries no event id")
            return "sha256:" + hashlib.sha256(body).hexdigest()
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not _EVENT_ID_RE.match(value):
            raise _reject(400, "bad_event_id", "the event id must be 1-256 printable characters")
        return value

    # -- replay defence ----------------------------------------------------------------

    @property
    def claim_ttl_sec(self) -> int:
        """Seconds every claim key lives (:attr:`WebhookSecurityPolicy.replay_ttl_sec`)."""
        return self.policy.replay_ttl_sec

    def claim_keys(self, verified: VerifiedWebhook) -> tuple[str, ...]:
        """The store keys whose joint absence makes ``verified`` new (pure, no I/O).

        The first key is derived from the event id. For schemes whose event id is not
        covered by the signature (GitHub, ``"hmac"`` with ``raw_body``) a second key is
        derived from the digest of the signed bytes, so changing the unsigned id header
        does not make a captured request new; likewise where the id is read from a body
        the profile takes as JSON or as a form (Slack), so changing the unsigned
        ``Content-Type`` does not either. A Slack ``url_verification`` handshake
        claims nothing (empty tuple).

        A consumer that writes its own record atomically with the claim (an inbox)
        writes every one of these keys, with TTL :attr:`claim_ttl_sec`, in one
        ``Store.aupdate`` that first checks they are all absent; the request is a replay
        when any of them exists.

        Raises:
            UsageError: If ``verified`` is not a :class:`VerifiedWebhook`.
        """
        if not isinstance(verified, VerifiedWebhook):
            raise UsageError(f"verified must be a VerifiedWebhook, not {type(verified).__name__}")
        if verified.challenge is not None:
            return ()
        provider = verified.profile.name
        digest = hashlib.sha256(verified.event_id.encode()).hexdigest()[:40]
        first = f"{self._prefix}:seen:{provider}:{digest}"
        if verified.body_digest is None:
            return (first,)
        return first, f"{self._prefix}:seen:{provider}:body:{verified.body_digest[:40]}"

    def claim_record(self, verified: VerifiedWebhook, token: str) -> dict[str, Any]:
        """The value :meth:`aclaim` stores under each claim key (JSON-compatible)."""
        if not isinstance(verified, VerifiedWebhook) or not isinstance(token, str):
            raise UsageError("claim_record takes a VerifiedWebhook and a str token")
        return {"event_id": verified.event_id, "at": self._clock(), "token": token}

    async def aclaim(self, verified: VerifiedWebhook) -> str:
        """Claim every key of :meth:`claim_keys` atomically; return a token for :meth:`arelease`.

        Raises:
            DuplicateEventError: One of the keys was claimed inside the idempotency window.
            StoreError: The store failed.
        """
        token, keys, record = self._claim_plan(verified)
        if keys:
            ttl = self.claim_ttl_sec
            if len(keys) == 1:
                claimed = await self.store.aput_if_absent(keys[0], record, ttl=ttl)
            else:
                claimed = await self.store.aupdate(keys, _claim_all(keys, record), ttl=ttl)
            _check_claimed(claimed)
        return token

    def _claim_sync(self, verified: VerifiedWebhook) -> str:
        # aclaim() through the store's own sync methods: no event loop is involved
        # (a MemoryStore does the work inline; blocking stores block this thread).
        token, keys, record = self._claim_plan(verified)
        if keys:
            ttl = self.claim_ttl_sec
            if len(keys) == 1:
                claimed = self.store.put_if_absent(keys[0], record, ttl=ttl)
            else:
                claimed = self.store.update(keys, _claim_all(keys, record), ttl=ttl)
            _check_claimed(claimed)
        return token

    def _claim_plan(self, verified: VerifiedWebhook) -> tuple[str, tuple[str, ...], dict[str, Any]]:
        """What a claim writes: its token, its keys (none: nothing to claim) and the
        record stored under each key."""
        token = f"{self._token_prefix}{next(self._token_count):x}"
        keys = self.claim_keys(verified)
        return token, keys, (self.claim_record(verified, token) if keys else {})

    async def arelease(self, verified: VerifiedWebhook, token: str) -> None:
        """Drop the claim made with ``token`` (only that one), so a retry can succeed."""
        if not isinstance(token, str):
            raise UsageError(f"token must be the str aclaim returned, not {type(token).__name__}")
        keys = self.claim_keys(verified)
        if not keys:
            return

        def release(current: dict[str, Any]) -> tuple[dict[str, Any], None]:
            mine = {
                key: None
                for key, value in current.items()
                if isinstance(value, Mapping) and value.get("token") == token
            }
            return mine, None

        await self.store.aupdate(keys, release)

    async def avalidate_and_extract(
        self,
        provider: str,
        *,
        method: str,
        headers: dict[str, str],
        raw_body: bytes,
        remote_addr: str | None = None,
        client_cert_present: bool = False,
    ) -> tuple[ProviderProfile, dict[str, Any], str, float]:
        """Verify a request and claim its event id.

        Returns:
            ``(profile, payload, event_id, timestamp)``.

        Raises:
            WebhookSecurityError: For a rejected request (see :meth:`verify`).
            DuplicateEventError: For a replayed event id (a WebhookSecurityError with
                ``status == 200``).
            StoreError: The store failed.
        """
        verified = self.verify(
            provider,
            method=method,
            headers=headers,
            raw_body=raw_body,
            remote_addr=remote_addr,
            client_cert_present=client_cert_present,
        )
        await self.aclaim(verified)
        return verified.profile, verified.payload, verified.event_id, verified.timestamp

    def validate_and_extract(
        self,
        provider: str,
        *,
        method: str,
        headers: dict[str, str],
        raw_body: bytes,
        remote_addr: str | None = None,
        client_cert_present: bool = False,
    ) -> tuple[ProviderProfile, dict[str, Any], str, float]:
        """Sync form of :meth:`avalidate_and_extract` (not on an event-loop thread).

        The same checks and claim, run on the calling thread with the store's own
        synchronous methods: no event loop is started or used.
        """
        _sync.check_sync_allowed("WebhookSecurity.avalidate_and_extract")
        verified = self.verify(
            provider,
            method=method,
            headers=headers,
            raw_body=raw_body,
            remote_addr=remote_addr,
            client_cert_present=client_cert_present,
        )
        self._claim_sync(verified)
        return verified.profile, verified.payload, verified.event_id, verified.timestamp


def _check_claimed(claimed: bool) -> None:
    if not claimed:
        raise DuplicateEventError("this event was already accepted")


def _claim_all(
    keys: tuple[str, ...], record: dict[str, Any]
) -> Callable[[dict[str, Any]], tuple[dict[str, Any], bool]]:
    """The update function claiming every key of ``keys``, or none if one is taken."""

    def claim(current: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        if any(value is not None for value in current.values()):
            return {}, False
        return dict.fromkeys(keys, record), True

    return claim


def _safe(headers: dict[str, str]) -> dict[str, str]:
    # ``headers`` is always a dict this module made; copy it only to drop credentials.
    if _CREDENTIAL_HEADERS.isdisjoint(headers):
        return headers
    return {k: v for k, v in headers.items() if k not in _CREDENTIAL_HEADERS}
