"""The ``converge`` command line: gateway, webhook sign, webhook send."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import standardwebhooks
from cli_helpers import EXAMPLE, GatewayProcess, Recorder, converge_cli

from converge.cli import main
from converge.extensions.connectors import ProviderProfile, WebhookSecurity, WebhookSecurityPolicy
from converge.extensions.storage import MemoryStore

SW_SECRET = "whsec_Y29udmVyZ2UtZGVtby1zZWNyZXQtY2hhbmdlLW1l"  # the example's demo secret


def test_readme_flow_a_fresh_gateway_answers_the_example_send_with_202(
    example_gateway: GatewayProcess,
) -> None:
    # The README line, pointed at this test's port.
    result = converge_cli(
        "webhook",
        "send",
        example_gateway.url + "/webhook/demo",
        "--config",
        str(EXAMPLE),
        "--provider",
        "demo",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("HTTP 202")
    assert json.loads(result.stdout.splitlines()[1])["status"] == "accepted"
    # No store configured: the embedded SQLite file holds the claims.
    assert (example_gateway.log.parent / "converge-gateway.sqlite3").exists()


@pytest.mark.parametrize("provider", ["demo", "stripe", "github", "slack", "internal"])
def test_webhook_send_signs_every_example_scheme_correctly(
    provider: str, example_gateway: GatewayProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"{example_gateway.url}/webhook/{provider}"
    assert main(["webhook", "send", url, "--config", str(EXAMPLE), "--provider", provider]) == 0
    assert capsys.readouterr().out.startswith("HTTP 202")


def test_webhook_send_reports_rejections_with_exit_status_1(
    example_gateway: GatewayProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"{example_gateway.url}/webhook/demo"
    wrong = "whsec_" + "d3Jvbmctc2VjcmV0LXZhbHVl"
    assert main(["webhook", "send", url, "--scheme", "standard-webhooks", "--secret", wrong]) == 1
    out = capsys.readouterr().out
    assert out.startswith("HTTP 401")
    assert "bad_signature" in out


def test_the_example_gateway_serves_probes_and_guards_outbound(
    example_gateway: GatewayProcess, example_target: tuple[Recorder, str]
) -> None:
    import time

    import httpx

    assert httpx.get(f"{example_gateway.url}/readyz").status_code == 200
    assert httpx.post(f"{example_gateway.url}/outbound", json={}).status_code == 401
    ok = httpx.post(
        f"{example_gateway.url}/outbound",
        json={"target": "app", "body": {"a": 1}},
        headers={"authorization": "Bearer " + "t" * 32},
    )
    assert ok.status_code == 202
    # Delivered to the target this test started (never to the example's own target).
    recorder = example_target[0]
    deadline = time.monotonic() + 10
    while not recorder.received() and time.monotonic() < deadline:
        time.sleep(0.02)
    path, _, body = recorder.received()[0]
    assert (path, json.loads(body)) == ("/events", {"a": 1})


def test_webhook_sign_prints_headers_the_reference_library_accepts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    body = '{"type":"demo"}'
    assert (
        main(
            [
                "webhook",
                "sign",
                "--scheme",
                "standard-webhooks",
                "--secret",
                SW_SECRET,
                "--data",
                body,
                "--id",
                "msg_1",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    headers = dict(line.split(": ", 1) for line in lines)
    assert headers["Content-Type"] == "application/json"
    assert headers["webhook-id"] == "msg_1"
    assert standardwebhooks.Webhook(SW_SECRET).verify(body.encode(), headers) == {"type": "demo"}


@pytest.mark.parametrize("scheme", ["hmac", "stripe", "github", "slack", "svix"])
def test_webhook_sign_json_output_verifies_for_every_scheme(
    scheme: str, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = SW_SECRET if scheme == "svix" else "cli-secret"
    assert (
        main(["webhook", "sign", "--scheme", scheme, "--secret", secret, "--format", "json"]) == 0
    )
    signed = json.loads(capsys.readouterr().out)
    profile = ProviderProfile("p", "p", scheme=scheme)
    security = WebhookSecurity(
        WebhookSecurityPolicy(), {"p": profile}, {"p": secret}, store=MemoryStore()
    )
    verified = security.verify(
        "p", method="POST", headers=signed["headers"], raw_body=signed["body"].encode()
    )
    assert verified.event_id


def test_webhook_sign_can_print_a_curl_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "webhook",
                "sign",
                "--scheme",
                "github",
                "--secret",
                "s",
                "--format",
                "curl",
                "--url",
                "https://gateway.example.com/webhook/github",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("curl -sS -X POST 'https://gateway.example.com/webhook/github'")
    assert "-H 'X-Hub-Signature-256: sha256=" in out


def test_secrets_can_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MY_SECRET", "from-env")
    assert (
        main(["webhook", "sign", "--scheme", "github", "--secret-env", "MY_SECRET", "--data", "{}"])
        == 0
    )
    out = capsys.readouterr().out
    import hashlib
    import hmac

    assert hmac.new(b"from-env", b"{}", hashlib.sha256).hexdigest() in out


@pytest.mark.parametrize(
    "argv",
    [
        ["webhook", "sign"],
        ["webhook", "sign", "--scheme", "stripe"],
        ["webhook", "sign", "--scheme", "stripe", "--secret", "s", "--data", "[1]"],
        ["webhook", "sign", "--scheme", "stripe", "--secret", "s", "--data", "{"],
        ["webhook", "sign", "--scheme", "stripe", "--secret-env", "CONVERGE_UNSET_VAR_X"],
        ["webhook", "sign", "--config", str(EXAMPLE)],
        ["webhook", "sign", "--config", str(EXAMPLE), "--provider", "nope"],
        ["webhook", "sign", "--config", "/nonexistent.toml", "--provider", "demo"],
        ["webhook", "sign", "--scheme", "stripe", "--secret", "s", "--format", "curl"],
        ["webhook", "send", "--scheme", "stripe", "--secret", "s"],
        ["webhook", "send", "http://[::1", "--scheme", "stripe", "--secret", "s"],  # InvalidURL
        ["webhook", "sign", "--scheme", "hmac", "--secret", "s", "--algorithm", "md5"],
    ],
)
def test_bad_arguments_exit_2_with_a_message(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_an_unreachable_url_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    from cli_helpers import free_port

    url = f"http://127.0.0.1:{free_port()}/webhook/x"
    assert (
        main(["webhook", "send", url, "--scheme", "github", "--secret", "s", "--timeout", "2"]) == 1
    )
    assert "could not reach" in capsys.readouterr().err


def test_gateway_check_validates_and_summarises_the_example(tmp_path: Path) -> None:
    result = converge_cli("gateway", "--config", str(EXAMPLE), "--check", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "POST /webhook/stripe  scheme=stripe" in result.stdout
    assert "POST /outbound: disabled" in result.stdout
    assert not (tmp_path / "converge-gateway.sqlite3").exists()


def test_gateway_refuses_an_invalid_config(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[providers.x]\nscheme = "stripe"\nsecret = "s"\ntypo = 1\n')
    result = converge_cli("gateway", "--config", str(config), "--check")
    assert result.returncode == 2
    assert "unknown keys in [providers.x]" in result.stderr


def test_gateway_chain_forwards_signed_events_durably(tmp_path: Path) -> None:
    """edge (stripe in, file outbox) -> forward_to -> inner gateway (standard-webhooks in)."""
    import time

    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from converge.extensions.connectors import sign_webhook

    inner = GatewayProcess(
        _write(
            tmp_path / "inner.toml",
            f"""
        [gateway]
        store = "memory"
        [providers.in]
        scheme = "standard-webhooks"
        secret = "{SW_SECRET}"
    """,
        ),
        tmp_path,
    )
    edge = GatewayProcess(
        _write(
            tmp_path / "edge.toml",
            f"""
        [gateway]
        store = "file:outbox"
        poll_interval_sec = 0.05
        [providers.edge]
        scheme = "stripe"
        secret_env = "EDGE_SECRET"
        forward_to = "inner"
        [targets.inner]
        url = "{inner.url}/webhook/in"
        signing_secret = "{SW_SECRET}"
    """,
        ),
        tmp_path,
        env={"EDGE_SECRET": "edge-secret"},
    )
    try:
        body = b'{"id":"evt_fwd_1","type":"x"}'
        headers = {
            "content-type": "application/json",
            **sign_webhook("stripe", "edge-secret", body),
        }
        response = httpx.post(f"{edge.url}/webhook/edge", content=body, headers=headers)
        assert response.status_code == 202
        deadline = time.monotonic() + 10
        accepted = 0.0
        while accepted < 1 and time.monotonic() < deadline:
            text = httpx.get(f"{inner.url}/metrics").text
            accepted = sum(
                s.value
                for f in text_string_to_metric_families(text)
                if f.name == "webhook_inbound_accepted"
                for s in f.samples
                if s.labels.get("provider") == "in"
            )
            time.sleep(0.05)
        assert accepted == 1
    finally:
        edge.stop()
        inner.stop()


def _write(path: Path, text: str) -> Path:
    import textwrap

    path.write_text(textwrap.dedent(text))
    return path
