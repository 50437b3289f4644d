"""Benchmark converge's stores against the code and libraries they replace.

Prints one JSON object per line (``case``, ``impl``, ``ops_per_s``) and a table of ratios
on stderr. Peers, measured in the same run, taking turns with converge:

* ``aiofiles``: ``async with aiofiles.open(path, "rb") as f: await f.read()`` (asyncio
  only: aiofiles fails under trio).
* ``stdlib``: a plain blocking ``open().read()``; and for durable writes the bare floor,
  temp file + write + fsync + ``os.replace`` + fsync of the directory.
* ``stdlib+to_thread``: the same inside one ``anyio.to_thread.run_sync`` hop, the floor
  for any async version that does not block the loop.
* ``diskcache``: ``diskcache.Cache`` get/set, with the same SQLite synchronous setting as
  the SQLiteStore it races.
* ``dict``: a plain dict, the floor for MemoryStore; ``dict scan``: listing a prefix by
  scanning every key of a dict (what MemoryStore did before it grouped its keys).
* ``dict+pickle``: a plain dict holding ``pickle.dumps`` of each value and answering
  ``pickle.loads``, the floor for ``MemoryStore(serializer="pickle")`` (what the gateway's
  memory store is), on an inbox-shaped record of about 600 bytes pickled.
* ``per-write``: SQLiteStore's previous write path, one worker-thread hop and one
  transaction (and one sync) per write, against its group commit, with 32 tasks writing
  at once (``diskcache`` too, each call in a worker thread, as an async caller must).

Usage: ``python benchmarks/storage.py [--quick] [--dir DIR]`` (``DIR`` should be on the
disk you care about: fsync costs what that disk makes it cost).
"""

from __future__ import annotations

import itertools
import os
import pickle
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import aiofiles
import anyio
import diskcache

from _bench import (
    Results,
    arg_parser,
    as_async,
    best_of_rounds,
    compare,
    compare_async,
    print_ratio_table,
    timed_workers,
)
from converge.extensions.storage import FileStore, MemoryStore, SQLiteStore

TASKS = 32

VALUE = os.urandom(1024)
# Writes cycle through distinct values: SQLite skips rewriting a row whose bytes did not
# change (and then has nothing to sync), which would flatter any store it backs.
VALUES = [os.urandom(1024) for _ in range(64)]


def writer(put: Callable[[str, bytes], object]) -> Callable[[], object]:
    """A no-argument callable writing the next of :data:`VALUES` under ``"key"``."""
    values = itertools.cycle(VALUES)
    return lambda: put("key", next(values))


def async_writer(put: Callable[[str, bytes], Awaitable[object]]) -> Callable[[], Awaitable[object]]:
    values = itertools.cycle(VALUES)
    return lambda: put("key", next(values))


def inbox_record() -> dict[str, Any]:
    """A record shaped like the gateway's inbox record of one webhook (nested dicts)."""
    event_id = uuid.uuid4().hex
    event = {
        "provider": "bench",
        "source": "bench",
        "event_id": event_id,
        "occurred_at": 1764000000.0,
        "subject": "order.paid",
        "payload": {
            "event_id": event_id,
            "subject": "order.paid",
            "data": {"amount": 1299, "currency": "eur", "items": [1, 2, 3]},
        },
        "headers": {
            "content-type": "application/json",
            "x-webhook-timestamp": "1764000000",
            "x-webhook-signature": "sha256=" + "0" * 64,
        },
        "trace_id": None,
    }
    item = {"id": event_id, "sender": "gateway", "topics": ["webhook.inbound"], "payload": event}
    return {
        "id": event_id,
        "kind": "inbox",
        "status": "acknowledged",
        "key": "bench",
        "data": {"emit": "message", "item": item},
        "created": 1764000000.0,
        "updated": 1764000000.0,
        "attempts": [],
    }


def in_thread(fn: Callable[[], object]) -> Callable[[], Awaitable[object]]:
    """The floor for any async version of ``fn``: one worker-thread hop around it."""

    async def call() -> object:
        return await anyio.to_thread.run_sync(fn)

    return call


# -- peers ------------------------------------------------------------------------------


async def aiofiles_read(path: str) -> bytes:
    async with aiofiles.open(path, "rb") as f:
        data: bytes = await f.read()
        return data


def stdlib_read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def bare_durable_write(directory: str, name: str, data: bytes) -> None:
    tmp = os.path.join(directory, ".tmp-bare")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, os.path.join(directory, name))
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class PerWriteSQLiteStore(SQLiteStore):
    """SQLiteStore as it was before group commit: each write its own transaction, and
    each async write its own worker-thread hop."""

    def _commit(self, write: Any) -> Any:
        with self._lock:
            conn = self._conn or self._conn_locked()
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = write.op(conn, time.time())
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return result

    async def _acommit(self, write: Any) -> Any:
        return await anyio.to_thread.run_sync(self._commit, write)


