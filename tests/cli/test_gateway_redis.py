"""``converge gateway`` on Redis: one store for many replicas, real processes throughout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from cli_helpers import GatewayProcess

from converge.cli.config import masked_store, open_store, parse_config
from converge.errors import ConfigurationError
from converge.extensions.connectors import sign_webhook
from loopback import UvicornThread, read_request, serve_lifespan
from redis_server import RedisServer

SECRET = "whsec_" + "cmVwbGljYXMtc2VjcmV0LWZvci10ZXN0cw=="
PASSWORD = "s3cret/with:odd@chars"


class Sink:
    """A receiver that records the idempotency key of every request and answers 2xx."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.keys: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        headers, _body = await read_request(scope, receive)
        with self.lock:
            self.keys.append(headers.get("idempotency-key", ""))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with RedisServer("--requirepass", PASSWORD) as server:
        yield server


@pytest.fixture
def sink() -> Iterator[tuple[Sink, str]]:
    app = Sink()
    server = UvicornThread(app, name="sink").start()
    yield app, server.url
    server.stop()


def write_config(directory: Path, redis: RedisServer, receiver_url: str) -> Path:
    path = directory / "gateway.toml"
    path.write_text(
        f"""
[gateway]
store = "{redis.url}"
store_password_env = "TEST_REDIS_PASSWORD"
connector_id = "c{uuid.uuid4().hex[:8]}"
max_in_flight = 4
log_events = false

[retry]
schedule = ["200ms", "200ms", "500ms", "1s"]
request_timeout_sec = 1.0
lease_margin_sec = 5.0

[providers.sw]
scheme = "standard-webhooks"
secret = "{SECRET}"
forward_to = "sink"

[targets.sink]
url = "{receiver_url}/events"
"""
    )
    return path


def signed(event_id: str) -> tuple[bytes, dict[str, str]]:
    body = json.dumps({"type": "issue.opened", "data": {"id": event_id}}).encode()
    headers = sign_webhook("standard-webhooks", SECRET, body, event_id=event_id)
    return body, {**headers, "content-type": "application/json"}


def env() -> dict[str, str]:
    return {"TEST_REDIS_PASSWORD": PASSWORD}


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_redis_store_url_takes_its_password_from_the_environment(tmp_path: Path) -> None:
    data = {"gateway": {"store": "redis://app@10.0.0.5:6380/2", "store_password_env": "PW"}}
    config = parse_config(data, env={"PW": "hunter2"}, base_dir=tmp_path)
    assert config.store_password == "hunter2"
    assert "hunter2" not in repr(config)
    with pytest.raises(ConfigurationError, match="PW"):
        parse_config(data, env={}, base_dir=tmp_path)
    inline = parse_config(
        {"gateway": {"store": "rediss://app:hunter2@10.0.0.5:6380/2"}}, env={}, base_dir=tmp_path
    )
    with pytest.raises(ConfigurationError, match="store_password_env") as caught:
        open_store(inline.store, tmp_path)
    assert "hunter2" not in str(caught.value)
    assert masked_store("rediss://app:hunter2@h:1/0") == "rediss://app:***@h:1/0"


@pytest.mark.parametrize(
    ("store", "message"),
    [
        ("redis://:badport", "Port could not be cast"),
        ("redis://h:1/zero", "database number"),
        ("redis://[::1", "Invalid IPv6 URL"),
        ("sqlite:no/such/dir/events.db", "no existing directory"),
        ("sqlite:.", "is a directory"),
    ],
)
def test_a_store_that_cannot_work_is_a_configuration_error(
    tmp_path: Path, store: str, message: str
) -> None:
    # Each was accepted before: the Redis ones crashed the inbox pump or read as a store
    # that is down, the SQLite ones served 503s and logged a warning per poll.
    with pytest.raises(ConfigurationError, match=message):
        open_store(store, tmp_path)


