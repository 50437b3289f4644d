"""The ReAct loop: tools run, observations fed back, bounded by steps and tokens."""

from __future__ import annotations

import json
from typing import Any

import pytest

from converge.core import Agent, Identity, InvokeTool, SendMessage, Task, ToolRegistry, UpdateTask
from converge.core.events import EventEmitter, ProgressEvent, ToolInvoked, ToolResult
from converge.errors import BudgetExceededError, SyncInEventLoopError, UsageError
from converge.extensions.llm import LLMAgent, ReActResult, Usage, arun_react, run_react
from converge.extensions.llm.testing import FunctionProvider, ScriptedProvider

pytestmark = pytest.mark.anyio

IDENTITY = Identity()


def invoke(tool: str, **params: Any) -> str:
    return json.dumps([{"type": "InvokeTool", "tool_name": tool, "params": params}])


FINAL = json.dumps(
    [
        {"type": "SendMessage", "message": {"recipient": "bob", "payload": {"answer": 5}}},
        {"type": "UpdateTask", "task_id": "t1", "state": "completed", "result": 5},
    ]
)


@pytest.fixture
def registry() -> ToolRegistry:
    registry = ToolRegistry()

    @registry.tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @registry.tool
    async def divide(a: int, b: int) -> float:
        """Divide a by b."""
        return a / b

    return registry


def task() -> list[Task]:
    return [Task(objective="compute", id="t1")]


async def test_loop_runs_tools_and_feeds_observations_back(registry: ToolRegistry) -> None:
    seen: list[list[dict[str, Any]]] = []

    def reply(messages: list[dict[str, Any]], **kwargs: Any) -> str:
        seen.append(messages)
        if messages[-1]["role"] != "tool":
            return invoke("add", a=2, b=3)
        return FINAL

    agent = LLMAgent(IDENTITY, FunctionProvider(reply), tool_registry=registry)
    result = await arun_react(agent, [], task())
    assert isinstance(result, ReActResult)
    assert result.steps == 2
    (observation,) = result.observations
    assert observation["result"] == 5
    assert observation["step"] == 1
    # Step 2 sees the same user turn, then the call and its result as native messages.
    assert seen[1][: len(seen[0])] == seen[0]
    call, answer = seen[1][len(seen[0]) :]
    assert call == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": observation["call_id"], "name": "add", "arguments": {"a": 2, "b": 3}}
        ],
    }
    assert answer == {
        "role": "tool",
        "tool_call_id": observation["call_id"],
        "name": "add",
        "content": "5",
    }
    assert "tool_observations" not in json.loads(seen[1][-3]["content"])
    send, update = result.decisions
    assert isinstance(send, SendMessage)
    assert update == UpdateTask("t1", "completed", result=5)


async def test_a_failing_tool_becomes_an_error_observation(registry: ToolRegistry) -> None:
    provider = ScriptedProvider([invoke("divide", a=1, b=0), FINAL])
    agent = LLMAgent(IDENTITY, provider, tool_registry=registry)
    result = await arun_react(agent, [], task())
    (observation,) = result.observations
    assert "ZeroDivisionError" in observation["error"]
    assert "result" not in observation
    last = provider.calls[1].messages[-1]
    assert last["role"] == "tool"
    assert last["content"].startswith("Error: ZeroDivisionError")


async def test_calls_of_one_step_share_one_assistant_message(registry: ToolRegistry) -> None:
    two = json.dumps(
        [
            {"type": "InvokeTool", "tool_name": "add", "params": {"a": 1, "b": 1}},
            {"type": "InvokeTool", "tool_name": "add", "params": {"a": 2, "b": 2}},
        ]
    )
    provider = ScriptedProvider([two, invoke("add", a=3, b=3), FINAL])
    result = await arun_react(LLMAgent(IDENTITY, provider, tool_registry=registry), [], task())
    assert [o["step"] for o in result.observations] == [1, 1, 2]
    tail = provider.calls[2].messages[-5:]
    assert [m["role"] for m in tail] == ["assistant", "tool", "tool", "assistant", "tool"]
    assert len(tail[0]["tool_calls"]) == 2
    assert [m["content"] for m in tail if m["role"] == "tool"] == ["2", "4", "6"]


