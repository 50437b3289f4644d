"""Forwarding through a running gateway: raw forward format, deliveries and dead letters
from the CLI, and the inspector replaying a dead delivery in a real browser."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import standardwebhooks
from cli_helpers import GatewayProcess, converge_cli
from selenium.webdriver.common.by import By

from browser_helpers import chromium, click
from converge.extensions.connectors import sign_webhook
from loopback import UvicornThread, read_request, serve_lifespan

GITHUB_SECRET = "github-secret-for-the-raw-test"
SIGNING = "whsec_" + base64.b64encode(b"target-signing-secret-0123").decode()
ADMIN = "admin-token-for-delivery-tests"


@dataclass
class Receiver:
    """An ASGI receiver: records each request, answers ``status``."""

    status: int = 200
    got: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        headers, body = await read_request(scope, receive)
        self.got.append((headers, body))
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[GatewayProcess, Path, Receiver]]:
    receiver = Receiver()
    server = UvicornThread(receiver).start()
    cwd = tmp_path_factory.mktemp("deliveries")
    config = cwd / "gateway.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [gateway]
            store = "sqlite:gateway.sqlite3"
            admin_token_env = "CONVERGE_TEST_ADMIN"
            poll_interval_sec = 0.05
            [retry]
            max_attempts = 2
            base_delay_sec = 0.05
            [providers.github]
            scheme = "github"
            secret = "{GITHUB_SECRET}"
            forward_to = "app"
            forward_format = "raw"
            [targets.app]
            url = "{server.url}/hooks"
            signing_secret = "{SIGNING}"
            """
        )
    )
    gateway = GatewayProcess(config, cwd, env={"CONVERGE_TEST_ADMIN": ADMIN})
    try:
        yield gateway, config, receiver
    finally:
        gateway.stop()
        server.stop()


def send_github(gateway: GatewayProcess, delivery: str) -> bytes:
    body = json.dumps({"action": "opened", "zen": delivery, "n": "ü"}).encode()
    headers = {"content-type": "application/json"}
    headers.update(sign_webhook("github", GITHUB_SECRET, body, event_id=delivery))
    headers["X-GitHub-Event"] = "issues"
    response = httpx.post(f"{gateway.url}/webhook/github", content=body, headers=headers)
    assert response.status_code == 202, response.text
    return body


