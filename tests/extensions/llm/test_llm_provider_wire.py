"""What each provider puts on (and reads off) its API's wire, beyond the shared contract."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anthropic
import openai
import pytest
from llm_fake_server import FakeLLMServer, Reply, _sse, anthropic_tool_use, openai_stream
from llm_helpers import WIRES
from mistralai.client import Mistral

from converge.errors import ProviderResponseError, UsageError
from converge.extensions.llm import AnthropicProvider, MistralProvider, OpenAIProvider, Usage

pytestmark = pytest.mark.anyio

MESSAGES = [
    {"role": "system", "content": "rule one"},
    {"role": "system", "content": "rule two"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "bye"},
]
TOOL = {
    "name": "emit_decisions",
    "description": "",
    "parameters": {"type": "object", "properties": {}},
}


@pytest.fixture
async def openai_provider(server: FakeLLMServer) -> AsyncIterator[OpenAIProvider]:
    provider = OpenAIProvider("test-key", base_url=server.openai_url, max_retries=0)
    yield provider
    await provider.aclose()


@pytest.fixture
async def anthropic_provider(server: FakeLLMServer) -> AsyncIterator[AnthropicProvider]:
    provider = AnthropicProvider("test-key", base_url=server.anthropic_url, max_retries=0)
    yield provider
    await provider.aclose()


@pytest.fixture
async def mistral_provider(server: FakeLLMServer) -> AsyncIterator[MistralProvider]:
    provider = MistralProvider("test-key", base_url=server.mistral_url, max_retries=0)
    yield provider
    await provider.aclose()


# -- OpenAI ----------------------------------------------------------------------------


async def test_openai_sends_messages_unchanged(
    openai_provider: OpenAIProvider, server: FakeLLMServer
) -> None:
    server.push(WIRES["openai"].chat("ok"))
    await openai_provider.achat(MESSAGES)
    request = server.requests[0]
    assert request.path == "/openai/v1/chat/completions"
    assert request.json["messages"] == MESSAGES
    assert request.json["model"] == "gpt-4o-mini"


async def test_openai_stream_asks_for_usage(
    openai_provider: OpenAIProvider, server: FakeLLMServer
) -> None:
    server.push(openai_stream(["x"]))
    await openai_provider.chat_stream(MESSAGES).acollect()
    body = server.requests[0].json
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


async def test_openai_stream_without_usage_chunk_reports_unknown_usage_not_zero(
    openai_provider: OpenAIProvider, server: FakeLLMServer
) -> None:
    server.push(openai_stream(["x", "y"], usage=False))
    stream = openai_provider.chat_stream(MESSAGES)
    assert await stream.acollect() == "xy"
    assert stream.usage == Usage(None, None)
    assert stream.result is not None
    assert stream.result.stop_reason == "stop"


async def test_openai_error_inside_the_stream_raises_response_error(
    openai_provider: OpenAIProvider, server: FakeLLMServer
) -> None:
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": "par"}, "finish_reason": None}],
    }
    server.push(_sse([(None, chunk), (None, {"error": {"message": "server overloaded"}})]))
    stream = openai_provider.chat_stream(MESSAGES)
    with pytest.raises(ProviderResponseError, match="server overloaded"):
        async for _ in stream:
            pass
    assert stream.text == "par"
    assert stream.done


async def test_openai_extra_body_is_merged_into_the_request(
    openai_provider: OpenAIProvider, server: FakeLLMServer
) -> None:
    server.push(WIRES["openai"].chat("ok"))
    await openai_provider.achat(MESSAGES, extra_body={"seed": 7})
    assert server.requests[0].json["seed"] == 7


async def test_openai_injected_client_needs_no_key_and_keeps_our_retry_policy(
    server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    client = openai.AsyncOpenAI(api_key="own-key", base_url=server.openai_url, max_retries=5)
    provider = OpenAIProvider(client=client, max_retries=0)
    server.push(*[WIRES["openai"].error(500, "boom", None)] * 6)
    with pytest.raises(ProviderResponseError):
        await provider.achat(MESSAGES)
    assert len(server.requests) == 1  # the SDK's own 5 retries are off
    assert server.requests[0].headers["authorization"] == "Bearer own-key"
    await provider.aclose()
    server.reset()
    server.push(WIRES["openai"].chat("still open"))
    response = await client.chat.completions.create(model="m", messages=[])
    assert response.choices[0].message.content == "still open"
    await client.close()


# -- Anthropic -------------------------------------------------------------------------


async def test_anthropic_moves_system_messages_to_the_system_parameter(
    anthropic_provider: AnthropicProvider, server: FakeLLMServer
) -> None:
    server.push(WIRES["anthropic"].chat("ok"))
    await anthropic_provider.achat(MESSAGES)
    request = server.requests[0]
    assert request.path == "/anthropic/v1/messages"
    assert request.json["system"] == "rule one\n\nrule two"
    assert [m["role"] for m in request.json["messages"]] == ["user", "assistant", "user"]
    assert request.json["max_tokens"] == 1024


async def test_anthropic_without_system_messages_sends_no_system(
    anthropic_provider: AnthropicProvider, server: FakeLLMServer
) -> None:
    server.push(WIRES["anthropic"].chat("ok"))
    await anthropic_provider.achat([{"role": "user", "content": "x"}], max_tokens=9)
    assert "system" not in server.requests[0].json
    assert server.requests[0].json["max_tokens"] == 9


async def test_anthropic_needs_a_non_system_message(
    anthropic_provider: AnthropicProvider, server: FakeLLMServer
) -> None:
    with pytest.raises(UsageError, match="at least one"):
        await anthropic_provider.achat([{"role": "system", "content": "only rules"}])
    assert server.requests == []


async def test_anthropic_sampling_options_the_sdk_lacks_are_refused_clearly(
    anthropic_provider: AnthropicProvider,
) -> None:
    with pytest.raises(UsageError, match="extra_body"):
        await anthropic_provider.achat(MESSAGES, temperature=0.2)


async def test_anthropic_tool_use_after_text_returns_the_tool_input(
    anthropic_provider: AnthropicProvider, server: FakeLLMServer
) -> None:
    server.push(anthropic_tool_use("emit_decisions", {"decisions": [1]}, preamble="Thinking."))
    text = await anthropic_provider.achat(
        MESSAGES, use_structured_output=True, emit_decisions_tool=TOOL
    )
    assert json.loads(text) == {"decisions": [1]}


async def test_anthropic_error_event_inside_the_stream_raises_response_error(
    anthropic_provider: AnthropicProvider, server: FakeLLMServer
) -> None:
    reply: Reply = WIRES["anthropic"].stream(["a"])
    assert reply.events is not None
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    reply.events.insert(3, f"event: error\ndata: {json.dumps(error)}\n\n".encode())
    server.push(reply)
    with pytest.raises(ProviderResponseError, match="Overloaded"):
        await anthropic_provider.chat_stream(MESSAGES).acollect()


async def test_anthropic_injected_client_is_used(
    server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    client = anthropic.AsyncAnthropic(api_key="own-key", base_url=server.anthropic_url)
    provider = AnthropicProvider(client=client)
    server.push(WIRES["anthropic"].chat("via injected"))
    assert await provider.achat(MESSAGES) == "via injected"
    await provider.aclose()
    await client.close()


# -- Mistral ---------------------------------------------------------------------------


async def test_mistral_sends_messages_and_tool_choice_any(
    mistral_provider: MistralProvider, server: FakeLLMServer
) -> None:
    server.push(WIRES["mistral"].tool("emit_decisions", "{}"))
    await mistral_provider.achat(MESSAGES, use_structured_output=True, emit_decisions_tool=TOOL)
    request = server.requests[0]
    assert request.path == "/mistral/v1/chat/completions"
    sent = [{"role": m["role"], "content": m["content"]} for m in request.json["messages"]]
    assert sent == MESSAGES  # the SDK adds its own defaults (e.g. "prefix": false)
    assert request.json["tool_choice"] == "any"


async def test_mistral_tool_arguments_given_as_an_object_come_back_as_json(
    mistral_provider: MistralProvider, server: FakeLLMServer
) -> None:
    reply = WIRES["mistral"].tool("emit_decisions", "{}")
    body = json.loads(reply.body)
    body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] = {"decisions": []}
    reply.body = json.dumps(body).encode()
    server.push(reply)
    text = await mistral_provider.achat(
        MESSAGES, use_structured_output=True, emit_decisions_tool=TOOL
    )
    assert json.loads(text) == {"decisions": []}


async def test_mistral_content_chunks_are_joined(
    mistral_provider: MistralProvider, server: FakeLLMServer
) -> None:
    reply = WIRES["mistral"].chat("")
    body = json.loads(reply.body)
    body["choices"][0]["message"]["content"] = [
        {"type": "text", "text": "Hello "},
        {"type": "text", "text": "there"},
    ]
    reply.body = json.dumps(body).encode()
    server.push(reply)
    assert await mistral_provider.achat(MESSAGES) == "Hello there"


async def test_mistral_rejects_options_it_does_not_take_naming_itself(
    mistral_provider: MistralProvider, server: FakeLLMServer
) -> None:
    with pytest.raises(UsageError, match="mistral does not take.*thinking"):
        await mistral_provider.achat(MESSAGES, thinking={"type": "enabled"})
    with pytest.raises(UsageError, match="unknown option.*frobnicate"):
        await mistral_provider.achat(MESSAGES, frobnicate=1)
    assert server.requests == []


async def test_mistral_injected_client_is_used_on_both_backends(
    server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MISTRAL_API_KEY", raising=False)
    client = Mistral(api_key="own-key", server_url=server.mistral_url)
    provider = MistralProvider(client=client)
    server.push(WIRES["mistral"].chat("via injected"), WIRES["mistral"].stream(["s", "t"]))
    assert await provider.achat(MESSAGES) == "via injected"
    assert await provider.chat_stream(MESSAGES).acollect() == "st"
    assert server.requests[0].headers["authorization"] == "Bearer own-key"
    await provider.aclose()
