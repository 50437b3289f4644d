"""The three providers, on their real SDKs, against the loopback server (asyncio and trio)."""

from __future__ import annotations

import dataclasses
import email.utils
import gc
import json
import sys
import threading
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from llm_fake_server import FakeLLMServer, Reply, closed_port_url, raw
from llm_helpers import WIRES, FakeTime, Wire

from converge.errors import (
    ClosedError,
    ConfigurationError,
    MissingDependencyError,
    ProviderAuthError,
    ProviderConnectionError,
    ProviderError,
    ProviderRateLimitError,
    ProviderResponseError,
    ProviderTimeoutError,
    SyncInEventLoopError,
    UsageError,
)
from converge.extensions.llm import RetryPolicy, Usage
from converge.extensions.llm._base import SDKProvider
from loop_stall import eventually, spy_on_tls_builds

pytestmark = pytest.mark.anyio

MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello"},
]
TOOL = {
    "name": "emit_decisions",
    "description": "Emit decisions.",
    "parameters": {
        "type": "object",
        "properties": {"decisions": {"type": "array", "items": {"type": "object"}}},
        "required": ["decisions"],
    },
}


# -- happy paths -----------------------------------------------------------------------


async def test_achat_returns_reply_text_and_records_usage(
    provider: SDKProvider, wire: Wire, server: FakeLLMServer
) -> None:
    server.push(wire.chat("Hi there"))
    assert await provider.achat(MESSAGES) == "Hi there"
    assert provider.last_usage == wire.usage
    (request,) = server.requests
    assert request.json["model"] == provider.model
    assert {"authorization": "Bearer test-key"}.items() <= request.headers.items() or (
        request.headers.get("x-api-key") == "test-key"
    )


