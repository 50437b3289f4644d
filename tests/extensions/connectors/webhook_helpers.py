"""Loopback servers and signing helpers for the connectors tests.

* :class:`ServerThread` serves any ASGI app with uvicorn (asyncio) or hypercorn (trio) on
  127.0.0.1 on its own thread and event loop, so tests on either backend talk to it over
  real sockets.
* :class:`Receiver` is the outside service outbound actions go to: it records every
  request, can fail a number of times (or until told otherwise), and counts distinct
  ``Idempotency-Key`` values.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
import standardwebhooks

from loopback import UvicornThread, loopback_socket, read_request, serve_lifespan

SW_SECRET = "whsec_" + base64.b64encode(b"converge-test-standard-webhooks!").decode()
STRIPE_SECRET = "whsec_test_stripe_0123456789abcdef"
GITHUB_SECRET = "github-test-secret"
SLACK_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
HMAC_SECRET = "generic-hmac-secret"
TARGET_SECRET = "whsec_" + base64.b64encode(b"outbound-target-signing-key-0001").decode()
TOKEN = "outbound-token-0123456789"


def now() -> int:
    return int(time.time())


def sw_request(
    body: bytes, *, msg_id: str | None = None, ts: int | None = None, secret: str = SW_SECRET
) -> dict[str, str]:
    """Headers signed by the reference ``standardwebhooks`` package."""
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    when = datetime.fromtimestamp(now() if ts is None else ts, tz=UTC)
    signature = standardwebhooks.Webhook(secret).sign(msg_id, when, body.decode())
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": signature,
    }


def stripe_request(
    body: bytes,
    *,
    ts: int | None = None,
    secret: str = STRIPE_SECRET,
    extra_signatures: tuple[str, ...] = (),
) -> dict[str, str]:
    """``Stripe-Signature: t=...,v1=...`` as Stripe documents it: HMAC-SHA256 of "{t}.{body}"."""
    t = now() if ts is None else ts
    sig = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    parts = [f"t={t}", *(f"v1={s}" for s in extra_signatures), f"v1={sig}", "v0=deadbeef"]
    return {"content-type": "application/json", "stripe-signature": ",".join(parts)}


def github_request(
    body: bytes, *, delivery: str | None = None, secret: str = GITHUB_SECRET
) -> dict[str, str]:
    """``X-Hub-Signature-256: sha256=<hex>`` over the raw body; id in X-GitHub-Delivery."""
    sig = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {
        "content-type": "application/json",
        "x-hub-signature-256": f"sha256={sig}",
        "x-github-delivery": delivery or str(uuid.uuid4()),
        "x-github-event": "push",
    }


def slack_request(
    body: bytes, *, ts: int | None = None, secret: str = SLACK_SECRET
) -> dict[str, str]:
    """``X-Slack-Signature: v0=<hex>`` over "v0:{ts}:{body}"."""
    t = now() if ts is None else ts
    sig = hmac.new(secret.encode(), f"v0:{t}:".encode() + body, hashlib.sha256).hexdigest()
    return {
        "content-type": "application/json",
        "x-slack-signature": f"v0={sig}",
        "x-slack-request-timestamp": str(t),
    }


def hmac_request(
    body: bytes, *, ts: int | None = None, secret: str = HMAC_SECRET, timestamp_body: bool = False
) -> dict[str, str]:
    """The generic scheme: hex HMAC in X-Webhook-Signature, time in X-Webhook-Timestamp."""
    t = now() if ts is None else ts
    prefix = f"{t}.".encode() if timestamp_body else b""
    sig = hmac.new(secret.encode(), prefix + body, hashlib.sha256).hexdigest()
    return {
        "content-type": "application/json",
        "x-webhook-signature": f"sha256={sig}",
        "x-webhook-timestamp": str(t),
    }


def event_body(**fields: Any) -> bytes:
    data = {"event_id": f"evt_{uuid.uuid4().hex}", "subject": "order.paid", **fields}
    return json.dumps(data).encode()


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int = 0
    names: tuple[str, ...] = ()  # every header name sent, repeats included


class Receiver:
    """An outside service: records requests; fails ``fail_next`` times, or while ``failing``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[Recorded] = []
        self.fail_next = 0
        self.failing = False
        self.fail_status = 503
        self.retry_after: str | None = None
        self.delay = 0.0
        self.status_for: Callable[[Recorded], int | None] | None = None
        self.set_cookie: str | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        headers, body = await read_request(scope, receive)
        names = tuple(name.decode("latin-1") for name, _ in scope["headers"])
        record = Recorded(scope["method"], scope["path"], headers, body, names=names)
        if self.delay:
            await anyio.sleep(self.delay)
        status = 200
        with self.lock:
            self.requests.append(record)
            if self.failing or self.fail_next > 0:
                self.fail_next = max(0, self.fail_next - 1)
                status = self.fail_status
            elif self.status_for is not None:
                status = self.status_for(record) or 200
            record.status = status
        out = [(b"content-type", b"application/json")]
        if status != 200 and self.retry_after is not None:
            out.append((b"retry-after", self.retry_after.encode()))
        if self.set_cookie is not None:
            out.append((b"set-cookie", self.set_cookie.encode()))
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": b"{}"})

    def delivered(self) -> list[Recorded]:
        """Every request received (``status`` says how it was answered)."""
        with self.lock:
            return list(self.requests)

    def keys(self) -> set[str]:
        with self.lock:
            return {r.headers.get("idempotency-key", "") for r in self.requests}


