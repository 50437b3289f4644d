"""Benchmark RedisStore and the Redis rate limiter against redis-py and ``limits``.

Prints one JSON object per line (``case``, ``impl``, ``ops_per_s``; the contended
limiter case adds ``retries``) and a table of ratios on stderr. Everything talks to one
``redis-server`` the script starts on a free loopback port (persistence off). Peers,
measured in the same run, taking turns with converge:

* ``redis-py``: ``redis.asyncio.Redis`` sending the same commands RedisStore sends
  (``GET``; ``SET``; ``SET NX PX``: RedisStore sends its writes inside a script that also
  keeps its prefix index) with values of the same size, one pooled client each.
* ``redis-py-scan``: listing 10 open records among a million other keys (10,000 with
  ``--quick``): ``RedisStore.alist`` (read from the prefix's index) against redis-py's
  ``scan_iter`` with ``MATCH`` on the prefix, which is what a listing costs without one.
* ``limits-fixed`` / ``limits-sliding``: ``limits``' async ``FixedWindowRateLimiter``
  and ``SlidingWindowCounterRateLimiter`` over its async Redis storage (its redis-py
  implementation: its coredis one fails on coredis 6), one ``hit`` per decision,
  against converge's ``aallow_message`` on one sender bucket (one Lua script on the
  server's clock).
* ``aupdate``: converge's limiter on the generic ``aupdate`` path (an optimistic
  transaction: read, then a compare-and-set, retried on conflicts; selected by passing a
  clock), against the dedicated Lua script, with 4 processes deciding on one shared
  bucket at once; ``retries`` counts the transactions that lost to another process and
  ran again.

* ``gateway_1_replica`` / ``gateway_3_replicas``: real ``converge gateway`` processes on
  the one Redis (no ``forward_to``: the record is the event log), fed pre-signed unique
  Standard Webhooks events as raw requests over 32 keep-alive connections spread over
  the replicas (``benchmarks/gateway.py``'s load generator); accepted
  events per second, the gateways' CPU milliseconds per event (``cpu_ms_per_event``, from
  ``/proc``) and p50/p99 latency. The peer is the same gateway on the embedded SQLite
  default (one process).
* ``gateway_forward_1_replica`` / ``gateway_forward_2_replicas``: the same with
  ``forward_to`` a local receiver (``benchmarks/gateway.py``'s), timed until it has
  every event once; the peer is the SQLite gateway forwarding to the same receiver.

Usage: ``python benchmarks/redis.py [--quick]``.
"""

from __future__ import annotations

import importlib.util
import itertools
import multiprocessing
import os
import sys
import time
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
from limits import RateLimitItemPerSecond
from limits.aio.storage import RedisStorage
from limits.aio.strategies import FixedWindowRateLimiter, SlidingWindowCounterRateLimiter

from _bench import (
    Results,
    arg_parser,
    child_servers,
    compare_running,
    cpu_seconds,
    print_ratio_table,
)
from converge.core.message import Message
from converge.extensions.rate_limit import RateLimiter, TokenBucketConfig
from converge.extensions.storage import RedisStore

ROOT = Path(__file__).resolve().parents[1]


def import_redis_py() -> ModuleType:
    """redis-py's ``redis.asyncio``, although this script is itself called redis.py.

    The script's directory comes first on ``sys.path``, where ``import redis`` would find
    this file; it is left out while redis-py is imported.
    """
    here = Path(__file__).resolve().parent
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    try:
        return importlib.import_module("redis.asyncio")
    finally:
        sys.path[:] = saved


redis_py = import_redis_py()
VALUE = os.urandom(1024)
HUGE = 10**9  # a bucket nothing drains: a decision is measured, not a denial
PROCESSES = 4


def load_redis_server() -> ModuleType:
    """The tests' ``redis_server`` helper, loaded by path."""
    path = ROOT / "tests" / "redis_server.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


# -- RedisStore against redis-py ---------------------------------------------------------


