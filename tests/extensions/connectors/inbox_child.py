"""A gateway process for the inbox crash tests (run as a script, then killed with -9).

``python inbox_child.py serve <backend> <path>``
    Serves a connector (no bus, nobody consuming) with uvicorn on a free loopback port,
    prints its URL, and waits to be killed: accepted events stay in the inbox, leased
    to this process for one second.

``python inbox_child.py flood <backend> <path>``
    Accepts signed events as fast as it can from eight tasks, printing ``started``
    once the first one is in, until killed.

The test puts ``tests/`` and this directory on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import sys
import time
import uuid

import anyio
from webhook_helpers import GITHUB_SECRET, HMAC_SECRET, event_body, github_request, hmac_request

from converge.core.store import Store
from converge.extensions.connectors import ProviderProfile, WebhookConnector, WebhookGateway
from converge.extensions.storage import FileStore, SQLiteStore
from loopback import UvicornThread

PROFILES = {
    "github": ProviderProfile("github", "github", scheme="github"),
    "shop": ProviderProfile("shop", "shop"),
}
SECRETS = {"github": GITHUB_SECRET, "shop": HMAC_SECRET}
LEASE_SEC = 1.0


def open_store(backend: str, path: str) -> Store:
    """The store both the child and the test open."""
    if backend == "file":
        return FileStore(path, locking=True)
    if backend == "sqlite":
        return SQLiteStore(os.path.join(path, "gateway.sqlite3"))
    raise SystemExit(f"unknown backend {backend!r}")


def connector(store: Store, **kw: object) -> WebhookConnector:
    """The connector both sides build (same id, so the same inbox)."""
    return WebhookConnector(
        provider_profiles=PROFILES,
        secrets=SECRETS,
        store=store,
        inbox_lease_sec=LEASE_SEC,
        **kw,  # type: ignore[arg-type]
    )


def serve(backend: str, path: str) -> None:
    gateway = WebhookGateway(connector(open_store(backend, path)))
    server = UvicornThread(gateway.asgi_app(run_dispatcher=False)).start()
    print(server.url, flush=True)
    while True:
        time.sleep(60)


async def flood(backend: str, path: str) -> None:
    c = connector(open_store(backend, path), max_pending=1_000_000)
    started = anyio.Event()

    async def accept() -> None:
        while True:
            if uuid.uuid4().int % 2:
                body = event_body()
                headers = hmac_request(body)
                provider = "shop"
            else:
                body = event_body(n=uuid.uuid4().hex)
                headers = github_request(body, delivery=str(uuid.uuid4()))
                provider = "github"
            status, _, _ = await c.accept_inbound_http(
                provider, method="POST", headers=headers, raw_body=body
            )
            assert status == 202, status
            if not started.is_set():
                started.set()
                print("started", flush=True)

    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(accept)


if __name__ == "__main__":
    mode, backend, path = sys.argv[1:4]
    if mode == "serve":
        serve(backend, path)
    else:
        anyio.run(flood, backend, path)