@pytest.mark.parametrize(
    "content",
    [b"\x7fELF" + bytes(range(256)) * 40, b"SQLite format 3\x00" + b"\xff" * 4000],
)
def test_a_file_that_is_no_sqlite_database_is_a_configuration_error(
    tmp_path: Path, content: bytes
) -> None:
    # Served before: every webhook got 503 and each poll logged "is damaged".
    (tmp_path / "events.db").write_bytes(content)
    with pytest.raises(ConfigurationError, match="not a readable SQLite database"):
        open_store("sqlite:events.db", tmp_path)
    assert (tmp_path / "events.db").read_bytes() == content  # left as it was
    store = open_store("sqlite:fresh.db", tmp_path)  # new, and reopened: both fine
    store.put("k", 1)
    store.close()
    open_store("sqlite:fresh.db", tmp_path).close()


def test_check_shows_the_redis_store_without_its_password(
    tmp_path: Path, redis: RedisServer
) -> None:
    config = write_config(tmp_path, redis, "http://127.0.0.1:1")
    url = redis.url.replace("redis://", "redis://:whatever-was-typed@")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "converge.cli",
            "gateway",
            "--config",
            str(config),
            "--check",
            "--store",
            url,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **env()},
    )
    assert "whatever-was-typed" not in out.stdout + out.stderr
    assert PASSWORD not in out.stdout + out.stderr


def test_three_replicas_on_one_redis_accept_once_deliver_once_and_survive_a_kill(
    tmp_path: Path, redis: RedisServer, sink: tuple[Sink, str]
) -> None:
    receiver, receiver_url = sink
    config = write_config(tmp_path, redis, receiver_url)
    homes = [tmp_path / f"replica{n}" for n in range(3)]
    for home in homes:
        home.mkdir()
    replicas = [GatewayProcess(config, home, env=env()) for home in homes]
    try:
        # 50 concurrent copies of one signed event, spread over the three: one 202.
        body, headers = signed(f"evt_{uuid.uuid4().hex}")

        def post(i: int, body: bytes = body, headers: dict[str, str] = headers) -> int:
            url = f"{replicas[i % 3].url}/webhook/sw"
            return httpx.post(url, content=body, headers=headers, timeout=10).status_code

        with ThreadPoolExecutor(max_workers=50) as pool:
            statuses = list(pool.map(post, range(50)))
        assert statuses.count(202) == 1, statuses
        assert set(statuses) <= {200, 202}, statuses
        wait_for(lambda: len(receiver.keys) >= 1, 15, "the event was not forwarded")

        # A burst over all three; one replica is killed -9 in the middle of it.
        events = [f"evt_{uuid.uuid4().hex}" for _ in range(40)]
        accepted: list[str] = []
        for n, event_id in enumerate(events):
            if n == 20:
                os.kill(replicas[0].process.pid, signal.SIGKILL)
            target = replicas[n % 3] if n < 20 else replicas[1 + n % 2]
            event_body, event_headers = signed(event_id)
            try:
                answer = httpx.post(
                    f"{target.url}/webhook/sw", content=event_body, headers=event_headers
                )
            except httpx.HTTPError:
                continue  # the killed replica: the sender would retry elsewhere
            if answer.status_code == 202:
                accepted.append(event_id)
        assert len(accepted) >= 35
        # every accepted event reaches the receiver; the dead replica's leased work is
        # finished by another replica once its lease (timeout + margin, 6 s) has run out
        wait_for(
            lambda: len(set(receiver.keys)) >= 1 + len(accepted),
            30,
            f"delivered {len(set(receiver.keys))} of {1 + len(accepted)}",
        )
        duplicates = len(receiver.keys) - len(set(receiver.keys))
        # only what the killed replica had in flight (max_in_flight = 4) may come twice
        assert duplicates <= 4, duplicates
    finally:
        for replica in replicas:
            replica.stop()
        for home in homes:
            print(f"--- {home.name}\n" + (home / "gateway.log").read_text()[-3000:])