def store_cases(url: str, ops: int, repeats: int) -> list[tuple[str, dict[str, float]]]:
    namespace = uuid.uuid4().hex

    async def main() -> list[tuple[str, dict[str, float]]]:
        peer = redis_py.Redis.from_url(url)
        async with RedisStore(url, namespace=namespace) as store:
            await store.aput("k", VALUE)
            # the bytes RedisStore stored, so that the peer moves as many
            blob = await peer.get(f"{namespace}:k".encode())
            assert blob is not None
            fresh = itertools.count()
            cases = {
                "get_1KiB": {
                    "converge": lambda: store.aget("k"),
                    "redis-py": lambda: peer.get(f"{namespace}:k".encode()),
                },
                "put_1KiB": {
                    "converge": lambda: store.aput("k", VALUE),
                    "redis-py": lambda: peer.set(f"{namespace}:k".encode(), blob),
                },
                "put_if_absent_ttl": {
                    "converge": lambda: store.aput_if_absent(f"c{next(fresh)}", 1, ttl=60),
                    "redis-py": lambda: peer.set(
                        f"{namespace}:c{next(fresh)}".encode(), b"J1", nx=True, px=60_000
                    ),
                },
            }
            results = [
                (case, await compare_running(impls, ops, repeats)) for case, impls in cases.items()
            ]
        await peer.aclose()
        return results

    return anyio.run(main)


def list_case(url: str, others: int, repeats: int) -> dict[str, float]:
    """Listing 10 open records among ``others`` keys: the store's index against a
    redis-py ``SCAN MATCH`` of the prefix (what a listing costs without an index)."""
    namespace = uuid.uuid4().hex
    prefix = "app:inbox:open:"

    async def main() -> dict[str, float]:
        peer = redis_py.Redis.from_url(url)
        for start in range(0, others, 10_000):
            async with peer.pipeline(transaction=False) as pipe:
                for i in range(start, min(others, start + 10_000)):
                    pipe.set(f"{namespace}:app:inbox:done:{i:012d}", b"J1")
                await pipe.execute()
        pattern = f"{namespace}:{prefix}*"

        async def scan() -> list[bytes]:
            return sorted([key async for key in peer.scan_iter(match=pattern, count=1000)])

        async with RedisStore(url, namespace=namespace) as store:
            for i in range(10):
                await store.aput(f"{prefix}{i}", i)
            assert len(await store.alist(prefix)) == len(await scan()) == 10
            rates = await compare_running(
                {"converge": lambda: store.alist(prefix), "redis-py-scan": scan}, 3, repeats
            )
        await peer.flushdb()
        await peer.aclose()
        return rates

    return anyio.run(main)


# -- the limiter against limits ----------------------------------------------------------


def limiter_case(url: str, ops: int, repeats: int) -> dict[str, float]:
    message = Message(sender="alice", topics=())
    item = RateLimitItemPerSecond(HUGE)

    async def main() -> dict[str, float]:
        # limits' coredis bridge does not open coredis 6's pools; its redis-py one works
        storage = RedisStorage(url.replace("redis://", "async+redis://"), implementation="redispy")
        fixed = FixedWindowRateLimiter(storage)
        sliding = SlidingWindowCounterRateLimiter(storage)
        async with RedisStore(url, namespace=uuid.uuid4().hex) as store:
            limiter = RateLimiter(store=store, sender_config=TokenBucketConfig(HUGE, HUGE))
            return await compare_running(
                {
                    "converge": lambda: limiter.aallow_message(message, direction="egress"),
                    "limits-fixed": lambda: fixed.hit(item, "alice"),
                    "limits-sliding": lambda: sliding.hit(item, "alice"),
                },
                ops,
                repeats,
            )

    return anyio.run(main)


# -- the limiter's script against the generic update, four processes on one bucket ------


