"""Event log lines: content, redaction, formats and rejection rate limiting."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest

from converge.errors import ConfigurationError
from converge.extensions.connectors import logs
from converge.extensions.connectors.logs import (
    RejectionLimiter,
    configure_logging,
    log_accepted,
    log_dead,
    log_delivered,
    log_payload,
    log_rejected,
    log_retried,
    redact_headers,
    redact_payload,
)

ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@pytest.fixture
def capture() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    configure_logging("info", "text", stream=stream)
    yield stream
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.NOTSET)


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_each_event_kind_is_one_text_line_with_timestamp_level_id_status_latency(
    capture: io.StringIO,
) -> None:
    log_accepted("stripe", "evt_1", latency_ms=1.234)
    log_rejected("stripe", "bad_signature", status_code=401, latency_ms=0.5)
    log_delivered("billing", "a1", status_code=200, latency_ms=12.04, attempts=1)
    log_retried("billing", "a2", status_code=503, error="status 503", attempts=1, retry_in_sec=0.3)
    log_dead("billing", "a3", reason="status 404", status_code=404, attempts=1)
    got = lines(capture)
    assert len(got) == 5
    assert re.fullmatch(
        ISO + r" INFO converge\.events inbound\.accepted provider=stripe event_id=evt_1 "
        r"status=accepted latency_ms=1\.2",
        got[0],
    ), got[0]
    assert "inbound.rejected provider=stripe status=401 reason=bad_signature" in got[1]
    assert got[1].split()[1] == "INFO"
    assert "outbound.delivered target=billing event_id=a1 status=200 latency_ms=12.0" in got[2]
    assert 'outbound.retry target=billing event_id=a2 status=503 error="status 503"' in got[3]
    assert got[4].split()[1] == "WARNING"
    assert 'outbound.dead target=billing event_id=a3 status=404 reason="status 404"' in got[4]


def test_json_lines_carry_the_fields_as_keys() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("info", "json", stream=stream)
        log_delivered("app", "a9", status_code=204, latency_ms=3.0, attempts=2)
        logging.getLogger("uvicorn.error").info("Started server process")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    first, second = (json.loads(line) for line in lines(stream))
    assert re.fullmatch(ISO, first["ts"])
    assert first["level"] == "INFO"
    assert first["event"] == "outbound.delivered"
    assert (first["target"], first["event_id"], first["status"]) == ("app", "a9", 204)
    assert first["latency_ms"] == 3.0
    assert first["attempts"] == 2
    assert second["message"] == "Started server process"
    assert "event" not in second


def test_values_from_the_network_cannot_forge_log_lines(capture: io.StringIO) -> None:
    log_accepted("p", "evt\nINFO forged line")
    (line,) = lines(capture)
    assert 'event_id="evt\\nINFO forged line"' in line


def test_payloads_appear_only_at_debug_and_redacted(capture: io.StringIO) -> None:
    payload = {"order": 42, "api_key": "sk_live_1", "nested": [{"password": "hunter2"}]}
    headers = {"webhook-signature": "v1,abc", "Authorization": "Bearer x", "x-github-event": "push"}
    log_payload("inbound", "stripe", "evt_1", payload, headers)
    log_accepted("stripe", "evt_1")
    assert "sk_live_1" not in capture.getvalue()
    assert "payload" not in capture.getvalue()
    logging.getLogger().setLevel(logging.DEBUG)
    log_payload("inbound", "stripe", "evt_1", payload, headers)
    text = capture.getvalue()
    assert '"order":42' in text
    for secret in ("sk_live_1", "hunter2", "v1,abc", "Bearer x"):
        assert secret not in text
    assert '"x-github-event":"push"' in text


def test_redaction_helpers() -> None:
    assert redact_headers({"Stripe-Signature": "t=1", "X-Hub-Signature-256": "s", "A": "b"}) == {
        "Stripe-Signature": "[redacted]",
        "X-Hub-Signature-256": "[redacted]",
        "A": "b",
    }
    assert redact_payload({"token": 1, "data": [{"client_secret": "x", "ok": 2}]}) == {
        "token": "[redacted]",
        "data": [{"client_secret": "[redacted]", "ok": 2}],
    }


def test_rejections_are_rate_limited_per_provider_and_reason(capture: io.StringIO) -> None:
    now = [0.0]
    limiter = RejectionLimiter(burst=2, window_sec=60, clock=lambda: now[0])
    results = [
        log_rejected("a", "bad_signature", status_code=401, limiter=limiter) for _ in range(5)
    ]
    assert results == [True, True, False, False, False]
    # Another reason and another provider have their own budget.
    assert log_rejected("a", "stale_timestamp", status_code=401, limiter=limiter)
    assert log_rejected("b", "bad_signature", status_code=401, limiter=limiter)
    now[0] = 61.0
    assert log_rejected("a", "bad_signature", status_code=401, limiter=limiter)
    assert lines(capture)[-1].endswith("reason=bad_signature suppressed=3")
    assert len(lines(capture)) == 5


def test_the_limiter_tracks_a_bounded_number_of_keys() -> None:
    limiter = RejectionLimiter(burst=1, max_keys=3, clock=lambda: 0.0)
    for n in range(10):
        assert limiter.allow((f"p{n}", "r")) == (True, 0)
    assert len(limiter._state) == 3


def test_httpx_is_quiet_at_info_and_heard_at_debug(capture: io.StringIO) -> None:
    logging.getLogger("httpx").info("HTTP Request: POST http://x 200")
    assert capture.getvalue() == ""
    configure_logging("debug", "text", stream=capture)
    logging.getLogger("httpx").debug("HTTP Request: POST http://x 200")
    assert "HTTP Request" in capture.getvalue()


def test_a_logging_constant_is_a_level(capture: io.StringIO) -> None:
    configure_logging(logging.WARNING, "text", stream=capture)
    assert logging.getLogger().level == logging.WARNING


@pytest.mark.parametrize(
    ("level", "fmt"),
    [("loud", "text"), ("info", "xml"), (15, "text"), (True, "text"), (None, "text")],
)
def test_bad_settings_are_configuration_errors(level: Any, fmt: str) -> None:
    with pytest.raises(ConfigurationError):
        configure_logging(level, fmt)  # type: ignore[arg-type]


def test_nothing_is_formatted_when_the_level_is_off(capture: io.StringIO) -> None:
    logging.getLogger().setLevel(logging.WARNING)
    log_accepted("p", "e")
    log_rejected("p", "r", status_code=400)
    assert capture.getvalue() == ""
    assert logs.EVENT_LOGGER == "converge.events"


def test_an_inbound_dead_letter_names_its_provider(capture: io.StringIO) -> None:
    log_dead("stripe", "evt_9", reason="consumer gave up", kind="inbound")
    (line,) = lines(capture)
    assert (
        'WARNING converge.events inbound.dead provider=stripe event_id=evt_9 reason="consumer'
        in line
    )


def test_a_percent_sign_in_a_value_is_printed_as_is(capture: io.StringIO) -> None:
    log_rejected("p", "bad%s%d", status_code=400)
    assert 'reason="bad%s%d"' in capture.getvalue()
