"""The single sync-shim mechanism: scripts, threads, worker threads, fork, event loop."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import anyio
import pytest

from converge import _sync
from converge.errors import ClosedError, SyncInEventLoopError


async def double(x: int) -> int:
    await anyio.lowlevel.checkpoint()
    return 2 * x


async def which_loop() -> object:
    return anyio.lowlevel.current_token().native_token


@pytest.fixture
def portal() -> Iterator[_sync.Portal]:
    p = _sync.Portal()
    yield p
    p.close()


def test_run_works_from_a_plain_script() -> None:
    code = (
        "import anyio\n"
        "from converge import _sync\n"
        "async def f(x, *, y):\n"
        "    await anyio.lowlevel.checkpoint()\n"
        "    return x + y\n"
        "print(_sync.run(f, 2, y=3, async_name='f'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "5"


def test_run_from_eight_threads_at_once() -> None:
    results: dict[int, int] = {}
    barrier = threading.Barrier(8)

    def work(i: int) -> None:
        barrier.wait()
        results[i] = _sync.run(double, i, async_name="double")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: 2 * i for i in range(8)}


def test_portal_from_eight_threads_uses_one_loop(portal: _sync.Portal) -> None:
    loops: list[object] = []
    barrier = threading.Barrier(8)

    def work() -> None:
        barrier.wait()
        loops.append(portal.call(which_loop, async_name="which_loop"))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(loops) == 8
    assert len({id(loop) for loop in loops}) == 1


@pytest.mark.anyio
async def test_run_from_worker_thread_uses_the_running_loop() -> None:
    here = await which_loop()
    there = await anyio.to_thread.run_sync(lambda: _sync.run(which_loop, async_name="which_loop"))
    assert there is here
    assert await anyio.to_thread.run_sync(lambda: _sync.run(double, 21, async_name="d")) == 42


@pytest.mark.anyio
async def test_portal_call_from_worker_thread(portal: _sync.Portal) -> None:
    assert await anyio.to_thread.run_sync(lambda: portal.call(double, 4, async_name="d")) == 8


@pytest.mark.anyio
async def test_run_on_event_loop_thread_raises_naming_async_method() -> None:
    with pytest.raises(SyncInEventLoopError, match=r"await Thing\.aget"):
        _sync.run(double, 1, async_name="Thing.aget")


@pytest.mark.anyio
async def test_portal_on_event_loop_thread_raises(portal: _sync.Portal) -> None:
    with pytest.raises(SyncInEventLoopError, match=r"Thing\.achat"):
        portal.call(double, 1, async_name="Thing.achat")


@pytest.mark.anyio
async def test_check_sync_allowed_only_refuses_on_loop_thread() -> None:
    with pytest.raises(SyncInEventLoopError):
        _sync.check_sync_allowed("x.ay")
    await anyio.to_thread.run_sync(_sync.check_sync_allowed, "x.ay")


def test_check_sync_allowed_passes_in_plain_thread() -> None:
    _sync.check_sync_allowed("x.ay")
    assert not _sync.in_event_loop_thread()
    assert not _sync.in_worker_thread()


def test_errors_propagate_with_their_type() -> None:
    async def boom() -> None:
        raise KeyError("inner")

    with pytest.raises(KeyError, match="inner"):
        _sync.run(boom, async_name="boom")


def test_portal_close_is_idempotent_and_refuses_later_calls() -> None:
    p = _sync.Portal()
    assert p.call(double, 1, async_name="d") == 2
    p.close()
    p.close()
    with pytest.raises(ClosedError):
        p.call(double, 1, async_name="d")


def test_portal_on_trio_backend() -> None:
    p = _sync.Portal(backend="trio")
    try:
        assert p.call(double, 5, async_name="d") == 10
    finally:
        p.close()


def test_run_and_portal_work_in_forked_child(portal: _sync.Portal) -> None:
    assert portal.call(double, 1, async_name="d") == 2  # parent's portal thread is running
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: the parent's portal thread does not exist here
        try:
            a = _sync.run(double, 3, async_name="d")
            b = portal.call(double, 4, async_name="d")
            os.write(write_fd, f"{a},{b}".encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as fh:
        result = fh.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0
    assert result == "6,8"
    assert portal.call(double, 5, async_name="d") == 10


@pytest.mark.anyio
async def test_loop_local_keeps_one_value_per_loop() -> None:
    created: list[object] = []

    def factory() -> object:
        created.append(object())
        return created[-1]

    local: _sync.LoopLocal[object] = _sync.LoopLocal(factory)
    first = local.get()
    assert local.get() is first
    other = await anyio.to_thread.run_sync(
        lambda: anyio.run(_get_from, local)  # a second, separate loop
    )
    assert other is not first
    assert len(created) == 2


async def _get_from(local: _sync.LoopLocal[object]) -> object:
    return local.get()


def test_run_from_thread_keeps_errors_and_later_calls_work() -> None:
    async def boom() -> None:
        raise KeyError("x")

    with pytest.raises(KeyError):
        _sync.run(boom, async_name="boom")
    assert _sync.run(double, 21, async_name="double") == 42


def test_sync_works_without_anyios_private_thread_marker() -> None:
    # anyio may move its private thread-local: ``import converge`` and the worker-thread
    # detection must keep working through the public fallback.
    code = (
        "import sys, types, anyio, anyio.from_thread, anyio.to_thread\n"
        "import anyio._core._eventloop as ev\n"
        "moved = types.ModuleType('moved')\n"
        "moved.__dict__.update({k: v for k, v in vars(ev).items() if k != 'threadlocals'})\n"
        "sys.modules['anyio._core._eventloop'] = moved\n"
        "from converge import _sync\n"
        "sys.modules['anyio._core._eventloop'] = ev\n"
        "assert _sync._anyio_threadlocals is None\n"
        "async def main():\n"
        "    inner = await anyio.to_thread.run_sync(_sync.in_worker_thread)\n"
        "    via = await anyio.to_thread.run_sync(\n"
        "        lambda: _sync.run(anyio.sleep, 0, async_name='s'))\n"
        "    return inner, _sync.in_worker_thread(), via\n"
        "print(anyio.run(main), _sync.in_worker_thread(),\n"
        "      _sync.run(anyio.sleep, 0, async_name='s'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "(True, False, None) False None"