def contend(url: str, namespace: str, scripted: bool, seconds: float, start: Any, out: Any) -> None:
    """Child process: decide on one shared bucket for ``seconds``; report counts."""

    async def main() -> tuple[int, int]:
        async with RedisStore(url, namespace=namespace) as store:
            clock = None if scripted else time.time_ns  # a clock selects the update path
            # a bucket that admits about half: every decision writes, often contended
            limiter = RateLimiter(
                store=store, global_config=TokenBucketConfig(100, 2000), clock=clock
            )
            message = Message(sender="bench", topics=())
            await limiter.aretry_after(message, direction="egress")  # connect first
            start.wait()
            decisions = 0
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                await limiter.aallow_message(message, direction="egress")
                decisions += 1
            return decisions, store.update_conflicts

    out.put(anyio.run(main))


def contended_case(
    url: str, seconds: float, rounds: int
) -> tuple[dict[str, float], dict[str, Any]]:
    ctx = multiprocessing.get_context("spawn")
    best: dict[str, float] = {}
    retries: dict[str, int] = {}
    for _ in range(rounds):
        for impl, scripted in (("converge", True), ("aupdate", False)):
            start, out = ctx.Barrier(PROCESSES), ctx.Queue()
            namespace = uuid.uuid4().hex
            args = (url, namespace, scripted, seconds, start, out)
            procs = [ctx.Process(target=contend, args=args) for _ in range(PROCESSES)]
            for p in procs:
                p.start()
            reports = [out.get(timeout=120) for _ in procs]
            for p in procs:
                p.join()
            rate = sum(r[0] for r in reports) / seconds
            if rate > best.get(impl, 0.0):
                best[impl] = rate
                retries[impl] = sum(r[1] for r in reports)
    return best, {impl: {"retries": n, "processes": PROCESSES} for impl, n in retries.items()}


# -- gateway replicas on one Redis ---------------------------------------------------------

GATEWAY_SECRET = "whsec_" + "YmVuY2htYXJrLXJlZGlzLWdhdGV3YXktc2VjcmV0"


def _gateway_config(directory: Path, store: str, receiver: int | None) -> Path:
    path = directory / "gateway.toml"
    text = (
        f'[gateway]\nstore = "{store}"\nconnector_id = "bench{uuid.uuid4().hex[:8]}"\n'
        'log_events = false\nlog_level = "warning"\n'
        f'[providers.sw]\nscheme = "standard-webhooks"\nsecret = "{GATEWAY_SECRET}"\n'
    )
    if receiver is not None:
        text += f'forward_to = "sink"\n[targets.sink]\nurl = "http://127.0.0.1:{receiver}/e"\n'
    path.write_text(text)
    return path


def _cpu_seconds(gateways: list[tuple[Any, int]]) -> float:
    """The CPU time the gateway processes have used so far (Linux's ``/proc``)."""
    times = [cpu_seconds(process.pid) for process, _ in gateways]
    if None in times:
        raise RuntimeError("the gateways' CPU time is read from /proc, which is not here")
    return sum(t for t in times if t is not None)


def _gateways(config: Path, count: int, cwd: Path) -> list[tuple[Any, int]]:
    import subprocess

    from _bench import free_port

    started = []
    for _ in range(count):
        port = free_port()
        command = [sys.executable, "-m", "converge.cli", "gateway", "--config", str(config)]
        process = subprocess.Popen(
            [*command, "--port", str(port)], cwd=cwd, stdout=subprocess.DEVNULL
        )
        started.append((process, port))
    import httpx

    deadline = time.monotonic() + 60
    for process, port in started:
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                for other, _ in started:
                    other.kill()
                raise RuntimeError("a gateway did not start")
            time.sleep(0.1)
    return started


