"""17.1: the standalone gateway's event log is the consumer: it never sheds load it could take."""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from cli_helpers import GatewayProcess

from converge.cli.config import load_config, open_store
from converge.durable import DurableQueue

pytestmark = pytest.mark.anyio

SECRET = "standalone-github-secret"
# More than the 1,000-slot in-memory queue that used to fill with nobody draining it.
EVENTS = 1_050


def config(log_events: bool) -> str:
    return f"""
[gateway]
bind = "127.0.0.1"
connector_id = "standalone"
log_events = {"true" if log_events else "false"}

[providers.github]
scheme = "github"
secret = "{SECRET}"
"""


@pytest.fixture(params=[False, True], ids=["log_events_off", "log_events_on"])
def gateway(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[GatewayProcess]:
    path = tmp_path / "gateway.toml"
    path.write_text(config(request.param))
    process = GatewayProcess(path, tmp_path)
    yield process
    process.stop()


def signed(n: int) -> tuple[bytes, dict[str, str]]:
    body = json.dumps({"action": "opened", "n": n, "nonce": uuid.uuid4().hex}).encode()
    digest = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return body, {
        "content-type": "application/json",
        "x-hub-signature-256": f"sha256={digest}",
        "x-github-delivery": str(uuid.uuid4()),
        "x-github-event": "issues",
    }


async def test_every_event_is_accepted_and_recorded_whether_or_not_it_is_logged(
    gateway: GatewayProcess,
) -> None:
    statuses: list[int] = []
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:

        async def send(start: int) -> None:
            for n in range(start, EVENTS, 16):
                body, headers = signed(n)
                response = await http.post("/webhook/github", content=body, headers=headers)
                statuses.append(response.status_code)

        async with anyio.create_task_group() as tg:
            for start in range(16):
                tg.start_soon(send, start)
        metrics = (await http.get("/metrics")).text
    assert statuses == [202] * EVENTS
    assert "webhook_inbound_unavailable_total" not in metrics
    gateway.stop()
    # Every event is in the event log (the inbox), recorded acknowledged.
    config = load_config(gateway.log.parent / "gateway.toml")
    store = open_store(config.store, gateway.log.parent)  # the process ran there
    try:
        inbox = DurableQueue(store, prefix="converge:webhook:standalone:inbox", kind="inbound")
        assert await inbox.apending_count() == 0
        records = await inbox.alist(status="acknowledged", limit=10 * EVENTS)
        assert len(records) == EVENTS
    finally:
        await store.aclose()
