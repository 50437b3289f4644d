"""Benchmark ``converge gateway`` as users run it: accepted requests/s and latency.

Each server runs in its own child process on 127.0.0.1; this process is the load
generator: 32 keep-alive connections (raw asyncio sockets) sending pre-signed, unique
requests (generic HMAC over ``"{ts}." + body``) and timing each answer. Servers:

* ``converge``: the CLI's own server, ``converge.cli.serve.serve`` on a parsed TOML
  configuration (``make_app``: event log, admin/ops wrappers, dispatcher running in the
  lifespan), with the CLI's uvicorn settings. Cases:

  - ``memory``: ``store = "memory"``, no ``forward_to``;
  - ``sqlite``: the default store (embedded SQLite file, JSON serializer, synced
    commits: a ``202`` leaves after the commit holding its claim and inbox record),
    no ``forward_to``;
  - ``sqlite_forward``: the same with ``forward_to`` a local receiver (another child
    process that counts deliveries by ``Idempotency-Key``): timed from the first request
    until the receiver has every event; every event must arrive exactly once.

  ``log_events = false`` (the event log is the inbox either way; the line logged per
  event is left out to measure the gateway, not the terminal).
* ``starlette``: a bare Starlette endpoint that checks the HMAC and parses the JSON,
  then answers 202, served by the very same ``serve`` function (same uvicorn settings).
* ``floor``: the same ``serve`` function with an app that only reads the body and
  answers 202 (row ``floor_c32``, impl ``uvicorn``): what the server costs alone. A
  case's CPU per event less the floor's is what its app adds (the gateway's checks,
  store and event log; the Starlette endpoint's routing, HMAC and JSON), and no change
  to the server can move the ratios but through that part.

Warm-up, then rounds that alternate between the servers (the forwarding rounds are a
quarter the size); each server's best round by throughput is ``ops_per_s``, with the
median and the worst round (``median_ops_per_s``, ``min_ops_per_s``: a shared machine's
noise shows there), and p50/p99 latency over every round; ``cpu_us_per_event``, the
server process's CPU time (every thread, from ``/proc``; None elsewhere) per event, the
median over rounds: what an event costs the server, whichever way the load generator on
the same cores paced the round (with forwarding, the deliveries included; the receiver's
own is not). One JSON line per case and implementation, then a table of ratios on
stderr: best against best, and ``paired_ratio``, the median over rounds of the ratio
within each round (the steadier of the two on a shared machine).

The rounds add up to about 12,500 events per server, so the event log only reaches its
bound (``event_log_max``, 10,000) near the end. The ``*_sustained`` cases then load each
of ``memory``, ``sqlite`` and ``starlette`` alone, freshly started, with 60,000 events
in one go (twice, taking turns): past the bound, every trim (each 10 s) deletes what
arrived since the last, as in service. ``ops_per_s`` is the better of the two runs'
events/s, and ``paired_ratio`` the median of the ratios within each turn.

Usage: ``python benchmarks/gateway.py [--quick]``
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import hmac
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio

from _bench import (
    Ports,
    Results,
    arg_parser,
    child_servers,
    cpu_seconds,
    read_request,
    respond,
    scratch_dir,
    serve_uvicorn,
    timed_workers,
)

SECRET = "bench-secret"
CONCURRENCY = 32
# case -> the implementation it measures (each against the bare Starlette endpoint)
CASES = {"memory": "converge", "sqlite": "converge", "sqlite_forward": "converge"}
CASES["floor"] = "uvicorn"  # the server alone: what the apps above share
SERVERS = (*CASES, "starlette")
SUSTAINED = {"memory": "converge", "sqlite": "converge"}  # also alone, under sustained load

# -- servers (run in child processes) -------------------------------------------------


def config_text(kind: str, receiver_port: int | None) -> str:
    store = "memory" if kind == "memory" else "sqlite:converge-gateway.sqlite3"
    text = f"""
[gateway]
bind = "127.0.0.1"
store = "{store}"
log_level = "warning"
log_events = false

[providers.bench]
scheme = "hmac"
canonicalization = "timestamp_body"
secret = "{SECRET}"
"""
    if kind == "sqlite_forward":
        text += 'forward_to = "sink"\n\n[targets.sink]\n'
        text += f'url = "http://127.0.0.1:{receiver_port}/events"\n'
    return text


def serve_cli(kind: str, port: int, receiver_port: int | None) -> None:
    """``converge gateway`` itself: parse the TOML, then the CLI's ``serve``."""
    from converge.cli.config import parse_config
    from converge.cli.serve import serve

    try:
        import tomllib
    except ImportError:  # pragma: no cover - Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    directory = Path(tempfile.mkdtemp(prefix="converge-gateway-bench-"))
    data = tomllib.loads(config_text(kind, receiver_port))
    config = parse_config(data, base_dir=directory)
    serve(dataclasses.replace(config, port=port))


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
        try:
            json.loads(body)
        except ValueError:
            return JSONResponse({"status": "rejected"}, status_code=400)
        return JSONResponse({"status": "accepted"}, status_code=202)

    return Starlette(routes=[Route("/webhook/bench", webhook, methods=["POST"])])


