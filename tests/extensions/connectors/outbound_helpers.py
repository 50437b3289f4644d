"""Outbound test helpers: a scripted sender, a fake wall clock, a connector factory."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
from webhook_helpers import HMAC_SECRET

from converge.core.store import Store
from converge.extensions.connectors import (
    OutboundRequest,
    OutboundResponse,
    OutboundTarget,
    OutboundWebhookAction,
    ProviderProfile,
    WebhookConnector,
    WebhookRetryPolicy,
)
from converge.extensions.storage import MemoryStore
from loop_stall import eventually

FAST = WebhookRetryPolicy(
    max_attempts=5,
    base_delay_sec=0.01,
    max_delay_sec=0.05,
    jitter_ratio=0.0,
    request_timeout_sec=2.0,
)


class FakeClock:
    """Wall-clock stand-in: time moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class Sender:
    """An ``outbound_sender`` scripted per attempt; records every request."""

    def __init__(self, *replies: int | OutboundResponse) -> None:
        self.replies = list(replies)
        self.requests: list[OutboundRequest] = []
        self.default: int | OutboundResponse = 200

    async def __call__(self, request: OutboundRequest) -> int | OutboundResponse:
        self.requests.append(request)
        await anyio.lowlevel.checkpoint()
        return self.replies.pop(0) if self.replies else self.default


def make(store: Store | None = None, **kw: Any) -> WebhookConnector:
    kw.setdefault("retry_policy", FAST)
    kw.setdefault("targets", [OutboundTarget("app", "http://127.0.0.1:9/hook")])
    return WebhookConnector(
        provider_profiles={"p": ProviderProfile("p", "p")},
        secrets={"p": HMAC_SECRET},
        store=store or MemoryStore(),
        **kw,
    )


def action(n: int = 0, **kw: Any) -> OutboundWebhookAction:
    kw.setdefault("url", "http://127.0.0.1:9/hook")
    return OutboundWebhookAction(target=kw.pop("target", "app"), method="POST", body={"n": n}, **kw)


@asynccontextmanager
async def dispatching(c: WebhookConnector, poll: float = 0.01) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(c.run_outbound_dispatcher, poll_interval_sec=poll))
        await eventually(lambda: c.dispatcher.running)
        try:
            yield
        finally:
            c.stop_dispatcher()
