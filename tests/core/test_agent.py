"""Agent base: either surface may be overridden; the other is derived."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from converge.core import Agent, Decision, Identity, InvokeTool, Message, Task, ToolRegistry
from converge.errors import SyncInEventLoopError, UsageError


class SyncAgent(Agent):
    def decide(self, messages: list[Message], tasks: list[Task], **kwargs: Any) -> list[Decision]:
        return [InvokeTool("echo", {"n": len(messages)})]


class AsyncAgent(Agent):
    async def adecide(
        self, messages: list[Message], tasks: list[Task], **kwargs: Any
    ) -> list[Decision]:
        await anyio.lowlevel.checkpoint()
        return [InvokeTool("echo", {"n": len(tasks)})]


def test_base_agent_decides_nothing() -> None:
    assert Agent(Identity()).decide([], []) == []


def test_agent_id_is_identity_fingerprint() -> None:
    ident = Identity()
    agent = Agent(ident, name="scout")
    assert agent.id == ident.fingerprint
    assert agent.name == "scout"


def test_identity_is_required() -> None:
    with pytest.raises(UsageError):
        Agent("not an identity")  # type: ignore[arg-type]


def test_sync_decide_of_async_agent_from_script() -> None:
    decisions = AsyncAgent(Identity()).decide([], [Task(objective="x")])
    assert decisions == [InvokeTool("echo", {"n": 1}, call_id=decisions[0].call_id)]  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_adecide_of_sync_agent() -> None:
    msg = Message(sender="a")
    [decision] = await SyncAgent(Identity()).adecide([msg, msg], [])
    assert isinstance(decision, InvokeTool)
    assert decision.params == {"n": 2}


@pytest.mark.anyio
async def test_ainvoke_tool_runs_an_invoke_tool_and_refuses_anything_else() -> None:
    registry = ToolRegistry()

    @registry.tool
    def echo(n: int) -> int:
        """Echo n."""
        return n

    agent = Agent(Identity(), registry)
    assert await agent.ainvoke_tool(InvokeTool("echo", {"n": 3})) == 3
    with pytest.raises(UsageError, match="InvokeTool"):
        await agent.ainvoke_tool({"tool_name": "echo"})  # type: ignore[arg-type]  # AttributeError


@pytest.mark.anyio
async def test_sync_decide_on_event_loop_names_adecide() -> None:
    with pytest.raises(SyncInEventLoopError, match=r"AsyncAgent\.adecide"):
        AsyncAgent(Identity()).decide([], [])
