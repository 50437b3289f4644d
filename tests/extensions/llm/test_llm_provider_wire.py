"""What each provider puts on (and reads off) its API's wire, beyond the shared contract."""

from __future__ import annotations

import base64
import functools
import json
import threading
from collections.abc import AsyncIterator

import anthropic
import anyio
import anyio.to_thread
import openai
import pytest
from llm_fake_server import FakeLLMServer, Reply, _sse, anthropic_tool_use, openai_stream
from llm_fake_server import anthropic_error as fake_anthropic_error
from llm_helpers import WIRES, FakeTime
from mistralai.client import Mistral

from converge.errors import ProviderOverloadedError, ProviderResponseError, UsageError
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
    with pytest.raises(UsageError, match=r"mistral does not take.*thinking"):
        await mistral_provider.achat(MESSAGES, thinking={"type": "enabled"})
    with pytest.raises(UsageError, match=r"unknown option.*frobnicate"):
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


# -- settings (16.5) ---------------------------------------------------------------------

IMAGE_B64 = base64.b64encode(b"\x89PNG fake image").decode()
PDF_B64 = base64.b64encode(b"%PDF-1.4 fake").decode()
RICH = [
    {"role": "system", "content": "rules"},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "look"},
            {"type": "image", "url": "https://example.test/cat.png"},
            {"type": "image", "data": IMAGE_B64, "media_type": "image/png"},
            {"type": "document", "data": PDF_B64, "media_type": "application/pdf"},
        ],
    },
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "name": "add", "arguments": {"a": 1, "b": 2}},
            {"id": "c2", "name": "add", "arguments": {"a": 3, "b": 4}},
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "name": "add", "content": "3"},
    {"role": "tool", "tool_call_id": "c2", "name": "add", "content": "7"},
    {"role": "user", "content": "and now?"},
]
ADD = {"name": "add", "description": "add", "parameters": {"type": "object"}}


async def test_openai_passes_its_real_settings_through(
    openai_provider: OpenAIProvider, server: FakeLLMServer
) -> None:
    server.push(WIRES["openai"].chat("ok"))
    await openai_provider.achat(
        MESSAGES,
        max_completion_tokens=50,
        seed=7,
        reasoning_effort="low",
        response_format={"type": "json_object"},
        stop=["END"],
        top_p=0.5,
        temperature=0.1,
        tools=[ADD],
        parallel_tool_calls=False,
        tool_choice="add",
        extra_headers={"X-Trace": "t1"},
        extra_body={"store": False},
    )
    request = server.requests[0]
    body = request.json
    assert body["max_completion_tokens"] == 50
    assert "max_tokens" not in body
    assert (body["seed"], body["reasoning_effort"], body["stop"]) == (7, "low", ["END"])
    assert body["response_format"] == {"type": "json_object"}
    assert (body["top_p"], body["temperature"], body["store"]) == (0.5, 0.1, False)
    assert body["parallel_tool_calls"] is False
    assert body["tool_choice"] == {"type": "function", "function": {"name": "add"}}
    assert request.headers["x-trace"] == "t1"


@pytest.mark.parametrize(
    ("model", "field"),
    [
        ("gpt-4o-mini", "max_tokens"),
        ("o3-mini", "max_completion_tokens"),
        ("gpt-5", "max_completion_tokens"),
    ],
)
async def test_openai_max_tokens_goes_under_the_name_the_model_takes(
    openai_provider: OpenAIProvider, server: FakeLLMServer, model: str, field: str
) -> None:
    server.push(WIRES["openai"].chat("ok"))
    await openai_provider.achat(MESSAGES, model=model, max_tokens=64)
    body = server.requests[0].json
    assert body[field] == 64
    assert {"max_tokens", "max_completion_tokens"} - {field} & set(body) == set()


async def test_anthropic_passes_thinking_tools_and_headers(
    anthropic_provider: AnthropicProvider, server: FakeLLMServer
) -> None:
    server.push(WIRES["anthropic"].chat("ok"))
    thinking = {"type": "enabled", "budget_tokens": 2048}
    await anthropic_provider.achat(
        MESSAGES,
        thinking=thinking,
        tools=[ADD],
        parallel_tool_calls=False,
        extra_headers={"anthropic-beta": "x"},
        stop="END",
    )
    request = server.requests[0]
    body = request.json
    assert body["thinking"] == thinking
    assert body["max_tokens"] == 1024 + 2048  # room for the answer beyond the budget
    assert body["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    assert body["tools"] == [
        {"name": "add", "description": "add", "input_schema": ADD["parameters"]}
    ]
    assert body["stop_sequences"] == ["END"]
    assert request.headers["anthropic-beta"] == "x"


