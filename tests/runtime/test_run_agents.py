"""run_agents / arun_agents: the script entry point."""

from __future__ import annotations

from typing import Any

import pytest

from converge.core import Agent, Identity, Message, SendMessage, Task, TaskState, UpdateTask
from converge.errors import SyncInEventLoopError, UsageError
from converge.runtime import AgentRetry, RunResult, arun_agents, run_agents


class Counter(Agent):
    """Passes a counter to ``peer`` until it reaches ``limit``; marks the task done then."""

    def __init__(self, name: str, limit: int | None = None) -> None:
        super().__init__(Identity(), name=name)
        self.peer: Agent = self
        self.limit = limit
        self.seen: list[int] = []

    def decide(self, messages: list[Message], tasks: list[Task], **kwargs: Any) -> list[Any]:
        out: list[Any] = []
        for m in messages:
            n = m.payload["n"]
            self.seen.append(n)
            if self.limit is not None and n >= self.limit:
                out += [UpdateTask(t.id, TaskState.COMPLETED, result=n) for t in tasks]
            else:
                reply = Message(sender=self.id, recipient=self.peer.id, payload={"n": n + 1})
                out.append(SendMessage(reply))
        return out


def pair(limit: int | None) -> tuple[Counter, Counter]:
    a, b = Counter("a", limit), Counter("b", limit)
    a.peer, b.peer = b, a
    return a, b


def start(agent: Agent) -> Message:
    return Message(sender="script", recipient=agent.id, payload={"n": 0})


def test_run_agents_from_a_script_runs_until_the_system_is_idle() -> None:
    a, b = pair(limit=6)
    task = Task(objective="count to six")
    result = run_agents([a, b], messages=[start(a)], tasks=[task], timeout=10)
    assert isinstance(result, RunResult)
    assert not result.timed_out
    assert result.errors == ()
    assert a.seen == [0, 2, 4, 6]
    assert b.seen == [1, 3, 5]
    assert result.tasks[0].state is TaskState.COMPLETED
    assert result.tasks[0].result == 6


def test_run_agents_stops_when_until_holds() -> None:
    a, b = pair(limit=None)  # would bounce forever
    result = run_agents([a, b], messages=[start(a)], until=lambda r: len(a.seen) >= 5, timeout=10)
    assert not result.timed_out
    assert 5 <= len(a.seen) <= 7  # stopped promptly, in-flight work drained


def test_run_agents_reports_a_timeout() -> None:
    a, b = pair(limit=None)
    result = run_agents([a, b], messages=[start(a)], until=lambda r: False, timeout=0.2)
    assert result.timed_out
    assert len(a.seen) > 1


def test_run_agents_collects_agent_errors() -> None:
    class Broken(Agent):
        def decide(self, messages: list[Message], tasks: list[Task], **kw: Any) -> list[Any]:
            raise ValueError("no")

    broken = Broken(Identity(), name="broken")
    seen: list[Exception] = []
    result = run_agents(
        [broken],
        messages=[start(broken)],
        timeout=10,
        on_agent_error=seen.append,
        retry=AgentRetry(max_attempts=2, backoff=0.01),
    )
    assert [e.agent_id for e in result.errors] == [broken.id]
    assert seen == list(result.errors)


@pytest.mark.anyio
async def test_arun_agents_runs_on_the_current_loop() -> None:
    a, b = pair(limit=3)
    result = await arun_agents([a, b], messages=[start(a)], tasks=[Task(objective="x")])
    assert result.tasks[0].state is TaskState.COMPLETED


@pytest.mark.anyio
async def test_run_agents_on_the_event_loop_thread_names_the_coroutine() -> None:
    a, _ = pair(limit=1)
    with pytest.raises(SyncInEventLoopError, match="arun_agents"):
        run_agents([a])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"timeout": -1},
        {"timeout": "soon"},
        {"drain_timeout": float("nan")},
        {"until": "always"},
        {"messages": "hello"},
        {"inbox_size": 0},
        {"hooks": [object()]},
    ],
)
def test_invalid_run_agents_arguments_are_usage_errors(kwargs: dict[str, Any]) -> None:
    a, _ = pair(limit=1)
    with pytest.raises(UsageError):
        run_agents([a], **kwargs)
