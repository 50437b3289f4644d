"""EncryptedStore: the Store contract, sealing, key binding, rotation, typed errors."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from converge.errors import (
    CryptoTypeError,
    CryptoValueError,
    DecryptionError,
    KeyNotFoundError,
    StoreCorruptedError,
    SyncInEventLoopError,
    UsageError,
)
from converge.extensions.crypto import INLINE_LIMIT, secure_random_bytes
from converge.extensions.storage import EncryptedStore, FileStore, MemoryStore, SQLiteStore
from converge.extensions.storage.testing import StoreContract
from loop_stall import assert_loop_stall_below

pytestmark = pytest.mark.anyio

K1 = bytes(range(32))
K2 = bytes(range(32, 64))


class TestEncryptedStoreContract(StoreContract):
    @pytest.fixture
    def store(self) -> Iterator[EncryptedStore]:
        store = EncryptedStore(MemoryStore(), {"k1": K1})
        yield store
        store.close()


@pytest.fixture
def inner() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def store(inner: MemoryStore) -> EncryptedStore:
    return EncryptedStore(inner, {"k1": K1})


def test_values_are_sealed_in_the_inner_store(store: EncryptedStore, inner: MemoryStore) -> None:
    store.put("secret", "attack at dawn")
    blob = inner.get("secret")
    assert isinstance(blob, bytes)
    assert b"attack" not in blob
    assert blob.startswith(b"CVE\x01\x02k1")
    assert store.get("secret") == "attack at dawn"


def test_blob_opens_with_raw_aes_gcm_and_the_key_name_as_aad(
    store: EncryptedStore, inner: MemoryStore
) -> None:
    store.put("name", b"payload")
    blob = inner.get("name")
    sealed = blob[4 + 1 + 2 :]
    plaintext = AESGCM(K1).decrypt(sealed[:12], sealed[12:], b"name")
    assert plaintext[0] == ord("P")  # pickle tag, then expiry, then the pickle
    assert plaintext[1:9] == b"\x00" * 8


def test_value_moved_to_another_key_does_not_open(
    store: EncryptedStore, inner: MemoryStore
) -> None:
    store.put("alice", "alice's secret")
    inner.put("bob", inner.get("alice"))
    with pytest.raises(DecryptionError, match="'bob'") as info:
        store.get("bob")
    assert "alice's secret" not in str(info.value)


def test_tampered_blob_raises_decryption_error(store: EncryptedStore, inner: MemoryStore) -> None:
    store.put("k", "v")
    blob = bytearray(inner.get("k"))
    blob[-1] ^= 1
    inner.put("k", bytes(blob))
    with pytest.raises(DecryptionError):
        store.get("k")


def test_wrong_key_under_the_same_id_raises_decryption_error(inner: MemoryStore) -> None:
    EncryptedStore(inner, {"k1": K1}).put("k", "v")
    with pytest.raises(DecryptionError, match="k1"):
        EncryptedStore(inner, {"k1": K2}).get("k")


def test_unknown_key_id_raises_key_not_found(inner: MemoryStore) -> None:
    EncryptedStore(inner, {"old": K1}).put("k", "v")
    with pytest.raises(KeyNotFoundError, match="'old'") as info:
        EncryptedStore(inner, {"new": K2}).get("k")
    assert isinstance(info.value, LookupError)


@pytest.mark.parametrize(
    "stored", ["plain", b"CVE", b"CVE\x01\x09short", b"XYZ\x01\x00" + b"0" * 40]
)
def test_foreign_values_raise_store_corrupted(inner: MemoryStore, stored: Any) -> None:
    inner.put("k", stored)
    with pytest.raises(StoreCorruptedError):
        EncryptedStore(inner, {"k1": K1}).get("k")


def test_rotate_reseals_old_values_and_keeps_ttls(inner: MemoryStore) -> None:
    old = EncryptedStore(inner, {"v1": K1})
    old.put("a", 1)
    old.put("b", {"x": 2}, ttl=60)
    old.put("gone", 3, ttl=0.05)
    time.sleep(0.1)
    both = EncryptedStore(inner, {"v1": K1, "v2": K2}, active_key_id="v2")
    both.put("c", 4)  # already under v2
    assert both.rotate() == 2
    assert both.rotate() == 0
    new_only = EncryptedStore(inner, {"v2": K2})
    assert [new_only.get(k) for k in ["a", "b", "c"]] == [1, {"x": 2}, 4]
    assert "b" in inner._expires  # TTL kept
    assert "a" not in inner._expires


async def test_arotate_matches_rotate(inner: MemoryStore) -> None:
    await EncryptedStore(inner, {"v1": K1}).aput("a", "x")
    both = EncryptedStore(inner, {"v1": K1, "v2": K2}, active_key_id="v2")
    assert await both.arotate() == 1
    assert await EncryptedStore(inner, {"v2": K2}).aget("a") == "x"


def test_rotate_stops_at_a_value_with_an_unknown_key(inner: MemoryStore) -> None:
    EncryptedStore(inner, {"lost": K1}).put("k", 1)
    with pytest.raises(KeyNotFoundError):
        EncryptedStore(inner, {"v2": K2}).rotate()


async def test_large_values_round_trip_through_the_chunked_path(store: EncryptedStore) -> None:
    big = secure_random_bytes(3 * 1024 * 1024 + 5)
    await store.aput("big", big)
    assert await store.aget("big") == big
    assert store.get("big") == big


def test_json_inner_store_holds_base64_text(tmp_path: Path) -> None:
    inner = FileStore(tmp_path, serializer="json")
    store = EncryptedStore(inner, {"k1": K1})
    store.put("k", {"set": [1, 2]})
    text = inner.get("k")
    assert isinstance(text, str)
    assert text.startswith("cve1:")
    base64.b64decode(text[5:], validate=True)
    assert store.get("k") == {"set": [1, 2]}


def test_update_sees_plaintext_and_writes_sealed_values(tmp_path: Path) -> None:
    inner = SQLiteStore(tmp_path / "kv.db")
    store = EncryptedStore(inner, {"k1": K1})
    store.put("n", 1)
    assert store.update(["n", "m"], lambda c: ({"n": c["n"] + 1, "m": "new"}, "r")) == "r"
    assert store.get("n") == 2
    assert isinstance(inner.get("m"), bytes)


async def test_flags_follow_the_inner_store(tmp_path: Path) -> None:
    assert EncryptedStore(MemoryStore(), {"a": K1}).supports_locking is False
    assert EncryptedStore(FileStore(tmp_path), {"a": K1}).supports_locking is True
    assert EncryptedStore(FileStore(tmp_path), {"a": K1}).atomic_put_if_absent is True


async def test_sync_call_on_event_loop_names_the_wrapper(tmp_path: Path) -> None:
    store = EncryptedStore(FileStore(tmp_path), {"a": K1})
    with pytest.raises(SyncInEventLoopError, match=r"EncryptedStore\.aget"):
        store.get("k")


@pytest.mark.parametrize(
    ("args", "kwargs", "error"),
    [
        (("not a store", {"a": K1}), {}, UsageError),
        ((MemoryStore(), {}), {}, UsageError),
        ((MemoryStore(), {"": K1}), {}, UsageError),
        ((MemoryStore(), {"a": "text key"}), {}, CryptoTypeError),
        ((MemoryStore(), {"a": b"short"}), {}, CryptoValueError),
        ((MemoryStore(), {"a": K1, "b": K2}), {}, UsageError),
        ((MemoryStore(), {"a": K1}), {"active_key_id": "b"}, UsageError),
        ((MemoryStore(), {"a": K1}), {"active_key_id": ["a"]}, UsageError),
        ((MemoryStore(), {"a": K1}), {"serializer": "yaml"}, UsageError),
    ],
)
def test_invalid_arguments_raise_typed_errors(
    args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        EncryptedStore(*args, **kwargs)


# -- large values: the loop stays free ---------------------------------------------------

LARGE = 64 * 1024 * 1024


async def test_64_mib_values_never_stall_the_loop_20_ms(
    store: EncryptedStore, inner: MemoryStore
) -> None:
    # Serialization and concatenation used to run on the loop: 80-103 ms for 64 MiB.
    value = secure_random_bytes(LARGE)
    keys = iter(range(5))  # fresh keys: freeing a replaced 64 MiB blob is not aput's cost
    await assert_loop_stall_below(lambda: store.aput(f"big{next(keys)}", value))
    await store.aput("big", value)
    await assert_loop_stall_below(lambda: store.aget("big"))
    assert await store.aget("big") == value
    # The blob is the ordinary format: the sync path (one-shot pickle) opens it too.
    assert await anyio.to_thread.run_sync(store.get, "big") == value


async def test_large_values_round_trip_between_the_async_and_sync_paths(
    store: EncryptedStore,
) -> None:
    big = 2 * INLINE_LIMIT + 3
    values: list[Any] = [
        secure_random_bytes(big),  # sealed without pickling a copy
        bytearray(secure_random_bytes(big)),  # pickled as usual, sealed off the loop
        "x" * big,
        [b"a" * big, 1],
    ]
    for i, value in enumerate(values):
        await store.aput(f"a{i}", value)
        await anyio.to_thread.run_sync(store.put, f"s{i}", value)
    for i, value in enumerate(values):
        assert await store.aget(f"a{i}") == value
        assert await store.aget(f"s{i}") == value
        assert await anyio.to_thread.run_sync(store.get, f"a{i}") == value


async def test_a_tampered_large_value_is_rejected(
    store: EncryptedStore, inner: MemoryStore
) -> None:
    await store.aput("big", secure_random_bytes(2 * INLINE_LIMIT))
    blob = bytearray(inner.get("big"))
    blob[INLINE_LIMIT] ^= 1
    inner.put("big", bytes(blob))
    with pytest.raises(DecryptionError):
        await store.aget("big")


async def test_large_values_in_a_json_inner_store(tmp_path: Path) -> None:
    store = EncryptedStore(FileStore(tmp_path, serializer="json"), {"k1": K1})
    value = secure_random_bytes(2 * INLINE_LIMIT)
    await store.aput("big", value)
    assert await store.aget("big") == value