async def test_anthropic_refuses_options_its_api_lacks_naming_itself(
    anthropic_provider: AnthropicProvider,
) -> None:
    for option, value in (("seed", 1), ("response_format", {}), ("reasoning_effort", "low")):
        with pytest.raises(UsageError, match=f"anthropic does not take.*{option}"):
            await anthropic_provider.achat(MESSAGES, **{option: value})


async def test_mistral_passes_seed_format_headers_and_extra_body(
    mistral_provider: MistralProvider, server: FakeLLMServer
) -> None:
    server.push(WIRES["mistral"].chat("ok"), WIRES["mistral"].stream(["s"]))
    options = {
        "seed": 3,
        "response_format": {"type": "json_object"},
        "max_completion_tokens": 20,
        "extra_headers": {"X-Trace": "m1"},
        "extra_body": {"safe_prompt": True, "custom": [1]},
    }
    await mistral_provider.achat(MESSAGES, **options)
    await mistral_provider.chat_stream(MESSAGES, **options).acollect()
    for request in server.requests:
        body = request.json
        assert (body["random_seed"], body["max_tokens"]) == (3, 20)
        assert body["response_format"] == {"type": "json_object"}
        assert (body["safe_prompt"], body["custom"]) == (True, [1])
        assert request.headers["x-trace"] == "m1"
    server.reset()
    server.push(WIRES["mistral"].chat("ok"))
    await mistral_provider.achat(MESSAGES)  # extra_body does not leak into later calls
    assert "custom" not in server.requests[0].json


# -- rich input and tool messages (16.7) -----------------------------------------------


async def test_openai_maps_parts_tool_calls_and_tool_results(
    openai_provider: OpenAIProvider, server: FakeLLMServer
) -> None:
    server.push(WIRES["openai"].chat("ok"))
    await openai_provider.achat(RICH)
    sent = server.requests[0].json["messages"]
    assert sent[1]["content"] == [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "https://example.test/cat.png"}},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{IMAGE_B64}"}},
        {
            "type": "file",
            "file": {
                "filename": "document.pdf",
                "file_data": f"data:application/pdf;base64,{PDF_B64}",
            },
        },
    ]
    assert sent[2]["tool_calls"][0] == {
        "id": "c1",
        "type": "function",
        "function": {"name": "add", "arguments": '{"a":1,"b":2}'},
    }
    assert sent[3] == {"role": "tool", "tool_call_id": "c1", "content": "3"}


async def test_anthropic_maps_parts_tool_use_and_merged_tool_results(
    anthropic_provider: AnthropicProvider, server: FakeLLMServer
) -> None:
    server.push(WIRES["anthropic"].chat("ok"))
    await anthropic_provider.achat(RICH)
    sent = server.requests[0].json["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert sent[0]["content"][1] == {
        "type": "image",
        "source": {"type": "url", "url": "https://example.test/cat.png"},
    }
    assert sent[0]["content"][2]["source"] == {
        "type": "base64",
        "media_type": "image/png",
        "data": IMAGE_B64,
    }
    assert sent[0]["content"][3]["type"] == "document"
    assert sent[1]["content"] == [
        {"type": "tool_use", "id": "c1", "name": "add", "input": {"a": 1, "b": 2}},
        {"type": "tool_use", "id": "c2", "name": "add", "input": {"a": 3, "b": 4}},
    ]
    assert sent[2]["content"] == [
        {"type": "tool_result", "tool_use_id": "c1", "content": "3"},
        {"type": "tool_result", "tool_use_id": "c2", "content": "7"},
        {"type": "text", "text": "and now?"},
    ]


async def test_mistral_maps_parts_tool_calls_and_tool_results(
    mistral_provider: MistralProvider, server: FakeLLMServer
) -> None:
    server.push(WIRES["mistral"].chat("ok"))
    await mistral_provider.achat(RICH)
    sent = server.requests[0].json["messages"]
    parts = sent[1]["content"]
    assert parts[1]["type"] == "image_url"
    assert parts[2]["image_url"] == f"data:image/png;base64,{IMAGE_B64}"
    assert parts[3]["type"] == "document_url"
    assert sent[2]["tool_calls"][0]["id"] == "c1"
    assert json.loads(sent[2]["tool_calls"][0]["function"]["arguments"]) == {"a": 1, "b": 2}
    assert (sent[3]["role"], sent[3]["tool_call_id"], sent[3]["name"]) == ("tool", "c1", "add")