async def test_the_first_client_builds_its_tls_context_off_the_event_loop(
    provider: SDKProvider, wire: Wire, server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Loading the trust store takes 20-130 ms: a fresh process's first call must not
    # spend it on the event loop.
    built_on = spy_on_tls_builds(monkeypatch)
    server.push(wire.chat("Hi there"))
    assert await provider.achat(MESSAGES) == "Hi there"
    assert len(built_on) == 1
    assert built_on[0] is not threading.current_thread()


async def test_achat_with_usage_returns_text_and_usage_of_that_call(
    provider: SDKProvider, wire: Wire, server: FakeLLMServer
) -> None:
    server.push(wire.chat("one"))
    assert await provider.achat_with_usage(MESSAGES) == ("one", wire.usage)


async def test_options_reach_the_api(
    provider: SDKProvider, wire: Wire, server: FakeLLMServer
) -> None:
    server.push(wire.chat("ok"))
    sampling = {"temperature": 0.5, "top_p": 0.9} if wire.name != "anthropic" else {}
    await provider.achat(MESSAGES, model="other-model", max_tokens=42, stop="END", **sampling)
    body = server.requests[0].json
    assert body["model"] == "other-model"
    assert body["max_tokens"] == 42
    assert body.get("stop", body.get("stop_sequences")) == ["END"]
    for key, value in sampling.items():
        assert body[key] == value


async def test_structured_output_returns_tool_arguments_as_json(
    provider: SDKProvider, wire: Wire, server: FakeLLMServer
) -> None:
    arguments = json.dumps({"decisions": [{"type": "UpdateTask", "task_id": "t"}]})
    server.push(wire.tool("emit_decisions", arguments))
    text = await provider.achat(MESSAGES, use_structured_output=True, emit_decisions_tool=TOOL)
    assert json.loads(text) == json.loads(arguments)
    body = server.requests[0].json
    (tool,) = body["tools"]
    described = tool.get("function", tool)
    assert described["name"] == "emit_decisions"
    assert described.get("parameters", described.get("input_schema")) == TOOL["parameters"]
    assert body["tool_choice"] in (
        {"type": "function", "function": {"name": "emit_decisions"}},  # OpenAI
        {"type": "tool", "name": "emit_decisions"},  # Anthropic
        "any",  # Mistral: must call a tool, and only one is offered
    )


@pytest.mark.parametrize("wire", [WIRES["anthropic"]], ids=["anthropic"])
async def test_structured_output_whose_arguments_have_no_json_form_is_a_bad_response(
    provider: SDKProvider, wire: Wire, server: FakeLLMServer
) -> None:
    # Anthropic's SDK parses a tool's input (Python's json reads NaN) and converge encodes
    # it again: a ValueError escaped. OpenAI and Mistral hand back the text as received.
    server.push(wire.tool("emit_decisions", '{"decisions": NaN}'))
    with pytest.raises(ProviderResponseError, match="not JSON"):
        await provider.achat(MESSAGES, use_structured_output=True, emit_decisions_tool=TOOL)


async def test_structured_output_falls_back_to_text_when_model_does_not_call_the_tool(
    provider: SDKProvider, wire: Wire, server: FakeLLMServer
) -> None:
    server.push(wire.chat("[]"))
    assert (
        await provider.achat(MESSAGES, use_structured_output=True, emit_decisions_tool=TOOL) == "[]"
    )


async def test_structured_flag_without_a_tool_is_a_plain_call(
    provider: SDKProvider, wire: Wire, server: FakeLLMServer
) -> None:
    server.push(wire.chat("plain"), wire.chat("plain too"))
    assert await provider.achat(MESSAGES, use_structured_output=True) == "plain"
    assert await provider.achat(MESSAGES, emit_decisions_tool=TOOL) == "plain too"
    assert all("tools" not in r.json for r in server.requests)


async def test_stream_yields_deltas_and_usage_after_the_end(
    provider: SDKProvider, wire: Wire, server: FakeLLMServer
) -> None:
    server.push(wire.stream(["Hel", "lo", " world"]))
    stream = provider.chat_stream(MESSAGES)
    assert stream.usage is None
    deltas = [delta async for delta in stream]
    assert deltas == ["Hel", "lo", " world"]
    assert stream.text == "Hello world"
    assert stream.done
    assert stream.usage == wire.usage
    assert provider.last_usage == wire.usage


async def test_stream_closed_early_releases_the_connection(
    provider: SDKProvider, wire: Wire, server: FakeLLMServer
) -> None:
    server.push(wire.stream(["a", "b", "c"]), wire.chat("after"))
    async with provider.chat_stream(MESSAGES) as stream:
        async for delta in stream:
            assert delta == "a"
            break
    assert stream.done
    # A stream left early leaves the SDK's inner async generators (the response's
    # aiter_raw) to the garbage collector: finalize them now, on this test's event loop,
    # not in whatever thread the next collection happens on (the fake server's, under
    # trio: "async generator already executing", in 2 of 5 full runs).
    gc.collect()
    await anyio.lowlevel.checkpoint()
    with anyio.fail_after(5):
        assert await provider.achat(MESSAGES) == "after"


async def test_stream_open_is_retried(
    provider: SDKProvider, wire: Wire, server: FakeLLMServer, fake_time: FakeTime
) -> None:
    server.push(wire.error(503, "busy", None), wire.stream(["ok"]))
    assert await provider.chat_stream(MESSAGES).acollect() == "ok"
    assert len(server.requests) == 2
    assert fake_time.sleeps == [0.5]


# -- retries and typed errors ----------------------------------------------------------


async def test_429_with_retry_after_one_second_is_retried_once_after_one_second(
    provider: SDKProvider, wire: Wire, server: FakeLLMServer, fake_time: FakeTime
) -> None:
    server.push(wire.error(429, "slow down", {"Retry-After": "1"}), wire.chat("done"))
    assert await provider.achat(MESSAGES) == "done"
    assert len(server.requests) == 2
    assert fake_time.sleeps == [1.0]


async def test_retry_after_ms_header_wins_over_retry_after(
    provider: SDKProvider, wire: Wire, server: FakeLLMServer, fake_time: FakeTime
) -> None:
    headers = {"retry-after-ms": "250", "retry-after": "9"}
    server.push(wire.error(429, "slow down", headers), wire.chat("done"))
    assert await provider.achat(MESSAGES) == "done"
    assert fake_time.sleeps == [0.25]


async def test_retry_after_http_date_is_honoured(
    provider: SDKProvider, wire: Wire, server: FakeLLMServer, fake_time: FakeTime
) -> None:
    when = email.utils.formatdate(fake_time.wall + 3, usegmt=True)
    server.push(wire.error(503, "maintenance", {"Retry-After": when}), wire.chat("back"))
    assert await provider.achat(MESSAGES) == "back"
    assert fake_time.sleeps == [3.0]


async def test_retry_after_beyond_the_cap_is_not_waited_for(
    provider: SDKProvider, wire: Wire, server: FakeLLMServer, fake_time: FakeTime
) -> None:
    server.push(wire.error(429, "quota", {"Retry-After": "3600"}))
    with pytest.raises(ProviderRateLimitError) as info:
        await provider.achat(MESSAGES)
    assert info.value.retry_after == 3600
    assert info.value.status_code == 429
    assert info.value.provider == wire.name
    assert fake_time.sleeps == []
    assert len(server.requests) == 1


async def test_401_raises_auth_error_without_retrying(
    provider: SDKProvider, wire: Wire, server: FakeLLMServer, fake_time: FakeTime
) -> None:
    server.push(wire.error(401, "invalid api key", None), wire.chat("never"))
    with pytest.raises(ProviderAuthError) as info:
        await provider.achat(MESSAGES)
    assert info.value.status_code == 401
    assert info.value.provider == wire.name
    assert "invalid api key" in str(info.value)
    assert len(server.requests) == 1
    assert fake_time.sleeps == []


async def test_three_500s_exhaust_the_retry_budget_with_a_typed_error(
    provider: SDKProvider, wire: Wire, server: FakeLLMServer, fake_time: FakeTime
) -> None:
    server.push(*[wire.error(500, "boom", None)] * 3, wire.chat("too late"))
    with pytest.raises(ProviderResponseError) as info:
        await provider.achat(MESSAGES)
    assert info.value.status_code == 500
    assert info.value.provider == wire.name
    assert "3 attempts" in str(info.value)
    assert len(server.requests) == 3
    assert fake_time.sleeps == [0.5, 1.0]  # exponential backoff, jitter switched off


async def test_429s_past_the_budget_raise_rate_limit_error(
    wire: Wire, server: FakeLLMServer, fake_time: FakeTime
) -> None:
    provider = wire.provider(server, retry_policy=fake_time.policy(), max_retries=1)
    server.push(*[wire.error(429, "slow", {"retry-after": "2"})] * 2)
    try:
        with pytest.raises(ProviderRateLimitError) as info:
            await provider.achat(MESSAGES)
    finally:
        await provider.aclose()
    assert info.value.retry_after == 2
    assert len(server.requests) == 2


@pytest.mark.parametrize("status", [408, 409, 502])
async def test_other_retryable_statuses_are_retried(
    provider: SDKProvider, wire: Wire, server: FakeLLMServer, status: int
) -> None:
    server.push(wire.error(status, "transient", None), wire.chat("fine"))
    assert await provider.achat(MESSAGES) == "fine"
    assert len(server.requests) == 2


async def test_400_is_not_retried(provider: SDKProvider, wire: Wire, server: FakeLLMServer) -> None:
    server.push(wire.error(400, "context too long", None))
    with pytest.raises(ProviderResponseError) as info:
        await provider.achat(MESSAGES)
    assert info.value.status_code == 400
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "reply",
    [
        raw(200, b"{not json"),
        raw(200, b"<html>oops</html>", content_type="text/html"),
        raw(200, b"{}"),
        raw(200, b'{"choices": "nope", "content": 5}'),
    ],
    ids=["truncated-json", "html", "empty-object", "wrong-types"],
)
async def test_malformed_body_raises_response_error_without_retrying(
    provider: SDKProvider, server: FakeLLMServer, reply: Reply
) -> None:
    server.push(reply, reply, reply)
    with pytest.raises(ProviderResponseError):
        await provider.achat(MESSAGES)
    assert len(server.requests) == 1


