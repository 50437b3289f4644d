"""Benchmark the whole edge: webhook -> durable inbox -> agent -> outbox -> HTTP delivery.

One process holds a ``WebhookConnector`` (durable inbox and outbox), a ``MessageBus``, an
``AgentRunner`` (decision records in the same store) running an agent that answers each
inbound event with one outbound message, and the outbound dispatcher; a receiver served
by uvicorn (in a thread) records when each answer arrives over real HTTP. Senders post
pre-signed unique events through ``accept_inbound_http``; the latency of an event is the
time from its webhook call to its answer reaching the receiver. Two cases:

* ``webhook_to_delivery_c1``: one event in flight at a time: the latency of the edge
  itself.
* ``webhook_to_delivery_c8``: 8 senders at once, as fast as they go: the throughput, and
  the latency under that load (queueing included).

* ``converge``: everything on the embedded default store (SQLite file, synced commits).
* ``converge-memory``: the same on a ``MemoryStore`` (nothing survives a restart), the
  floor of the in-process work.

One JSON line per implementation: ``ops_per_s`` (events delivered end to end per second),
``p50_ms`` and ``p99_ms`` of the webhook-to-delivery latency.

Usage: ``python benchmarks/edge.py [--quick]``
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
import time
import uuid
from typing import Any

import anyio
import uvicorn

from _bench import (
    Results,
    arg_parser,
    free_port,
    print_ratio_table,
    scratch_dir,
    serve_lifespan,
)
from converge.core import Agent, Identity, Message, SendMessage
from converge.core.store import Store
from converge.extensions.connectors import (
    INBOUND_TOPIC,
    OUTBOUND_TOPIC,
    OutboundTarget,
    ProviderProfile,
    WebhookConnector,
)
from converge.extensions.storage import MemoryStore, SQLiteStore
from converge.runtime import AgentRunner, MessageBus

SECRET = "bench-secret"
PROFILES = {"bench": ProviderProfile("bench", "bench", canonicalization="timestamp_body")}


class Answerer(Agent):
    """Answers each inbound event with one message to the ``sink`` target."""

    async def adecide(self, messages: list[Message], tasks: list[Any], **kwargs: Any) -> list[Any]:
        return [
            SendMessage(
                Message(
                    sender=self.id,
                    topics=[OUTBOUND_TOPIC],
                    payload={"target": "sink", "body": {"event": m.payload["event_id"]}},
                )
            )
            for m in messages
        ]


class Receiver:
    """Records when each answer arrives (keyed by the event it answers)."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        event = json.loads(body)["event"]
        self.arrived.setdefault(event, time.perf_counter())
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def serve_receiver() -> tuple[Receiver, str, uvicorn.Server]:
    receiver = Receiver()
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(receiver, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return receiver, f"http://127.0.0.1:{port}", server


def signed(n: int) -> list[tuple[str, dict[str, str], bytes]]:
    out = []
    for _ in range(n):
        event_id = f"evt_{uuid.uuid4().hex}"
        body = json.dumps({"event_id": event_id, "subject": "issue.opened"})
        ts = str(int(time.time()))
        mac = hmac.new(SECRET.encode(), f"{ts}.{body}".encode(), hashlib.sha256).hexdigest()
        headers = {
            "content-type": "application/json",
            "x-webhook-timestamp": ts,
            "x-webhook-signature": f"sha256={mac}",
        }
        out.append((event_id, headers, body.encode()))
    return out


async def edge_round(
    store: Store, url: str, receiver: Receiver, n: int, concurrency: int
) -> tuple[float, list[float]]:
    requests = signed(n)
    sent: dict[str, float] = {}
    receiver.arrived.clear()
    async with MessageBus() as bus:
        connector = WebhookConnector(
            provider_profiles=PROFILES,
            secrets={"bench": SECRET},
            store=store,
            bus=bus,
            targets=[OutboundTarget("sink", f"{url}/answers")],
            max_pending=n + 100,
        )
        agent = Answerer(Identity.generate(), name="answerer")
        runner = AgentRunner(bus, [agent], topics={"answerer": [INBOUND_TOPIC]}, store=store)

        async def post(chunk: list[tuple[str, dict[str, str], bytes]]) -> None:
            for event_id, headers, body in chunk:
                sent[event_id] = time.perf_counter()
                status, _, _ = await connector.accept_inbound_http(
                    "bench", method="POST", headers=headers, raw_body=body
                )
                assert status == 202, status
                if concurrency == 1:  # the next event only once this one's answer arrived
                    for _ in range(20_000):
                        if event_id in receiver.arrived:
                            break
                        await anyio.sleep(0.0005)

        async with runner, anyio.create_task_group() as tg:
            tg.start_soon(lambda: connector.run_outbound_dispatcher(poll_interval_sec=0.05))
            start = time.perf_counter()
            async with anyio.create_task_group() as senders:
                for i in range(concurrency):
                    senders.start_soon(post, requests[i::concurrency])
            for _ in range(24_000):  # 120 s at most
                if len(receiver.arrived) >= n:
                    break
                await anyio.sleep(0.005)
            else:
                raise RuntimeError(f"{n - len(receiver.arrived)} events were not delivered")
            elapsed = time.perf_counter() - start
            connector.stop_dispatcher()
        await connector.aclose()
    await store.aclose()
    latencies = sorted(receiver.arrived[e] - sent[e] for e in sent)
    return n / elapsed, latencies


def fresh(kind: str) -> Store:
    if kind == "sqlite":
        path = os.path.join(scratch_dir("converge-edge-bench-"), "edge.sqlite3")
        return SQLiteStore(path, serializer="json")
    return MemoryStore()


def main() -> None:
    args = arg_parser(__doc__).parse_args()
    sizes = {1: 20, 8: 40} if args.quick else {1: 100, 8: 400}
    rounds = 1 if args.quick else 3
    receiver, url, server = serve_receiver()
    results = Results()
    for concurrency, n in sizes.items():
        best: dict[str, tuple[float, list[float]]] = {}
        for _ in range(rounds):
            for impl, kind in (("converge", "sqlite"), ("converge-memory", "memory")):
                rate, latencies = anyio.run(edge_round, fresh(kind), url, receiver, n, concurrency)
                if impl not in best or rate > best[impl][0]:
                    best[impl] = (rate, latencies)
        for impl, (rate, latencies) in best.items():
            p50 = latencies[len(latencies) // 2] * 1000
            p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
            case = f"webhook_to_delivery_c{concurrency}"
            results.add(case, impl, rate, p50_ms=round(p50, 2), p99_ms=round(p99, 2))
    server.should_exit = True
    print_ratio_table(results.rows, (26, 18, 12, 12))


if __name__ == "__main__":
    main()
