"""Benchmark the durable inbox: accepted events/s through the connector, SQLite vs memory.

In one process, 32 concurrent senders call ``WebhookConnector.accept_inbound_http`` with
pre-signed, unique generic-HMAC requests while consumers take every event and
acknowledge it. Implementations (a fresh store per round):

* ``converge``: the durable inbox on the embedded default store (SQLite file, JSON
  serializer, synced commits): claim + record in one atomic write before the ``202``;
  consumers ``receive_inbound()`` and ``aack_inbound()`` (a second write).
* ``converge-memory``: the same inbox on a ``MemoryStore`` (nothing survives a restart).
* ``old-memory-handoff``: the path the inbox replaced, rebuilt from the same parts:
  verify, claim with ``put_if_absent`` on a MemoryStore, hand the ``Message`` to a
  bounded in-memory queue that a consumer drains (lost if the process dies).

A second case, ``standalone``, is the CLI gateway's path for events without
``forward_to``: the record is written already acknowledged (one write, no consumer).

Warm-up, then the best of several rounds per implementation (rounds alternate). One
JSON line per case and implementation (``ops_per_s``, ``p50_ms``, ``p99_ms`` of the
accept call), then a table of ratios on stderr.

Usage: ``python benchmarks/inbox.py [--quick]``
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

import anyio

from _bench import Results, arg_parser, best_of_rounds, print_ratio_table, scratch_dir
from converge.core.store import Store
from converge.extensions.connectors import ProviderProfile, WebhookConnector
from converge.extensions.connectors.inbound.inbox import event_uid
from converge.extensions.storage import MemoryStore, SQLiteStore

SECRET = "bench-secret"
SENDERS = 32
CONSUMERS = 4
PROFILES = {"bench": ProviderProfile("bench", "bench", canonicalization="timestamp_body")}

Round = tuple[float, float, float]  # ops/s, p50 ms, p99 ms


def signed(n: int) -> list[tuple[dict[str, str], bytes]]:
    """``n`` unique requests signed the way the generic HMAC scheme checks them."""
    out = []
    key = SECRET.encode()
    for _ in range(n):
        body = json.dumps({"event_id": f"evt_{uuid.uuid4().hex}", "subject": "order.paid"})
        ts = str(int(time.time()))
        mac = hmac.new(key, f"{ts}.{body}".encode(), hashlib.sha256).hexdigest()
        headers = {
            "content-type": "application/json",
            "x-webhook-timestamp": ts,
            "x-webhook-signature": f"sha256={mac}",
        }
        out.append((headers, body.encode()))
    return out


def fresh_store(kind: str) -> Store:
    if kind == "sqlite":
        path = os.path.join(scratch_dir("converge-inbox-bench-"), "inbox.sqlite3")
        return SQLiteStore(path, serializer="json")
    return MemoryStore()


def connector(store: Store, n: int, *, record_only: bool = False) -> WebhookConnector:
    return WebhookConnector(
        provider_profiles=PROFILES,
        secrets={"bench": SECRET},
        store=store,
        max_pending=n + 100,
        acknowledge_on_accept=record_only,
    )


def summary(n: int, seconds: float, latencies: list[float]) -> Round:
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1000
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
    return n / seconds, p50, p99


async def senders(
    accept: Callable[[dict[str, str], bytes], Any], requests: list[tuple[dict[str, str], bytes]]
) -> list[float]:
    latencies: list[float] = []

    async def send(chunk: list[tuple[dict[str, str], bytes]]) -> None:
        for headers, body in chunk:
            start = time.perf_counter()
            status = await accept(headers, body)
            latencies.append(time.perf_counter() - start)
            assert status == 202, status

    async with anyio.create_task_group() as tg:
        for i in range(SENDERS):
            tg.start_soon(send, requests[i::SENDERS])
    return latencies


async def durable_round(kind: str, n: int, record_only: bool) -> Round:
    store = fresh_store(kind)
    c = connector(store, n, record_only=record_only)
    requests = signed(n)
    done = anyio.Event()
    consumed = 0

    async def accept(headers: dict[str, str], body: bytes) -> int:
        status, _, _ = await c.accept_inbound_http(
            "bench", method="POST", headers=headers, raw_body=body
        )
        return status

    async def consume() -> None:
        nonlocal consumed
        while consumed < n:
            item = await c.receive_inbound()
            assert await c.aack_inbound(item)
            consumed += 1
        done.set()

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        if not record_only:
            for _ in range(CONSUMERS):
                tg.start_soon(consume)
        latencies = await senders(accept, requests)
        if not record_only:
            await done.wait()
        tg.cancel_scope.cancel()
    seconds = time.perf_counter() - start
    await c.aclose()
    await store.aclose()
    return summary(n, seconds, latencies)


async def old_round(n: int) -> Round:
    """verify + put_if_absent claim + in-memory queue, as the connector did before."""
    store = MemoryStore()
    c = connector(store, n)
    security = c.security
    profile = security.profiles["bench"]
    requests = signed(n)
    # Room for the whole round: the old 1,000-slot queue shed load (503) whenever the
    # consumer fell behind; here it is only measured for throughput.
    send, receive = anyio.create_memory_object_stream[Any](n)
    done = anyio.Event()

    async def accept(headers: dict[str, str], body: bytes) -> int:
        lowered = {k.lower(): v for k, v in headers.items()}
        verified = security._verify_body(profile, lowered, body)
        key = f"converge:webhook:bench:seen:{verified.event_id}"
        claim = {"event_id": verified.event_id, "at": time.time()}
        if not await store.aput_if_absent(key, claim, ttl=3600):
            return 200
        item = c._item(verified, event_uid("bench", verified.event_id))
        try:
            send.send_nowait(item)
        except anyio.WouldBlock:
            await store.adelete(key)
            return 503
        return 202

    async def consume() -> None:
        consumed = 0
        async for _ in receive:
            consumed += 1
            if consumed == n:
                done.set()

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        latencies = await senders(accept, requests)
        await done.wait()
        tg.cancel_scope.cancel()
    seconds = time.perf_counter() - start
    await c.aclose()
    return summary(n, seconds, latencies)


def main() -> None:
    args = arg_parser(__doc__).parse_args()
    warmup, size, rounds = (100, 300, 1) if args.quick else (500, 3000, 3)
    results = Results()

    def durable(kind: str, record_only: bool) -> Callable[[int], Round]:
        return lambda n: anyio.run(durable_round, kind, n, record_only)

    cases = {
        "accept+consume": {
            "converge": durable("sqlite", False),
            "converge-memory": durable("memory", False),
            "old-memory-handoff": lambda n: anyio.run(old_round, n),
        },
        "standalone": {
            "converge": durable("sqlite", True),
            "old-memory-handoff": lambda n: anyio.run(old_round, n),
        },
    }
    for case, impls in cases.items():
        best = best_of_rounds(impls, warmup, size, rounds, key=lambda r: r[0])
        for impl, (rate, p50, p99) in best.items():
            results.add(case, impl, rate, p50_ms=round(p50, 3), p99_ms=round(p99, 3))
    print_ratio_table(results.rows, (16, 20, 12, 12))


if __name__ == "__main__":
    main()