def gateway_case(
    store: str, replicas: int, events: int, workdir: Path, receiver: int | None = None
) -> dict[str, Any]:
    """Accepted events/s, gateway CPU ms per event and latency for ``replicas`` gateways
    (with a ``receiver`` port: forwarded there, timed until it has every event once)."""
    from converge.extensions.connectors import sign_webhook
    from gateway import all_delivered, load, received

    config = _gateway_config(workdir, store, receiver)
    gateways = _gateways(config, replicas, workdir)
    # Raw pre-signed requests over keep-alive sockets, as benchmarks/gateway.py sends
    # them: an httpx client here took more CPU per request than one gateway replica.
    requests: list[list[bytes]] = [[] for _ in gateways]
    run_id = uuid.uuid4().hex[:8]  # the receiver counts each event once over all cases
    for n in range(events):
        body = f'{{"type":"bench","n":{n}}}'.encode()
        headers = sign_webhook("standard-webhooks", GATEWAY_SECRET, body, event_id=f"e{run_id}-{n}")
        port = gateways[n % replicas][1]
        head = f"POST /webhook/sw HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        requests[n % replicas].append(head.encode() + b"\r\n" + body)
    latencies: list[float] = []

    async def replica(port: int, mine: list[bytes]) -> None:
        latencies.extend((await load(port, mine, 32 // replicas))[1])

    async def run() -> float:
        before = await received(receiver) if receiver is not None else {}
        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for (_, port), mine in zip(gateways, requests, strict=True):
                tg.start_soon(replica, port, mine)
        if receiver is None:
            return time.perf_counter() - start
        return await all_delivered(receiver, before, events) - start

    try:
        cpu_before = _cpu_seconds(gateways)
        elapsed = anyio.run(run)
        cpu = _cpu_seconds(gateways) - cpu_before
    finally:
        for process, _ in gateways:
            process.terminate()
            process.wait(10)
    latencies.sort()
    return {
        "ops_per_s": events / elapsed,
        "cpu_ms_per_event": round(cpu * 1000 / events, 3),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2),
    }


def gateway_rows(
    results: Results,
    name: str,
    url: str,
    replica_counts: tuple[int, ...],
    events: int,
    work: Path,
    receiver: int | None,
) -> None:
    """The gateway cases ``{name}_{n}_replica(s)`` on Redis, each against the SQLite
    gateway (one process) measured before them."""
    embedded = gateway_case(f"sqlite:{name}.sqlite3", 1, events, work, receiver)
    for replicas in replica_counts:
        row = gateway_case(url, replicas, events, work, receiver)
        case = f"{name}_{replicas}_replica{'s' if replicas > 1 else ''}"
        results.add(case, "converge", row.pop("ops_per_s"), **row)
        results.add(case, "embedded-sqlite", embedded["ops_per_s"])


def main() -> None:
    args = arg_parser(__doc__).parse_args()
    quick = args.quick
    results = Results()
    server_module = load_redis_server()
    with server_module.RedisServer() as server:
        ops, repeats = (200, 2) if quick else (3000, 5)
        for case, rates in store_cases(server.url, ops, repeats):
            results.add_rates(case, rates)
        others, label = (10_000, "10k") if quick else (1_000_000, "1m")
        results.add_rates(f"list_open_{label}_keys", list_case(server.url, others, repeats))
        results.add_rates("limiter_one_bucket", limiter_case(server.url, ops, repeats))
        seconds, rounds = (0.5, 1) if quick else (3.0, 3)
        rates, fields = contended_case(server.url, seconds, rounds)
        results.add_rates("limiter_4_processes_one_bucket", rates, fields)
        events = 100 if quick else 3000
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            gateway_rows(results, "gateway", server.url, (1, 3), events, work, None)
            sink = {"receiver": ["--receiver"]}
            with child_servers(str(ROOT / "benchmarks" / "gateway.py"), sink, timeout=30) as up:
                receiver = up["receiver"]
                gateway_rows(results, "gateway_forward", server.url, (1, 2), events, work, receiver)
    print_ratio_table(results.rows, widths=(32, 16, 12, 12))


if __name__ == "__main__":
    main()
