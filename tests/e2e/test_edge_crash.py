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
import time
from collections import Counter
from pathlib import Path

import anyio
import httpx
import pytest
from edge_helpers import (
    EdgeApp,
    complete,
    delivered_keys,
    inbox_statuses,
    read_notes,
    wait_for,
)
from webhook_helpers import Receiver, event_body, hmac_request

EVENTS = 5
PAUSED = 2  # the event the first process is killed on


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
        wait_for(lambda: set(delivered_keys(rec)) == set(ids), "every event's action")

        def acknowledged() -> bool:
            statuses = anyio.run(inbox_statuses, db)
            return statuses == dict.fromkeys(ids, "acknowledged")

        wait_for(acknowledged, "every inbox record acknowledged")
        time.sleep(0.3)  # a late duplicate would show up here
    finally:
        second.kill()

    keys = delivered_keys(rec)
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
