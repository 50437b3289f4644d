"""The ReAct loop: tools run, observations fed back, bounded by steps and tokens."""

from __future__ import annotations

import json
from typing import Any

import pytest

from converge.core import Agent, Identity, InvokeTool, SendMessage, Task, ToolRegistry, UpdateTask
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
    seen: list[Any] = []

    def reply(messages: list[dict[str, str]], **kwargs: Any) -> str:
        turn = json.loads(messages[-1]["content"])
        observations = turn.get("tool_observations", [])
        seen.append(observations)
        if not observations:
            return invoke("add", a=2, b=3)
        return FINAL

    agent = LLMAgent(IDENTITY, FunctionProvider(reply), tool_registry=registry)
    result = await arun_react(agent, [], task())
    assert isinstance(result, ReActResult)
    assert result.steps == 2
    assert seen[0] == []
    (observation,) = seen[1]
    assert observation["tool_name"] == "add"
    assert observation["params"] == {"a": 2, "b": 3}
    assert observation["result"] == 5
    assert result.observations[0]["result"] == 5
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
    turn = json.loads(provider.calls[1].messages[-1]["content"])
    assert "ZeroDivisionError" in turn["tool_observations"][0]["error"]


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
        ScriptedProvider(["gibberish"]),
        tool_registry=registry,
        on_decide_error=errors.append,
    )
    result = await arun_react(agent, [], task())
    assert result.decisions == ()
    assert result.steps == 1
    assert len(errors) == 1


async def test_any_agent_with_adecide_can_be_looped(registry: ToolRegistry) -> None:
    class Scripted(Agent):
        async def adecide(self, messages: Any, tasks: Any, **kwargs: Any) -> list[Any]:
            observations = kwargs.get("tool_observations")
            if observations is None:
                return [UpdateTask("t1", "running"), InvokeTool("add", {"a": 1, "b": 2})]
            return []

    result = await arun_react(Scripted(IDENTITY), [], task(), tool_registry=registry)
    assert result.observations[0]["result"] == 3
    assert result.usage == Usage()


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
