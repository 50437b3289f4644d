"""Benchmark the synchronous surface: what a sync call costs over its coroutine.

Sync shims run their coroutine on a fresh event loop per call (``converge._sync.run``,
``anyio.run``); sync paths that need no loop (``validate_and_extract`` on a store with a
sync surface) skip it. Cases:

* ``agent_decide``: ``Agent.decide`` from a script against awaiting ``adecide`` on a
  running loop (the peer ``coroutine``); the table's last column is the time added per
  call in microseconds.
* ``tool_invoke_async_tool``: ``ToolRegistry.invoke`` of an async tool against awaiting
  ``ainvoke``.
* ``validate_and_extract``: ``WebhookSecurity.validate_and_extract`` (every check and the
  replay claim, on a MemoryStore) against ``standardwebhooks.Webhook.verify``, which
  checks the signature and timestamp and parses the JSON but claims nothing. The async
  ``avalidate_and_extract`` is measured too (``validate_and_extract_async``).

Usage: ``python benchmarks/sync_calls.py [--quick]``
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from standardwebhooks import Webhook

from _bench import (
    Column,
    Results,
    arg_parser,
    as_async,
    compare,
    compare_async,
    print_ratio_table,
)
from converge.core import Agent, Identity, Message, SendMessage, ToolRegistry
from converge.extensions.connectors import (
    ProviderProfile,
    WebhookSecurity,
    WebhookSecurityPolicy,
    sign_webhook,
)
from converge.extensions.storage import MemoryStore

SECRET = "whsec_" + base64.b64encode(os.urandom(24)).decode()


class Echo(Agent):
    """Answers each message with one message: a typical cheap, CPU-only decide."""

    async def adecide(self, messages: list[Message], tasks: list[Any], **kwargs: Any) -> list[Any]:
        return [SendMessage(Message(sender=self.id, recipient="x", payload={"n": len(messages)}))]


async def lookup(key: str) -> str:
    """An async tool."""
    return key.upper()


def signed_requests(count: int) -> list[tuple[dict[str, str], bytes]]:
    requests = []
    for i in range(count):
        body = json.dumps({"type": "invoice.paid", "data": {"n": i}}).encode()
        headers = sign_webhook("standard-webhooks", SECRET, body, event_id=f"msg_{i}")
        requests.append(({**headers, "content-type": "application/json"}, body))
    return requests


def run(quick: bool) -> list[dict[str, Any]]:
    results = Results()
    ops = 2_000 if quick else 20_000
    repeats = 3 if quick else 7

    agent = Echo(Identity.generate())
    message = [Message(sender="a", recipient=agent.id, payload={"q": 1})]
    sync_rate = compare({"converge": lambda: agent.decide(message, [])}, ops, repeats)
    async_rate = compare_async({"coroutine": lambda: agent.adecide(message, [])}, ops, repeats)
    results.add_rates("agent_decide", {**sync_rate, **async_rate})

    tools = ToolRegistry()
    tools.register(lookup)
    sync_rate = compare({"converge": lambda: tools.invoke("lookup", {"key": "k"})}, ops, repeats)
    async_rate = compare_async(
        {"coroutine": lambda: tools.ainvoke("lookup", {"key": "k"})}, ops, repeats
    )
    results.add_rates("tool_invoke_async_tool", {**sync_rate, **async_rate})

    profile = ProviderProfile(name="sw", secret_ref="sw", scheme="standard-webhooks")
    peer = Webhook(SECRET)
    total = ops * (repeats + 1) + ops // 10 + 1  # every call claims a fresh event id
    for name in ("validate_and_extract", "validate_and_extract_async"):
        security = WebhookSecurity(
            WebhookSecurityPolicy(), {"sw": profile}, {"sw": SECRET}, store=MemoryStore()
        )
        ours, theirs = iter(signed_requests(total)), iter(signed_requests(total))

        def verify_peer(theirs: Any = theirs) -> object:
            headers, body = next(theirs)
            return peer.verify(body, headers)

        if name == "validate_and_extract":

            def check(ours: Any = ours, security: WebhookSecurity = security) -> object:
                headers, body = next(ours)
                return security.validate_and_extract(
                    "sw", method="POST", headers=headers, raw_body=body
                )

            rates = compare({"converge": check, "standardwebhooks": verify_peer}, ops, repeats)
        else:

            async def acheck(ours: Any = ours, security: WebhookSecurity = security) -> object:
                headers, body = next(ours)
                return await security.avalidate_and_extract(
                    "sw", method="POST", headers=headers, raw_body=body
                )

            rates = compare_async(
                {"converge": acheck, "standardwebhooks": as_async(verify_peer)}, ops, repeats
            )
        results.add_rates(name, rates)

    print_ratio_table(
        results.rows,
        (28, 18, 12, 12),
        Column("us added", 10, lambda ours, theirs: f"{(1 / ours - 1 / theirs) * 1e6:.1f}"),
    )
    return results.rows


if __name__ == "__main__":
    run(arg_parser(__doc__).parse_args().quick)
