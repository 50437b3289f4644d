"""LLMAgent: prompt assembly, provider calling, untrusted output, memory, sync surface."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from llm_fake_server import FakeLLMServer
from llm_helpers import WIRES, Wire

from converge.core import (
    Agent,
    Identity,
    InvokeTool,
    Message,
    SendMessage,
    ShortTermMemory,
    Task,
    TaskState,
    ToolRegistry,
    UpdateTask,
)
from converge.errors import (
    DecisionParseError,
    ProviderAuthError,
    SyncInEventLoopError,
    UsageError,
)
from converge.extensions.llm import (
    ChatResult,
    LLMAgent,
    ToolCall,
    Usage,
    arun_react,
    decisions_tool,
)
from converge.extensions.llm.testing import FunctionProvider, ScriptedProvider
from nesting import deep_list

pytestmark = pytest.mark.anyio

IDENTITY = Identity()
DONE = json.dumps([{"type": "UpdateTask", "task_id": "t1", "state": "completed", "result": 1}])


@pytest.fixture
def registry() -> ToolRegistry:
    registry = ToolRegistry()

    @registry.tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    return registry


def inbox() -> list[Message]:
    return [Message(sender="bob", recipient=IDENTITY.fingerprint, payload={"text": "1+2?"})]


def tasks() -> list[Task]:
    return [Task(objective="answer bob", id="t1")]


# -- construction ----------------------------------------------------------------------


def test_llm_agent_is_an_agent_named_after_its_identity() -> None:
    agent = LLMAgent(IDENTITY, ScriptedProvider([]))
    assert isinstance(agent, Agent)
    assert agent.id == IDENTITY.fingerprint
    assert agent.use_structured_output is False


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((object(),), {}),
        ((ScriptedProvider([]), 5), {}),
        ((ScriptedProvider([]), None, "not a registry"), {}),
        ((ScriptedProvider([]),), {"use_structured_output": "yes"}),
        ((ScriptedProvider([]),), {"on_decide_error": "print"}),
        ((ScriptedProvider([]),), {"memory": []}),
        ((ScriptedProvider([]),), {"few_shot_examples": [("only one",)]}),
        ((ScriptedProvider([]),), {"few_shot_examples": [("a", 1)]}),
        ((ScriptedProvider([]),), {"few_shot_examples": 5}),
        ((ScriptedProvider([]),), {"max_output_chars": 0}),
    ],
)
def test_invalid_constructor_arguments_raise_usage_error(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    with pytest.raises(UsageError):
        LLMAgent(IDENTITY, *args, **kwargs)


def test_identity_must_be_an_identity() -> None:
    with pytest.raises(UsageError):
        LLMAgent("me", ScriptedProvider([]))  # type: ignore[arg-type]


async def test_ainvoke_tool_runs_an_invoke_tool_and_refuses_anything_else(
    registry: ToolRegistry,
) -> None:
    agent = LLMAgent(IDENTITY, ScriptedProvider([]), tool_registry=registry)
    assert await agent.ainvoke_tool(InvokeTool("add", {"a": 1, "b": 2})) == 3
    with pytest.raises(UsageError, match="InvokeTool"):
        await agent.ainvoke_tool({"tool_name": "add"})  # type: ignore[arg-type]  # AttributeError


# -- deciding --------------------------------------------------------------------------


async def test_adecide_returns_the_models_decisions() -> None:
    reply = json.dumps(
        [
            {"type": "SendMessage", "message": {"recipient": "bob", "payload": {"text": "3"}}},
            {"type": "UpdateTask", "task_id": "t1", "state": "completed", "result": 3},
        ]
    )
    agent = LLMAgent(IDENTITY, ScriptedProvider([reply]))
    send, update = await agent.adecide(inbox(), tasks())
    assert isinstance(send, SendMessage)
    assert send.message.sender == agent.id
    assert send.message.recipient == "bob"
    assert update == UpdateTask("t1", TaskState.COMPLETED, result=3)


async def test_prompt_is_system_then_few_shots_then_memory_then_this_turn() -> None:
    memory = ShortTermMemory()
    memory.append("user", "earlier question")
    memory.append("assistant", "[]")
    provider = ScriptedProvider([DONE])
    agent = LLMAgent(
        IDENTITY,
        provider,
        system_prompt="You are terse.",
        memory=memory,
        few_shot_examples=[("example in", "[]"), ("example 2", DONE)],
    )
    await agent.adecide(inbox(), tasks())
    sent = provider.calls[0].messages
    assert [m["role"] for m in sent] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]
    assert sent[0]["content"].startswith("You are terse.")
    assert agent.id in sent[0]["content"]
    assert [m["content"] for m in sent[1:5]] == ["example in", "[]", "example 2", DONE]
    assert [m["content"] for m in sent[5:7]] == ["earlier question", "[]"]
    turn = json.loads(sent[7]["content"])
    assert turn["messages"][0]["payload"] == {"text": "1+2?"}
    assert turn["tasks"][0]["id"] == "t1"


async def test_memory_records_the_turn_and_the_parsed_decisions() -> None:
    memory = ShortTermMemory()
    agent = LLMAgent(IDENTITY, ScriptedProvider(["```json\n" + DONE + "\n```"]), memory=memory)
    decisions = await agent.adecide(inbox(), tasks())
    user, assistant = memory.get_messages()
    assert user["role"] == "user"
    assert json.loads(user["content"])["tasks"][0]["id"] == "t1"
    assert assistant["role"] == "assistant"
    assert json.loads(assistant["content"]) == [d.to_dict() for d in decisions]


async def test_memory_tool_turns_reach_the_provider_as_user_text() -> None:
    memory = ShortTermMemory()
    memory.append("user", "q")
    memory.append("tool", "42", tool_call_id="c1")
    provider = ScriptedProvider(["[]"])
    await LLMAgent(IDENTITY, provider, memory=memory).adecide([], [])
    assert provider.calls[0].messages[2] == {"role": "user", "content": "Tool result: 42"}


async def test_fallback_path_lists_tool_schemas_in_the_system_prompt(
    registry: ToolRegistry,
) -> None:
    provider = ScriptedProvider(
        ['[{"type": "InvokeTool", "tool_name": "add", "params": {"a": 1, "b": 2}}]']
    )
    agent = LLMAgent(IDENTITY, provider, tool_registry=registry)
    (call,) = await agent.adecide(inbox(), tasks())
    assert isinstance(call, InvokeTool)
    assert dict(call.params) == {"a": 1, "b": 2}
    assert (
        json.dumps(registry.schemas(), ensure_ascii=False)
        in provider.calls[0].messages[0]["content"]
    )
    assert provider.calls[0].kwargs == {}


async def test_structured_path_sends_the_decisions_tool(registry: ToolRegistry) -> None:
    provider = ScriptedProvider([json.dumps({"decisions": json.loads(DONE)})])
    agent = LLMAgent(IDENTITY, provider, tool_registry=registry, use_structured_output=True)
    assert len(await agent.adecide(inbox(), tasks())) == 1
    kwargs = provider.calls[0].kwargs
    assert kwargs["use_structured_output"] is True
    assert kwargs["emit_decisions_tool"] == decisions_tool(registry)


async def test_tool_observations_are_sent_as_native_tool_messages() -> None:
    provider = ScriptedProvider(["[]"])
    observation = {"tool_name": "add", "params": {"a": 1, "b": 2}, "call_id": "c1", "result": 3}
    await LLMAgent(IDENTITY, provider).adecide(inbox(), tasks(), tool_observations=[observation])
    *_, turn, call, result = provider.calls[0].messages
    assert "tool_observations" not in json.loads(turn["content"])
    assert call["tool_calls"] == [{"id": "c1", "name": "add", "arguments": {"a": 1, "b": 2}}]
    assert result == {"role": "tool", "tool_call_id": "c1", "name": "add", "content": "3"}


async def test_usage_of_each_call_is_kept_and_totalled() -> None:
    provider = ScriptedProvider([("[]", Usage(10, 2)), ("[]", Usage(5, 1))])
    agent = LLMAgent(IDENTITY, provider)
    await agent.adecide([], [])
    assert agent.last_usage == Usage(10, 2)
    await agent.adecide([], [])
    assert agent.last_usage == Usage(5, 1)
    assert agent.total_usage == Usage(15, 3)


# -- untrusted output ------------------------------------------------------------------


@pytest.mark.parametrize(
    "output",
    [
        "I'd rather not.",
        '[{"type": "SendMessage", "message": "hi"}]',
        '[{"type": "InvokeTool", "tool_name": "rm_rf", "params": {}}]',
        '[{"type": "InvokeTool", "tool_name": "add", "params": {"a": "one", "b": 2}}]',
        '[{"type": "SendMessage", "message": {"sender": "the-boss", "payload": {}}}]',
        json.dumps([json.loads(DONE)[0]] * 1000),
        "[" + " " * 200_000 + "]",
    ],
    ids=[
        "prose",
        "wrong-type",
        "unknown-tool",
        "bad-tool-args",
        "spoofed-sender",
        "too-many",
        "huge",
    ],
)
async def test_untrusted_output_yields_no_decisions_and_reports_the_error(
    output: str, registry: ToolRegistry
) -> None:
    errors: list[Exception | str] = []
    memory = ShortTermMemory()
    agent = LLMAgent(
        IDENTITY,
        ScriptedProvider([output, output]),
        tool_registry=registry,
        on_decide_error=errors.append,
        memory=memory,
    )
    assert await agent.adecide(inbox(), tasks()) == []
    assert len(errors) == 2  # the answer, then the re-asked one
    assert all(isinstance(e, DecisionParseError) for e in errors)
    assert memory.get_messages()[-1] == {"role": "assistant", "content": "[]"}


async def test_non_text_reply_from_a_custom_provider_is_reported_not_raised() -> None:
    class Weird:
        async def achat(self, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
            return {"decisions": []}

    errors: list[Exception | str] = []
    agent = LLMAgent(IDENTITY, Weird(), on_decide_error=errors.append)
    assert await agent.adecide([], []) == []
    assert isinstance(errors[0], DecisionParseError)


async def test_a_failing_error_callback_does_not_escape(caplog: pytest.LogCaptureFixture) -> None:
    def explode(problem: Exception | str) -> None:
        raise RuntimeError("callback bug")

    agent = LLMAgent(
        IDENTITY, ScriptedProvider(["nonsense"]), on_decide_error=explode, max_reasks=0
    )
    assert await agent.adecide([], []) == []
    assert "on_decide_error raised" in caplog.text


async def test_provider_errors_are_reported_then_raised() -> None:
    failure = ProviderAuthError("bad key", provider="test", status_code=401)
    errors: list[Exception | str] = []
    agent = LLMAgent(IDENTITY, ScriptedProvider([failure]), on_decide_error=errors.append)
    with pytest.raises(ProviderAuthError):
        await agent.adecide([], [])
    assert errors == [failure]


@pytest.mark.parametrize(
    ("messages", "tasks_", "observations"),
    [("hi", [], None), ([], ["task"], None), ([], [], "obs"), ([], [], [1])],
)
async def test_bad_adecide_arguments_raise_usage_error(
    messages: Any, tasks_: Any, observations: Any
) -> None:
    provider = ScriptedProvider(["[]"])
    with pytest.raises(UsageError):
        await LLMAgent(IDENTITY, provider).adecide(messages, tasks_, observations)
    assert provider.calls == []


DEEP = deep_list()


@pytest.mark.parametrize(
    "field",
    [
        {"params": 5},
        {"params": "xy"},
        {"call_id": []},
        {"call_id": 7},
        {"tool_name": DEEP},
        {"tool_name": ""},
        {"step": "one"},
        {"step": DEEP},
    ],
    ids=[
        "params-int",
        "params-str",
        "call-id-list",
        "call-id-int",
        "name-deep",
        "name-empty",
        "step-str",
        "step-deep",
    ],
)
async def test_malformed_tool_observations_raise_usage_error(field: dict[str, Any]) -> None:
    observation = {"tool_name": "t", "params": {}, "call_id": "c", "result": 1, **field}
    provider = ScriptedProvider(["[]"])
    agent = LLMAgent(IDENTITY, provider)
    with pytest.raises(UsageError, match=rf"tool_observations\[0\]\['{next(iter(field))}'\]"):
        agent.build_prompt([], [], [observation])
    with pytest.raises(UsageError):
        await agent.adecide([], [], [observation])
    assert provider.calls == []


class _BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [
        ("result", DEEP, "[[[[[[[[[...]]]]]]]]]"),
        ("result", {"a": DEEP}, "{'a': [[[[[[[[...]]]]]]]]}"),
        ("result", _BadRepr(), "<_BadRepr instance at"),
        ("result", "half a pair: \ud800", "half a pair: \\ud800"),
        ("error", DEEP, "Error: [[[[[[[[[...]]]]]]]]]"),
    ],
    ids=["deep", "deep-inside", "raising-repr", "lone-surrogate", "deep-error"],
)
async def test_tool_results_no_json_or_repr_can_show_are_sent_as_placeholders(
    key: str, value: Any, shown: str
) -> None:
    # Tools return arbitrary data: the observation still reaches the model.
    provider = ScriptedProvider(["[]"])
    observation = {"tool_name": "t", "params": {}, "call_id": "c", key: value}
    assert await LLMAgent(IDENTITY, provider).adecide([], [], [observation]) == []
    result = provider.calls[0].messages[-1]
    assert result["role"] == "tool"
    assert shown in result["content"]


async def test_a_react_tool_returning_deeply_nested_data_does_not_break_the_loop() -> None:
    registry = ToolRegistry()

    @registry.tool
    def nest() -> list[Any]:
        """Return something very deep."""
        return DEEP

    call = '[{"type": "InvokeTool", "tool_name": "nest", "params": {}}]'
    provider = ScriptedProvider([call, "[]"])
    agent = LLMAgent(IDENTITY, provider, tool_registry=registry)
    result = await arun_react(agent, [], [])
    assert result.steps == 2
    assert "[[[[[[[[...]]]]]]]]" in provider.calls[1].messages[-1]["content"]


async def test_memory_turns_no_provider_could_take_are_left_out() -> None:
    memory = ShortTermMemory()
    memory.append("tool", "orphan", tool_call_id=[])
    memory.append("assistant", "", tool_calls=[{"id": [], "name": "t", "arguments": {}}])
    memory.append("assistant", "", tool_calls=[{"id": "c2", "name": "t", "arguments": 5}])
    memory.append("assistant", "", tool_calls=[{"id": "c1", "name": "t", "arguments": {}}])
    memory.append("tool", "42", tool_call_id="c1", name=DEEP)
    provider = ScriptedProvider(["[]"])
    agent = LLMAgent(IDENTITY, provider, memory=memory)
    history = agent.build_prompt([], [])[1:-1]
    assert history == [
        {"role": "user", "content": "Tool result: orphan"},
        {"role": "assistant", "content": ""},
        {"role": "assistant", "content": ""},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "name": "t", "arguments": {}}],
        },
        {"role": "tool", "tool_call_id": "c1", "name": None, "content": "42"},
    ]
    assert await agent.adecide([], []) == []  # and the provider takes them


@pytest.mark.parametrize(
    "arguments",
    [{"decisions": {(1, 2): 1}}, {"decisions": DEEP}, {"decisions": [_BadRepr()]}],
    ids=["tuple-keys", "deep", "raising-repr"],
)
async def test_structured_tool_arguments_no_json_can_hold_are_a_decision_parse_error(
    arguments: dict[str, Any],
) -> None:
    def reply(call_id: str) -> ChatResult:
        call = ToolCall(call_id, "emit_decisions", arguments)
        return ChatResult("", tool_calls=(call,), stop_reason="tool_calls")

    errors: list[Exception | str] = []
    provider = ScriptedProvider([reply("i1"), reply("i2")])
    agent = LLMAgent(IDENTITY, provider, use_structured_output=True, on_decide_error=errors.append)
    assert await agent.adecide([], []) == []
    assert [type(e) for e in errors] == [DecisionParseError, DecisionParseError]
    call, answer = provider.calls[1].messages[-2:]  # re-asked as that call's tool result
    assert call["tool_calls"][0]["id"] == "i1"
    assert answer["role"] == "tool"
    assert "not JSON data" in answer["content"]


async def test_a_deeply_nested_non_text_reply_is_reported_and_re_asked() -> None:
    class Deep:
        async def achat(self, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
            seen.append(messages)
            return DEEP

    seen: list[list[dict[str, Any]]] = []
    errors: list[Exception | str] = []
    agent = LLMAgent(IDENTITY, Deep(), on_decide_error=errors.append)
    assert await agent.adecide([], []) == []
    assert [type(e) for e in errors] == [DecisionParseError, DecisionParseError]
    assert seen[1][-2] == {"role": "assistant", "content": "[[[[[[[[[...]]]]]]]]]"}


# -- providers of each shape -----------------------------------------------------------


async def test_sync_only_provider_runs_in_a_worker_thread() -> None:
    loop_thread = threading.get_ident()
    seen: list[int] = []

    class SyncOnly:
        def chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
            seen.append(threading.get_ident())
            return DONE

    decisions = await LLMAgent(IDENTITY, SyncOnly()).adecide([], [])
    assert len(decisions) == 1
    assert seen
    assert seen[0] != loop_thread


async def test_async_provider_without_usage_reporting_is_supported() -> None:
    class AsyncOnly:
        async def achat(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
            await anyio.lowlevel.checkpoint()
            return DONE

    agent = LLMAgent(IDENTITY, AsyncOnly())
    assert len(await agent.adecide([], [])) == 1
    assert agent.last_usage is None


@pytest.fixture
async def real_provider(wire: Wire, server: FakeLLMServer) -> AsyncIterator[Any]:
    provider = wire.provider(server, max_retries=0)
    yield provider
    await provider.aclose()


async def test_llm_agent_on_a_real_sdk_fallback_path(
    real_provider: Any, wire: Wire, server: FakeLLMServer, registry: ToolRegistry
) -> None:
    server.push(wire.chat("Here you go:\n```json\n" + DONE + "\n```"))
    agent = LLMAgent(IDENTITY, real_provider, tool_registry=registry)
    (decision,) = await agent.adecide(inbox(), tasks())
    assert decision == UpdateTask("t1", "completed", result=1)
    assert agent.last_usage == wire.usage
    assert "tools" not in server.requests[0].json


async def test_llm_agent_on_a_real_sdk_structured_path(
    real_provider: Any, wire: Wire, server: FakeLLMServer, registry: ToolRegistry
) -> None:
    arguments = json.dumps(
        {"decisions": [{"type": "InvokeTool", "tool_name": "add", "params": {"a": 2, "b": 3}}]}
    )
    server.push(wire.tool("emit_decisions", arguments))
    agent = LLMAgent(IDENTITY, real_provider, tool_registry=registry, use_structured_output=True)
    (decision,) = await agent.adecide(inbox(), tasks())
    assert isinstance(decision, InvokeTool)
    assert decision.tool_name == "add"
    assert len(server.requests[0].json["tools"]) == 1


# -- sync surface ----------------------------------------------------------------------


def test_decide_works_from_a_script() -> None:
    agent = LLMAgent(IDENTITY, ScriptedProvider([DONE, "[]"]))
    try:
        assert len(agent.decide(inbox(), tasks())) == 1
        assert agent.decide([], []) == []
    finally:
        agent.close()


@pytest.mark.parametrize("name", sorted(WIRES))
def test_decide_with_a_real_provider_reuses_its_connection_loop(
    name: str, server: FakeLLMServer
) -> None:
    wire = WIRES[name]
    provider = wire.provider(server)
    agent = LLMAgent(IDENTITY, provider)
    server.push(wire.chat(DONE), wire.chat("[]"))
    try:
        assert len(agent.decide(inbox(), tasks())) == 1
        assert agent.decide(inbox(), tasks()) == []
    finally:
        agent.close()
        provider.close()


async def test_decide_on_the_event_loop_thread_names_adecide() -> None:
    with pytest.raises(SyncInEventLoopError, match="adecide"):
        LLMAgent(IDENTITY, ScriptedProvider(["[]"])).decide([], [])


async def test_function_provider_sees_the_agents_prompt() -> None:
    def reply(messages: list[dict[str, str]], **kwargs: Any) -> str:
        turn = json.loads(messages[-1]["content"])
        task_id = turn["tasks"][0]["id"]
        return json.dumps([{"type": "UpdateTask", "task_id": task_id, "state": "running"}])

    (decision,) = await LLMAgent(IDENTITY, FunctionProvider(reply)).adecide([], tasks())
    assert decision == UpdateTask("t1", "running")
