"""kill -9 at random moments under load: every accepted event reaches the receiver once.

The crash tests (``test_edge_crash.py``) stop the edge at two chosen points; this one
kills it wherever it happens to be: reading a request, in a group commit, inside an
agent, between the outbox and the acknowledgement, in the middle of a delivery. The
edge (``edge_app.py``: connector, inbox and outbox on one SQLite file, bus, agent
runner, dispatcher) takes signed events from four clients at once and is killed with
SIGKILL a random 0.3-1.2 s after it accepted the first, three times, alternating asyncio
and trio on the same database; a last run then drains what is left. The receiver turns
away the first attempt of one action in ten (503), so retries are in flight when the
kills come.

Accepted means answered ``202``: a request the kill cut off may or may not have been
recorded, and either is right. Every accepted event's action must reach the receiver
under one idempotency key (a repeat under that key is allowed: it is the receiver's to
drop), nothing may arrive that was not sent, and every inbox record must end
acknowledged.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from pathlib import Path

import anyio
import httpx
from edge_helpers import EdgeApp, complete, delivered_keys, inbox_statuses, wait_for
from webhook_helpers import Receiver, Recorded, event_body, hmac_request

KILLS = 3
CLIENTS = 4


class Load:
    """Clients posting fresh signed events until stopped; sorts them by the answer."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.accepted: set[str] = set()
        self.unanswered: set[str] = set()  # cut off by the kill: in or out, both right
        self.other: Counter[int] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._post) for _ in range(CLIENTS)]
        for thread in self._threads:
            thread.start()

    def _post(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                body = event_body()
                event_id = json.loads(body)["event_id"]
                try:
                    answer = client.post(
                        f"{self.url}/webhook/shop", content=body, headers=hmac_request(body)
                    )
                except httpx.HTTPError:
                    with self._lock:
                        self.unanswered.add(event_id)
                    return
                with self._lock:
                    if answer.status_code == 202:
                        self.accepted.add(event_id)
                    else:
                        self.other[answer.status_code] += 1

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)


def test_kill_9_at_random_moments_under_load_loses_no_accepted_event(
    tmp_path: Path, receiver: tuple[Receiver, str]
) -> None:
    rec, receiver_url = receiver
    first_attempts: set[str] = set()

    def turn_some_away(request: Recorded) -> int | None:
        key = request.headers.get("idempotency-key", "")
        if key in first_attempts:
            return None
        first_attempts.add(key)  # the receiver calls this under its lock
        return 503 if random.random() < 0.1 else None

    rec.status_for = turn_some_away
    db, calls = tmp_path / "edge.sqlite3", tmp_path / "calls.jsonl"
    accepted: set[str] = set()
    unanswered: set[str] = set()
    for round_ in range(KILLS):
        app = EdgeApp(("asyncio", "trio")[round_ % 2], db, receiver_url, calls, "-")
        try:
            load = Load(app.url)
            wait_for(lambda load=load: bool(load.accepted), "a first accepted event")
            time.sleep(random.uniform(0.3, 1.2))
        finally:
            app.kill()
        load.stop()
        assert not load.other, load.other  # no 4xx/5xx below the store's throughput
        accepted |= load.accepted
        unanswered |= load.unanswered

    last = EdgeApp("asyncio", db, receiver_url, calls, "-")
    try:

        def delivered() -> bool:
            return accepted <= set(delivered_keys(rec, answered_ok=True))

        wait_for(delivered, f"the actions of all {len(accepted)} accepted events", within=60)

        def settled() -> bool:
            statuses = anyio.run(inbox_statuses, db)
            return set(statuses.values()) == {"acknowledged"}

        wait_for(settled, "every inbox record acknowledged", within=30)
        time.sleep(0.3)  # a late duplicate would show up here
    finally:
        last.kill()

    keys = delivered_keys(rec)
    assert {e: k for e, k in keys.items() if len(k) != 1} == {}, "one key per event"
    assert set(keys) <= accepted | unanswered, "the receiver got an event nobody sent"
    statuses = anyio.run(inbox_statuses, db)
    assert accepted <= set(statuses)
    assert len({r.headers["idempotency-key"] for r in complete(rec)}) == len(keys)
