"""What the edge's crash tests share: ``edge_app.py`` as a process, and views of its work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import converge
from converge.extensions.connectors import ProviderProfile, WebhookConnector
from converge.extensions.connectors.inbound.inbox import item_of
from converge.extensions.storage import SQLiteStore

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "extensions" / "connectors"))  # the connectors' helpers

from webhook_helpers import HMAC_SECRET, Receiver, Recorded  # noqa: E402

APP = Path(__file__).with_name("edge_app.py")


def wait_for(predicate: Callable[[], bool], what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class EdgeApp:
    """One run of ``edge_app.py``; kill -9 it with :meth:`kill`."""

    def __init__(self, backend: str, db: Path, receiver: str, calls: Path, pause: str) -> None:
        paths = [str(Path(converge.__file__).parents[1]), str(TESTS), str(APP.parent)]
        paths.append(str(TESTS / "extensions" / "connectors"))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        args = [sys.executable, str(APP), backend, str(db), receiver, str(calls), pause]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, env=env, text=True)
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        assert self.url.startswith("http://"), f"edge_app did not start: {self.url!r}"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


def complete(rec: Receiver) -> list[Recorded]:
    """The requests the receiver got whole (the kill may cut a delivery in flight)."""
    out = []
    for r in rec.delivered():
        try:
            json.loads(r.body)
        except ValueError:
            continue
        out.append(r)
    return out


def delivered_keys(rec: Receiver, *, answered_ok: bool = False) -> dict[str, set[str]]:
    """Event id -> the idempotency keys its actions reached the receiver under (only
    requests answered 200 with ``answered_ok``)."""
    keys: dict[str, set[str]] = {}
    for r in complete(rec):
        if answered_ok and r.status != 200:
            continue
        event_id = json.loads(r.body)["event_id"]
        keys.setdefault(event_id, set()).add(r.headers["idempotency-key"])
    return keys


def read_notes(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


async def inbox_statuses(db: Path) -> dict[str, str]:
    # the test's own view of the app's inbox (same connector id, same store)
    async with SQLiteStore(db) as store:
        connector = WebhookConnector(
            provider_profiles={"shop": ProviderProfile("shop", "shop")},
            secrets={"shop": HMAC_SECRET},
            store=store,
        )
        records = await connector.inbox.alist(limit=100_000)
        await connector.aclose()
    return {item_of(r).payload["event_id"]: r.status for r in records}  # type: ignore[union-attr]
