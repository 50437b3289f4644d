"""A throwaway ``redis-server`` on a free loopback port, for tests and benchmarks.

``tests/`` is on ``sys.path`` under pytest, so ``from redis_server import RedisServer``;
benchmarks load it by path. Each server is a real process started with persistence off;
:meth:`RedisServer.pause` and :meth:`RedisServer.resume` stall it with SIGSTOP/SIGCONT.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from types import TracebackType

__all__ = ["RedisServer", "free_port", "shared_redis_url"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """``redis-server`` on 127.0.0.1 at a free port; a context manager that stops it."""

    def __init__(self, *extra_args: str, port: int | None = None) -> None:
        server = shutil.which("redis-server")
        assert server, "redis-server is needed (apt install redis-server)"
        self.port = free_port() if port is None else port
        self.url = f"redis://127.0.0.1:{self.port}/0"
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        self.proc = subprocess.Popen(
            [server, *args, "--appendonly", "no", *extra_args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                assert self.proc.poll() is None, "redis-server exited"
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.02)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open, nothing is answered."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused server run again (SIGCONT)."""
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Stop the server (resuming it first, so that it can exit)."""
        if self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:  # pragma: no cover
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def shared_redis_url() -> Iterator[str]:
    """For a fixture: ``CONVERGE_TEST_REDIS_URL`` (``.ci/run`` sets it), else a server of
    our own for the fixture's scope."""
    url = os.environ.get("CONVERGE_TEST_REDIS_URL")
    if url:
        yield url
        return
    with RedisServer() as server:
        yield server.url
