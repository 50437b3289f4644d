"""``converge webhook sign`` and ``converge webhook send``: correctly signed test requests."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from converge.cli.config import GatewayConfig
from converge.errors import UsageError
from converge.extensions.connectors import ProviderProfile, sign_webhook

__all__ = ["SignedRequest", "default_body", "resolve_target", "sign_request"]


@dataclass(frozen=True, slots=True)
class SignedRequest:
    """A ready-to-send webhook request.

    Attributes:
        headers: Every header, ``Content-Type`` included.
        body: The exact body bytes.
    """

    headers: dict[str, str]
    body: bytes

    def to_dict(self) -> dict[str, Any]:
        """``{"headers": {...}, "body": "..."}``."""
        return {"headers": self.headers, "body": self.body.decode()}

    def curl(self, url: str) -> str:
        """A ``curl`` command line sending this request to ``url``."""

        def quote(text: str) -> str:
            return "'" + text.replace("'", "'\\''") + "'"

        parts = ["curl", "-sS", "-X", "POST", quote(url)]
        for name, value in self.headers.items():
            parts += ["-H", quote(f"{name}: {value}")]
        parts += ["--data-binary", quote(self.body.decode())]
        return " ".join(parts)


def default_body(profile: ProviderProfile) -> dict[str, Any]:
    """A valid test payload for ``profile``'s scheme, with a fresh event id."""
    scheme = profile.canonical_scheme
    token = uuid.uuid4().hex
    if scheme == "stripe":
        body: dict[str, Any] = {
            "id": f"evt_{token}",
            "object": "event",
            "type": "converge.test",
            "created": int(time.time()),
            "data": {"object": {"hello": "world"}},
        }
    elif scheme == "github":
        body = {"zen": "Design for failure.", "hook_id": 1}
    elif scheme == "slack":
        body = {
            "type": "event_callback",
            "event_id": f"Ev{token[:10].upper()}",
            "event_time": int(time.time()),
            "event": {"type": "app_mention", "text": "hello from converge"},
        }
    elif scheme == "standard-webhooks":
        body = {"type": "converge.test", "timestamp": int(time.time()), "data": {"hello": "world"}}
    else:
        body = {
            profile.event_id_field: f"evt_{token}",
            profile.subject_field: "converge.test",
            profile.source_field: "converge-cli",
            "data": {"hello": "world"},
        }
    for name in profile.required_payload_fields:
        body.setdefault(name, "converge-test")
    return body


def sign_request(
    profile: ProviderProfile,
    secret: str,
    *,
    body: bytes | None = None,
    timestamp: int | None = None,
    event_id: str | None = None,
) -> SignedRequest:
    """Sign ``body`` (or a fresh :func:`default_body`) as ``profile``'s sender would.

    Raises:
        UsageError: If ``body`` is not a JSON object.
    """
    if body is None:
        body = json.dumps(default_body(profile), separators=(",", ":")).encode()
    else:
        try:
            parsed = json.loads(body)
        except json.JSONDecodeError as exc:
            raise UsageError(
                f"the request body is not valid JSON: {exc.msg} "
                f"(line {exc.lineno}, column {exc.colno})"
            ) from exc
        except ValueError as exc:  # not UTF-8
            raise UsageError(f"the request body is not valid JSON: {exc}") from exc
        if not isinstance(parsed, dict):
            raise UsageError("the request body must be a JSON object")
    headers = {"Content-Type": "application/json"}
    headers.update(sign_webhook(profile, secret, body, timestamp=timestamp, event_id=event_id))
    return SignedRequest(headers, body)


def resolve_target(config: GatewayConfig, provider: str) -> tuple[ProviderProfile, str, str]:
    """The profile, first secret and local URL of ``provider`` in a gateway config.

    Raises:
        UsageError: If the config has no such provider.
    """
    found = config.providers.get(provider)
    if found is None:
        raise UsageError(
            f"provider {provider!r} is not in the config; known: {sorted(config.providers)}"
        )
    host = config.bind
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "[::1]"
    elif ":" in host:
        host = f"[{host}]"
    return found.profile, found.secrets[0], f"http://{host}:{config.port}/webhook/{provider}"
