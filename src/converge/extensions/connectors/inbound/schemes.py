"""Sans-I/O webhook signature schemes: parse, verify and sign.

Each scheme turns request headers into the signed prefix (the bytes hashed before the
body), the candidate signatures and, where the sender puts it in a header, the event id.
Nothing here reads a clock, sleeps or does I/O; :class:`~.security.WebhookSecurity` and
``converge webhook sign`` drive these functions.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import math
import re
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

from converge.errors import ConfigurationError, UsageError, WebhookSecurityError
from converge.extensions.connectors.models import SCHEMES as _SCHEMES
from converge.extensions.connectors.models import ProviderProfile

__all__ = [
    "EVENT_ID_RE",
    "SignedParts",
    "compute_signature",
    "decode_secret",
    "hmac_state",
    "parse_signed_parts",
    "parse_timestamp",
    "sign_webhook",
    "signature_matches",
]

# An event id a receiver accepts (and a sender may send): printable ASCII, 1-256 long.
EVENT_ID_RE = re.compile(r"^[\x21-\x7e]{1,256}\Z")
# Several signatures per header are allowed (secret rotation); more than this is abuse.
_MAX_SIGNATURES = 16
_TIMESTAMP_RE = re.compile(r"^[0-9]{1,12}(\.[0-9]{1,9})?\Z")


class SignedParts(NamedTuple):
    """What a request's headers say about its signature (a tuple: built per request).

    Attributes:
        prefix: Bytes signed before the raw body.
        signatures: Candidate signatures (decoded digests); any one may match.
        timestamp: The timestamp text as sent, or None if the scheme has none.
        event_id: The event id from a header, or None if it lives in the payload.
    """

    prefix: bytes
    signatures: tuple[bytes, ...]
    timestamp: str | None
    event_id: str | None


def _missing_signature(name: str) -> WebhookSecurityError:
    return WebhookSecurityError(
        f"the {name} header is missing", status=401, reason="missing_signature"
    )


def _missing_header(name: str) -> WebhookSecurityError:
    return WebhookSecurityError(
        f"required header {name} is missing", status=400, reason="missing_header"
    )


def _hex(values: Iterable[str], size: int) -> tuple[bytes, ...]:
    out = []
    for value in values:
        value = value.strip()
        if len(value) == 2 * size and value.isascii() and value.isalnum():
            try:
                out.append(bytes.fromhex(value))
            except ValueError:
                continue
        if len(out) >= _MAX_SIGNATURES:
            break
    return tuple(out)


def _b64(values: Iterable[str]) -> tuple[bytes, ...]:
    out = []
    for value in values:
        try:
            # base64.b64decode(value, validate=True) without its Python-level wrapper
            out.append(binascii.a2b_base64(value, strict_mode=True))
        except (binascii.Error, ValueError):
            continue
        if len(out) >= _MAX_SIGNATURES:
            break
    return tuple(out)


@functools.lru_cache(maxsize=8)
def _digest_size(algorithm: str) -> int:
    return hashlib.new(algorithm).digest_size


def parse_signed_parts(profile: ProviderProfile, headers: Mapping[str, str]) -> SignedParts:
    """Read a request's signature headers as ``profile``'s scheme defines them.

    Args:
        profile: The provider profile (its scheme picks the format).
        headers: Request headers with **lower-case** names.

    Returns:
        The signed prefix, candidate signatures, timestamp text and header event id.
        Malformed signature values are skipped (they can never match).

    Raises:
        WebhookSecurityError: 401 ``missing_signature`` when the signature header is
            absent; 400 ``missing_header`` when another required header is absent.
    """
    scheme = profile.canonical_scheme
    if scheme == "standard-webhooks":
        return _parse_standard(profile, headers)
    if scheme == "stripe":
        return _parse_stripe(headers)
    if scheme == "github":
        return _parse_github(headers)
    if scheme == "slack":
        return _parse_slack(headers)
    return _parse_hmac(profile, headers)


def _parse_hmac(profile: ProviderProfile, headers: Mapping[str, str]) -> SignedParts:
    sig_name = profile.signature_header.lower()
    raw = headers.get(sig_name)
    if raw is None:
        raise _missing_signature(profile.signature_header)
    timestamp = headers.get(profile.timestamp_header.lower())
    if timestamp is None and profile.canonicalization == "timestamp_body":
        raise _missing_header(profile.timestamp_header)
    prefix = b""
    if profile.canonicalization == "timestamp_body" and timestamp is not None:
        prefix = timestamp.encode("latin-1", "replace") + b"."
    label = profile.signature_algorithm + "="
    tokens = re.split(r"[,\s]+", raw) if ("," in raw or " " in raw) else [raw]
    values = []
    for token in tokens:
        if token[: len(label)].lower() == label:
            token = token[len(label) :]
        values.append(token)
    size = _digest_size(profile.signature_algorithm)
    return SignedParts(prefix, _hex(values, size), timestamp, None)


# Standard Webhooks header names: (signature, id, timestamp), per accepted family.
_WEBHOOK_HEADERS = ("webhook-signature", "webhook-id", "webhook-timestamp")
_SVIX_HEADERS = ("svix-signature", "svix-id", "svix-timestamp")
_FAMILIES = {"standard-webhooks": (_WEBHOOK_HEADERS,), "svix": (_WEBHOOK_HEADERS, _SVIX_HEADERS)}


def _parse_standard(profile: ProviderProfile, headers: Mapping[str, str]) -> SignedParts:
    families = _FAMILIES[profile.scheme]
    for signature_name, id_name, timestamp_name in families:
        signature = headers.get(signature_name)
        if signature is None:
            continue
        msg_id = headers.get(id_name)
        timestamp = headers.get(timestamp_name)
        if msg_id is None:
            raise _missing_header(id_name)
        if timestamp is None:
            raise _missing_header(timestamp_name)
        values = []
        for token in signature.split():
            version, _, value = token.strip(",").partition(",")
            if version == "v1":
                values.append(value)
        prefix = f"{msg_id}.{timestamp}.".encode("latin-1", "replace")
        return SignedParts(prefix, _b64(values), timestamp, msg_id)
    raise _missing_signature(families[-1][0])


def _parse_stripe(headers: Mapping[str, str]) -> SignedParts:
    raw = headers.get("stripe-signature")
    if raw is None:
        raise _missing_signature("Stripe-Signature")
    timestamp: str | None = None
    values = []
    for item in raw.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t" and timestamp is None:
            timestamp = value
        elif key == "v1":
            values.append(value)
    if timestamp is None:
        raise WebhookSecurityError(
            "the Stripe-Signature header has no t= timestamp", status=400, reason="bad_timestamp"
        )
    prefix = timestamp.encode("latin-1", "replace") + b"."
    return SignedParts(prefix, _hex(values, 32), timestamp, None)


def _parse_github(headers: Mapping[str, str]) -> SignedParts:
    raw = headers.get("x-hub-signature-256")
    if raw is None:
        raise _missing_signature("X-Hub-Signature-256")
    delivery = headers.get("x-github-delivery")
    if delivery is None:
        raise _missing_header("X-GitHub-Delivery")
    tokens = [t.strip() for t in raw.split(",")]
    values = [t[len("sha256=") :] for t in tokens if t.startswith("sha256=")]
    return SignedParts(b"", _hex(values, 32), None, delivery)


def _parse_slack(headers: Mapping[str, str]) -> SignedParts:
    raw = headers.get("x-slack-signature")
    if raw is None:
        raise _missing_signature("X-Slack-Signature")
    timestamp = headers.get("x-slack-request-timestamp")
    if timestamp is None:
        raise _missing_header("X-Slack-Request-Timestamp")
    values = [t.strip()[3:] for t in raw.split(",") if t.strip().startswith("v0=")]
    prefix = b"v0:" + timestamp.encode("latin-1", "replace") + b":"
    return SignedParts(prefix, _hex(values, 32), timestamp, None)


def parse_timestamp(text: str) -> float:
    """Parse a Unix timestamp header: digits, optionally a fraction; nothing else.

    Raises:
        WebhookSecurityError: 400 ``bad_timestamp`` for NaN, infinities, signs,
            exponents, whitespace or any other text.
    """
    if not isinstance(text, str) or not _TIMESTAMP_RE.match(text):
        raise WebhookSecurityError(
            "the timestamp must be Unix seconds (digits)", status=400, reason="bad_timestamp"
        )
    value = float(text)
    if not math.isfinite(value):  # pragma: no cover - the pattern admits finite values only
        raise WebhookSecurityError(
            "the timestamp is not finite", status=400, reason="bad_timestamp"
        )
    return value


def decode_secret(scheme: str, secret: str) -> bytes:
    """Turn a configured secret into HMAC key bytes for ``scheme``.

    Standard Webhooks secrets are ``whsec_`` + base64 (the prefix is optional) and the
    key is the decoded bytes; every other scheme uses the secret's UTF-8 bytes (Stripe's
    ``whsec_...`` secrets included, as Stripe's libraries do).

    Raises:
        ConfigurationError: For an empty secret or a Standard Webhooks secret that is
            not base64.
    """
    if scheme not in _SCHEMES:
        raise ConfigurationError(f"unknown scheme {scheme!r}; one of {_SCHEMES}")
    if not isinstance(secret, str) or not secret:
        raise ConfigurationError("a webhook secret must be a non-empty string")
    if scheme in ("standard-webhooks", "svix"):
        text = secret.removeprefix("whsec_")
        try:
            key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ConfigurationError(
                "a Standard Webhooks secret is 'whsec_' followed by base64"
            ) from exc
        if not key:
            raise ConfigurationError("a Standard Webhooks secret must not be empty")
        return key
    return secret.encode()


def compute_signature(key: bytes, prefix: bytes, body: bytes, algorithm: str = "sha256") -> bytes:
    """HMAC of ``prefix + body``."""
    if len(body) <= 65536:
        return hmac.digest(key, prefix + body, algorithm)  # one C call
    mac = hmac.new(key, prefix, algorithm)  # large bodies: no concatenated copy
    mac.update(body)
    return mac.digest()


def hmac_state(key: bytes, algorithm: str = "sha256") -> hmac.HMAC:
    """An HMAC keyed with ``key``, to copy for each message (the key is prepared once)."""
    return hmac.new(key, digestmod=algorithm)


def signature_matches(keyed: Sequence[hmac.HMAC], parts: SignedParts, body: bytes) -> bool:
    """Return True if any candidate signature is the HMAC under any key.

    Args:
        keyed: One :func:`hmac_state` per secret (left unchanged: each is copied).
        parts: The request's signed prefix and candidate signatures.
        body: The raw body.

    Every comparison is constant time; all candidates are compared.
    """
    matched = False
    for state in keyed:
        mac = state.copy()
        mac.update(parts.prefix)
        mac.update(body)
        expected = mac.digest()
        for candidate in parts.signatures:
            matched |= hmac.compare_digest(expected, candidate)
    return matched


def sign_webhook(
    profile: ProviderProfile | str,
    secret: str,
    body: bytes,
    *,
    timestamp: int | None = None,
    event_id: str | None = None,
) -> dict[str, str]:
    """Headers that make ``body`` a correctly signed request for ``profile``'s scheme.

    Use it to test a receiver (``converge webhook sign`` prints the same headers) and,
    with ``"standard-webhooks"``, to sign outbound requests.

    Args:
        profile: A provider profile, or a scheme name (generic ``"hmac"`` then uses the
            profile defaults: ``X-Webhook-Signature`` / ``X-Webhook-Timestamp``).
        secret: The shared secret, as configured on the receiver.
        body: The exact request body.
        timestamp: Unix seconds; now when None.
        event_id: For header-carried ids (Standard Webhooks ``webhook-id``, GitHub
            ``X-GitHub-Delivery``); a random one when None. Payload-carried ids (Stripe,
            Slack, generic) live in the body and are ignored here. At most 256
            printable ASCII characters, as a receiver accepts.

    Returns:
        Header names and values to send along with ``Content-Type: application/json``.

    Raises:
        UsageError: For an unknown scheme or a non-bytes body.
        ConfigurationError: For an unusable secret.
    """
    if isinstance(profile, str):
        if profile not in _SCHEMES:
            raise UsageError(f"unknown scheme {profile!r}; one of {_SCHEMES}")
        profile = ProviderProfile(name="sign", secret_ref="sign", scheme=profile)
    if not isinstance(profile, ProviderProfile):
        raise UsageError("profile must be a ProviderProfile or a scheme name")
    if not isinstance(body, bytes | bytearray):
        raise UsageError(f"body must be bytes, not {type(body).__name__}")
    body = bytes(body)
    if timestamp is None:
        timestamp = int(time.time())
    if isinstance(timestamp, bool) or not isinstance(timestamp, int) or timestamp < 0:
        raise UsageError("timestamp must be a non-negative integer of Unix seconds")
    if event_id is not None and (not isinstance(event_id, str) or not EVENT_ID_RE.match(event_id)):
        raise UsageError("event_id must be 1-256 printable ASCII characters")
    ts = str(timestamp)
    scheme = profile.canonical_scheme
    key = decode_secret(profile.scheme, secret)
    if scheme == "standard-webhooks":
        msg_id = event_id or f"msg_{uuid.uuid4().hex}"
        sig = compute_signature(key, f"{msg_id}.{ts}.".encode(), body)
        return {
            "webhook-id": msg_id,
            "webhook-timestamp": ts,
            "webhook-signature": "v1," + base64.b64encode(sig).decode(),
        }
    if scheme == "stripe":
        sig = compute_signature(key, f"{ts}.".encode(), body)
        return {"Stripe-Signature": f"t={ts},v1={sig.hex()}"}
    if scheme == "github":
        sig = compute_signature(key, b"", body)
        return {
            "X-Hub-Signature-256": "sha256=" + sig.hex(),
            "X-GitHub-Delivery": event_id or str(uuid.uuid4()),
            "X-GitHub-Event": "ping",
        }
    if scheme == "slack":
        sig = compute_signature(key, f"v0:{ts}:".encode(), body)
        return {"X-Slack-Signature": "v0=" + sig.hex(), "X-Slack-Request-Timestamp": ts}
    prefix = f"{ts}.".encode() if profile.canonicalization == "timestamp_body" else b""
    sig = compute_signature(key, prefix, body, profile.signature_algorithm)
    return {
        profile.signature_header: f"{profile.signature_algorithm}={sig.hex()}",
        profile.timestamp_header: ts,
    }