async def floor_app(scope: Any, receive: Any, send: Any) -> None:
    """Reads the body and answers 202: the server's own cost per request."""
    if await read_request(scope, receive, send):
        await respond(send, 202, b'{"status":"accepted"}')


def serve_app(app: Any, port: int) -> None:
    """``app`` under exactly the CLI's uvicorn settings: the CLI's ``serve`` with
    ``make_app`` swapped for it (and its memory store)."""
    from unittest import mock

    from converge.cli import serve as cli_serve

    with mock.patch.object(cli_serve, "make_app", return_value=(None, app)):
        serve_cli("memory", port, None)


class Receiver:
    """The forward target: counts deliveries by Idempotency-Key; ``GET /count``."""

    def __init__(self) -> None:
        self.total = 0
        self.keys: set[bytes] = set()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if not await read_request(scope, receive, send):
            return
        body = b"{}"
        if scope["method"] == "GET":
            body = json.dumps({"total": self.total, "unique": len(self.keys)}).encode()
        else:
            self.total += 1
            self.keys.add(dict(scope["headers"]).get(b"idempotency-key", b""))
        await respond(send, 200, body)


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


async def read_response(stream: Any, buffer: bytearray) -> tuple[int, bytes]:
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
    return status, rest[:length]


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
                status, _ = await read_response(stream, buffer)
                latencies.append(time.perf_counter() - start)
                if status != 202:
                    bad.append(status)

    elapsed = await timed_workers(worker, concurrency)
    if bad:
        raise RuntimeError(f"unexpected statuses: {sorted(set(bad))}")
    return elapsed, latencies