async def test_connection_refused_is_retried_then_raises_connection_error(
    wire: Wire, fake_time: FakeTime
) -> None:
    provider = wire.cls(
        api_key="k", base_url=closed_port_url(), retry_policy=fake_time.policy(max_retries=1)
    )
    try:
        with pytest.raises(ProviderConnectionError) as info:
            await provider.achat(MESSAGES)
    finally:
        await provider.aclose()
    assert info.value.provider == wire.name
    assert fake_time.sleeps == [0.5]


async def test_slow_answer_raises_timeout_error(wire: Wire, server: FakeLLMServer) -> None:
    provider = wire.provider(server, timeout=0.2, max_retries=0)
    server.push(Reply(delay=3.0, body=b"{}"))
    try:
        with pytest.raises(ProviderTimeoutError) as info:
            await provider.achat(MESSAGES)
    finally:
        await provider.aclose()
    assert isinstance(info.value, TimeoutError)


async def test_overall_deadline_bounds_the_whole_call(wire: Wire, server: FakeLLMServer) -> None:
    provider = wire.provider(server, timeout=None, retry_policy=RetryPolicy(deadline=0.3))
    server.push(Reply(delay=3.0, body=b"{}"))
    try:
        with anyio.fail_after(2.5), pytest.raises(ProviderTimeoutError, match="deadline"):
            await provider.achat(MESSAGES)
    finally:
        await provider.aclose()