async def test_unsupported_parts_raise_usage_error_naming_the_provider(
    openai_provider: OpenAIProvider, server: FakeLLMServer
) -> None:
    doc = {"type": "document", "url": "https://example.test/a.pdf"}
    with pytest.raises(UsageError, match="openai"):
        await openai_provider.achat([{"role": "user", "content": [doc]}])
    bad = [
        [{"role": "user", "content": [{"type": "audio", "url": "https://x.test"}]}],
        [{"role": "user", "content": [{"type": "image", "data": "not base64!"}]}],
        [{"role": "user", "content": [{"type": "image", "data": IMAGE_B64, "media_type": "x"}]}],
        [{"role": "tool", "content": "3"}],
        [{"role": "assistant", "content": None}],
        [
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"id": "c", "name": "f", "arguments": 1}],
            }
        ],
    ]
    for messages in bad:
        with pytest.raises(UsageError):
            await openai_provider.achat(messages)
    assert server.requests == []


# -- Anthropic overload inside a 200 stream (16.8b) -----------------------------------


def _overloaded_stream(after_deltas: int) -> Reply:
    reply: Reply = WIRES["anthropic"].stream(["a", "b"])
    assert reply.events is not None
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    reply.events.insert(3 + after_deltas, f"event: error\ndata: {json.dumps(error)}\n\n".encode())
    return reply


async def test_anthropic_overload_event_before_any_text_is_retried(
    server: FakeLLMServer, fake_time: FakeTime
) -> None:
    provider = AnthropicProvider(
        "k", base_url=server.anthropic_url, retry_policy=fake_time.policy()
    )
    server.push(_overloaded_stream(0), WIRES["anthropic"].stream(["fine"]))
    assert await provider.chat_stream(MESSAGES).acollect() == "fine"
    assert len(server.requests) == 2
    assert fake_time.sleeps == [0.5]
    await provider.aclose()


async def test_anthropic_overload_event_after_text_raises_typed_overload_error(
    server: FakeLLMServer, fake_time: FakeTime
) -> None:
    provider = AnthropicProvider(
        "k", base_url=server.anthropic_url, retry_policy=fake_time.policy()
    )
    server.push(_overloaded_stream(1))
    stream = provider.chat_stream(MESSAGES)
    with pytest.raises(ProviderOverloadedError, match="Overloaded") as info:
        await stream.acollect()
    assert info.value.status_code == 529
    assert stream.text == "a"
    assert len(server.requests) == 1
    await provider.aclose()


async def test_http_529_is_an_overload_and_retried(
    anthropic_provider: AnthropicProvider, server: FakeLLMServer
) -> None:
    server.push(fake_anthropic_error(529, "Overloaded", type_="overloaded_error"))
    with pytest.raises(ProviderOverloadedError):
        await anthropic_provider.achat(MESSAGES)


# -- Mistral on trio (16.8a) -----------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_mistral_stream_cancel_on_trio_does_not_wait_for_the_next_event(
    server: FakeLLMServer, anyio_backend: str
) -> None:
    provider = MistralProvider("k", base_url=server.mistral_url, timeout=10, max_retries=0)
    reply = WIRES["mistral"].stream(["a", "b"])
    assert reply.events is not None
    reply.events.insert(2, 3.0)  # the server stalls 3 s after the first delta
    server.push(reply)
    seen = []
    start = anyio.current_time()
    with anyio.move_on_after(0.5):
        async for delta in provider.chat_stream(MESSAGES):
            seen.append(delta)
    assert seen == ["a"]
    assert anyio.current_time() - start < 1.5
    await provider.aclose()


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_mistral_on_trio_uses_its_own_thread_limiter(
    server: FakeLLMServer, anyio_backend: str
) -> None:
    provider = MistralProvider("k", base_url=server.mistral_url, thread_limit=3, max_retries=0)
    default = anyio.to_thread.current_default_thread_limiter()
    saved = default.total_tokens
    release = threading.Event()
    try:
        default.total_tokens = 1
        async with anyio.create_task_group() as tg:
            # a sync tool holds the only default worker thread
            tg.start_soon(
                functools.partial(anyio.to_thread.run_sync, release.wait, abandon_on_cancel=True)
            )
            await anyio.sleep(0.05)
            server.push(WIRES["mistral"].chat("still served"))
            with anyio.fail_after(5):
                assert await provider.achat(MESSAGES) == "still served"
            assert provider._limiters.get().total_tokens == 3
            release.set()
    finally:
        release.set()
        default.total_tokens = saved
        await provider.aclose()


def test_mistral_thread_limit_must_be_positive() -> None:
    with pytest.raises(UsageError, match="thread_limit"):
        MistralProvider("k", thread_limit=0)
