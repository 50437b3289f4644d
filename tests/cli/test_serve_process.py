"""What ``converge gateway`` sets up in its process before serving: the collector and the
C allocator."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import subprocess_env

from converge.cli import serve as serve_module
from converge.cli.config import parse_config


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_serve_freezes_startup_objects_and_collects_young_objects_less_often(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restored_gc: None
) -> None:
    seen: dict[str, Any] = {}

    def run(app: Any, **settings: Any) -> None:  # uvicorn.run: record the state it sees
        seen["threshold"] = gc.get_threshold()
        seen["frozen"] = gc.get_freeze_count()

    import uvicorn

    monkeypatch.setattr(uvicorn, "run", run)
    config = parse_config(
        {"gateway": {"store": "memory"}, "providers": {"demo": {"secret": "s" * 32}}},
        base_dir=tmp_path,
    )
    gc.unfreeze()
    serve_module.serve(config)
    assert seen["threshold"][0] >= 50_000  # not CPython's default of 700
    assert seen["frozen"] > 10_000  # startup's objects (modules, classes, the gateway)


_MAPPED = textwrap.dedent(
    """
    import ctypes, sys

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2

    def mapped(size):  # does a block of this size get its own mmap?
        before = libc.mallinfo2().hblks
        block = bytearray(size)
        during = libc.mallinfo2().hblks
        del block
        return during - before

    from converge.cli.serve import _raise_mmap_threshold
    if sys.argv[1] == "raise":
        _raise_mmap_threshold()
    print(mapped(3 << 19), mapped(4 << 20))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
@pytest.mark.parametrize(("step", "expected"), [("none", "1 1"), ("raise", "0 1")])
def test_receive_buffers_come_from_the_heap_not_from_mmap(step: str, expected: str) -> None:
    # asyncio reads each socket into a 256 KiB buffer; above glibc's mmap threshold
    # every read maps, remaps and unmaps memory. Each case runs in a fresh process (a
    # freed block raises the threshold for good): a 1.5 MiB block is mapped until the
    # gateway raises the threshold; a 4 MiB one still is (the measurement works).
    out = subprocess.run(
        [sys.executable, "-c", _MAPPED, step],
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env(),
        check=True,
    ).stdout.split()
    assert " ".join(out) == expected