async def test_no_retry_starts_that_would_end_past_the_deadline(
    wire: Wire, server: FakeLLMServer, fake_time: FakeTime
) -> None:
    provider = wire.provider(server, retry_policy=fake_time.policy(deadline=1.5))
    server.push(wire.error(503, "later", {"retry-after": "2"}), wire.chat("unused"))
    try:
        with pytest.raises(ProviderResponseError):
            await provider.achat(MESSAGES)
    finally:
        await provider.aclose()
    assert fake_time.sleeps == []
    assert len(server.requests) == 1


async def test_default_policy_really_sleeps_for_retry_after(server: FakeLLMServer) -> None:
    wire = WIRES["openai"]
    provider = wire.provider(server)
    server.push(wire.error(429, "slow", {"Retry-After": "1"}), wire.chat("done"))
    start = anyio.current_time()
    try:
        assert await provider.achat(MESSAGES) == "done"
    finally:
        await provider.aclose()
    assert anyio.current_time() - start >= 0.95
    first, second = server.requests
    assert second.at - first.at >= 0.95


# -- configuration and validation ------------------------------------------------------


async def test_missing_api_key_fails_before_any_network_call(
    wire: Wire, server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(wire.env_var, raising=False)
    with pytest.raises(ConfigurationError, match=wire.env_var):
        wire.cls(base_url=wire.url(server))
    assert server.requests == []


async def test_api_key_is_read_from_the_environment(
    wire: Wire, server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(wire.env_var, "env-key")
    provider = wire.cls(base_url=wire.url(server))
    server.push(wire.chat("ok"))
    try:
        await provider.achat(MESSAGES)
    finally:
        await provider.aclose()
    headers = server.requests[0].headers
    assert "env-key" in headers.get("authorization", "") + headers.get("x-api-key", "")


@pytest.mark.parametrize("module", ["openai", "anthropic", "mistralai.client"])
async def test_missing_sdk_names_the_extra_to_install(
    module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    wire = {"openai": WIRES["openai"], "anthropic": WIRES["anthropic"]}.get(
        module, WIRES["mistral"]
    )
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingDependencyError, match=f"\\.\\[{wire.cls.extra}\\]"):
        wire.cls(api_key="k")


@pytest.mark.parametrize(
    ("messages", "kwargs"),
    [
        ([], {}),
        ("hello", {}),
        ([{"role": "wizard", "content": "x"}], {}),
        ([{"role": "user", "content": 5}], {}),
        ([{"role": "user"}], {}),
        # A lone surrogate has no UTF-8 form: the SDKs raised UnicodeEncodeError.
        ([{"role": "user", "content": "caf\ud800"}], {}),
        ([{"role": "user", "content": [{"type": "text", "text": "\udc80"}]}], {}),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\ud800"}], {}),
        (MESSAGES, {"temperature": "hot"}),
        (MESSAGES, {"temperature": 7}),
        (MESSAGES, {"max_tokens": 0}),
        (MESSAGES, {"top_p": 2}),
        (MESSAGES, {"stop": [1]}),
        (MESSAGES, {"model": ""}),
        (MESSAGES, {"frobnicate": True}),
        (MESSAGES, {"use_structured_output": True, "emit_decisions_tool": {"name": "x"}}),
        (MESSAGES, {"use_structured_output": "yes"}),
        (MESSAGES, {"tools": [TOOL], "tool_choice": {"function": "emit_decisions"}}),
    ],
)
async def test_bad_arguments_raise_usage_error_before_any_network_call(
    provider: SDKProvider, server: FakeLLMServer, messages: Any, kwargs: dict[str, Any]
) -> None:
    with pytest.raises(UsageError):
        await provider.achat(messages, **kwargs)
    with pytest.raises(UsageError):
        provider.chat_stream(messages, **kwargs)
    assert server.requests == []


LONE = "a\ud800b"
CALLED = [
    {"role": "user", "content": "x"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "name": "f"}]},
    {"role": "tool", "tool_call_id": "c1", "content": "done"},
]


