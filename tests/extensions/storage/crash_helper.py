"""Subprocess driver for the reliability tests (run as a script, single-threaded).

``python crash_helper.py kill <backend> <path> <kills> <seed>``
    Forks a writer, SIGKILLs it after a random delay, checks every key, and repeats.
    The writer reports each put that returned through a pipe; after the kill every key
    must hold a complete value, never older than the last acknowledged one.

``python crash_helper.py race <backend> <path> <processes>``
    Forks ``processes`` children that wait on one pipe and then race ``put_if_absent``
    on one key, first absent, then expired. Reports the winners of each round.

Both print one JSON object. The driver forks from a fresh interpreter rather than the
pytest process, which may have threads (fork copies only the calling thread).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sys
import time
import traceback
from typing import Any

from converge.core.store import Store
from converge.extensions.storage import FileStore, SQLiteStore

KEYS = [f"key/{i}" for i in range(8)]
VALUE_SIZE = 96 * 1024


def open_store(backend: str, path: str) -> Store:
    if backend == "file":
        return FileStore(path, locking=True)
    if backend == "sqlite":
        # A killed process loses nothing a committed WAL transaction holds, synced or
        # not (the OS keeps it); durable=True only matters for power loss, and fsync
        # would make this test slow on a busy disk.
        return SQLiteStore(os.path.join(path, "kv.db"), durable=False)
    raise SystemExit(f"unknown backend {backend!r}")


def make_value(key: str, round_: int) -> dict[str, Any]:
    digest = hashlib.sha256(f"{key}:{round_}".encode()).digest()
    return {"key": key, "round": round_, "blob": digest * (VALUE_SIZE // 32)}


def check_value(key: str, value: Any) -> int:
    """Return the value's round if it is complete and consistent, else raise."""
    if not isinstance(value, dict) or value.get("key") != key:
        raise AssertionError(f"{key}: wrong or foreign value {str(value)[:80]!r}")
    if value != make_value(key, value["round"]):
        raise AssertionError(f"{key}: torn value for round {value['round']}")
    return int(value["round"])


def writer(backend: str, path: str, first_round: int, ack_fd: int) -> None:
    store = open_store(backend, path)
    os.write(ack_fd, b"ready\n")
    round_ = first_round
    while True:
        for key in KEYS:
            store.put(key, make_value(key, round_))
            os.write(ack_fd, f"{key} {round_}\n".encode())
        round_ += 1


def read_lines(fd: int, count: int) -> bytes:
    """Read until ``count`` more newlines arrived (or EOF)."""
    data = b""
    while data.count(b"\n") < count:
        chunk = os.read(fd, 1)
        if not chunk:
            break
        data += chunk
    return data


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def kill_loop(backend: str, path: str, kills: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    acked = dict.fromkeys(KEYS, -1)
    seen = dict.fromkeys(KEYS, -1)
    checked = writes = 0
    # The checker's store stays open throughout (a child never uses it: the stores
    # drop inherited connections after fork).
    store = open_store(backend, path)
    for attempt in range(kills):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the writer
            os.close(read_fd)
            try:
                writer(backend, path, (attempt + 1) * 1_000_000, write_fd)
            finally:
                os._exit(3)
        os.close(write_fd)
        # Wait for the writer's first completed put, and time it: the kill then comes
        # within about two puts, so it lands mid-write however fast the disk syncs.
        received = read_lines(read_fd, 1)
        started = time.perf_counter()
        received += read_lines(read_fd, 1)
        one_put = time.perf_counter() - started
        time.sleep(rng.uniform(0.0, 2 * one_put))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        if not os.WIFSIGNALED(status):
            raise AssertionError(f"writer exited by itself (status {status})")
        received += read_all(read_fd)
        lines = received.decode().splitlines()
        if not lines or lines[0] != "ready":
            raise AssertionError(f"writer did not start: {received[:80]!r}")
        for line in lines[1:]:
            key, round_ = line.split()
            acked[key] = max(acked[key], int(round_))
            writes += 1
        os.close(read_fd)
        for key in KEYS:
            value = store.get(key)
            if value is None:
                if acked[key] >= 0:
                    raise AssertionError(f"{key}: acknowledged round {acked[key]} was lost")
                continue
            round_ = check_value(key, value)
            if round_ < acked[key]:
                raise AssertionError(f"{key}: round {round_} older than acknowledged {acked[key]}")
            if round_ < seen[key]:
                raise AssertionError(f"{key}: went back from round {seen[key]} to {round_}")
            seen[key] = round_
            checked += 1
    store.close()
    return {"kills": kills, "checked": checked, "acknowledged_writes": writes}


def race(backend: str, path: str, processes: int) -> dict[str, Any]:
    rounds: list[dict[str, Any]] = []
    setup = open_store(backend, path)
    for name in ["absent", "expired"]:
        key = f"claim/{name}"
        if name == "expired":
            setup.put(key, "stale", ttl=0.05)
            time.sleep(0.1)
        start_r, start_w = os.pipe()
        children = []
        for _ in range(processes):
            pid = os.fork()
            if pid == 0:
                code = 2
                try:
                    os.close(start_w)
                    store = open_store(backend, path)
                    os.read(start_r, 1)
                    code = 0 if store.put_if_absent(key, os.getpid(), ttl=60) else 1
                except BaseException:
                    traceback.print_exc()
                finally:
                    os._exit(code)
            children.append(pid)
        os.close(start_r)
        time.sleep(0.2)  # let every child open its store and block on the pipe
        os.write(start_w, b"x" * processes)
        os.close(start_w)
        codes = {}
        for pid in children:
            _, status = os.waitpid(pid, 0)
            codes[pid] = os.waitstatus_to_exitcode(status)
        winners = [pid for pid, code in codes.items() if code == 0]
        rounds.append(
            {
                "round": name,
                "winners": winners,
                "losers": sum(1 for c in codes.values() if c == 1),
                "errors": sum(1 for c in codes.values() if c not in (0, 1)),
                "stored": setup.get(key),
            }
        )
    return {"rounds": rounds}


def main(argv: list[str]) -> None:
    mode, backend, path, count = argv[1], argv[2], argv[3], int(argv[4])
    if mode == "kill":
        result = kill_loop(backend, path, count, int(argv[5]))
    elif mode == "race":
        result = race(backend, path, count)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv)