async def received(port: int) -> dict[str, int]:
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(b"GET /count HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        _, body = await read_response(stream, bytearray())
    counts: dict[str, int] = json.loads(body)
    return counts


async def forward_round(
    port: int, receiver: int, requests: list[bytes]
) -> tuple[float, list[float]]:
    """:func:`load`, then wait until the receiver has every event exactly once."""
    before = await received(receiver)
    start = time.perf_counter()
    _, latencies = await load(port, requests, CONCURRENCY)
    return await all_delivered(receiver, before, len(requests)) - start, latencies


async def all_delivered(receiver: int, before: dict[str, int], events: int) -> float:
    """Wait until the receiver has ``events`` more distinct events than ``before``, and
    return when that was (``time.perf_counter``); raise if one of them arrived twice."""
    got = 0
    with anyio.move_on_after(120):
        while True:
            got = (await received(receiver))["unique"] - before["unique"]
            if got >= events:
                break
            await anyio.sleep(0.005)
    if got < events:  # say how far it got: a lost event and a slow machine differ
        raise RuntimeError(f"{events} events: {got} arrived within 120 s")
    arrived = time.perf_counter()
    await anyio.sleep(0.2)  # a duplicate delivery would show up now
    counts = await received(receiver)
    got = (counts["total"] - before["total"], counts["unique"] - before["unique"])
    if got != (events, events):
        raise RuntimeError(f"{events} events: {got[0]} deliveries, {got[1]} distinct")
    return arrived


@dataclasses.dataclass
class Round:
    """One round against one server."""

    rate: float  # events/s
    latencies: list[float]  # seconds, one per request
    cpu_us: float | None  # the server process's CPU time per event (None: no /proc)


def measure(server: str, ports: Ports, receiver: int, n: int) -> Round:
    """One round of ``n`` fresh signed requests (a quarter with forwarding, which is
    timed until the last delivery, and whose CPU time includes the deliveries)."""
    if server == "sqlite_forward":
        n = max(50, n // 4)
    port, pid = ports[server], ports.pids[server]
    requests = [signed_request(port) for _ in range(n)]
    cpu_before = cpu_seconds(pid)
    if server == "sqlite_forward":
        elapsed, latencies = anyio.run(forward_round, port, receiver, requests)
    else:
        elapsed, latencies = anyio.run(load, port, requests, CONCURRENCY)
    cpu_after = cpu_seconds(pid)
    cpu_us = None
    if cpu_before is not None and cpu_after is not None:
        cpu_us = (cpu_after - cpu_before) / n * 1e6
    return Round(n / elapsed, latencies, cpu_us)


def sustained(events: int, turns: int) -> dict[str, list[Round]]:
    """Each server alone and fresh, ``events`` events in one go, ``turns`` times in turn:
    {server: [one round a turn]}."""
    servers = (*SUSTAINED, "starlette")
    runs: dict[str, list[Round]] = {s: [] for s in servers}
    for _ in range(turns):
        for server in servers:
            argv = {server: ["--serve", server, "--receiver-port", "0"]}
            with child_servers(__file__, argv, timeout=60) as ports:
                measure(server, ports, 0, 500)  # warm-up
                runs[server].append(measure(server, ports, 0, events))
    return runs


def percentile(ordered: list[float], q: float) -> float:
    """The ``q`` quantile of ``ordered`` (sorted)."""
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(quick: bool) -> list[dict[str, Any]]:
    per_round = 400 if quick else 2000
    rounds = 1 if quick else 6
    warmup = 100 if quick else 500
    with child_servers(__file__, {"receiver": ["--receiver"]}, timeout=30) as sink:
        receiver = sink["receiver"]
        argv = {s: ["--serve", s, "--receiver-port", str(receiver)] for s in SERVERS}
        with child_servers(__file__, argv, timeout=60) as ports:
            for server in ports:
                measure(server, ports, receiver, warmup)
            rates: dict[str, list[Round]] = {s: [] for s in SERVERS}
            for _ in range(rounds):
                for server in ports:
                    rates[server].append(measure(server, ports, receiver, per_round))
    results = Results()
    add_rows(results, rates, CASES, "")
    add_rows(
        results, sustained(1_000 if quick else 60_000, 1 if quick else 2), SUSTAINED, "_sustained"
    )
    return results.rows


def add_rows(
    results: Results, rates: dict[str, list[Round]], cases: Mapping[str, str], suffix: str
) -> None:
    """A row per case and implementation, from each server's rounds in ``rates``."""
    bare = [r.rate for r in rates["starlette"]]
    for case in cases:
        # Every server runs once per round, one after another: the ratio within each
        # round, then its median over rounds, is what a drifting shared machine disturbs
        # least (a best round can come from a quiet moment the other server missed).
        paired = statistics.median(r.rate / b for r, b in zip(rates[case], bare, strict=True))
        for impl, server in ((cases[case], case), ("starlette", "starlette")):
            runs = rates[server]
            everything = sorted(lat for r in runs for lat in r.latencies)
            cpu = [r.cpu_us for r in runs if r.cpu_us is not None]
            results.add(
                f"{case}{suffix}_c{CONCURRENCY}",
                impl,
                max(r.rate for r in runs),
                min_ops_per_s=round(min(r.rate for r in runs), 1),
                median_ops_per_s=round(statistics.median(r.rate for r in runs), 1),
                paired_ratio=round(paired if server == case else 1.0, 3),
                # the server's CPU time per event, median over rounds: what an event
                # costs, however the load generator on the same cores paced the round
                cpu_us_per_event=round(statistics.median(cpu), 1) if cpu else None,
                # over every round: the tail of a single best round would hide stalls
                p50_ms=round(percentile(everything, 0.50) * 1000, 2),
                p99_ms=round(percentile(everything, 0.99) * 1000, 2),
                # the event loop's stalls (a collection, a trim) show here first
                p999_ms=round(percentile(everything, 0.999) * 1000, 2),
                max_ms=round(everything[-1] * 1000, 2),
            )


def table(rows: list[dict[str, Any]]) -> None:
    print(
        f"\n{'case':<22}{'impl':<11}{'best/s':>9}{'median':>9}{'min':>9}{'p50 ms':>9}"
        f"{'p99 ms':>9}{'p999':>8}{'max':>8}{'cpu us':>8}{'vs starlette':>14}{'per round':>11}",
        file=sys.stderr,
    )
    peer = {r["case"]: r["ops_per_s"] for r in rows if r["impl"] == "starlette"}
    for row in rows:
        ratio = row["ops_per_s"] / peer[row["case"]]
        cpu = "-" if row["cpu_us_per_event"] is None else f"{row['cpu_us_per_event']:.0f}"
        print(
            f"{row['case']:<22}{row['impl']:<11}{row['ops_per_s']:>9.0f}"
            f"{row['median_ops_per_s']:>9.0f}{row['min_ops_per_s']:>9.0f}"
            f"{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}{row['p999_ms']:>8.1f}{row['max_ms']:>8.1f}"
            f"{cpu:>8}{ratio:>13.2f}x{row['paired_ratio']:>10.2f}x",
            file=sys.stderr,
        )


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)
    parser.add_argument("--receiver", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--receiver-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receiver:
        serve_uvicorn(Receiver(), args.port, backlog=2048)
    elif args.serve == "starlette":
        serve_app(starlette_app(), args.port)
    elif args.serve == "floor":
        serve_app(floor_app, args.port)
    elif args.serve:
        serve_cli(args.serve, args.port, args.receiver_port)
    else:
        # The servers' store files go in here: the children end by their signal (uvicorn
        # raises it again once shut down), so they cannot remove their own.
        os.environ["TMPDIR"] = scratch_dir("converge-gateway-bench-")
        table(run(args.quick))


if __name__ == "__main__":
    main()