def wait_for(predicate: Any, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_raw_forward_delivers_the_senders_bytes_and_headers_plus_a_signature(
    setup: tuple[GatewayProcess, Path, Receiver],
) -> None:
    gateway, _, receiver = setup
    receiver.status = 200
    before = len(receiver.got)
    body = send_github(gateway, "raw-1")
    wait_for(lambda: len(receiver.got) > before)
    headers, got = receiver.got[-1]
    assert got == body  # byte for byte, not re-encoded
    assert headers["x-github-event"] == "issues"
    assert headers["content-type"] == "application/json"
    # A receiver written for GitHub verifies it unchanged...
    expected = "sha256=" + hmac.new(GITHUB_SECRET.encode(), got, hashlib.sha256).hexdigest()
    assert headers["x-hub-signature-256"] == expected
    # ...and converge's Standard Webhooks signature covers the same bytes.
    assert standardwebhooks.Webhook(SIGNING).verify(got, headers)["zen"] == "raw-1"


def test_deliveries_and_dead_letters_from_the_cli(
    setup: tuple[GatewayProcess, Path, Receiver],
) -> None:
    gateway, config, receiver = setup
    cwd = config.parent
    receiver.status = 200
    send_github(gateway, "cli-ok")
    wait_for(
        lambda: (
            "delivered"
            in converge_cli(
                "deliveries", "list", "--config", str(config), "--status", "delivered", cwd=cwd
            ).stdout
        )
    )
    receiver.status = 410  # not retried: dead at once
    send_github(gateway, "cli-dead")
    wait_for(
        lambda: (
            converge_cli(
                "dead-letters", "list", "--config", str(config), "--json", cwd=cwd
            ).stdout.strip()
            not in ("", "[]")
        )
    )
    dead = json.loads(
        converge_cli("dead-letters", "list", "--config", str(config), "--json", cwd=cwd).stdout
    )
    record = dead[0]
    assert record["key"] == "app"
    assert record["last_status_code"] == 410
    shown = converge_cli("deliveries", "show", record["id"], "--config", str(config), cwd=cwd)
    assert "HTTP 410" in shown.stdout
    receiver.status = 200
    replayed = converge_cli(
        "dead-letters", "replay", record["id"], "--config", str(config), cwd=cwd
    )
    assert replayed.stdout.strip() == f"replayed {record['id']}"
    wait_for(
        lambda: (
            json.loads(
                converge_cli(
                    "deliveries", "show", record["id"], "--config", str(config), "--json", cwd=cwd
                ).stdout
            )["status"]
            == "delivered"
        )
    )
    table = converge_cli(
        "deliveries", "list", "--config", str(config), "--target", "app", cwd=cwd
    ).stdout
    assert table.splitlines()[0].split()[:3] == ["ID", "TARGET", "STATUS"]


def test_the_inspector_replays_a_dead_delivery_and_it_appears_delivered(
    setup: tuple[GatewayProcess, Path, Receiver], tmp_path: Path
) -> None:
    gateway, _, receiver = setup
    receiver.status = 410
    send_github(gateway, "browser-dead")
    admin = {"authorization": f"Bearer {ADMIN}"}

    def dead_ids() -> list[str]:
        found = httpx.get(f"{gateway.url}/admin/api/dead-letters", headers=admin).json()
        return [r["id"] for r in found["records"]]

    wait_for(lambda: bool(dead_ids()))
    target = dead_ids()[0]
    receiver.status = 200
    with chromium() as driver:
        driver.get(gateway.url + "/admin/")
        driver.find_element(By.ID, "token").send_keys(ADMIN)
        click(driver, driver.find_element(By.ID, "sign-in"))  # wait: the cookie is set
        driver.get(gateway.url + "/admin/?view=dead-letters")
        row = driver.find_element(By.CSS_SELECTOR, f'tr.record[data-id="{target}"]')
        click(driver, row.find_element(By.CSS_SELECTOR, "button.replay"))
        assert f"Replayed {target}" in driver.find_element(By.ID, "flash").text

        def shows_delivered() -> bool:
            driver.get(gateway.url + "/admin/?view=deliveries&status=delivered")
            rows = driver.find_elements(By.CSS_SELECTOR, f'tr.record[data-id="{target}"]')
            return bool(rows)

        wait_for(shows_delivered)
        row = driver.find_element(By.CSS_SELECTOR, f'tr.record[data-id="{target}"]')
        assert row.find_element(By.CSS_SELECTOR, "td.status").text == "delivered"
        row.find_element(By.CSS_SELECTOR, "td.attempts summary").click()
        attempts = row.find_element(By.CSS_SELECTOR, "ol.attempts").text
        assert "HTTP 410" in attempts
        assert "HTTP 200" in attempts
        driver.save_screenshot(str(tmp_path / "replayed.png"))
        Path("/tmp/ops-replayed.png").write_bytes((tmp_path / "replayed.png").read_bytes())


def test_replaying_a_forwarded_event_delivers_it_again(
    setup: tuple[GatewayProcess, Path, Receiver],
) -> None:
    gateway, config, receiver = setup
    cwd = config.parent
    receiver.status = 200
    body = send_github(gateway, "replay-me")
    wait_for(lambda: any(got == body for _, got in receiver.got))
    events = json.loads(
        converge_cli(
            "events", "list", "--config", str(config), "--json", "--limit", "100", cwd=cwd
        ).stdout
    )
    (event,) = [e for e in events if e["created"] == max(x["created"] for x in events)]
    replayed = converge_cli("events", "replay", event["id"], "--config", str(config), cwd=cwd)
    assert replayed.returncode == 0, replayed.stderr
    wait_for(lambda: sum(got == body for _, got in receiver.got) == 2)
