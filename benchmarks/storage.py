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
* ``dict``: a plain dict, the floor for MemoryStore.

Usage: ``python benchmarks/storage.py [--quick] [--dir DIR]`` (``DIR`` should be on the
disk you care about: fsync costs what that disk makes it cost).
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import aiofiles
import anyio
import diskcache

from _bench import Results, arg_parser, as_async, compare, compare_async, print_ratio_table
from converge.extensions.storage import FileStore, MemoryStore, SQLiteStore

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
    return results.rows


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--dir", default=None, help="where to put the files (default: a temp dir)")
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix="converge-bench-", dir=args.dir)
    try:
        print_ratio_table(run(args.quick, base), widths=(26, 18, 14, 14))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
