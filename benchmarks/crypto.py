"""Benchmark converge.extensions.crypto against raw ``cryptography`` AESGCM and hashlib.

Prints one JSON object per line (``case``, ``impl``, ``ops_per_s``, ``mb_per_s``) and a
table of ratios on stderr. Peers:

* ``cryptography``: the code you would write by hand for the same blob layout and the
  same call shape (a key per call): ``nonce + AESGCM(key).encrypt(nonce, data, aad)``.
* ``cryptography-reused``: the same, with one ``AESGCM`` object built ahead of time,
  which is the floor for any wrapper.
* ``hashlib``: ``hashlib.pbkdf2_hmac`` for :func:`derive_key`.

Usage: ``python benchmarks/crypto.py [--quick]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import anyio
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from converge.extensions.crypto import adecrypt, aencrypt, decrypt, derive_key, encrypt

SIZES = {"1KiB": 1024, "64KiB": 64 * 1024, "1MiB": 1024 * 1024}
KEY = os.urandom(32)
AAD = b"bench"


def compare(impls: dict[str, Callable[[], object]], ops: int, repeats: int) -> dict[str, float]:
    """Operations per second of each implementation: warm up, then the best of
    ``repeats`` timed runs, the implementations taking turns so that background noise
    hits them alike."""
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
    impls: dict[str, Callable[[], Awaitable[object]]], ops: int, repeats: int
) -> dict[str, float]:
    """:func:`compare` for coroutine functions, all on one asyncio loop."""

    async def main() -> dict[str, float]:
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

    return anyio.run(main)


def as_async(fn: Callable[[], object]) -> Callable[[], Awaitable[object]]:
    """Wrap a sync peer so that it runs in the same loop as the coroutine it races."""

    async def call() -> object:
        return fn()

    return call


def raw_encrypt(plaintext: bytes, key: bytes, aad: bytes | None) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def raw_decrypt(blob: bytes, key: bytes, aad: bytes | None) -> bytes:
    return AESGCM(key).decrypt(blob[:12], blob[12:], aad)


def run(quick: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    reused = AESGCM(KEY)

    def reused_encrypt(plaintext: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + reused.encrypt(nonce, plaintext, AAD)

    def reused_decrypt(blob: bytes) -> bytes:
        return reused.decrypt(blob[:12], blob[12:], AAD)

    def emit(case: str, impl: str, ops_per_s: float, size: int | None = None) -> None:
        row: dict[str, Any] = {"case": case, "impl": impl, "ops_per_s": round(ops_per_s, 1)}
        if size is not None:
            row["mb_per_s"] = round(ops_per_s * size / 1e6, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)

    for label, size in SIZES.items():
        data = os.urandom(size)
        ops = max(20, (2_000 if quick else 20_000) * 1024 // size)
        repeats = 3 if quick else 15
        blob = encrypt(data, KEY, AAD)
        seal = {
            "converge": partial(encrypt, data, KEY, AAD),
            "cryptography": partial(raw_encrypt, data, KEY, AAD),
            "cryptography-reused": partial(reused_encrypt, data),
        }
        open_ = {
            "converge": partial(decrypt, blob, KEY, AAD),
            "cryptography": partial(raw_decrypt, blob, KEY, AAD),
            "cryptography-reused": partial(reused_decrypt, blob),
        }
        for case, impls in [(f"encrypt_{label}", seal), (f"decrypt_{label}", open_)]:
            for impl, rate in compare(impls, ops, repeats).items():
                emit(case, impl, rate, size)
        # The async twins, against the same hand-written code run inline in the loop.
        for case, afn, peer in [
            (f"aencrypt_{label}", partial(aencrypt, data, KEY, AAD), seal["cryptography"]),
            (f"adecrypt_{label}", partial(adecrypt, blob, KEY, AAD), open_["cryptography"]),
        ]:
            rates = compare_async({"converge": afn, "cryptography": as_async(peer)}, ops, repeats)
            for impl, rate in rates.items():
                emit(case, impl, rate, size)

    iterations = 10_000 if quick else 100_000
    ops, repeats = (3, 2) if quick else (5, 5)
    salt = os.urandom(16)
    case = f"derive_key_{iterations}"
    rates = compare(
        {
            "converge": partial(derive_key, "pw", salt, 32, iterations),
            "hashlib": partial(hashlib.pbkdf2_hmac, "sha256", b"pw", salt, iterations, 32),
        },
        ops,
        repeats,
    )
    for impl, rate in rates.items():
        emit(case, impl, rate)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    by_case: dict[str, dict[str, float]] = {}
    for row in rows:
        by_case.setdefault(row["case"], {})[row["impl"]] = row["ops_per_s"]
    print(
        f"\n{'case':<22}{'peer':<22}{'converge/s':>14}{'peer/s':>14}{'ratio':>8}", file=sys.stderr
    )
    for case, impls in by_case.items():
        ours = impls.get("converge")
        for impl, rate in impls.items():
            if impl == "converge" or ours is None:
                continue
            print(
                f"{case:<22}{impl:<22}{ours:>14,.0f}{rate:>14,.0f}{ours / rate:>7.2f}x",
                file=sys.stderr,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run (smoke test)")
    args = parser.parse_args()
    print_table(run(args.quick))


if __name__ == "__main__":
    main()