async def test_tool_calls_and_results_are_progress_events(registry: ToolRegistry) -> None:
    events = EventEmitter()
    seen: list[ProgressEvent] = []
    events.subscribe(seen.append, types=(ToolInvoked, ToolResult))
    provider = ScriptedProvider([invoke("divide", a=1, b=0), invoke("add", a=1, b=2), FINAL])
    agent = LLMAgent(IDENTITY, provider, tool_registry=registry, events=events)
    await arun_react(agent, [], task())
    invoked1, result1, invoked2, result2 = seen
    assert isinstance(invoked1, ToolInvoked)
    assert invoked1.tool_name == "divide"
    assert dict(invoked1.arguments) == {"a": 1, "b": 0}
    assert isinstance(result1, ToolResult)
    assert result1.tool_call_id == invoked1.tool_call_id
    assert "ZeroDivisionError" in (result1.error or "")
    assert isinstance(result2, ToolResult)
    assert result2.result == 3
    assert result2.error is None
    assert invoked2.source == agent.id


async def test_decisions_alongside_tool_calls_are_kept_in_order(registry: ToolRegistry) -> None:
    progress = {"type": "UpdateTask", "task_id": "t1", "state": "running"}
    call = {"type": "InvokeTool", "tool_name": "add", "params": {"a": 1, "b": 1}}
    provider = ScriptedProvider([json.dumps([progress, call]), FINAL])
    result = await arun_react(LLMAgent(IDENTITY, provider, tool_registry=registry), [], task())
    assert [type(d).__name__ for d in result.decisions] == [
        "UpdateTask",
        "SendMessage",
        "UpdateTask",
    ]


async def test_max_steps_bounds_the_loop(registry: ToolRegistry) -> None:
    provider = ScriptedProvider([invoke("add", a=1, b=1)] * 10)
    agent = LLMAgent(IDENTITY, provider, tool_registry=registry)
    with pytest.raises(BudgetExceededError, match="max_steps=3"):
        await arun_react(agent, [], task(), max_steps=3)
    assert len(provider.calls) == 3


async def test_token_budget_bounds_the_loop(registry: ToolRegistry) -> None:
    step = (invoke("add", a=1, b=1), Usage(60, 10))
    provider = ScriptedProvider([step, step, step, (FINAL, Usage(1, 1))])
    agent = LLMAgent(IDENTITY, provider, tool_registry=registry)
    with pytest.raises(BudgetExceededError, match="140 tokens"):
        await arun_react(agent, [], task(), max_tokens=100)
    assert len(provider.calls) == 2


async def test_usage_of_all_steps_is_summed(registry: ToolRegistry) -> None:
    provider = ScriptedProvider([(invoke("add", a=1, b=1), Usage(3, 1)), (FINAL, Usage(4, 2))])
    agent = LLMAgent(IDENTITY, provider, tool_registry=registry)
    result = await arun_react(agent, [], task(), max_tokens=100)
    assert result.usage == Usage(7, 3)


async def test_unparseable_step_ends_the_loop_with_no_decisions(registry: ToolRegistry) -> None:
    errors: list[Exception | str] = []
    agent = LLMAgent(
        IDENTITY,
        ScriptedProvider(["gibberish", "still gibberish"]),
        tool_registry=registry,
        on_decide_error=errors.append,
    )
    result = await arun_react(agent, [], task())
    assert result.decisions == ()
    assert result.steps == 1
    assert len(errors) == 2  # the answer and the re-asked answer


async def test_any_agent_with_adecide_can_be_looped(registry: ToolRegistry) -> None:
    class Scripted(Agent):
        async def adecide(self, messages: Any, tasks: Any, **kwargs: Any) -> list[Any]:
            observations = kwargs.get("tool_observations")
            if observations is None:
                return [UpdateTask("t1", "running"), InvokeTool("add", {"a": 1, "b": 2})]
            return []

    result = await arun_react(Scripted(IDENTITY), [], task(), tool_registry=registry)
    assert result.observations[0]["result"] == 3
    assert result.usage == Usage(None, None)  # nothing reported: unknown, not zero


@pytest.mark.parametrize(
    "kwargs",
    [{"max_steps": 0}, {"max_steps": 1.5}, {"max_tokens": 0}, {"max_tokens": "lots"}],
)
async def test_invalid_bounds_raise_usage_error(
    registry: ToolRegistry, kwargs: dict[str, Any]
) -> None:
    agent = LLMAgent(IDENTITY, ScriptedProvider([]), tool_registry=registry)
    with pytest.raises(UsageError):
        await arun_react(agent, [], [], **kwargs)