class ServerThread:
    """Serve an ASGI app on 127.0.0.1 from a daemon thread (uvicorn, or hypercorn+trio)."""

    def __init__(self, app: Any, *, server: str = "uvicorn") -> None:
        self.app = app
        self.server = server
        self.url = ""
        self._thread: threading.Thread | None = None
        self._uvicorn: UvicornThread | None = None
        self._stop = threading.Event()
        self._failure: list[BaseException] = []

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> ServerThread:
        if self.server == "uvicorn":
            self._uvicorn = UvicornThread(self.app).start()
            self.url = self._uvicorn.url
            return self
        sock = loopback_socket()
        port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self._thread = threading.Thread(target=self._run_hypercorn, args=(sock,), daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline or self._failure:
                    raise RuntimeError(f"hypercorn did not start: {self._failure}") from None
                time.sleep(0.01)
        return self

    def _run_hypercorn(self, sock: socket.socket) -> None:
        import hypercorn.config
        import hypercorn.trio
        import trio

        config = hypercorn.config.Config()
        sock.listen(128)
        # hypercorn wraps the descriptor in a socket of its own and closes it: ``sock``
        # lets go of it, or collecting ``sock`` later would close it a second time, by
        # then perhaps another socket's (seen as trio's wakeup socket on Python 3.13).
        config.bind = [f"fd://{sock.detach()}"]
        config.loglevel = "WARNING"
        config.accesslog = None

        async def shutdown() -> None:
            # A threading.Event set by the test thread: nothing trio can await.
            while not self._stop.is_set():  # noqa: ASYNC110
                await trio.sleep(0.02)

        try:
            trio.run(
                functools.partial(hypercorn.trio.serve, self.app, config, shutdown_trigger=shutdown)
            )
        except BaseException as exc:  # reported to the test thread
            self._failure.append(exc)

    def stop(self) -> None:
        if self._uvicorn is not None:
            self._uvicorn.stop()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def count_outbox_writes(store: Any) -> list[list[str]]:
    """From now on, list the keys of each update of ``store`` that writes outbox keys."""
    writes: list[list[str]] = []
    aupdate = store.aupdate

    async def counting(keys: Any, fn: Any, **kw: Any) -> Any:
        def counted(current: Any) -> Any:
            changes, result = fn(current)
            if any(":outbound:" in key for key in changes):
                writes.append(list(changes))
            return changes, result

        return await aupdate(keys, counted, **kw)

    store.aupdate = counting
    return writes
