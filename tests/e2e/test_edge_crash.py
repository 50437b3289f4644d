"""kill -9 between the inbox and the outbox: nothing lost, nothing sent twice, no repeated call.

Issue 12 crash points (b) during an agent's ``adecide`` and (c) after ``adecide`` and
before the inbound event's acknowledgement, on a real process (``edge_app.py``: connector
on SQLite, bus, AgentRunner recording decisions, dispatcher) killed with SIGKILL and
restarted on the same database, with a real HTTP receiver that counts every request and
each ``Idempotency-Key``. After the restart every accepted event is acknowledged in the
inbox, every event's action reached the receiver under exactly one key, and the agent was
not called again for an event whose decisions were recorded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import converge
from converge.extensions.connectors import ProviderProfile, WebhookConnector
from converge.extensions.connectors.inbox import item_of
from converge.extensions.storage import SQLiteStore

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "extensions" / "connectors"))  # the connectors' helpers

from webhook_helpers import (  # noqa: E402
    HMAC_SECRET,
    Receiver,
    Recorded,
    ServerThread,
    event_body,
    hmac_request,
)

APP = Path(__file__).with_name("edge_app.py")
EVENTS = 5
PAUSED = 2  # the event the first process is killed on


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


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    rec = Receiver()
    with ServerThread(rec) as server:
        yield rec, server.url


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
        records = await connector.inbox.alist(limit=1000)
        await connector.aclose()
    return {item_of(r).payload["event_id"]: r.status for r in records}  # type: ignore[union-attr]


# each crash point once, on each backend once: four runs would take ~25 s
@pytest.mark.parametrize(("crash", "backend"), [("decide", "asyncio"), ("ack", "trio")])
def test_kill_9_during_or_after_adecide_loses_nothing_and_repeats_nothing(
    tmp_path: Path, receiver: tuple[Receiver, str], backend: str, crash: str
) -> None:
    rec, receiver_url = receiver
    db, calls = tmp_path / "edge.sqlite3", tmp_path / "calls.jsonl"
    bodies = [event_body() for _ in range(EVENTS)]
    ids = [json.loads(b)["event_id"] for b in bodies]

    first = EdgeApp(backend, db, receiver_url, calls, f"{crash}:{ids[PAUSED]}")
    try:
        with httpx.Client(timeout=10) as client:
            for body in bodies:
                answer = client.post(
                    f"{first.url}/webhook/shop", content=body, headers=hmac_request(body)
                )
                assert answer.status_code == 202, answer.text
        wait_for(lambda: any("paused" in n for n in read_notes(calls)), "the pause")
    finally:
        first.kill()  # (b) inside adecide, or (c) between the outbox write and the ack

    second = EdgeApp(backend, db, receiver_url, calls, "-")
    try:

        def delivered() -> dict[str, set[str]]:
            keys: dict[str, set[str]] = {}
            for r in complete(rec):
                event_id = json.loads(r.body)["event_id"]
                keys.setdefault(event_id, set()).add(r.headers["idempotency-key"])
            return keys

        wait_for(lambda: set(delivered()) == set(ids), "every event's action")

        def acknowledged() -> bool:
            statuses = anyio.run(inbox_statuses, db)
            return statuses == dict.fromkeys(ids, "acknowledged")

        wait_for(acknowledged, "every inbox record acknowledged")
        time.sleep(0.3)  # a late duplicate would show up here
    finally:
        second.kill()

    keys = delivered()
    assert {event_id: len(k) for event_id, k in keys.items()} == dict.fromkeys(ids, 1)
    requests = complete(rec)
    distinct = {r.headers["idempotency-key"] for r in requests}
    assert len(distinct) == EVENTS
    assert len(requests) >= EVENTS  # a repeat (same key) is the receiver's to drop

    notes = read_notes(calls)
    pids = {n["pid"] for n in notes}
    assert len(pids) == 2
    model_calls = Counter(n["call"] for n in notes if "call" in n)
    expected = dict.fromkeys(ids, 1)
    if crash == "decide":
        expected[ids[PAUSED]] = 2  # killed before its decisions were recorded
    assert dict(model_calls) == expected
