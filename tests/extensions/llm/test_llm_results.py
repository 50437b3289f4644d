"""What a call returns: ChatResult, normalised stop reasons, typed errors for truncated,
filtered and refused answers, and the full usage of each API (contract D)."""

from __future__ import annotations

import json

import llm_fake_server as fake
import pytest
from llm_fake_server import FakeLLMServer, Reply
from llm_helpers import Wire

from converge.core import MetricsCollector
from converge.errors import (
    ContentFilteredError,
    ProviderResponseError,
    ResponseIncompleteError,
    ResponseRefusedError,
    ResponseTruncatedError,
)
from converge.extensions.llm import ChatResult, ToolCall, Usage
from converge.extensions.llm._base import SDKProvider

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "hi"}]
TOOL = {
    "name": "emit_decisions",
    "description": "",
    "parameters": {"type": "object", "properties": {}},
}

# Each API's way of saying "stopped at the output limit", and its raw value.
TRUNCATED = {
    "openai": (lambda: fake.openai_chat("par", finish_reason="length"), "length"),
    "anthropic": (lambda: fake.anthropic_message("par", stop_reason="max_tokens"), "max_tokens"),
    "mistral": (lambda: fake.mistral_chat("par", finish_reason="length"), "length"),
}
TRUNCATED_STREAM = {
    "openai": lambda d: fake.openai_stream(d, finish_reason="length"),
    "anthropic": lambda d: fake.anthropic_stream(d, stop_reason="max_tokens"),
    "mistral": lambda d: fake.mistral_stream(d, finish_reason="length"),
}

# The frames of each API's stream before its first text delta (role chunk, or
# message_start + content_block_start + ping): a stream cut after them and ``n`` deltas
# keeps ``OPENING + n`` frames and has no stop reason.
OPENING = {"openai": 1, "anthropic": 3, "mistral": 1}


def cut_short(wire: Wire, deltas: list[str]) -> Reply:
    """``wire``'s stream of ``deltas``, ended cleanly after the last one: no stop reason,
    no closing event, as a proxy or load balancer that cuts a stream leaves it."""
    reply = wire.stream(deltas)
    assert reply.events is not None
    return Reply(
        events=reply.events[: OPENING[wire.name] + len(deltas)], content_type="text/event-stream"
    )


# -- the result object -------------------------------------------------------------


async def test_acomplete_returns_text_usage_stop_reason_model_and_id(
    provider: SDKProvider, wire: Wire, server: FakeLLMServer
) -> None:
    server.push(wire.chat("Hello"))
    result = await provider.acomplete(MESSAGES)
    assert isinstance(result, ChatResult)
    assert result.text == "Hello"
    assert result.stop_reason == "stop"
    assert result.raw_stop_reason == {"anthropic": "end_turn"}.get(wire.name, "stop")
    assert result.usage == Usage(wire.usage.input_tokens, wire.usage.output_tokens)
    assert result.model
    assert result.response_id
    assert result.tool_calls == ()
    assert provider.last_usage == result.usage


async def test_tool_calls_come_back_decoded_with_their_ids(
    provider: SDKProvider, wire: Wire, server: FakeLLMServer
) -> None:
    server.push(wire.tool("lookup", json.dumps({"q": "x"})))
    tools = [{"name": "lookup", "description": "find", "parameters": {"type": "object"}}]
    result = await provider.acomplete(MESSAGES, tools=tools, tool_choice="required")
    assert result.stop_reason == "tool_calls"
    (call,) = result.tool_calls
    assert isinstance(call, ToolCall)
    assert (call.name, call.arguments) == ("lookup", {"q": "x"})
    assert call.id in {"call_1", "toolu_1", "abc123def"}


async def test_truncation_raises_a_typed_error_carrying_the_partial_result(
    provider: SDKProvider, wire: Wire, server: FakeLLMServer
) -> None:
    reply, raw = TRUNCATED[wire.name]
    server.push(reply())
    with pytest.raises(ResponseTruncatedError, match="max_tokens") as info:
        await provider.acomplete(MESSAGES)
    assert isinstance(info.value, ProviderResponseError)
    assert info.value.result.text == "par"
    assert info.value.result.stop_reason == "length"
    assert info.value.result.raw_stop_reason == raw


async def test_allow_partial_returns_the_truncated_result(
    provider: SDKProvider, wire: Wire, server: FakeLLMServer
) -> None:
    server.push(TRUNCATED[wire.name][0]())
    result = await provider.acomplete(MESSAGES, allow_partial=True)
    assert (result.text, result.stop_reason, result.truncated) == ("par", "length", True)


async def test_achat_raises_on_truncation_unless_partial_text_is_asked_for(
    provider: SDKProvider, wire: Wire, server: FakeLLMServer
) -> None:
    server.push(TRUNCATED[wire.name][0](), TRUNCATED[wire.name][0]())
    with pytest.raises(ResponseTruncatedError):
        await provider.achat(MESSAGES)
    assert await provider.achat(MESSAGES, allow_partial=True) == "par"


