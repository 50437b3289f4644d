"""Benchmark converge.extensions.crypto against raw ``cryptography`` AESGCM and hashlib.

Prints one JSON object per line (``case``, ``impl``, ``ops_per_s``, ``mb_per_s``) and a
table of ratios on stderr. Peers:

* ``cryptography``: the code you would write by hand for the same blob layout and the
  same call shape (a key per call): ``nonce + AESGCM(key).encrypt(nonce, data, aad)``.
* ``cryptography-reused``: the same, with one ``AESGCM`` object built ahead of time,
  which is the floor for any wrapper.

The decrypting peers split the blob without copying it when that is cheaper (a
memoryview above 64 KiB, slices below), as converge does. At 4 MiB the async twins work
in a worker thread (the loop stays free) while the peer runs inline and blocks the loop.
* ``hashlib``: ``hashlib.pbkdf2_hmac`` for :func:`derive_key`.

Usage: ``python benchmarks/crypto.py [--quick]``
"""

from __future__ import annotations

import hashlib
import os
from functools import partial
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from _bench import Results, arg_parser, as_async, compare, compare_async, print_ratio_table
from converge.extensions.crypto import adecrypt, aencrypt, decrypt, derive_key, encrypt

SIZES = {"1KiB": 1024, "64KiB": 64 * 1024, "1MiB": 1024 * 1024, "4MiB": 4 * 1024 * 1024}
KEY = os.urandom(32)
AAD = b"bench"


def raw_encrypt(plaintext: bytes, key: bytes, aad: bytes | None) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


# The peer's best split of a blob into nonce and body: slicing copies, which costs more
# than a memoryview above some tens of KiB (converge switches at 64 KiB, so does the peer).
SLICE_LIMIT = 64 * 1024


def split(blob: bytes) -> tuple[bytes | memoryview, bytes | memoryview]:
    if len(blob) <= SLICE_LIMIT:
        return blob[:12], blob[12:]
    view = memoryview(blob)
    return view[:12], view[12:]


def raw_decrypt(blob: bytes, key: bytes, aad: bytes | None) -> bytes:
    nonce, body = split(blob)
    return AESGCM(key).decrypt(nonce, body, aad)


def run(quick: bool) -> list[dict[str, Any]]:
    results = Results()
    reused = AESGCM(KEY)

    def reused_encrypt(plaintext: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + reused.encrypt(nonce, plaintext, AAD)

    def reused_decrypt(blob: bytes) -> bytes:
        nonce, body = split(blob)
        return reused.decrypt(nonce, body, AAD)

    def emit(case: str, rates: dict[str, float], size: int) -> None:
        for impl, rate in rates.items():
            results.add(case, impl, rate, mb_per_s=round(rate * size / 1e6, 1))

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
            emit(case, compare(impls, ops, repeats), size)
        # The async twins, against the same hand-written code run inline in the loop.
        for case, afn, peer in [
            (f"aencrypt_{label}", partial(aencrypt, data, KEY, AAD), seal["cryptography"]),
            (f"adecrypt_{label}", partial(adecrypt, blob, KEY, AAD), open_["cryptography"]),
        ]:
            rates = compare_async({"converge": afn, "cryptography": as_async(peer)}, ops, repeats)
            emit(case, rates, size)

    iterations = 10_000 if quick else 100_000
    ops, repeats = (3, 2) if quick else (5, 5)
    salt = os.urandom(16)
    results.add_rates(
        f"derive_key_{iterations}",
        compare(
            {
                "converge": partial(derive_key, "pw", salt, 32, iterations),
                "hashlib": partial(hashlib.pbkdf2_hmac, "sha256", b"pw", salt, iterations, 32),
            },
            ops,
            repeats,
        ),
    )
    return results.rows


def main() -> None:
    args = arg_parser(__doc__).parse_args()
    print_ratio_table(run(args.quick), widths=(22, 22, 14, 14))


if __name__ == "__main__":
    main()