def _with(path: tuple[Any, ...], value: Any) -> list[dict[str, Any]]:
    """CALLED with the value at ``path`` (message index, then keys) replaced."""
    messages = json.loads(json.dumps(CALLED))
    *keys, last = path
    target = messages
    for key in keys:
        target = target[key]
    target[last] = value
    return messages


# Values the SDKs could not encode (UnicodeEncodeError, TypeError, ValueError) or that
# h11 refuses on the wire: each must be a UsageError naming the field, before any request.
UNSENDABLE: list[tuple[str, list[dict[str, Any]], dict[str, Any], str]] = [
    ("model", MESSAGES, {"model": LONE}, "model holds a lone surrogate"),
    ("stop", MESSAGES, {"stop": ["ok", LONE]}, r"stop\[1\] holds a lone surrogate"),
    ("tool name", MESSAGES, {"tools": [{**TOOL, "name": LONE}]}, r"\['name'\] holds"),
    ("tool text", MESSAGES, {"tools": [{**TOOL, "description": LONE}]}, "description'] holds"),
    (
        "tool schema",
        MESSAGES,
        {"tools": [{**TOOL, "parameters": {"type": "object", "title": LONE}}]},
        r"tools\[0\]\['parameters'\] holds a lone surrogate",
    ),
    (
        "schema NaN",
        MESSAGES,
        {"tools": [{**TOOL, "parameters": {"type": "object", "maximum": float("nan")}}]},
        "cannot be sent as JSON",
    ),
    ("extra_body", MESSAGES, {"extra_body": {LONE: 1}}, "extra_body holds a lone surrogate"),
    ("extra_body object", MESSAGES, {"extra_body": {"x": object()}}, "cannot be sent as JSON"),
    ("header value", MESSAGES, {"extra_headers": {"x-a": "caf\u00e9"}}, "printable ASCII"),
    ("header break", MESSAGES, {"extra_headers": {"x-a": "v\r\nx-b: c"}}, "printable ASCII"),
    ("header name", MESSAGES, {"extra_headers": {"x a": "v"}}, "not a valid HTTP header"),
    ("call id", _with((1, "tool_calls", 0, "id"), LONE), {}, r"\['id'\] holds"),
    ("call name", _with((1, "tool_calls", 0, "name"), LONE), {}, r"\['name'\] holds"),
    ("arguments", _with((1, "tool_calls", 0, "arguments"), {"q": LONE}), {}, "arguments'] holds"),
    (
        "arguments object",
        _with((1, "tool_calls", 0, "arguments"), {"q": object()}),
        {},
        "cannot be sent as JSON",
    ),
    ("result id", _with((2, "tool_call_id"), LONE), {}, "tool_call_id'] holds"),
    (
        "part url",
        [{"role": "user", "content": [{"type": "image", "url": "https://x/" + LONE}]}],
        {},
        "url'] holds",
    ),
]