async def test_truncated_structured_output_is_reported_as_truncated(
    provider: SDKProvider, wire: Wire, server: FakeLLMServer
) -> None:
    partial = '{"decisions": ['  # what a cut-off tool call looks like
    reply = wire.tool("emit_decisions", "{}" if wire.name == "anthropic" else partial)
    body = json.loads(reply.body)
    if wire.name == "anthropic":
        body["stop_reason"] = "max_tokens"
    else:
        body["choices"][0]["finish_reason"] = "length"
    reply.body = json.dumps(body).encode()
    server.push(reply)
    with pytest.raises(ResponseTruncatedError) as info:
        await provider.achat(MESSAGES, use_structured_output=True, emit_decisions_tool=TOOL)
    assert info.value.result.tool_calls[0].name == "emit_decisions"


async def test_stream_result_holds_the_stop_reason_and_truncation_raises_at_the_end(
    provider: SDKProvider, wire: Wire, server: FakeLLMServer
) -> None:
    server.push(TRUNCATED_STREAM[wire.name](["a", "b"]))
    stream = provider.chat_stream(MESSAGES)
    assert await stream.__anext__() == "a"
    assert await stream.__anext__() == "b"
    with pytest.raises(ResponseTruncatedError):
        await stream.__anext__()
    assert stream.stop_reason == "length"
    assert stream.result is not None
    assert stream.result.text == "ab"
    server.push(TRUNCATED_STREAM[wire.name](["c"]))
    stream = provider.chat_stream(MESSAGES, allow_partial=True)
    assert await stream.acollect() == "c"
    assert stream.result is not None
    assert stream.result.truncated


async def test_a_stream_cut_short_raises_incomplete_at_the_end_carrying_its_text(
    provider: SDKProvider, wire: Wire, server: FakeLLMServer
) -> None:
    # It used to end as if complete, with stop reason "other": half an answer as a whole.
    server.push(cut_short(wire, ["Hel", "lo"]))
    stream = provider.chat_stream(MESSAGES)
    assert await stream.__anext__() == "Hel"
    assert await stream.__anext__() == "lo"
    with pytest.raises(ResponseIncompleteError) as info:
        await stream.__anext__()
    assert isinstance(info.value, ProviderResponseError)
    assert "no stop reason" in str(info.value)
    assert info.value.provider == wire.name
    assert info.value.result.text == "Hello"
    assert stream.stop_reason == "incomplete"
    assert stream.result is not None
    assert stream.result.raw_stop_reason is None
    assert len(server.requests) == 1  # text was shown: not retried
    server.push(cut_short(wire, ["Hel", "lo"]))
    stream = provider.chat_stream(MESSAGES, allow_partial=True)
    assert await stream.acollect() == "Hello"
    assert stream.stop_reason == "incomplete"


async def test_a_stream_cut_before_any_text_is_retried(
    provider: SDKProvider, wire: Wire, server: FakeLLMServer
) -> None:
    server.push(cut_short(wire, []), cut_short(wire, []), wire.stream(["whole"]))
    stream = provider.chat_stream(MESSAGES)
    assert await stream.acollect() == "whole"
    assert stream.stop_reason == "stop"
    assert len(server.requests) == 3
    server.reset()
    server.push(*(cut_short(wire, []) for _ in range(3)))  # the policy's 2 retries, spent
    with pytest.raises(ResponseIncompleteError) as info:
        await provider.chat_stream(MESSAGES).acollect()
    assert info.value.result.text == ""
    assert len(server.requests) == 3


async def test_a_complete_stream_reports_stop_model_and_id(
    provider: SDKProvider, wire: Wire, server: FakeLLMServer
) -> None:
    server.push(wire.stream(["x"]))
    stream = provider.chat_stream(MESSAGES)
    await stream.acollect()
    assert stream.result is not None
    assert stream.result.stop_reason == "stop"
    assert stream.result.model
    assert stream.result.response_id
    assert stream.usage == stream.result.usage


async def test_openai_content_filter_and_refusal_raise_their_errors(
    server: FakeLLMServer, fake_time: object
) -> None:
    from converge.extensions.llm import OpenAIProvider

    provider = OpenAIProvider("k", base_url=server.openai_url, max_retries=0)
    server.push(
        fake.openai_chat("cut", finish_reason="content_filter"),
        fake.openai_chat(None, refusal="I can't help with that."),
        fake.openai_chat(None, refusal="I can't help with that."),
    )
    with pytest.raises(ContentFilteredError) as filtered:
        await provider.acomplete(MESSAGES)
    assert filtered.value.result.stop_reason == "content_filter"
    with pytest.raises(ResponseRefusedError, match="can't help") as refused:
        await provider.achat(MESSAGES)
    assert refused.value.result.text == "I can't help with that."
    result = await provider.acomplete(MESSAGES, allow_partial=True)
    assert (result.stop_reason, result.raw_stop_reason) == ("refusal", "stop")
    await provider.aclose()


