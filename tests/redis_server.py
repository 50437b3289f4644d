"""A throwaway ``redis-server`` on a free loopback port, for the Redis tests.

``CONVERGE_TEST_REDIS_URL`` (set by ``.ci/run``) names a server to use instead.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def redis_server(*extra: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Start ``redis-server`` (no persistence unless ``extra`` asks); yield its URL and
    process; stop it after."""
    server = shutil.which("redis-server")
    assert server, "redis-server is needed (apt install redis-server) or CONVERGE_TEST_REDIS_URL"
    port = free_port()
    args = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *extra]
    if "--appendonly" not in extra:
        args += ["--appendonly", "no"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert proc.poll() is None, "redis-server exited"
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()


def shared_redis_url() -> Iterator[str]:
    """For a session fixture: ``CONVERGE_TEST_REDIS_URL``, else a server of our own."""
    url = os.environ.get("CONVERGE_TEST_REDIS_URL")
    if url:
        yield url
        return
    with redis_server() as (url, _proc):
        yield url