async def test_a_registry_is_required() -> None:
    with pytest.raises(UsageError, match="ToolRegistry"):
        await arun_react(LLMAgent(IDENTITY, ScriptedProvider([])), [], [])
    with pytest.raises(UsageError, match="Agent"):
        await arun_react("agent", [], [], tool_registry=ToolRegistry())  # type: ignore[arg-type]


def test_run_react_works_from_a_script(registry: ToolRegistry) -> None:
    agent = LLMAgent(
        IDENTITY, ScriptedProvider([invoke("add", a=2, b=2), FINAL]), tool_registry=registry
    )
    try:
        result = run_react(agent, [], task())
    finally:
        agent.close()
    assert result.observations[0]["result"] == 4
    assert result.steps == 2


async def test_run_react_on_the_event_loop_thread_names_the_coroutine(
    registry: ToolRegistry,
) -> None:
    agent = LLMAgent(IDENTITY, ScriptedProvider([]), tool_registry=registry)
    with pytest.raises(SyncInEventLoopError, match="arun_react"):
        run_react(agent, [], task())


def test_react_result_validates_its_fields() -> None:
    with pytest.raises(UsageError):
        ReActResult((), (), -1, Usage())
    with pytest.raises(UsageError):
        ReActResult((), (), 1, None)  # type: ignore[arg-type]


async def test_token_budget_counts_cache_and_reasoning_once_and_unknown_as_zero(
    registry: ToolRegistry,
) -> None:
    cached = Usage(100, 20, cache_read_tokens=80, cache_write_tokens=5, reasoning_tokens=10)
    unknown = Usage(None, None)
    provider = ScriptedProvider(
        [(invoke("add", a=1, b=1), cached), (invoke("add", a=1, b=1), unknown), (FINAL, cached)]
    )
    agent = LLMAgent(IDENTITY, provider, tool_registry=registry)
    result = await arun_react(agent, [], task(), max_tokens=240)  # 120 + 0 + 120
    assert result.steps == 3
    assert result.usage.total_tokens == 240
    assert result.usage.cache_read_tokens == 160
    assert result.usage.reasoning_tokens == 20

    provider = ScriptedProvider([(invoke("add", a=1, b=1), cached)] * 2 + [(FINAL, cached)])
    agent = LLMAgent(IDENTITY, provider, tool_registry=registry)
    with pytest.raises(BudgetExceededError, match="240 tokens"):
        await arun_react(agent, [], task(), max_tokens=239)


async def test_usage_nobody_reported_stays_unknown(registry: ToolRegistry) -> None:
    provider = ScriptedProvider(
        [(invoke("add", a=1, b=1), Usage(None, None)), (FINAL, Usage(None, None))]
    )
    result = await arun_react(LLMAgent(IDENTITY, provider, tool_registry=registry), [], task())
    assert result.usage == Usage(None, None)


@pytest.mark.parametrize(("messages", "tasks"), [(None, []), ([], None), ([], 5)])
async def test_messages_and_tasks_that_are_not_lists_raise_usage_error(
    registry: ToolRegistry, messages: Any, tasks: Any
) -> None:
    agent = LLMAgent(IDENTITY, ScriptedProvider([FINAL]), tool_registry=registry)
    with pytest.raises(UsageError, match="must be a list"):
        await arun_react(agent, messages, tasks)
    assert agent.provider.remaining == 1  # refused before any step


def test_run_react_refuses_messages_that_are_not_a_list(registry: ToolRegistry) -> None:
    agent = LLMAgent(IDENTITY, ScriptedProvider([FINAL]), tool_registry=registry)
    try:
        with pytest.raises(UsageError, match="messages must be a list"):
            run_react(agent, None, [])  # type: ignore[arg-type]
    finally:
        agent.close()


async def test_every_step_sees_tasks_given_as_an_iterator(registry: ToolRegistry) -> None:
    seen: list[str] = []

    def reply(messages: list[dict[str, Any]], **kwargs: Any) -> str:
        seen.append(next(m["content"] for m in messages if m["role"] == "user"))
        return FINAL if len(seen) > 1 else invoke("add", a=1, b=2)

    agent = LLMAgent(IDENTITY, FunctionProvider(reply), tool_registry=registry)
    result = await arun_react(agent, [], iter(task()))
    assert result.steps == 2
    assert all("compute" in text for text in seen)