def bump(current: dict[str, Any]) -> tuple[dict[str, Any], None]:
    return {k: (v or 0) + 1 for k, v in current.items()}, None


def diskcache_bump(cache: diskcache.Cache, key: str) -> None:
    with cache.transact():
        cache.set(key, cache.get(key, 0) + 1)


def concurrent_writes(
    impls: dict[str, Callable[[int, int], Awaitable[object]]],
) -> dict[str, Callable[[int], float]]:
    """``impls[name](task, i)`` is one write; each round runs ``TASKS`` tasks at once."""

    def round_of(write: Callable[[int, int], Awaitable[object]]) -> Callable[[int], float]:
        def run_round(n: int) -> float:
            per_task = max(1, n // TASKS)

            async def main() -> float:
                tasks = iter(range(TASKS))

                async def worker() -> None:
                    task = next(tasks)
                    for i in range(per_task):
                        await write(task, i)

                return per_task * TASKS / await timed_workers(worker, TASKS)

            return anyio.run(main)

        return run_round

    return {name: round_of(write) for name, write in impls.items()}


# -- cases ------------------------------------------------------------------------------


def run(quick: bool, base: str) -> list[dict[str, Any]]:
    results = Results()
    emit = results.add_rates
    repeats = 3 if quick else 9

    # FileStore reads: one thread hop for open + read + verify + decode.
    store = FileStore(os.path.join(base, "file"))
    store.put("key", VALUE)
    raw_path = os.path.join(base, "raw-1KiB")
    with open(raw_path, "wb") as f:
        f.write(VALUE)
    ops = 200 if quick else 3000
    emit(
        "file_aget_1KiB",
        compare_async(
            {
                "converge": partial(store.aget, "key"),
                "aiofiles": partial(aiofiles_read, raw_path),
                "stdlib": as_async(partial(stdlib_read, raw_path)),
                "stdlib+to_thread": in_thread(partial(stdlib_read, raw_path)),
            },
            ops,
            repeats,
        ),
    )
    emit(
        "file_aget_1KiB_trio",
        compare_async(
            {
                "converge": partial(store.aget, "key"),
                "stdlib": as_async(partial(stdlib_read, raw_path)),
            },
            ops,
            repeats,
            backend="trio",
        ),
    )
    emit(
        "file_get_1KiB",
        compare(
            {"converge": partial(store.get, "key"), "stdlib": partial(stdlib_read, raw_path)},
            ops * 5,
            repeats,
        ),
    )

    # Durable writes: temp + fsync + replace + fsync(dir), whoever does them.
    bare_dir = os.path.join(base, "bare")
    os.makedirs(bare_dir)
    ops, repeats = (20, 3) if quick else (100, 5)
    emit(
        "file_aput_durable_1KiB",
        compare_async(
            {
                "converge": async_writer(store.aput),
                "stdlib": as_async(writer(partial(bare_durable_write, bare_dir))),
                "stdlib+to_thread": in_thread(writer(partial(bare_durable_write, bare_dir))),
            },
            ops,
            repeats,
        ),
    )
    emit(
        "file_put_durable_1KiB",
        compare(
            {
                "converge": writer(store.put),
                "stdlib": writer(partial(bare_durable_write, bare_dir)),
            },
            ops,
            repeats,
        ),
    )

    # SQLite: SQLiteStore against diskcache, same synchronous setting.
    ops, repeats = (300, 3) if quick else (5000, 9)
    for durable, synchronous, suffix in [(False, 1, ""), (True, 2, "_durable")]:
        sqlite_store = SQLiteStore(os.path.join(base, f"kv{suffix}.db"), durable=durable)
        cache = diskcache.Cache(os.path.join(base, f"dc{suffix}"), sqlite_synchronous=synchronous)
        sqlite_store.put("key", VALUE)
        cache.set("key", VALUE)
        put_ops = ops if not durable else ops // 50
        emit(
            f"sqlite_put{suffix}_1KiB",
            compare(
                {
                    "converge": writer(sqlite_store.put),
                    "diskcache": writer(cache.set),
                },
                put_ops,
                repeats,
            ),
        )
        if not durable:
            emit(
                "sqlite_get_1KiB",
                compare(
                    {
                        "converge": partial(sqlite_store.get, "key"),
                        "diskcache": partial(cache.get, "key"),
                    },
                    ops,
                    repeats,
                ),
            )
        sqlite_store.close()
        cache.close()

    # Group commit: 32 tasks writing durably at once, against one transaction per write.
    size, rounds = (TASKS * 4, 2) if quick else (TASKS * 40, 5)
    stores = {
        "converge": SQLiteStore(os.path.join(base, "gc.db")),
        "per-write": PerWriteSQLiteStore(os.path.join(base, "pw.db")),
    }
    cache = diskcache.Cache(os.path.join(base, "dc_gc"), sqlite_synchronous=2)
    unique = uuid.uuid4().hex

    def value(i: int) -> bytes:
        return VALUES[i % len(VALUES)]

    fresh = itertools.count()  # put_if_absent of a key that exists writes nothing

    def put(st: SQLiteStore, t: int, i: int) -> Awaitable[None]:
        return st.aput(f"k{t}", value(i))

    def claim(st: SQLiteStore, t: int, i: int) -> Awaitable[bool]:
        return st.aput_if_absent(f"c{next(fresh)}/{unique}", 1)

    def update(st: SQLiteStore, t: int, i: int) -> Awaitable[None]:
        return st.aupdate([f"n{t}"], bump)

    def in_worker(fn: Callable[..., object], *args: object) -> Awaitable[object]:
        return anyio.to_thread.run_sync(fn, *args)

    cases: dict[str, dict[str, Callable[[int, int], Awaitable[object]]]] = {
        "sqlite_aput_durable_x32": {
            **{name: partial(put, st) for name, st in stores.items()},
            "diskcache": lambda t, i: in_worker(cache.set, f"k{t}", value(i)),
        },
        "sqlite_aput_if_absent_durable_x32": {
            **{name: partial(claim, st) for name, st in stores.items()},
            "diskcache": lambda t, i: in_worker(cache.add, f"c{next(fresh)}/{unique}", 1),
        },
        "sqlite_aupdate_durable_x32": {
            **{name: partial(update, st) for name, st in stores.items()},
            "diskcache": lambda t, i: in_worker(diskcache_bump, cache, f"n{t}"),
        },
    }
    for case, impls in cases.items():
        best = best_of_rounds(concurrent_writes(impls), TASKS, size, rounds, key=float)
        emit(case, best)
    for st in stores.values():
        st.close()
    cache.close()

    # MemoryStore against a bare dict (no lock, no TTL): the floor.
    memory = MemoryStore()
    plain: dict[str, Any] = {}
    memory.put("key", VALUE)
    plain["key"] = VALUE
    ops = 20_000 if quick else 200_000
    emit(
        "memory_get",
        compare(
            {"converge": partial(memory.get, "key"), "dict": partial(plain.get, "key")},
            ops,
            repeats,
        ),
    )
    emit(
        "memory_put",
        compare(
            {
                "converge": writer(memory.put),
                "dict": writer(plain.__setitem__),
            },
            ops,
            repeats,
        ),
    )
    # The serialized store (the gateway's memory store) on an inbox-shaped record: a copy
    # in and a copy out each time, against a dict doing just that with pickle.
    pickled = MemoryStore(serializer="pickle")
    blobs: dict[str, bytes] = {}
    record = inbox_record()
    pickled.put("key", record)
    blobs["key"] = pickle.dumps(record, pickle.HIGHEST_PROTOCOL)
    emit(
        "memory_pickle_get",
        compare(
            {
                "converge": partial(pickled.get, "key"),
                "dict+pickle": lambda: pickle.loads(blobs["key"]),
            },
            ops,
            repeats,
        ),
    )
    emit(
        "memory_pickle_put",
        compare(
            {
                "converge": partial(pickled.put, "key", record),
                "dict+pickle": lambda: blobs.__setitem__(
                    "key", pickle.dumps(record, pickle.HIGHEST_PROTOCOL)
                ),
            },
            ops,
            repeats,
        ),
    )
    pickled.close()
    # A prefix listing among many other keys (the inbox pump lists its open records
    # every second while claims and done records pile up): the store's key groups
    # against a scan of every key of a dict.
    crowd = 20_000 if quick else 200_000
    for i in range(crowd):
        memory.put(f"app:seen:bench:{i:040x}", 1, ttl=3600)
        plain[f"app:seen:bench:{i:040x}"] = 1
    for i in range(100):
        memory.put(f"app:inbox:open:{i:020x}", 1)
        plain[f"app:inbox:open:{i:020x}"] = 1
    prefix = "app:inbox:open:"
    emit(
        f"memory_list_100_of_{crowd // 1000}k",
        compare(
            {
                "converge": partial(memory.list, prefix),
                "dict scan": lambda: sorted(k for k in plain if k.startswith(prefix)),
            },
            50,
            repeats,
        ),
    )
    return results.rows


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--dir", default=None, help="where to put the files (default: a temp dir)")
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix="converge-bench-", dir=args.dir)
    try:
        print_ratio_table(run(args.quick, base), widths=(34, 18, 14, 14))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
