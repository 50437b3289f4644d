"""Scaffolding shared by the benchmark scripts (a private helper, not a benchmark).

Every ``benchmarks/<area>.py`` measures converge against its peers in the same process and
run, prints one JSON line per case and implementation (``{"case", "impl", "ops_per_s",
...}``) on stdout, a readable table of ratios on stderr, and takes ``--quick`` for a short
run. The scripts run as ``python benchmarks/<name>.py``, which puts ``benchmarks/`` on
``sys.path``, so they ``from _bench import ...``:

* :class:`Results`: the rows of a run, each printed as a JSON line when added.
* :func:`compare` / :func:`compare_async` (:func:`compare_running` inside a running
  loop) / :func:`as_async`: operations per second of
  no-argument callables, best of several turn-taking runs after a warm-up.
* :func:`best_of_rounds`: the same for implementations that time a whole round themselves;
  :func:`timed_workers` times such a round run by concurrent workers.
* :func:`print_ratio_table`: converge against each peer, case by case, on stderr.
* :func:`arg_parser`: the command line (``--quick``).
* :func:`free_port`, :func:`child_servers`, :func:`serve_uvicorn`: servers run by the
  script itself in child processes on 127.0.0.1; :func:`read_request`, :func:`respond`
  and :func:`serve_lifespan` for their apps;
  :func:`cpu_seconds`, the CPU time a child has used (what a server costs per request,
  however the load generator on the same cores slows or speeds its rounds).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio

T = TypeVar("T")

# -- results ------------------------------------------------------------------------------


class Results:
    """The result rows of one run; each row is printed as one JSON line when it is added."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, case: str, impl: str, ops_per_s: float, **fields: Any) -> dict[str, Any]:
        """Record and print ``{"case", "impl", "ops_per_s", **fields}`` (ops/s rounded to
        0.1); ``fields`` are the script's own columns, such as ``mb_per_s``."""
        row: dict[str, Any] = {"case": case, "impl": impl, "ops_per_s": round(ops_per_s, 1)}
        row.update(fields)
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    def add_rates(
        self,
        case: str,
        rates: Mapping[str, float],
        fields: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """:meth:`add` a row for each ``{impl: ops_per_s}`` of ``rates``, with that impl's
        extra ``fields`` if any."""
        for impl, rate in rates.items():
            self.add(case, impl, rate, **(fields or {}).get(impl, {}))


# -- timing -------------------------------------------------------------------------------


def compare(impls: Mapping[str, Callable[[], object]], ops: int, repeats: int) -> dict[str, float]:
    """Operations per second of each implementation: warm up, then the best of
    ``repeats`` timed runs of ``ops`` calls, the implementations taking turns so that
    background noise hits them alike."""
    for fn in impls.values():
        for _ in range(max(1, ops // 10)):
            fn()
    best = dict.fromkeys(impls, float("inf"))
    for _ in range(repeats):
        for name, fn in impls.items():
            start = time.perf_counter()
            for _ in range(ops):
                fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: ops / seconds for name, seconds in best.items()}


def compare_async(
    impls: Mapping[str, Callable[[], Awaitable[object]]],
    ops: int,
    repeats: int,
    backend: str = "asyncio",
) -> dict[str, float]:
    """:func:`compare` for coroutine functions, all on one event loop of ``backend``."""
    return anyio.run(compare_running, impls, ops, repeats, backend=backend)


async def compare_running(
    impls: Mapping[str, Callable[[], Awaitable[object]]], ops: int, repeats: int
) -> dict[str, float]:
    """:func:`compare_async` on the event loop already running (its pools stay open)."""
    for afn in impls.values():
        for _ in range(max(1, ops // 10)):
            await afn()
    best = dict.fromkeys(impls, float("inf"))
    for _ in range(repeats):
        for name, afn in impls.items():
            start = time.perf_counter()
            for _ in range(ops):
                await afn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: ops / seconds for name, seconds in best.items()}


def as_async(fn: Callable[[], object]) -> Callable[[], Awaitable[object]]:
    """Wrap a sync peer so that it runs in the same loop as the coroutine it races."""

    async def call() -> object:
        return fn()

    return call


def best_of_rounds(
    impls: Mapping[str, Callable[[int], T]],
    warmup: int,
    size: int,
    rounds: int,
    key: Callable[[T], float],
) -> dict[str, T]:
    """For implementations that run and time a whole round of ``n`` operations themselves
    (``impls[name](n)`` returns the round's result): one warm-up round of ``warmup`` each,
    then ``rounds`` rounds of ``size``, taking turns; each one's best round by ``key``
    (its operations per second)."""
    for fn in impls.values():
        fn(warmup)
    best: dict[str, T] = {}
    for _ in range(rounds):
        for name, fn in impls.items():
            result = fn(size)
            if name not in best or key(result) > key(best[name]):
                best[name] = result
    return best


async def timed_workers(
    worker: Callable[[], Coroutine[Any, Any, object]], concurrency: int
) -> float:
    """Seconds until ``concurrency`` concurrent copies of ``worker`` have all returned."""
    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
    return time.perf_counter() - start


# -- output -------------------------------------------------------------------------------


def by_case(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{case: {impl: row}}``, in the order the rows came."""
    cases: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        cases.setdefault(row["case"], {})[row["impl"]] = row
    return cases


@dataclass(frozen=True)
class Column:
    """An extra column of :func:`print_ratio_table`, right-aligned in ``width``: ``cell``
    gets converge's and the peer's ops/s."""

    title: str
    width: int
    cell: Callable[[float, float], str]


def print_ratio_table(
    rows: Sequence[dict[str, Any]],
    widths: tuple[int, int, int, int],
    extra: Column | None = None,
) -> None:
    """On stderr, a line per case and peer: converge's ops/s, the peer's, and the ratio
    (above 1: converge is faster). ``widths`` are those of the case, peer, converge/s and
    peer/s columns."""
    case_w, peer_w, ours_w, theirs_w = widths
    header = f"\n{'case':<{case_w}}{'peer':<{peer_w}}{'converge/s':>{ours_w}}"
    header += f"{'peer/s':>{theirs_w}}{'ratio':>9}"
    if extra is not None:
        header += f"{extra.title:>{extra.width}}"
    print(header, file=sys.stderr)
    for case, impls in by_case(rows).items():
        if "converge" not in impls:
            continue
        ours = impls["converge"]["ops_per_s"]
        for impl, row in impls.items():
            if impl == "converge":
                continue
            rate = row["ops_per_s"]
            line = f"{case:<{case_w}}{impl:<{peer_w}}{ours:>{ours_w},.0f}{rate:>{theirs_w},.0f}"
            line += f" {ours / rate:>7.2f}x"
            if extra is not None:
                line += f"{extra.cell(ours, rate):>{extra.width}}"
            print(line, file=sys.stderr)


def arg_parser(doc: str | None) -> argparse.ArgumentParser:
    """The command line of a benchmark: the first line of its docstring as description,
    and ``--quick`` for a short run (what the smoke test uses)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    parser.add_argument("--quick", action="store_true", help="short run (smoke test)")
    return parser


# -- ASGI receivers --------------------------------------------------------------------


async def serve_lifespan(
    receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]
) -> None:
    """Answer an ASGI lifespan's startup and shutdown (for the scripts' small receivers)."""
    while True:
        message = await receive()
        kind = message["type"].rsplit(".", 1)[-1]
        await send({"type": f"lifespan.{kind}.complete"})
        if kind == "shutdown":
            return


async def read_request(scope: Any, receive: Callable[[], Awaitable[Any]], send: Any) -> bool:
    """For the scripts' small ASGI apps: answer a lifespan (False), or read an HTTP
    request's body to its end (True: answer it with :func:`respond`)."""
    if scope["type"] == "lifespan":
        await serve_lifespan(receive, send)
        return False
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    return True


async def respond(send: Callable[[Any], Awaitable[None]], status: int, body: bytes) -> None:
    """Answer ``status`` with the JSON ``body``."""
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# -- servers in child processes -----------------------------------------------------------


def scratch_dir(prefix: str) -> str:
    """A new temporary directory, removed with what it holds when this process exits
    normally (a server child that ends by its signal never does: let its files go in
    one its parent made)."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_listening(port: int, process: subprocess.Popen[bytes], deadline: float) -> bool:
    """Whether 127.0.0.1:``port`` accepts connections before ``deadline`` (monotonic)
    and while ``process`` is alive."""
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                return False
            time.sleep(0.05)


class Ports(dict[str, int]):
    """``{name: port}`` of the servers :func:`child_servers` runs; ``pids``, their
    process ids by name."""

    def __init__(self, ports: Mapping[str, int], pids: Mapping[str, int]) -> None:
        super().__init__(ports)
        self.pids = dict(pids)


def cpu_seconds(pid: int) -> float | None:
    """The CPU time (user and system, every thread) process ``pid`` has used so far, in
    seconds, counted in the kernel's clock ticks (10 ms here); None without Linux's
    ``/proc``."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # utime and stime are the 14th and 15th fields; the name before ")" may
            # hold spaces
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def child_servers(
    script: str, argv: Mapping[str, Sequence[str]], timeout: float
) -> Iterator[Ports]:
    """Run ``python script *argv[name] --port PORT`` for each name (all at once, each on a
    free port), wait until they all listen, yield their :class:`Ports`; terminate them
    after.

    Raises RuntimeError (after killing them all) if one has not started within
    ``timeout`` seconds.
    """
    servers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    for name, args in argv.items():
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, script, *args, "--port", str(port)], stdout=subprocess.DEVNULL
        )
        servers[name] = (process, port)
    deadline = time.monotonic() + timeout
    for name, (process, port) in servers.items():
        if not _wait_listening(port, process, deadline):
            for other, _ in servers.values():
                other.kill()
            raise RuntimeError(f"{name} server did not start")
    try:
        yield Ports(
            {name: port for name, (_, port) in servers.items()},
            {name: process.pid for name, (process, _) in servers.items()},
        )
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(timeout=10)


def serve_uvicorn(app: Any, port: int, **options: Any) -> None:
    """Serve ``app`` on 127.0.0.1:``port`` with the settings every benchmark server shares
    (one worker, h11, asyncio, no access log); ``options`` adds to them."""
    import uvicorn

    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        http="h11",
        loop="asyncio",
        **options,
    )
