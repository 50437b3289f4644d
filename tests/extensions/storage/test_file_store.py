"""FileStore: the Store contract, safe names, on-disk format, corruption, locking."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from converge.errors import (
    ClosedError,
    StoreCorruptedError,
    StoreError,
    SyncInEventLoopError,
    UsageError,
)
from converge.extensions.storage import FileStore
from converge.extensions.storage.file import _key_for, _name_for
from converge.extensions.storage.testing import VALUES, StoreContract

pytestmark = pytest.mark.anyio


class TestFileStoreContract(StoreContract):
    # locking=True exercises every lock path; the unlocked default shares the rest.
    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[FileStore]:
        store = FileStore(str(tmp_path / "store"), locking=True)
        yield store
        store.close()


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(str(tmp_path / "store"))


def data_files(store: FileStore) -> list[str]:
    return sorted(n for n in os.listdir(store.base_path) if not n.startswith("."))


# -- seed surface --------------------------------------------------------------------------


def test_seed_signature_and_flags(tmp_path: Path) -> None:
    assert FileStore.atomic_put_if_absent is True
    assert FileStore.supports_locking is True
    store = FileStore(str(tmp_path), locking=True)
    assert store.locking is True
    assert store.serializer == "pickle"
    with pytest.raises(TypeError):
        FileStore(str(tmp_path), True)  # type: ignore[misc]  # locking is keyword-only


def test_pickle_by_default_stores_any_python_object(store: FileStore) -> None:
    value = {"set": {1, 2}, "tuple": (1, 2), "bytes": b"\x00\xff"}
    store.put("k", value)
    assert store.get("k") == value


def test_accepts_pathlib_paths_and_creates_the_directory(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "a" / "b")
    store.put("k", 1)
    assert (tmp_path / "a" / "b").is_dir()


# -- key encoding --------------------------------------------------------------------------

AWKWARD_KEYS = [
    "../../etc/passwd",
    "/abs/path",
    "..",
    ".",
    "a\x00b",
    "back\\slash",
    "CON",
    "nul.txt",
    "LPT1",
    "trailing dot.",
    "trailing space ",
    "UPPER and lower",
    "ünïcödé ✓ 𝄞",
    "\ud800lone surrogate",
    "x" * 1000,
    "é" * 1000,
    "%41",
    "A",
    "a",
]


@pytest.mark.parametrize("key", AWKWARD_KEYS, ids=range(len(AWKWARD_KEYS)))
def test_awkward_keys_stay_inside_base_path_and_round_trip(store: FileStore, key: str) -> None:
    store.put(key, key)
    assert store.get(key) == key
    assert store.list() == [key]
    (name,) = data_files(store)
    assert os.path.dirname(os.path.join(store.base_path, name)) == store.base_path
    assert len(name.encode()) <= 201
    assert name == name.lower()  # safe on case-insensitive file systems


def test_all_awkward_keys_coexist(store: FileStore) -> None:
    for i, key in enumerate(AWKWARD_KEYS):
        store.put(key, i)
    assert store.list() == sorted(AWKWARD_KEYS)
    for i, key in enumerate(AWKWARD_KEYS):
        assert store.get(key) == i
    assert len(data_files(store)) == len(AWKWARD_KEYS)


@given(st.text(min_size=1, max_size=300))
def test_file_names_decode_back_to_the_key(key: str) -> None:
    name = _name_for(key)
    assert len(name) <= 201
    assert "/" not in name
    assert "\\" not in name
    assert name not in {".", ".."}
    if name.startswith("k"):
        assert _key_for(name) == key
    else:
        assert name.startswith("h")
        assert len(name) == 65


def test_non_canonical_names_are_not_keys() -> None:
    assert _key_for("k%61") is None  # "a" is spelled "ka"
    assert _key_for("kA") is None
    assert _key_for("k%zz") is None
    assert _key_for("notes.txt") is None


def test_foreign_files_in_the_directory_are_ignored(store: FileStore) -> None:
    store.put("real", 1)
    Path(store.base_path, "README").write_text("hello")
    Path(store.base_path, "kitten.jpg").write_bytes(b"\xff\xd8")
    assert store.list() == ["real"]


def test_long_keys_list_by_prefix(store: FileStore) -> None:
    long_a = "a/" + "x" * 500
    long_b = "b/" + "y" * 500
    store.put(long_a, 1)
    store.put(long_b, 2)
    store.put("a/short", 3)
    assert store.list("a/") == sorted(["a/short", long_a])
    assert store.get(long_b) == 2
    store.delete(long_a)
    assert store.list("a/") == ["a/short"]


# -- on-disk behaviour ---------------------------------------------------------------------


def test_ttl_is_stored_in_the_file_and_honoured_by_another_process(store: FileStore) -> None:
    store.put("short", "v", ttl=0.2)
    store.put("long", "v", ttl=60)
    time.sleep(0.3)
    code = (
        "import sys; from converge.extensions.storage import FileStore\n"
        "s = FileStore(sys.argv[1]); print(s.list(), s.get('short'), s.get('long'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, store.base_path], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "['long'] None v"


def test_expired_files_are_removed_when_read(store: FileStore) -> None:
    store.put("gone", 1, ttl=0.05)
    time.sleep(0.1)
    assert store.get("gone") is None
    assert data_files(store) == []


def test_writes_leave_no_temp_files(store: FileStore) -> None:
    for i in range(20):
        store.put("k", i)
        store.put_if_absent(f"p{i}", i)
    assert [n for n in os.listdir(store.base_path) if n.startswith(".tmp")] == []


def test_list_sweeps_temp_files_of_dead_writers(store: FileStore) -> None:
    store.put("k", 1)
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(proc.stdout)
    stale = Path(store.base_path, f".tmp-{dead_pid}-abcdef")
    stale.write_bytes(b"half a value")
    old = time.time() - 60
    os.utime(stale, (old, old))
    fresh = Path(store.base_path, f".tmp-{os.getpid()}-123456")
    fresh.write_bytes(b"in flight")
    assert store.list() == ["k"]
    assert not stale.exists()
    assert fresh.exists()  # a live writer's temp file is left alone


# -- corruption ----------------------------------------------------------------------------


def only_file(store: FileStore) -> Path:
    (name,) = data_files(store)
    return Path(store.base_path, name)


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 2],
        lambda b: b[:3],
        lambda b: b"",
        lambda b: b[:-1] + bytes([b[-1] ^ 1]),
        lambda b: b[:20] + bytes([b[20] ^ 0x40]) + b[21:],
        lambda b: b"garbage" * 10,
        lambda b: pickle.dumps("not our format"),
    ],
    ids=["half", "three-bytes", "empty", "crc-bit", "payload-bit", "garbage", "bare-pickle"],
)
def test_corrupt_file_raises_store_corrupted_error_naming_the_key(
    store: FileStore, damage: Any
) -> None:
    store.put("victim", {"some": "value"})
    store.put("bystander", 42)
    path = Path(store.base_path, _name_for("victim"))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(StoreCorruptedError) as info:
        store.get("victim")
    assert info.value.key == "victim"
    assert "victim" in str(info.value)
    assert isinstance(info.value, OSError)
    assert store.get("bystander") == 42
    assert "victim" in store.list()  # listed, so that it can be found and deleted
    store.delete("victim")
    assert store.get("victim") is None


@pytest.mark.parametrize("ttl", [None, 3600])
def test_a_bit_flip_anywhere_in_the_header_keeps_the_file_listed_and_corrupt(
    store: FileStore, ttl: float | None
) -> None:
    # Flips in the expiry field used to make list() delete the file as expired.
    from converge.extensions.storage import file as file_module

    store.put("victim", "value", ttl=ttl)
    path = Path(store.base_path, _name_for("victim"))
    good = path.read_bytes()
    end = file_module._HEADER.size + len(b"victim")  # header and key
    for bit in range(end * 8):
        damaged = bytearray(good)
        damaged[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(damaged)
        assert store.list() == ["victim"], f"bit {bit}"
        assert path.read_bytes() == damaged, f"bit {bit}: the file was changed"
        with pytest.raises(StoreCorruptedError):
            store.get("victim")
        assert path.exists(), f"bit {bit}"
    path.write_bytes(good)
    assert store.get("victim") == "value"


async def test_a_dangling_symlink_at_a_keys_path_is_a_typed_error(
    store: FileStore, tmp_path: Path
) -> None:
    os.symlink(tmp_path / "gone", Path(store.base_path, _name_for("link")))
    with pytest.raises(StoreCorruptedError, match="symbolic link") as info:
        await store.aget("link")
    assert info.value.key == "link"
    with pytest.raises(StoreCorruptedError, match="symbolic link"):
        await store.aput_if_absent("link", 1)
    assert await store.alist() == ["link"]  # listed, so it can be found and deleted
    await store.adelete("link")
    assert await store.aget("link") is None


def test_valid_frame_with_bad_pickle_is_corrupt_not_a_raw_pickle_error(store: FileStore) -> None:
    import struct
    import zlib

    from converge.extensions.storage import file as file_module

    key = b"k"
    header = file_module._HEADER.pack(b"CVFS", 1, 0x50, 0.0, len(key))
    body = header + key + b"\x80\x05not a pickle"
    Path(store.base_path, "kk").write_bytes(body + struct.pack(">I", zlib.crc32(body)))
    with pytest.raises(StoreCorruptedError, match="unpickle"):
        store.get("k")


def test_file_moved_under_another_name_is_corrupt(store: FileStore) -> None:
    store.put("a", 1)
    os.replace(Path(store.base_path, "ka"), Path(store.base_path, "kb"))
    with pytest.raises(StoreCorruptedError, match="holds key 'a'"):
        store.get("b")


def test_unreadable_file_is_reported_as_corrupt(store: FileStore) -> None:
    os.mkdir(Path(store.base_path, "kdir"))  # a directory where a value file should be
    with pytest.raises(StoreCorruptedError):
        store.get("dir")


def test_json_store_never_unpickles(tmp_path: Path) -> None:
    FileStore(tmp_path).put("k", {"a": 1})  # pickle-tagged
    with pytest.raises(StoreCorruptedError, match="never unpickles"):
        FileStore(tmp_path, serializer="json").get("k")


@pytest.mark.parametrize("value", VALUES)
def test_json_serializer_round_trips_json_values(tmp_path: Path, value: Any) -> None:
    store = FileStore(tmp_path, serializer="json")
    store.put("k", value)
    assert store.get("k") == value


def test_pickle_store_reads_json_values(tmp_path: Path) -> None:
    FileStore(tmp_path, serializer="json").put("k", {"a": [1, 2]})
    assert FileStore(tmp_path).get("k") == {"a": [1, 2]}


# -- errors and arguments ------------------------------------------------------------------


def test_unserializable_values_raise_usage_error_and_write_nothing(tmp_path: Path) -> None:
    pickled = FileStore(tmp_path / "p")
    with pytest.raises(UsageError, match="cannot be pickled"):
        pickled.put("k", threading.Lock())
    as_json = FileStore(tmp_path / "j", serializer="json")
    with pytest.raises(UsageError, match="JSON"):
        as_json.put("k", {1, 2})
    with pytest.raises(UsageError):
        as_json.put("k", float("nan"))
    assert pickled.list() == []
    assert as_json.list() == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base_path": ""},
        {"base_path": 5},
        {"base_path": "a\x00b"},  # raised ValueError
        {"base_path": "a\ud800b"},  # raised UnicodeEncodeError
        {"base_path": "x", "locking": "yes"},
        {"base_path": "x", "serializer": "yaml"},
        {"base_path": "x", "lock_timeout": 0},
    ],
)
def test_invalid_arguments_raise_usage_error(
    kwargs: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError):
        FileStore(**kwargs)


def test_base_path_that_is_a_file_raises_usage_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        FileStore(tmp_path / "f")


def test_write_failure_raises_store_error_naming_the_key(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "gone")
    os.rmdir(tmp_path / "gone")
    with pytest.raises(StoreError, match="'k'") as info:
        store.put("k", 1)
    assert not isinstance(info.value, StoreCorruptedError)
    assert info.value.errno is not None


def test_closed_store_refuses_calls(store: FileStore) -> None:
    store.close()
    with pytest.raises(ClosedError):
        store.put("k", 1)


async def test_sync_call_on_event_loop_names_the_coroutine(store: FileStore) -> None:
    with pytest.raises(SyncInEventLoopError, match=r"FileStore\.aget"):
        store.get("k")


async def test_async_and_sync_surfaces_share_files(store: FileStore) -> None:
    await store.aput("k", [1, 2], ttl=60)
    assert store.base_path
    assert await store.aget("k") == [1, 2]
    assert await store.alist() == ["k"]


# -- concurrency ---------------------------------------------------------------------------


def test_two_instances_on_one_directory_share_thread_locks(tmp_path: Path) -> None:
    stores = [FileStore(tmp_path), FileStore(tmp_path)]
    barrier = threading.Barrier(12)
    wins: list[int] = []

    def claim(i: int) -> None:
        barrier.wait()
        if stores[i % 2].put_if_absent("claim", i):
            wins.append(i)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1


def test_expired_key_is_claimed_by_exactly_one_thread(tmp_path: Path) -> None:
    store = FileStore(tmp_path, locking=True)
    store.put("claim", "old", ttl=0.05)
    time.sleep(0.1)
    barrier = threading.Barrier(12)
    wins: list[int] = []

    def claim(i: int) -> None:
        barrier.wait()
        if store.put_if_absent("claim", i):
            wins.append(i)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert store.get("claim") == wins[0]


def test_update_across_processes_with_locking_is_atomic(tmp_path: Path) -> None:
    code = (
        "import sys; from converge.extensions.storage import FileStore\n"
        "s = FileStore(sys.argv[1], locking=True)\n"
        "for _ in range(25):\n"
        "    s.update(['n'], lambda c: ({'n': (c['n'] or 0) + 1}, None))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)]) for _ in range(4)]
    assert [p.wait() for p in procs] == [0, 0, 0, 0]
    assert FileStore(tmp_path).get("n") == 100