def test_a_redis_restart_gives_503_with_retry_after_then_recovers_by_itself(
    tmp_path: Path, sink: tuple[Sink, str]
) -> None:
    receiver, receiver_url = sink
    server = RedisServer("--requirepass", PASSWORD)
    config = write_config(tmp_path, server, receiver_url)
    gateway = GatewayProcess(config, tmp_path, env=env())
    try:
        body, headers = signed(f"evt_{uuid.uuid4().hex}")
        assert (
            httpx.post(f"{gateway.url}/webhook/sw", content=body, headers=headers).status_code
            == 202
        )
        server.stop()  # Redis goes away mid-run
        body, headers = signed(f"evt_{uuid.uuid4().hex}")
        down = httpx.post(f"{gateway.url}/webhook/sw", content=body, headers=headers, timeout=30)
        assert down.status_code == 503, down.text
        assert down.headers["retry-after"]
        assert down.json()["reason"] == "store_unavailable"
        assert httpx.get(f"{gateway.url}/readyz").status_code in (200, 503)  # never a 500
        server = RedisServer("--requirepass", PASSWORD, port=server.port)  # back, empty
        deadline = time.monotonic() + 20
        while True:  # the sender's retry, as Standard Webhooks senders do
            again = httpx.post(f"{gateway.url}/webhook/sw", content=body, headers=headers)
            if again.status_code == 202:
                break
            assert again.status_code == 503, again.text
            assert time.monotonic() < deadline, "the gateway did not recover"
            time.sleep(0.2)
        wait_for(lambda: len(set(receiver.keys)) == 2, 15, "not every event was delivered")
    finally:
        gateway.stop()
        server.stop()


def redis_commands(url: str) -> dict[str, int]:
    """Commands the server ran so far, by name (``INFO commandstats``)."""
    info = subprocess.run(
        ["redis-cli", "-u", url, "--no-auth-warning", "info", "commandstats"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    counts = {}
    for line in info.splitlines():
        if line.startswith("cmdstat_"):
            name, stats = line[len("cmdstat_") :].split(":", 1)
            counts[name] = int(stats.split(",")[0].split("=")[1])
    return counts


def test_an_accepted_webhook_costs_two_redis_round_trips(tmp_path: Path) -> None:
    with RedisServer() as server:
        config = write_config(tmp_path, server, "http://127.0.0.1:1")
        # the accepting path alone: no password, no forward (the record is the event log)
        text = config.read_text().replace('store_password_env = "TEST_REDIS_PASSWORD"\n', "")
        config.write_text(text.replace('forward_to = "sink"\n', ""))
        gateway = GatewayProcess(config, tmp_path)
        try:
            with httpx.Client(base_url=gateway.url) as http:

                def accept() -> None:
                    body, headers = signed(f"evt_{uuid.uuid4().hex}")
                    assert (
                        http.post("/webhook/sw", content=body, headers=headers).status_code == 202
                    )

                accept()  # warm: the script is loaded once per server
                before = redis_commands(server.url)
                started = time.monotonic()
                for _ in range(50):
                    accept()
                after = redis_commands(server.url)
                window = time.monotonic() - started
        finally:
            gateway.stop()
    # the claim and the inbox record: one read (MGET) and one compare-and-set (EVALSHA)
    # per event; inside the script the server runs GET/SET and keeps the prefix index
    # (HKEYS, EXISTS, ZADD, ...), which are no round trips
    ran = {c: after[c] - before.get(c, 0) for c in after if after[c] - before.get(c, 0)}
    in_scripts = {"get", "set", "del", "info", "hkeys", "hget", "hset", "hlen", "time"}
    in_scripts |= {"exists", "zadd", "zrem", "zrangebylex"}
    round_trips = sum(n for c, n in ran.items() if c not in in_scripts)
    # Besides: the replica's own polls meanwhile, one listing script (EVALSHA) each, and
    # its event-log trims (every 10 s: a counter read, MGET, and two listings), which
    # CI's run at aed57da caught once inside the window; a run on a loaded machine saw two
    # MGETs more than the events in a 1.1 s window (background work running late).
    trims = int(window // 10) + 2
    assert 50 <= ran.get("mget", 0) <= 50 + trims, (ran, window)
    assert 50 <= ran.get("evalsha", 0) <= 60, ran
    assert round_trips - 100 <= 10, ran