@pytest.mark.parametrize(
    ("messages", "kwargs", "reason"),
    [pytest.param(*case[1:], id=case[0]) for case in UNSENDABLE],
)
async def test_values_no_request_can_carry_raise_usage_error_before_any_network_call(
    provider: SDKProvider,
    server: FakeLLMServer,
    messages: list[dict[str, Any]],
    kwargs: dict[str, Any],
    reason: str,
) -> None:
    with pytest.raises(UsageError, match=reason):
        await provider.achat(messages, **kwargs)
    assert server.requests == []


async def test_structured_output_is_not_streamed(provider: SDKProvider) -> None:
    with pytest.raises(UsageError, match="not streamed"):
        provider.chat_stream(MESSAGES, use_structured_output=True, emit_decisions_tool=TOOL)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"model": ""},
        {"base_url": "ftp://example"},
        {"base_url": "http://127.0.0.1:99999"},
        {"base_url": "http://h:abc"},
        {"base_url": "http://h:0/v1"},
        {"base_url": "http://[::1"},
        {"base_url": "http:///v1"},
        {"base_url": "http://999.1.1.1/v1"},
        {"base_url": "http://\udcff/"},
        {"base_url": "http://127.0.0.1:9/?q=\udcff"},
        {"base_url": "http://h/v1\n"},
        {"api_key": "caf\u00e9"},
        {"api_key": "\udcff"},
        {"api_key": "key\n"},
        {"api_key": "k\r\nx-evil: 1"},
        {"timeout": 0},
        {"timeout": float("nan")},
        {"max_retries": -1},
        {"retry_policy": "fast"},
        {"api_key": ""},
        {"client": object()},
    ],
)
async def test_bad_constructor_arguments_raise_usage_error(
    wire: Wire, kwargs: dict[str, Any]
) -> None:
    kwargs.setdefault("api_key", "k")
    with pytest.raises(UsageError):
        wire.cls(**kwargs)


