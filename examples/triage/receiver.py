"""A stand-in for a chat service: receives the triage replies as signed webhooks.

``POST /messages`` checks the Standard Webhooks signature (``webhook-id``,
``webhook-timestamp``, ``webhook-signature``) with the shared signing secret, refuses a
timestamp more than five minutes off (``401 timestamp_outside_tolerance``), and keeps
each message once: a request whose ``Idempotency-Key`` (else ``webhook-id``) was seen
before is answered ``200 {"status": "duplicate"}``, as a real chat API deduplicates
retries. ``GET /messages`` returns what arrived: ``{"requests", "distinct", "messages"}``.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from converge.errors import ConvergeError
from converge.extensions.connectors import sign_webhook

__all__ = ["ChatReceiver"]

_Scope = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
_Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
_MAX_BODY = 256 * 1024
_MAX_KEPT = 100_000


class ChatReceiver:
    """The chat service's ASGI app (see the module docstring).

    Args:
        signing_secret: The Standard Webhooks secret (``whsec_...``) requests are signed with.
        tolerance_sec: Largest accepted difference between a request's timestamp and now.
        on_message: Called with each new message's body (the app prints it).
        clock: Unix seconds.
    """

    def __init__(
        self,
        signing_secret: str,
        *,
        tolerance_sec: float = 300.0,
        on_message: Callable[[dict[str, Any]], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.signing_secret = signing_secret
        self.tolerance_sec = tolerance_sec
        self.on_message = on_message
        self.clock = clock
        self.requests = 0
        self.messages: dict[str, dict[str, Any]] = {}

    def _check(self, headers: dict[str, str], body: bytes) -> str | None:
        """Why the request is refused, or None."""
        msg_id = headers.get("webhook-id", "")
        stamp = headers.get("webhook-timestamp", "")
        presented = headers.get("webhook-signature", "").split()
        if not msg_id or not stamp.isdigit() or not presented:
            return "missing_signature"
        if abs(self.clock() - int(stamp)) > self.tolerance_sec:
            return "timestamp_outside_tolerance"
        try:
            expected = sign_webhook(
                "standard-webhooks",
                self.signing_secret,
                body,
                timestamp=int(stamp),
                event_id=msg_id,
            )["webhook-signature"]
        except ConvergeError:
            return "bad_signature"
        if not any(hmac.compare_digest(p.encode(), expected.encode()) for p in presented):
            return "bad_signature"
        return None

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        """The ASGI 3 entry point."""
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].rsplit(".", 1)[-1]
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"].rstrip("/")
        if path != "/messages":
            await _answer(send, 404, {"status": "not_found"})
        elif method == "GET":
            await _answer(send, 200, self.summary())
        elif method != "POST":
            await _answer(send, 405, {"status": "method_not_allowed"})
        else:
            await self._post(scope, receive, send)

    async def _post(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > _MAX_BODY:
                await _answer(send, 413, {"status": "too_large"})
                return
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        self.requests += 1
        reason = self._check(headers, body)
        if reason is not None:
            await _answer(send, 401, {"status": "rejected", "reason": reason})
            return
        try:
            data = json.loads(body)
        except ValueError:
            await _answer(send, 400, {"status": "rejected", "reason": "not_json"})
            return
        key = headers.get("idempotency-key") or headers["webhook-id"]
        if key in self.messages:
            await _answer(send, 200, {"status": "duplicate"})
            return
        if len(self.messages) < _MAX_KEPT:
            self.messages[key] = data
        if self.on_message is not None:
            self.on_message(data)
        await _answer(send, 200, {"status": "ok"})

    def summary(self) -> dict[str, Any]:
        """``{"requests": n, "distinct": n, "messages": {key: body}}``."""
        return {
            "requests": self.requests,
            "distinct": len(self.messages),
            "messages": self.messages,
        }


async def _answer(send: _Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
