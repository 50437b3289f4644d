"""Benchmark the webhook gateway: verified requests/s and latency under uvicorn.

Each implementation runs in its own uvicorn process (same settings: one worker, h11,
no access log) on 127.0.0.1; this process is the load generator: keep-alive connections
sending pre-signed, unique requests (generic HMAC over ``"{ts}." + body``) and timing
each answer. Implementations:

* ``converge``: :class:`~converge.extensions.connectors.GatewayApp` with a MemoryStore:
  every check (media type, size, timestamp, signature, JSON, event id), the atomic
  idempotency claim and the inbox record, written in one atomic update (recorded
  acknowledged, as the standalone gateway does for events without ``forward_to``).
* ``converge-sqlite``: the same with the CLI's embedded default store (SQLite file,
  ``durable=True``: a synced write per accepted event). Informational.
* ``starlette``: a bare Starlette endpoint doing only the HMAC check, then 202.

Warm-up, then the best of several rounds per implementation (rounds alternate between
implementations). One JSON line per case and implementation (``ops_per_s``, ``p50_ms``,
``p99_ms``), then a table of ratios on stderr.

Usage: ``python benchmarks/gateway.py [--quick]``
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import sys
import tempfile
import time
import uuid
from functools import partial
from typing import Any

import anyio

from _bench import Results, arg_parser, best_of_rounds, child_servers, serve_uvicorn, timed_workers

SECRET = "bench-secret"
IMPLS = ("converge", "converge-sqlite", "starlette")
CONCURRENCY = 32


# -- servers (run in child processes) -------------------------------------------------


def converge_app(store_kind: str) -> Any:
    from converge.extensions.connectors import (
        GatewayApp,
        ProviderProfile,
        WebhookConnector,
        WebhookGateway,
    )
    from converge.extensions.storage import MemoryStore, SQLiteStore

    store: Any = MemoryStore()
    if store_kind == "sqlite":
        store = SQLiteStore(os.path.join(tempfile.mkdtemp(), "bench.sqlite3"))
    connector = WebhookConnector(
        provider_profiles={
            "bench": ProviderProfile("bench", "bench", canonicalization="timestamp_body")
        },
        secrets={"bench": SECRET},
        store=store,
    )
    # As the standalone gateway runs it (cli/serve.py make_app): no forward_to, so the
    # inbox record, written already acknowledged with the claim, is the consumer.
    connector.acknowledge_on_accept = True
    return GatewayApp(WebhookGateway(connector), run_dispatcher=False)


def starlette_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    key = SECRET.encode()

    async def webhook(request: Request) -> JSONResponse:
        body = await request.body()
        ts = request.headers.get("x-webhook-timestamp", "")
        sent = request.headers.get("x-webhook-signature", "").removeprefix("sha256=")
        mac = hmac.new(key, ts.encode() + b".", hashlib.sha256)
        mac.update(body)
        if not hmac.compare_digest(mac.hexdigest(), sent):
            return JSONResponse({"status": "rejected"}, status_code=401)
        return JSONResponse({"status": "accepted"}, status_code=202)

    return Starlette(routes=[Route("/webhook/bench", webhook, methods=["POST"])])


def serve(impl: str, port: int) -> None:
    app = (
        starlette_app() if impl == "starlette" else converge_app(impl.partition("-")[2] or "memory")
    )
    serve_uvicorn(app, port)


# -- load generator -------------------------------------------------------------------


def signed_request(port: int) -> bytes:
    body = json.dumps(
        {
            "event_id": uuid.uuid4().hex,
            "subject": "order.paid",
            "data": {"amount": 1299, "currency": "eur", "items": [1, 2, 3]},
        }
    ).encode()
    ts = str(int(time.time()))
    mac = hmac.new(SECRET.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    head = (
        f"POST /webhook/bench HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"X-Webhook-Timestamp: {ts}\r\nX-Webhook-Signature: sha256={mac}\r\n\r\n"
    )
    return head.encode() + body


async def read_response(stream: Any, buffer: bytearray) -> int:
    while b"\r\n\r\n" not in buffer:
        buffer.extend(await stream.receive())
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        rest += await stream.receive()
    buffer[:] = rest[length:]
    return status


async def load(port: int, requests: list[bytes], concurrency: int) -> tuple[float, list[float]]:
    """Send every request over ``concurrency`` keep-alive connections."""
    latencies: list[float] = []
    queue = list(reversed(requests))
    bad: list[int] = []

    async def worker() -> None:
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            buffer = bytearray()
            while queue:
                request = queue.pop()
                start = time.perf_counter()
                await stream.send(request)
                status = await read_response(stream, buffer)
                latencies.append(time.perf_counter() - start)
                if status != 202:
                    bad.append(status)

    elapsed = await timed_workers(worker, concurrency)
    if bad:
        raise RuntimeError(f"unexpected statuses: {sorted(set(bad))}")
    return len(requests) / elapsed, latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(port: int, n: int) -> tuple[float, list[float]]:
    """One round: ``n`` fresh signed requests to the server on ``port``."""
    return anyio.run(load, port, [signed_request(port) for _ in range(n)], CONCURRENCY)


def run(quick: bool) -> list[dict[str, Any]]:
    per_round = 600 if quick else 5000
    rounds = 2 if quick else 3
    warmup = 100 if quick else 1000
    servers = {impl: ["--serve", impl] for impl in IMPLS}
    with child_servers(__file__, servers, timeout=30) as ports:
        best = best_of_rounds(
            {impl: partial(measure, port) for impl, port in ports.items()},
            warmup,
            per_round,
            rounds,
            key=lambda result: result[0],
        )
    results = Results()
    case = f"verified_webhook_c{CONCURRENCY}"
    for impl in IMPLS:
        ops, latencies = best[impl]
        results.add(
            case,
            impl,
            ops,
            p50_ms=round(percentile(latencies, 0.50) * 1000, 2),
            p99_ms=round(percentile(latencies, 0.99) * 1000, 2),
        )
    return results.rows


def table(rows: list[dict[str, Any]]) -> None:
    peer = next(r for r in rows if r["impl"] == "starlette")
    print(
        f"\n{'case':<24}{'impl':<18}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'vs starlette':>14}",
        file=sys.stderr,
    )
    for row in rows:
        ratio = row["ops_per_s"] / peer["ops_per_s"]
        print(
            f"{row['case']:<24}{row['impl']:<18}{row['ops_per_s']:>10.0f}"
            f"{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}{ratio:>13.2f}x",
            file=sys.stderr,
        )


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--serve", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    table(run(args.quick))


if __name__ == "__main__":
    main()
