"""Benchmark outbound delivery: deliveries/s to a local receiver, converge vs raw clients.

A minimal ASGI receiver (answers 200) runs under uvicorn in a child process on
127.0.0.1. In this process, at concurrency 1, 16 and 64:

* ``converge``: submit N actions to a :class:`WebhookConnector` (MemoryStore outbox;
  ``deliveries_sqlite_*``: the durable store as ``converge gateway`` opens it, a SQLite
  file with JSON values and synced commits) and run its dispatcher until all are
  delivered: persistence, fenced leases, attempt history, Idempotency-Key, breaker,
  retries bookkeeping and metrics included. Timed from the first submit to the last
  delivery.
* ``httpx2`` and ``httpx``: the same N POSTs (same body and ``Idempotency-Key`` header)
  with one ``AsyncClient`` and as many worker tasks as the concurrency: what you would
  write without an outbox. converge sends with an ``httpx2`` client too (the client the
  LLM SDKs use), on its own connection stack instead of httpx2's pool
  (``converge.extensions.connectors.outbound.connections``), so the ratio against ``httpx2`` is
  what the outbox costs less what the stack saves. ``httpx`` is the older client, whose
  connection pool scans every connection on each request (at 64 connections it spends
  several times longer per request).

All use the same connection limits and run on asyncio. Warm-up, then the best of
several rounds (alternating). One JSON line per case and implementation, with
``cpu_us_per_delivery``: this process's CPU time per delivery in that round (every
thread, the receiver excluded: it is another process), what a delivery costs the sender
however fast the receiver answered. Then a table of ratios on stderr.

Usage: ``python benchmarks/outbound.py [--quick]``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from operator import attrgetter
from pathlib import Path
from typing import Any, NamedTuple

import anyio
import httpx
import httpx2

from _bench import (
    Results,
    arg_parser,
    best_of_rounds,
    by_case,
    child_servers,
    print_ratio_table,
    read_request,
    respond,
    serve_uvicorn,
    timed_workers,
)
from converge.core.store import Store
from converge.extensions.connectors import (
    OutboundTarget,
    OutboundWebhookAction,
    WebhookConnector,
    WebhookRetryPolicy,
)
from converge.extensions.storage import MemoryStore, SQLiteStore

CONCURRENCY = (1, 16, 64)
BODY = {"type": "invoice.paid", "data": {"invoice": "in_123", "amount": 1299, "currency": "eur"}}


async def receiver(scope: Any, receive: Any, send: Any) -> None:
    """The outside service: reads the request, answers 200."""
    if await read_request(scope, receive, send):
        await respond(send, 200, b"{}")


def serve(port: int) -> None:
    serve_uvicorn(receiver, port, backlog=2048)


class Round(NamedTuple):
    """A round's deliveries per second, and this process's CPU µs per delivery."""

    rate: float
    cpu_us: float


def per_delivery(n: int, elapsed: float, cpu_from: float) -> Round:
    """The :class:`Round` of ``n`` deliveries that took ``elapsed`` seconds, begun when
    ``time.process_time()`` read ``cpu_from``."""
    return Round(n / elapsed, (time.process_time() - cpu_from) / n * 1e6)


async def converge_round(url: str, n: int, concurrency: int, durable: bool = False) -> Round:
    with tempfile.TemporaryDirectory() as tmp:
        # The durable store as the CLI opens it: SQLite file, JSON values, synced commits.
        path = Path(tmp) / "outbox.sqlite3"
        store: Store = SQLiteStore(path, serializer="json") if durable else MemoryStore()
        try:
            return await _converge_round(store, url, n, concurrency)
        finally:
            await store.aclose()


async def _converge_round(store: Store, url: str, n: int, concurrency: int) -> Round:
    connector = WebhookConnector(
        provider_profiles={},
        secrets={},
        store=store,
        targets=[OutboundTarget("app", url, max_concurrency=concurrency)],
        max_in_flight=concurrency,
        retry_policy=WebhookRetryPolicy(request_timeout_sec=30),
    )
    delivered = anyio.Event()
    start, cpu = time.perf_counter(), time.process_time()
    async with anyio.create_task_group() as tg:
        tg.start_soon(connector.run_outbound_dispatcher)
        for _ in range(n):
            await connector.submit_outbound_action(
                OutboundWebhookAction("app", "POST", url, BODY, idempotency_key=uuid.uuid4().hex)
            )

        async def watch() -> None:
            # Polling a counter: the connector has no "all delivered" event to await.
            while (  # noqa: ASYNC110
                connector.metrics.get("webhook_outbound_sent_total", labels={"target": "app"}) < n
            ):
                await anyio.sleep(0.001)
            delivered.set()

        tg.start_soon(watch)
        await delivered.wait()
        result = per_delivery(n, time.perf_counter() - start, cpu)
        connector.stop_dispatcher()
    await connector.aclose()
    if await connector.alist_dead_letters():
        raise RuntimeError("deliveries failed")
    return result


async def client_round(client_module: Any, url: str, n: int, concurrency: int) -> Round:
    """``n`` POSTs with one ``client_module.AsyncClient`` (``httpx`` or ``httpx2``)."""
    limits = client_module.Limits(
        max_connections=concurrency, max_keepalive_connections=concurrency
    )
    content = json.dumps(BODY, separators=(",", ":")).encode()
    left = [n]
    failures: list[int] = []
    async with client_module.AsyncClient(
        limits=limits, follow_redirects=False, timeout=30
    ) as client:

        async def worker() -> None:
            while left[0] > 0:
                left[0] -= 1
                headers = {"content-type": "application/json", "idempotency-key": uuid.uuid4().hex}
                response = await client.post(url, content=content, headers=headers)
                if response.status_code != 200:
                    failures.append(response.status_code)

        cpu = time.process_time()
        result = per_delivery(n, await timed_workers(worker, concurrency), cpu)
    if failures:
        raise RuntimeError(f"deliveries failed: {set(failures)}")
    return result


PEERS = {"httpx2": partial(client_round, httpx2), "httpx": partial(client_round, httpx)}
IMPLS = ("converge", *PEERS)


def deliver(
    round_: Callable[[str, int, int], Awaitable[Round]], url: str, concurrency: int, n: int
) -> Round:
    """One round of ``n`` deliveries (:func:`converge_round` or :func:`client_round`)."""
    return anyio.run(round_, url, n, concurrency)


def add_best(results: Results, case: str, best: dict[str, Round]) -> None:
    """A row per implementation: its best round's rate, and that round's CPU time."""
    for impl, round_ in best.items():
        results.add(case, impl, round_.rate, cpu_us_per_delivery=round(round_.cpu_us, 1))


def run(quick: bool) -> list[dict[str, Any]]:
    results = Results()
    rounds = 2 if quick else 3
    with child_servers(__file__, {"receiver": ["--serve"]}, timeout=20) as ports:
        url = f"http://127.0.0.1:{ports['receiver']}/events"
        for concurrency in CONCURRENCY:
            n = (30 if concurrency == 1 else 80) if quick else (500 if concurrency == 1 else 2000)
            impls = {
                "converge": partial(deliver, converge_round, url, concurrency),
                **{name: partial(deliver, peer, url, concurrency) for name, peer in PEERS.items()},
            }
            best = best_of_rounds(impls, max(20, n // 10), n, rounds, key=attrgetter("rate"))
            add_best(results, f"deliveries_c{concurrency}", best)
        n = 60 if quick else 1000
        impls = {
            "converge": partial(deliver, partial(converge_round, durable=True), url, 16),
            **{name: partial(deliver, peer, url, 16) for name, peer in PEERS.items()},
        }
        best = best_of_rounds(impls, 20, n, rounds, key=attrgetter("rate"))
        add_best(results, "deliveries_sqlite_c16", best)
    return results.rows


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.port)
        return
    rows = run(args.quick)
    print_ratio_table(rows, (24, 8, 12, 10))
    print(f"\n{'cpu us per delivery':<24}" + "".join(f"{i:>10}" for i in IMPLS), file=sys.stderr)
    for case, impls in by_case(rows).items():
        cells = "".join(f"{impls[i]['cpu_us_per_delivery']:>10.0f}" for i in IMPLS)
        print(f"{case:<24}{cells}", file=sys.stderr)


if __name__ == "__main__":
    main()
