"""``converge events|deliveries|dead-letters`` against a running gateway process's store,
its log lines by content, and its admin API over real HTTP."""

from __future__ import annotations

import json
import re
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from cli_helpers import GatewayProcess, converge_cli

from converge.cli.config import build_gateway, load_config, open_store
from converge.extensions.connectors import ProviderProfile, sign_webhook

SECRET = "whsec_Y29udmVyZ2UtZGVtby1zZWNyZXQtY2hhbmdlLW1l"
ADMIN = "admin-token-for-the-cli-tests"


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, Path]]:
    cwd = tmp_path_factory.mktemp("events")
    config = cwd / "gateway.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [gateway]
            store = "sqlite:events.sqlite3"
            admin_token_env = "CONVERGE_TEST_ADMIN"
            poll_interval_sec = 0.1
            [providers.demo]
            scheme = "standard-webhooks"
            secret = "{SECRET}"
            """
        )
    )
    gateway = GatewayProcess(config, cwd, env={"CONVERGE_TEST_ADMIN": ADMIN})
    yield gateway, config
    gateway.stop()


def send(gateway: GatewayProcess, event_id: str, *, secret: str = SECRET) -> httpx.Response:
    body = json.dumps({"type": "order.paid", "id": event_id, "token": "tok_secret"}).encode()
    profile = ProviderProfile("demo", "demo", scheme="standard-webhooks")
    headers = {"content-type": "application/json"}
    headers.update(sign_webhook(profile, secret, body, event_id=event_id))
    return httpx.post(f"{gateway.url}/webhook/demo", content=body, headers=headers)


def test_events_list_show_and_replay_while_the_gateway_runs(
    running: tuple[GatewayProcess, Path],
) -> None:
    gateway, config = running
    assert send(gateway, "msg_cli_1").status_code == 202
    assert send(gateway, "msg_cli_2").status_code == 202
    cwd = config.parent

    listed = converge_cli("events", "list", "--config", str(config), cwd=cwd)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["ID", "PROVIDER", "STATUS", "RECEIVED", "ATTEMPTS", "LAST"]
    assert len(lines) >= 3
    assert lines[0].index("STATUS") == lines[1].index("acknowledged")  # aligned columns

    records = json.loads(
        converge_cli("events", "list", "--config", str(config), "--json", cwd=cwd).stdout
    )
    assert {r["key"] for r in records} == {"demo"}
    newest = records[0]["id"]
    only = converge_cli("events", "list", "--config", str(config), "--provider", "nope", cwd=cwd)
    assert only.stdout.strip() == "no events"

    shown = converge_cli("events", "show", newest, "--config", str(config), cwd=cwd)
    assert shown.returncode == 0, shown.stderr
    assert "status:    acknowledged" in shown.stdout
    assert '"webhook-signature": "[redacted]"' in shown.stdout
    assert "v1," not in shown.stdout  # no signature value anywhere

    replayed = converge_cli("events", "replay", newest, "--config", str(config), cwd=cwd)
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.strip() == f"replayed {newest}"
    missing = converge_cli("events", "show", "nosuchid", "--config", str(config), cwd=cwd)
    assert missing.returncode == 1
    bulk = converge_cli(
        "events", "replay", "--since", "1h", "--config", str(config), "--json", cwd=cwd
    )
    assert json.loads(bulk.stdout)["status"] == "replayed"


def test_the_gateway_logs_one_line_per_event_without_payloads_or_signatures(
    running: tuple[GatewayProcess, Path],
) -> None:
    gateway, _ = running
    assert send(gateway, "msg_log_ok").status_code == 202
    wrong = "whsec_" + "d3Jvbmctc2VjcmV0LXZhbHVl"
    assert send(gateway, "msg_log_bad", secret=wrong).status_code == 401
    deadline = time.monotonic() + 5
    text = ""
    while time.monotonic() < deadline:
        text = gateway.log.read_text()
        if "msg_log_ok" in text and "bad_signature" in text:
            break
        time.sleep(0.05)
    accepted = next(line for line in text.splitlines() if "event_id=msg_log_ok" in line)
    assert " INFO converge.events inbound.accepted provider=demo event_id=msg_log_ok " in accepted
    assert "latency_ms=" in accepted
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ", accepted)  # ISO first
    rejected = next(line for line in text.splitlines() if "inbound.rejected" in line)
    assert "provider=demo status=401 reason=bad_signature" in rejected
    assert "tok_secret" not in text  # no payload at INFO
    assert "webhook-signature" not in text.lower()


def test_the_admin_api_of_the_running_gateway(running: tuple[GatewayProcess, Path]) -> None:
    gateway, _ = running
    assert send(gateway, "msg_admin_1").status_code == 202
    url = f"{gateway.url}/admin/api/events"
    assert httpx.get(url).status_code == 401
    body = httpx.get(url, headers={"authorization": f"Bearer {ADMIN}"}).json()
    assert body["records"]
    assert all(r["key"] == "demo" for r in body["records"])


def test_the_cli_reads_a_running_gateways_redis_store(tmp_path: Path) -> None:
    from redis_server import RedisServer

    with RedisServer() as redis:
        url = redis.url
        config = tmp_path / "redis.toml"
        config.write_text(
            textwrap.dedent(
                f"""
                [gateway]
                store = "{url}"
                connector_id = "cli-redis-{tmp_path.name[-12:]}"
                [providers.demo]
                scheme = "standard-webhooks"
                secret = "{SECRET}"
                """
            )
        )
        gateway = GatewayProcess(config, tmp_path)
        try:
            assert send(gateway, "msg_redis_1").status_code == 202
            listed = converge_cli("events", "list", "--config", str(config), "--json", cwd=tmp_path)
            assert listed.returncode == 0, listed.stderr
            records = json.loads(listed.stdout)
            assert [r["key"] for r in records] == ["demo"]
            replayed = converge_cli(
                "events", "replay", records[0]["id"], "--config", str(config), cwd=tmp_path
            )
            assert replayed.returncode == 0, replayed.stderr
        finally:
            gateway.stop()


def test_recount_repairs_the_counters_a_crash_left_low(tmp_path: Path) -> None:
    # A FileStore writes an update file by file: a crash between a record and its
    # counter leaves the count low. The gateway does not recount when it starts (a
    # recount misses what is accepted while it lists); the operator does, stopped.
    config = tmp_path / "gateway.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [gateway]
            store = "file:data"
            [providers.demo]
            scheme = "standard-webhooks"
            secret = "{SECRET}"
            """
        )
    )

    async def counts(open_now: tuple[int, int] | None = None) -> tuple[int, int]:
        store = open_store("file:data", tmp_path)
        connector = build_gateway(load_config(config, warn=False), store).connector
        queues = (connector.inbox, connector.outbox.queue)
        try:
            if open_now is not None:  # add them, then lose every count, as a crash can
                for queue, n in zip(queues, open_now, strict=True):
                    for i in range(n):
                        await queue.aadd({"i": i})
                    for key in queue.keys.counts:
                        await store.aput(key, 0)
            return (await queues[0].apending_count(), await queues[1].apending_count())
        finally:
            await connector.aclose()
            await store.aclose()

    assert anyio.run(counts, (3, 2)) == (0, 0)
    events = converge_cli("events", "recount", "--config", str(config), "--json", cwd=tmp_path)
    assert events.returncode == 0, events.stderr
    assert json.loads(events.stdout) == {"status": "recounted", "open": 3}
    deliveries = converge_cli("deliveries", "recount", "--config", str(config), cwd=tmp_path)
    assert deliveries.returncode == 0, deliveries.stderr
    assert deliveries.stdout.strip() == "2 open deliveries"
    assert anyio.run(counts) == (3, 2)
