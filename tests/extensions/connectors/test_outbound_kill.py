"""kill -9 during outbound deliveries: after a restart every action arrives, and a
receiver that deduplicates on ``webhook-id`` / ``Idempotency-Key`` sees each one once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
import standardwebhooks
from outbound_helpers import action, make
from webhook_helpers import TARGET_SECRET

import converge
from converge.extensions.connectors import OutboundTarget
from converge.extensions.storage import SQLiteStore
from loopback import UvicornThread, read_request, serve_lifespan

pytestmark = pytest.mark.anyio

ACTIONS = 24

CHILD = """
import sys

import anyio

from converge.extensions.connectors import OutboundTarget, RetrySchedule, WebhookConnector
from converge.extensions.storage import SQLiteStore


async def main(path: str, url: str, secret: str) -> None:
    store = SQLiteStore(path)
    connector = WebhookConnector(
        provider_profiles={},
        secrets={},
        store=store,
        connector_id="killed",
        targets=[OutboundTarget("app", url, signing_secret=secret, max_concurrency=4)],
        # A lease is the request timeout plus the margin: 1.5 s after a crash.
        retry_policy=RetrySchedule(delays_sec=(0.1, 0.2), request_timeout_sec=1.0,
                                   lease_margin_sec=0.5),
    )
    await connector.run_outbound_dispatcher(poll_interval_sec=0.05)


anyio.run(main, *sys.argv[1:4], backend=sys.argv[4])
"""


class DedupReceiver:
    """A receiver that verifies signatures and processes each ``webhook-id`` once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.raw: list[str] = []  # every request's webhook-id, duplicates included
        self.processed: dict[str, int] = {}  # webhook-id -> body "n", first delivery
        self.keys: dict[str, str] = {}  # webhook-id -> Idempotency-Key
        self.in_flight = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        headers, body = await read_request(scope, receive)
        payload = standardwebhooks.Webhook(TARGET_SECRET).verify(body, headers)
        webhook_id = headers["webhook-id"]
        with self.lock:
            self.raw.append(webhook_id)
            self.in_flight += 1
        await anyio.sleep(0.15)  # slow enough that a kill lands mid-delivery
        with self.lock:
            self.in_flight -= 1
            if webhook_id not in self.processed:
                self.processed[webhook_id] = payload["n"]
                self.keys[webhook_id] = headers["idempotency-key"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


def _spawn(script: Path, db: Path, url: str, backend: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    src = str(Path(converge.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, str(script), str(db), url, TARGET_SECRET, backend],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def _wait(predicate: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await anyio.sleep(0.01)


async def test_kill_9_during_deliveries_loses_nothing_and_sends_each_action_effectively_once(
    tmp_path: Path, anyio_backend: str
) -> None:
    receiver = DedupReceiver()
    server = UvicornThread(receiver, name="receiver").start()
    url = f"{server.url}/events"
    db = tmp_path / "outbox.sqlite3"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    store = SQLiteStore(db)
    submitter = make(
        store, connector_id="killed", targets=[OutboundTarget("app", url)], outbound_sender=None
    )
    for n in range(ACTIONS):
        await submitter.submit_outbound_action(action(n, url=url, idempotency_key=f"order-{n}"))
    first = _spawn(script, db, url, anyio_backend)
    try:
        # Kill it while deliveries are on the wire and most actions are still pending.
        await _wait(lambda: len(receiver.raw) >= 6 and receiver.in_flight > 0, 20, "deliveries")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        assert len(receiver.processed) < ACTIONS
        assert await submitter.apending_count() > 0
        second = _spawn(script, db, url, anyio_backend)
        try:
            await _wait(lambda: len(receiver.processed) == ACTIONS, 30, "every action")
            with anyio.fail_after(10):
                # Polling on purpose: the count lives in another process's store writes.
                while await submitter.apending_count():  # noqa: ASYNC110
                    await anyio.sleep(0.05)
        finally:
            second.kill()
            second.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
        server.stop()
        await store.aclose()
    # Every action reached the receiver; deduplicating on webhook-id, each once.
    assert sorted(receiver.processed.values()) == list(range(ACTIONS))
    assert len(set(receiver.keys.values())) == ACTIONS
    assert set(receiver.keys.values()) == {f"order-{n}" for n in range(ACTIONS)}
    # Redelivered requests carry the same webhook-id as the first try.
    assert set(receiver.raw) == set(receiver.processed)
    assert len(receiver.raw) > ACTIONS  # what was on the wire at the kill came again
    store = SQLiteStore(db)
    reopened = make(store, connector_id="killed", targets=[OutboundTarget("app", url)])
    delivered = await reopened.outbox.alist(status="delivered", limit=1000)
    assert len(delivered) == ACTIONS
    assert await reopened.alist_dead_letters() == []
    await store.aclose()
