"""LLMAgent: re-asking on invalid output, truncated answers, progress events, native
tool history in memory, content parts, ids converge assigns."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from llm_fake_server import FakeLLMServer
from llm_helpers import Wire

from converge.core import (
    Identity,
    Message,
    SendMessage,
    ShortTermMemory,
    Task,
    ToolRegistry,
    UpdateTask,
)
from converge.core.events import (
    CallFailed,
    CallFinished,
    CallStarted,
    DecisionsMade,
    EventEmitter,
    ProgressEvent,
    TextDelta,
)
from converge.errors import (
    ContentFilteredError,
    DecisionParseError,
    ProviderAuthError,
    ResponseIncompleteError,
    ResponseRefusedError,
    ResponseTruncatedError,
    UsageError,
)
from converge.extensions.llm import ChatResult, LLMAgent, ToolCall, Usage, arun_react
from converge.extensions.llm.testing import FunctionProvider, ScriptedProvider

pytestmark = pytest.mark.anyio

IDENTITY = Identity()
DONE = json.dumps([{"type": "UpdateTask", "task_id": "t1", "state": "completed", "result": 1}])
SEND = json.dumps(
    [{"type": "SendMessage", "message": {"recipient": "bob", "payload": {"text": "hi"}}}]
)


def tasks() -> list[Task]:
    return [Task(objective="answer", id="t1")]


@pytest.fixture
def registry() -> ToolRegistry:
    registry = ToolRegistry()

    @registry.tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    return registry


def recorder(events: EventEmitter, *types: type[ProgressEvent]) -> list[ProgressEvent]:
    seen: list[ProgressEvent] = []
    events.subscribe(seen.append, types=types or None)
    return seen


# -- re-asking -------------------------------------------------------------------------


async def test_invalid_output_is_sent_back_with_the_reason_and_the_retry_counts() -> None:
    errors: list[Exception | str] = []
    provider = ScriptedProvider(['[{"type": "Launch"}]', DONE])
    agent = LLMAgent(IDENTITY, provider, on_decide_error=errors.append)
    assert await agent.adecide([], tasks()) == [UpdateTask("t1", "completed", result=1)]
    (error,) = errors
    assert isinstance(error, DecisionParseError)
    first, second = provider.calls
    assert second.messages[: len(first.messages)] == first.messages
    echo, reason = second.messages[len(first.messages) :]
    assert echo == {"role": "assistant", "content": '[{"type": "Launch"}]'}
    assert reason["role"] == "user"
    assert "unknown decision type 'Launch'" in reason["content"]
    assert "JSON array" in reason["content"]


async def test_structured_reask_answers_the_native_tool_call(registry: ToolRegistry) -> None:
    errors: list[Exception | str] = []
    bad = json.dumps({"decisions": [{"type": "InvokeTool", "tool_name": "rm", "params": {}}]})
    provider = ScriptedProvider([bad, json.dumps({"decisions": json.loads(DONE)})])
    agent = LLMAgent(
        IDENTITY,
        provider,
        tool_registry=registry,
        use_structured_output=True,
        on_decide_error=errors.append,
    )
    assert len(await agent.adecide([], tasks())) == 1
    call, result = provider.calls[1].messages[-2:]
    (tool_call,) = call["tool_calls"]
    assert tool_call["name"] == "emit_decisions"
    assert tool_call["arguments"] == json.loads(bad)
    assert result["role"] == "tool"
    assert result["tool_call_id"] == tool_call["id"]
    assert "no tools are registered" not in result["content"]
    assert "rm" in result["content"]
    assert len(errors) == 1


@pytest.mark.parametrize("max_reasks", [0, 1, 3])
async def test_max_reasks_bounds_the_calls_and_each_failure_is_reported(max_reasks: int) -> None:
    errors: list[Exception | str] = []
    provider = ScriptedProvider(["nope"] * (max_reasks + 1))
    agent = LLMAgent(IDENTITY, provider, on_decide_error=errors.append, max_reasks=max_reasks)
    assert await agent.adecide([], tasks()) == []
    assert len(provider.calls) == max_reasks + 1
    assert len(errors) == max_reasks + 1
    assert provider.remaining == 0


async def test_usage_of_every_attempt_is_counted() -> None:
    provider = ScriptedProvider([("nope", Usage(10, 2)), (DONE, Usage(12, 3))])
    agent = LLMAgent(IDENTITY, provider)
    await agent.adecide([], tasks())
    assert agent.last_usage == Usage(22, 5)
    assert agent.total_usage == Usage(22, 5)


@pytest.mark.parametrize("value", [-1, 1.5, True, "1"])
def test_max_reasks_must_be_a_non_negative_integer(value: Any) -> None:
    with pytest.raises(UsageError, match="max_reasks"):
        LLMAgent(IDENTITY, ScriptedProvider([]), max_reasks=value)


def test_events_must_be_an_emitter() -> None:
    with pytest.raises(UsageError, match="events"):
        LLMAgent(IDENTITY, ScriptedProvider([]), events=[])  # type: ignore[arg-type]


# -- truncated, filtered, refused ------------------------------------------------------


@pytest.mark.parametrize(
    ("stop", "error"),
    [
        ("length", ResponseTruncatedError),
        ("content_filter", ContentFilteredError),
        ("refusal", ResponseRefusedError),
    ],
)
async def test_cut_answers_are_reported_as_such_and_not_reasked(
    stop: str, error: type[Exception]
) -> None:
    errors: list[Exception | str] = []
    cut = ChatResult('[{"type": "UpdateTask", "task_', Usage(900, 1024), stop_reason=stop)
    provider = ScriptedProvider([cut])
    agent = LLMAgent(IDENTITY, provider, on_decide_error=errors.append)
    assert await agent.adecide([], tasks()) == []
    (problem,) = errors
    assert isinstance(problem, error)
    assert "unknown decision type" not in str(problem)
    assert agent.last_usage == Usage(900, 1024)
    assert len(provider.calls) == 1


async def test_truncated_structured_output_says_so(registry: ToolRegistry) -> None:
    errors: list[Exception | str] = []
    cut = ChatResult(
        "",
        Usage(50, 1024),
        stop_reason="length",
        tool_calls=(ToolCall("c1", "emit_decisions", {}, raw_arguments='{"decisions": [{"ty'),),
    )
    agent = LLMAgent(
        IDENTITY,
        ScriptedProvider([cut]),
        tool_registry=registry,
        use_structured_output=True,
        on_decide_error=errors.append,
    )
    assert await agent.adecide([], tasks()) == []
    (problem,) = errors
    assert isinstance(problem, ResponseTruncatedError)
    assert "token limit" in str(problem)


async def test_a_custom_provider_returning_a_cut_result_is_reported_too() -> None:
    class Custom:
        async def acomplete(self, messages: Any, **kwargs: Any) -> ChatResult:
            return ChatResult("[", stop_reason="length")

    errors: list[Exception | str] = []
    agent = LLMAgent(IDENTITY, Custom(), on_decide_error=errors.append)
    assert await agent.adecide([], []) == []
    assert isinstance(errors[0], ResponseTruncatedError)
    assert "max_tokens" in str(errors[0])


# -- progress events -------------------------------------------------------------------


async def test_a_turn_emits_started_finished_and_decisions() -> None:
    events = EventEmitter()
    seen = recorder(events, CallStarted, CallFinished, CallFailed, DecisionsMade)
    provider = ScriptedProvider([("nope", Usage(5, 1)), (DONE, Usage(6, 2))])
    agent = LLMAgent(IDENTITY, provider, events=events)
    decisions = await agent.adecide([], tasks())
    kinds = [type(e).__name__ for e in seen]
    assert kinds == [
        "CallStarted",
        "CallFinished",
        "CallFailed",
        "CallStarted",
        "CallFinished",
        "DecisionsMade",
    ]
    started, finished, failed, again, last, made = seen
    assert isinstance(started, CallStarted)
    assert started.provider == "ScriptedProvider"
    assert started.model == "test"
    assert started.source == agent.id
    assert isinstance(again, CallStarted)
    assert again.attempt == 2
    assert isinstance(finished, CallFinished)
    assert finished.call_id == started.call_id
    assert finished.usage["input_tokens"] == 5
    assert finished.stop_reason == "stop"
    assert finished.model == "test"
    assert isinstance(failed, CallFailed)
    assert failed.error_type == "DecisionParseError"
    assert failed.final is False
    assert isinstance(made, DecisionsMade)
    assert list(made.decisions) == decisions
    assert made.call_id == again.call_id
    assert isinstance(last, CallFinished)


async def test_provider_failure_is_a_final_call_failed_event() -> None:
    events = EventEmitter()
    seen = recorder(events, CallFailed)
    failure = ProviderAuthError("bad key", provider="test", status_code=401)
    agent = LLMAgent(IDENTITY, ScriptedProvider([failure]), events=events)
    with pytest.raises(ProviderAuthError):
        await agent.adecide([], [])
    (failed,) = seen
    assert isinstance(failed, CallFailed)
    assert failed.final
    assert failed.error_type == "ProviderAuthError"


async def test_text_deltas_stream_only_when_someone_listens() -> None:
    words = '[{"type": "UpdateTask", "task_id": "t1", "state": "running"}]'
    provider = ScriptedProvider([words, words])
    agent = LLMAgent(IDENTITY, provider)
    started = recorder(agent.events, CallStarted)
    await agent.adecide([], tasks())  # nobody wants deltas: acomplete
    deltas = recorder(agent.events, TextDelta)
    (decision,) = await agent.adecide([], tasks())
    assert decision == UpdateTask("t1", "running")
    assert len(deltas) > 3
    assert "".join(d.text for d in deltas if isinstance(d, TextDelta)) == words
    assert {d.call_id for d in deltas if isinstance(d, TextDelta)} == {
        started[-1].call_id  # type: ignore[attr-defined]
    }


async def test_a_streamed_truncated_answer_is_reported_as_truncated() -> None:
    errors: list[Exception | str] = []
    agent = LLMAgent(
        IDENTITY,
        FunctionProvider(lambda messages, **kw: '[{"type": "Upd', stop_reason="length"),
        on_decide_error=errors.append,
    )
    recorder(agent.events, TextDelta)
    assert await agent.adecide([], tasks()) == []
    (problem,) = errors
    assert isinstance(problem, ResponseTruncatedError)


@pytest.mark.parametrize("streamed", [True, False])
async def test_an_answer_cut_short_is_a_failed_call_not_decisions(streamed: bool) -> None:
    # Half a decision list that parses must not be acted on: the call fails, is
    # reported, and raises, so the runner can take the task again. A custom provider
    # reports the cut as a result (or a stream's stop reason), not as an error.
    half = '[{"type": "UpdateTask", "task_id": "t1", "state": "running"}]'

    class CutStream:
        stop_reason = "incomplete"

        def __aiter__(self) -> AsyncIterator[str]:
            return self._deltas()

        async def _deltas(self) -> AsyncIterator[str]:
            yield half

    class Custom:
        async def acomplete(self, messages: Any, **kwargs: Any) -> ChatResult:
            return ChatResult(half, stop_reason="incomplete")

        def chat_stream(self, messages: Any, **kwargs: Any) -> CutStream:
            return CutStream()

    errors: list[Exception | str] = []
    agent = LLMAgent(IDENTITY, Custom(), on_decide_error=errors.append)
    if streamed:
        recorder(agent.events, TextDelta)
    with pytest.raises(ResponseIncompleteError):
        await agent.adecide([], tasks())
    (problem,) = errors
    assert isinstance(problem, ResponseIncompleteError)


async def test_events_stream_to_a_ui_task() -> None:
    agent = LLMAgent(IDENTITY, ScriptedProvider([DONE]))
    with agent.events.open_stream(max_buffer=64) as stream:
        await agent.adecide([], tasks())
        stream.close()
        names = [type(e).__name__ async for e in stream]
    assert names[0] == "CallStarted"
    assert "TextDelta" in names
    assert names[-1] == "DecisionsMade"


# -- memory and history ----------------------------------------------------------------


async def test_memory_keeps_no_message_ids_or_timestamps() -> None:
    memory = ShortTermMemory()
    agent = LLMAgent(IDENTITY, ScriptedProvider([SEND]), memory=memory)
    (send,) = await agent.adecide([], tasks())
    assert isinstance(send, SendMessage)
    remembered = memory.get_messages()[-1]["content"]
    assert send.message.id not in remembered
    assert "timestamp" not in remembered
    assert json.loads(remembered) == [
        {
            "type": "SendMessage",
            "message": {
                "recipient": "bob",
                "topics": [],
                "payload": {"text": "hi"},
                "task_id": None,
            },
        }
    ]


async def test_a_model_repeating_an_id_from_its_history_gets_a_fresh_one() -> None:
    first = Message(sender=IDENTITY.fingerprint, recipient="bob", payload={"n": 1})
    echo = json.dumps([{"type": "SendMessage", "message": {**first.to_dict(), "signature": None}}])
    (send,) = await LLMAgent(IDENTITY, ScriptedProvider([echo])).adecide([], [])
    assert isinstance(send, SendMessage)
    assert send.message.id != first.id
    assert send.message.timestamp >= first.timestamp


async def test_react_with_memory_keeps_native_tool_history(registry: ToolRegistry) -> None:
    memory = ShortTermMemory()
    call = json.dumps([{"type": "InvokeTool", "tool_name": "add", "params": {"a": 1, "b": 2}}])
    provider = ScriptedProvider([call, DONE, "[]"])
    agent = LLMAgent(IDENTITY, provider, tool_registry=registry, memory=memory)
    result = await arun_react(agent, [], tasks())
    call_id = result.observations[0]["call_id"]
    roles = [(m["role"], m.get("tool_call_id")) for m in memory.get_messages()]
    assert roles == [("user", None), ("assistant", None), ("tool", call_id), ("assistant", None)]
    assert memory.get_messages()[1]["tool_calls"][0]["id"] == call_id
    # Step 2's prompt is exactly memory's history: the turn is not repeated.
    step2 = provider.calls[1].messages
    assert [m["role"] for m in step2[1:]] == ["user", "assistant", "tool"]
    assert step2[-1]["content"] == "3"
    # The next turn sends the whole history natively.
    await agent.adecide([], [])
    history = provider.calls[2].messages[1:-1]
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "assistant"]
    assert history[1]["content"] is None
    assert history[1]["tool_calls"][0]["id"] == call_id


# -- content parts ---------------------------------------------------------------------


async def test_image_and_document_parts_in_a_payload_go_as_native_parts() -> None:
    memory = ShortTermMemory()
    provider = ScriptedProvider(["[]"])
    image = {"type": "image", "url": "https://example.test/cat.png"}
    pdf = {"type": "document", "data": "JVBERi0=", "media_type": "application/pdf"}
    inbound = Message(
        sender="bob",
        recipient=IDENTITY.fingerprint,
        payload={
            "question": "what is this?",
            "parts": [{"type": "text", "text": "see"}, image, pdf],
        },
    )
    await LLMAgent(IDENTITY, provider, memory=memory).adecide([inbound], [])
    content = provider.calls[0].messages[-1]["content"]
    assert isinstance(content, list)
    text, *attachments = content
    assert attachments == [image, pdf]
    turn = json.loads(text["text"])
    assert turn["messages"][0]["payload"]["parts"] == [
        {"type": "text", "text": "see"},
        {"type": "image", "attachment": 1},
        {"type": "document", "attachment": 2},
    ]
    assert turn["messages"][0]["id"] == inbound.id
    remembered = memory.get_messages()[0]["content"]
    assert isinstance(remembered, str)
    assert "JVBERi0=" not in remembered


async def test_a_payload_parts_key_of_another_shape_stays_plain_json() -> None:
    provider = ScriptedProvider(["[]"])
    inbound = Message(sender="bob", payload={"parts": ["wheel", "axle"]})
    await LLMAgent(IDENTITY, provider).adecide([inbound], [])
    content = provider.calls[0].messages[-1]["content"]
    assert isinstance(content, str)
    assert json.loads(content)["messages"][0]["payload"] == {"parts": ["wheel", "axle"]}


# -- on the real SDKs ------------------------------------------------------------------


@pytest.fixture
async def real_provider(wire: Wire, server: FakeLLMServer) -> AsyncIterator[Any]:
    provider = wire.provider(server, max_retries=0)
    yield provider
    await provider.aclose()


async def test_reask_on_a_real_sdk(real_provider: Any, wire: Wire, server: FakeLLMServer) -> None:
    server.push(wire.chat("I would rather chat."), wire.chat(DONE))
    errors: list[Exception | str] = []
    agent = LLMAgent(IDENTITY, real_provider, on_decide_error=errors.append)
    assert await agent.adecide([], tasks()) == [UpdateTask("t1", "completed", result=1)]
    assert len(errors) == 1
    body = json.dumps(server.requests[1].json)
    assert "I would rather chat." in body
    assert "rejected" in body


async def test_text_deltas_from_a_real_sdk_stream(
    real_provider: Any, wire: Wire, server: FakeLLMServer
) -> None:
    pieces = ['[{"type": "UpdateTask", ', '"task_id": "t1", ', '"state": "running"}]']
    server.push(wire.stream(pieces))
    agent = LLMAgent(IDENTITY, real_provider)
    deltas = recorder(agent.events, TextDelta)
    finished = recorder(agent.events, CallFinished)
    assert await agent.adecide([], tasks()) == [UpdateTask("t1", "running")]
    assert [d.text for d in deltas if isinstance(d, TextDelta)] == pieces
    assert server.requests[0].json.get("stream") is True
    (done,) = finished
    assert isinstance(done, CallFinished)
    assert done.usage["input_tokens"] == wire.usage.input_tokens


def _cut(reply: Any, wire: Wire) -> Any:
    """The same reply, stopped at the output token limit."""
    body = json.loads(reply.body)
    if wire.name == "anthropic":
        body["stop_reason"] = "max_tokens"
    else:
        body["choices"][0]["finish_reason"] = "length"
    reply.body = json.dumps(body).encode()
    return reply


async def test_truncated_structured_output_on_a_real_sdk_is_reported_as_truncated(
    real_provider: Any, wire: Wire, server: FakeLLMServer, registry: ToolRegistry
) -> None:
    partial = "{}" if wire.name == "anthropic" else '{"decisions": [{"type": "Upd'
    server.push(_cut(wire.tool("emit_decisions", partial), wire))
    errors: list[Exception | str] = []
    agent = LLMAgent(
        IDENTITY,
        real_provider,
        tool_registry=registry,
        use_structured_output=True,
        on_decide_error=errors.append,
    )
    assert await agent.adecide([], tasks()) == []
    (problem,) = errors
    assert isinstance(problem, ResponseTruncatedError)
    assert "token limit" in str(problem)
    assert "unknown decision type" not in str(problem)
    assert len(server.requests) == 1  # not re-asked
    assert agent.last_usage is not None
    assert agent.last_usage.output_tokens is not None


async def test_react_history_reaches_each_api_as_native_tool_messages(
    real_provider: Any, wire: Wire, server: FakeLLMServer, registry: ToolRegistry
) -> None:
    call = json.dumps([{"type": "InvokeTool", "tool_name": "add", "params": {"a": 2, "b": 3}}])
    server.push(wire.chat(call), wire.chat(DONE))
    agent = LLMAgent(IDENTITY, real_provider, tool_registry=registry)
    result = await arun_react(agent, [], tasks())
    call_id = result.observations[0]["call_id"]
    messages = server.requests[1].json["messages"]
    if wire.name == "anthropic":
        use = [b for m in messages if isinstance(m["content"], list) for b in m["content"]]
        (tool_use,) = [b for b in use if b["type"] == "tool_use"]
        (tool_result,) = [b for b in use if b["type"] == "tool_result"]
        assert tool_use["id"] == call_id
        assert tool_use["input"] == {"a": 2, "b": 3}
        assert tool_result["tool_use_id"] == call_id
        assert "5" in json.dumps(tool_result["content"])
    else:
        (assistant,) = [m for m in messages if m.get("tool_calls")]
        assert assistant["tool_calls"][0]["id"] == call_id
        assert json.loads(assistant["tool_calls"][0]["function"]["arguments"]) == {"a": 2, "b": 3}
        (tool,) = [m for m in messages if m["role"] == "tool"]
        assert tool["tool_call_id"] == call_id
        assert tool["content"] == "5"
