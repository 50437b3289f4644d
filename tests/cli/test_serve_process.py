"""What ``converge gateway`` sets up in its process before serving: the collector and the
C allocator."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cli_helpers import subprocess_env


def _python(code: str, *argv: str) -> list[str]:
    """Run ``code`` in a fresh interpreter (these settings are a whole process's)."""
    return subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env(),
        check=True,
    ).stdout.split()


_SERVE = textwrap.dedent(
    """
    import gc, sys
    import uvicorn
    from converge.cli.config import parse_config
    from converge.cli.serve import serve

    def run(app, **settings):  # uvicorn.run: report the state it would serve in
        print(gc.get_threshold()[0], gc.get_freeze_count())

    uvicorn.run = run
    config = {"gateway": {"store": "memory"}, "providers": {"demo": {"secret": "s" * 32}}}
    serve(parse_config(config, base_dir=sys.argv[1]))
    """
)


def test_serve_freezes_startup_objects_and_collects_young_objects_less_often(
    tmp_path: Path,
) -> None:
    threshold, frozen = map(int, _python(_SERVE, str(tmp_path))[-2:])
    assert threshold == 10_000  # not CPython's default of 700
    assert frozen > 10_000  # startup's objects (modules, classes, the gateway)


_SURVIVORS = textwrap.dedent(
    """
    import gc, sys
    import uvicorn
    from converge.cli.config import parse_config
    from converge.cli.serve import serve

    def run(app, **settings):  # uvicorn.run: build what an admin listing builds, and count
        walked = []

        def walk(phase, info):  # the objects each middle-generation collection walks
            if phase == "start" and info["generation"] == 1:
                walked.append(len(gc.get_objects(0)) + len(gc.get_objects(1)))

        gc.callbacks.append(walk)
        kept = [{"id": str(n), "data": {"n": n}} for n in range(200_000)]  # all survive
        gc.callbacks.remove(walk)
        print(len(kept), len(walked), max(walked))

    uvicorn.run = run
    config = {"gateway": {"store": "memory"}, "providers": {"demo": {"secret": "s" * 32}}}
    serve(parse_config(config, base_dir=sys.argv[1]))
    """
)


def test_serve_keeps_middle_generation_collections_small(tmp_path: Path) -> None:
    # 400,000 surviving containers built at once. With CPython's middle threshold (10) a
    # middle collection walks the survivors of up to ten young ones: 60,039 objects here
    # (3 such collections), and 25-33 ms in a listing of 20,000 dead letters. The CLI's 2
    # walks two young collections' worth: 20,031 (10 such collections).
    kept, collections, most = map(int, _python(_SURVIVORS, str(tmp_path))[-3:])
    assert kept == 200_000
    assert collections >= 5
    assert most <= 30_000


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


@pytest.mark.parametrize(("step", "expected"), [("none", "1 1"), ("raise", "0 1")])
def test_receive_buffers_come_from_the_heap_not_from_mmap(step: str, expected: str) -> None:
    # asyncio reads each socket into a 256 KiB buffer; above glibc's mmap threshold
    # every read maps, remaps and unmaps memory. Each case runs in a fresh process (a
    # freed block raises the threshold for good): a 1.5 MiB block is mapped until the
    # gateway raises the threshold; a 4 MiB one still is (the measurement works).
    assert " ".join(_python(_MAPPED, step)) == expected