async def test_a_key_from_the_environment_that_no_header_can_carry_is_a_configuration_error(
    wire: Wire, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(wire.env_var, "secret\u00e9")
    with pytest.raises(ConfigurationError, match=wire.env_var) as caught:
        wire.cls()
    assert "secret" not in str(caught.value)


async def test_a_timeout_past_30_days_is_taken_as_30_days(
    wire: Wire, server: FakeLLMServer
) -> None:
    # 2**70 s overflowed the clock of the HTTP library (Mistral's sync client on trio).
    provider = wire.provider(server, timeout=2**70, max_retries=0)
    try:
        assert provider.timeout == 30 * 86_400
        server.push(wire.chat("Hi there"))
        assert await provider.achat(MESSAGES) == "Hi there"
    finally:
        await provider.aclose()


@pytest.mark.parametrize(
    "response_format",
    [{"type": -1}, {"type": "json_schema", "json_schema": 1}],
)
async def test_arguments_the_mistral_sdk_refuses_raise_usage_error_before_any_request(
    server: FakeLLMServer, response_format: dict[str, Any]
) -> None:
    provider = WIRES["mistral"].provider(server, max_retries=3)
    try:
        with pytest.raises(UsageError, match="SDK refused the request's arguments"):
            await provider.achat(MESSAGES, response_format=response_format)
    finally:
        await provider.aclose()
    assert server.requests == []


async def test_api_key_is_not_in_the_repr(provider: SDKProvider) -> None:
    assert "test-key" not in repr(provider)
    assert provider.model in repr(provider)


async def test_calls_after_aclose_raise_closed_error(
    provider: SDKProvider, server: FakeLLMServer
) -> None:
    await provider.aclose()
    await provider.aclose()  # idempotent
    with pytest.raises(ClosedError):
        await provider.achat(MESSAGES)
    assert server.requests == []


async def test_a_call_cut_short_by_aclose_raises_closed_error_and_is_not_retried(
    provider: SDKProvider, wire: Wire, server: FakeLLMServer
) -> None:
    # It was retried on the closed client: httpx's RuntimeError escaped (OpenAI,
    # Mistral), or the retries ran out into a ProviderConnectionError (Anthropic).
    server.default = dataclasses.replace(wire.chat("late"), delay=1.0)
    raised: list[BaseException] = []

    async def call() -> None:
        try:
            await provider.achat(MESSAGES)
        except Exception as exc:
            raised.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await eventually(lambda: len(server.requests) == 1)
            await provider.aclose()
    assert [type(exc) for exc in raised] == [ClosedError]
    assert len(server.requests) == 1


async def test_max_retries_overrides_the_policy(
    wire: Wire, server: FakeLLMServer, fake_time: FakeTime
) -> None:
    provider = wire.provider(server, retry_policy=fake_time.policy(), max_retries=0)
    assert provider.retry_policy.max_retries == 0
    server.push(wire.error(500, "boom", None), wire.chat("unused"))
    try:
        with pytest.raises(ProviderError):
            await provider.achat(MESSAGES)
    finally:
        await provider.aclose()
    assert len(server.requests) == 1


async def test_concurrent_calls_each_get_their_own_usage(
    provider: SDKProvider, wire: Wire, server: FakeLLMServer
) -> None:
    server.default = wire.chat("same")
    results: list[tuple[str, Usage]] = []

    async def call() -> None:
        results.append(await provider.achat_with_usage(MESSAGES))

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(call)
    assert results == [("same", wire.usage)] * 5
    assert len(server.requests) == 5


# -- sync surface ----------------------------------------------------------------------


async def test_sync_chat_on_the_event_loop_thread_names_the_coroutine(
    provider: SDKProvider,
) -> None:
    with pytest.raises(SyncInEventLoopError, match=r"achat"):
        provider.chat(MESSAGES)


async def test_sync_chat_works_from_a_worker_thread(
    provider: SDKProvider, wire: Wire, server: FakeLLMServer
) -> None:
    server.push(wire.chat("from a thread"))
    assert await anyio.to_thread.run_sync(provider.chat, MESSAGES) == "from a thread"


async def test_sync_complete_works_from_a_worker_thread_and_names_acomplete_on_the_loop(
    provider: SDKProvider, wire: Wire, server: FakeLLMServer
) -> None:
    with pytest.raises(SyncInEventLoopError, match=r"acomplete"):
        provider.complete(MESSAGES)
    server.push(wire.chat("from a thread"))
    result = await anyio.to_thread.run_sync(provider.complete, MESSAGES)
    assert (result.text, result.stop_reason) == ("from a thread", "stop")


@pytest.mark.parametrize("name", sorted(WIRES))
def test_sync_chat_from_a_script_reuses_one_connection(name: str, server: FakeLLMServer) -> None:
    wire = WIRES[name]
    provider = wire.provider(server)
    server.push(wire.chat("one"), wire.chat("two"))
    try:
        assert provider.chat(MESSAGES) == "one"
        assert provider.chat_with_usage(MESSAGES) == ("two", wire.usage)
    finally:
        provider.close()
    first, second = server.requests
    assert first.client == second.client  # same loop, same pooled connection
    with pytest.raises(ClosedError):
        provider.chat(MESSAGES)


@pytest.mark.parametrize(
    "cut", [b'{"id": "chatcmpl-1", "cho', b'{"id": "msg_1", "content": [', b""], ids=repr
)
async def test_a_body_cut_before_its_json_ends_is_retried(
    wire: Wire, server: FakeLLMServer, fake_time: FakeTime, cut: bytes
) -> None:
    provider = wire.provider(server, retry_policy=fake_time.policy(max_retries=2))
    server.push(raw(200, cut), wire.chat("whole"))
    try:
        assert await provider.achat(MESSAGES) == "whole"
        server.push(raw(200, cut), raw(200, cut), raw(200, cut))
        with pytest.raises(ProviderResponseError, match="cut short") as info:
            await provider.achat(MESSAGES)
    finally:
        await provider.aclose()
    assert info.value.status_code == 200
    assert len(server.requests) == 5