async def test_anthropic_refusal_stop_reason_raises(server: FakeLLMServer) -> None:
    from converge.extensions.llm import AnthropicProvider

    provider = AnthropicProvider("k", base_url=server.anthropic_url, max_retries=0)
    server.push(fake.anthropic_message("", stop_reason="refusal"))
    with pytest.raises(ResponseRefusedError) as info:
        await provider.acomplete(MESSAGES)
    assert info.value.result.raw_stop_reason == "refusal"
    await provider.aclose()


@pytest.mark.parametrize(
    ("finish", "expected"), [("model_length", "length"), ("error", "other"), ("stop", "stop")]
)
async def test_mistral_finish_reasons_are_normalised(
    server: FakeLLMServer, finish: str, expected: str
) -> None:
    from converge.extensions.llm import MistralProvider

    provider = MistralProvider("k", base_url=server.mistral_url, max_retries=0)
    server.push(fake.mistral_chat("t", finish_reason=finish))
    result = await provider.acomplete(MESSAGES, allow_partial=True)
    assert (result.stop_reason, result.raw_stop_reason) == (expected, finish)
    await provider.aclose()


# -- usage -----------------------------------------------------------------------------


async def test_openai_usage_reports_cached_and_reasoning_tokens(server: FakeLLMServer) -> None:
    from converge.extensions.llm import OpenAIProvider

    provider = OpenAIProvider("k", base_url=server.openai_url, max_retries=0)
    details = {
        "prompt_tokens_details": {"cached_tokens": 1024},
        "completion_tokens_details": {"reasoning_tokens": 300},
    }
    server.push(fake.openai_chat("x", prompt_tokens=1200, completion_tokens=350, usage=details))
    result = await provider.acomplete(MESSAGES)
    assert result.usage == Usage(1200, 350, cache_read_tokens=1024, reasoning_tokens=300)
    assert result.usage.total_tokens == 1550
    await provider.aclose()


async def test_anthropic_input_tokens_include_cache_reads_and_writes(
    server: FakeLLMServer,
) -> None:
    from converge.extensions.llm import AnthropicProvider

    provider = AnthropicProvider("k", base_url=server.anthropic_url, max_retries=0)
    cache = {"cache_read_input_tokens": 1000, "cache_creation_input_tokens": 200}
    server.push(
        fake.anthropic_message("x", input_tokens=5, output_tokens=9, usage=cache),
        fake.anthropic_stream(["y"], input_tokens=5, output_tokens=9, usage=cache),
    )
    expected = Usage(1205, 9, cache_read_tokens=1000, cache_write_tokens=200)
    assert (await provider.acomplete(MESSAGES)).usage == expected
    stream = provider.chat_stream(MESSAGES)
    await stream.acollect()
    assert stream.usage == expected
    await provider.aclose()


async def test_missing_usage_is_unknown_not_zero(
    provider: SDKProvider, wire: Wire, server: FakeLLMServer
) -> None:
    reply: Reply = wire.chat("x")
    body = json.loads(reply.body)
    body.pop("usage")
    if wire.name == "anthropic":  # the SDK requires the object; send it empty
        body["usage"] = {}
    reply.body = json.dumps(body).encode()
    server.push(reply)
    try:
        result = await provider.acomplete(MESSAGES)
    except ProviderResponseError:  # an SDK that insists on usage is allowed to refuse
        return
    assert result.usage.input_tokens is None
    assert result.usage.output_tokens is None
    assert not result.usage.known


async def test_an_absurd_token_count_is_unknown_and_the_call_succeeds(
    wire: Wire, server: FakeLLMServer
) -> None:
    # 10**400 parses as a Python int; counted, it would break float metrics afterwards.
    reply: Reply = wire.chat("x")
    body = json.loads(reply.body)
    body["usage"] = {k: 10**400 if isinstance(v, int) else v for k, v in body["usage"].items()}
    reply.body = json.dumps(body).encode()
    server.push(reply)
    collector = MetricsCollector()
    provider = wire.provider(server, metrics_collector=collector)
    try:
        result = await provider.acomplete(MESSAGES)
    finally:
        await provider.aclose()
    assert result.text == "x"
    assert (result.usage.input_tokens, result.usage.output_tokens) == (None, None)
    assert collector.get("llm_calls_total", labels={"provider": wire.name, "model": result.model})


def test_usage_arithmetic_keeps_unknown_apart_from_zero() -> None:
    unknown = Usage(None, None)
    assert unknown + unknown == Usage(None, None)
    assert unknown + Usage(3, 4) == Usage(3, 4)
    total = Usage(3, 4, cache_read_tokens=2) + Usage(1, 1, reasoning_tokens=1)
    assert total == Usage(4, 5, cache_read_tokens=2, reasoning_tokens=1)
    assert unknown.total_tokens == 0
    assert Usage() == Usage(0, 0)
