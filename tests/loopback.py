"""Loopback HTTP servers for the tests: ASGI plumbing and uvicorn on its own thread.

Shared by the LLM fake server (``tests/extensions/llm/llm_fake_server.py``) and the
connectors' :class:`ServerThread` and :class:`Receiver`
(``tests/extensions/connectors/webhook_helpers.py``). ``tests/`` is on ``sys.path`` under
pytest (rootdir ``conftest.py``, no packages), so ``from loopback import ...``; the LLM
benchmark loads this module by path before the fake server.

* :func:`serve_lifespan` and :func:`read_request`: what a hand-written ASGI test server
  does with a lifespan scope and with an HTTP request.
* :func:`loopback_socket` and :class:`UvicornThread`: serve an ASGI app on 127.0.0.1 at a
  free port from a daemon thread with its own asyncio loop, so tests on asyncio and trio
  alike talk to it over real sockets.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def serve_lifespan(receive: Receive, send: Send) -> None:
    """Answer an ASGI ``lifespan`` scope: complete each event, return after shutdown."""
    while True:
        message = await receive()
        kind = message["type"].rsplit(".", 1)[-1]
        await send({"type": f"lifespan.{kind}.complete"})
        if kind == "shutdown":
            return


async def read_request(scope: dict[str, Any], receive: Receive) -> tuple[dict[str, str], bytes]:
    """An HTTP scope's headers (``{name: value}``, latin-1) and its whole body."""
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
    return headers, b"".join(chunks)


def loopback_socket(*, nodelay: bool = False, port: int = 0) -> socket.socket:
    """A TCP socket bound to 127.0.0.1 at a free port, or at ``port`` (not listening yet).

    ``nodelay``: accepted connections inherit ``TCP_NODELAY``; without it, Nagle's
    algorithm plus delayed ACKs add ~40 ms to every answer written in two parts (headers,
    then body), which matters where latency is measured.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if nodelay:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", port))
    return sock


class UvicornThread:
    """``app`` served by uvicorn on 127.0.0.1 at a free port, from a daemon thread.

    ``config`` adds to (or overrides) the uvicorn settings: warning log level, no access
    log, lifespan on. ``name`` names the thread and the error if it does not start.
    ``port`` serves on that port (a server stopped and started again on its old port
    plays an outage).
    """

    def __init__(
        self,
        app: Any,
        *,
        nodelay: bool = False,
        name: str = "uvicorn",
        port: int = 0,
        **config: Any,
    ) -> None:
        self.app = app
        self.name = name
        self.nodelay = nodelay
        self.port = port
        self.config = {"log_level": "warning", "access_log": False, "lifespan": "on", **config}
        self.url = ""
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> UvicornThread:
        """Start serving; return once uvicorn has started (RuntimeError after 10 s)."""
        sock = loopback_socket(nodelay=self.nodelay, port=self.port)
        port = sock.getsockname()[1]
        self._server = server = uvicorn.Server(uvicorn.Config(self.app, **self.config))
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name=self.name, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"{self.name} did not start")
            time.sleep(0.005)
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        """Ask uvicorn to exit and join the thread."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
