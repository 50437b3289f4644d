"""AgentRunner: inbox -> adecide -> decisions, tool observations, failures, graceful stop."""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import pytest

from converge.core import (
    Agent,
    Identity,
    InvokeTool,
    Message,
    SendMessage,
    Task,
    TaskState,
    ToolRegistry,
    UpdateTask,
)
from converge.errors import AgentFailedError, BudgetExceededError, UsageError
from converge.extensions.storage import MemoryStore
from converge.runtime import AgentRetry, AgentRunner, MessageBus, arun_agents

pytestmark = pytest.mark.anyio

NO_RETRY = AgentRetry(max_attempts=1)


class Scripted(Agent):
    """Records every adecide call and answers with ``respond(agent, messages, tasks, obs)``."""

    def __init__(self, name: str, respond: Any = None, registry: ToolRegistry | None = None):
        super().__init__(Identity(), registry, name=name)
        self.respond = respond or (lambda *a: [])
        self.calls: list[dict[str, Any]] = []

    async def adecide(self, messages: list[Message], tasks: list[Task], **kwargs: Any) -> Any:
        self.calls.append({"messages": list(messages), "tasks": list(tasks), **kwargs})
        return self.respond(self, messages, tasks, kwargs.get("tool_observations"))


def to(agent: Agent, sender: str = "user", **payload: Any) -> Message:
    return Message(sender=sender, recipient=agent.id, payload=payload)


async def run_until_idle(
    bus: MessageBus, agents: list[Agent], *msgs: Message, **kw: Any
) -> AgentRunner:
    async with AgentRunner(bus, agents, **kw) as runner:
        for m in msgs:
            await bus.publish(m)
        with anyio.fail_after(5):
            await runner.wait_until(lambda r: r.idle)
    return runner


async def test_send_message_decisions_are_published_and_answered() -> None:
    def ping(agent: Agent, messages: list[Message], *_: Any) -> list[Any]:
        return [
            SendMessage(Message(sender=agent.id, recipient=pong.id, payload={"n": m.payload["n"]}))
            for m in messages
        ]

    pong = Scripted("pong")
    ping_agent = Scripted("ping", ping)
    bus = MessageBus()
    await run_until_idle(bus, [ping_agent, pong], to(ping_agent, n=1), to(ping_agent, n=2))
    received = [m.payload["n"] for call in pong.calls for m in call["messages"]]
    assert received == [1, 2]


async def test_queued_messages_are_batched_up_to_max_batch() -> None:
    agent = Scripted("batcher")
    bus = MessageBus()
    runner = AgentRunner(bus, [agent], max_batch=3)
    for i in range(7):  # queued before the agent starts
        await bus.publish(to(agent, n=i))
    async with runner:
        with anyio.fail_after(5):
            await runner.wait_until(lambda r: r.idle)
    assert [len(c["messages"]) for c in agent.calls] == [3, 3, 1]


async def test_tool_result_is_fed_back_as_an_observation() -> None:
    registry = ToolRegistry()

    @registry.tool
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    def respond(agent: Agent, messages: list[Message], tasks: Any, obs: Any) -> list[Any]:
        if obs is None:
            return [InvokeTool("add", {"a": 2, "b": 3}, call_id="c1")]
        return []

    agent = Scripted("calc", respond, registry)
    await run_until_idle(MessageBus(), [agent], to(agent))
    first, second = agent.calls
    assert "tool_observations" not in first
    assert second["messages"] == first["messages"]
    assert second["tool_observations"] == [
        {"tool_name": "add", "params": {"a": 2, "b": 3}, "call_id": "c1", "result": 5}
    ]


async def test_a_tool_stuck_in_a_thread_does_not_hold_a_run_past_its_timeout() -> None:
    # A sync tool blocked on a call with no timeout used to hold the stopping runner,
    # and so the run's timeout, until it returned.
    release = threading.Event()
    registry = ToolRegistry()

    @registry.tool
    def stuck() -> str:
        """Waits on a call that does not come back in time."""
        release.wait(10)
        return "late"

    def respond(agent: Agent, messages: list[Message], tasks: Any, obs: Any) -> list[Any]:
        return [InvokeTool("stuck", call_id="c1")] if obs is None and messages else []

    agent = Scripted("stuck", respond, registry)
    started = time.monotonic()
    try:
        result = await arun_agents([agent], messages=[to(agent)], timeout=0.3, drain_timeout=0.3)
    finally:
        release.set()
    assert result.timed_out
    assert time.monotonic() - started < 3


async def test_tool_failures_become_error_observations_and_the_agent_goes_on() -> None:
    registry = ToolRegistry()

    @registry.tool
    def fail() -> None:
        """Always fails."""
        raise RuntimeError("disk on fire")

    def respond(agent: Agent, messages: Any, tasks: Any, obs: Any) -> list[Any]:
        if obs is None:
            return [InvokeTool("fail", call_id="c1"), InvokeTool("nope", call_id="c2")]
        return []

    agent = Scripted("tools", respond, registry)
    runner = await run_until_idle(MessageBus(), [agent], to(agent))
    observations = agent.calls[1]["tool_observations"]
    assert [o["call_id"] for o in observations] == ["c1", "c2"]
    assert "disk on fire" in observations[0]["error"]
    assert observations[0]["result"] == {"error": observations[0]["error"]}
    assert "nope" in observations[1]["error"]
    assert runner.errors == []


async def test_observations_accumulate_across_tool_steps() -> None:
    registry = ToolRegistry()

    @registry.tool
    def echo(x: int) -> int:
        """Echo."""
        return x

    def respond(agent: Agent, messages: Any, tasks: Any, obs: Any) -> list[Any]:
        step = len(obs or [])
        return [InvokeTool("echo", {"x": step})] if step < 3 else []

    agent = Scripted("looper", respond, registry)
    await run_until_idle(MessageBus(), [agent], to(agent))
    assert [len(c.get("tool_observations") or []) for c in agent.calls] == [0, 1, 2, 3]
    assert [o["result"] for o in agent.calls[-1]["tool_observations"]] == [0, 1, 2]


async def test_agent_without_a_registry_gets_an_error_observation() -> None:
    agent = Scripted("bare", lambda a, m, t, obs: [] if obs else [InvokeTool("x")])
    await run_until_idle(MessageBus(), [agent], to(agent))
    assert "no tool registry" in agent.calls[1]["tool_observations"][0]["error"]


async def test_tool_loop_past_max_tool_steps_is_reported() -> None:
    registry = ToolRegistry()

    @registry.tool
    def noop() -> None:
        """Nothing."""

    agent = Scripted("addict", lambda *a: [InvokeTool("noop")], registry)
    errors: list[AgentFailedError] = []
    await run_until_idle(
        MessageBus(), [agent], to(agent), max_tool_steps=2, on_agent_error=errors.append
    )
    assert len(agent.calls) == 3  # the first call plus two follow-ups, not retried
    assert isinstance(errors[0].__cause__, BudgetExceededError)
    assert "max_tool_steps" in str(errors[0])


async def test_update_task_changes_the_shared_task_set_seen_by_every_agent() -> None:
    task = Task(objective="ship it")

    def worker_respond(agent: Agent, messages: Any, tasks: Any, obs: Any) -> list[Any]:
        if not messages:
            return []
        return [
            UpdateTask(task.id, TaskState.COMPLETED, result="done"),
            SendMessage(Message(sender=agent.id, recipient=watcher.id)),
        ]

    watcher = Scripted("watcher")
    worker = Scripted("worker", worker_respond)
    runner = await run_until_idle(MessageBus(), [worker, watcher], to(worker), tasks=[task])
    [final] = runner.tasks
    assert (final.state, final.result) == (TaskState.COMPLETED, "done")
    # every agent is called once at start with the tasks and no messages
    assert watcher.calls[0]["messages"] == []
    assert watcher.calls[0]["tasks"] == [task]
    assert watcher.calls[-1]["tasks"][0].state is TaskState.COMPLETED


async def test_without_tasks_agents_are_only_called_for_messages() -> None:
    agent = Scripted("quiet")
    await run_until_idle(MessageBus(), [agent])
    assert agent.calls == []


async def test_failing_agent_is_reported_dead_letters_and_goes_on() -> None:
    def explode(agent: Agent, messages: list[Message], *_: Any) -> list[Any]:
        if messages[0].payload.get("fail"):
            raise RuntimeError("kaboom")
        return []

    bad = Scripted("bad", explode)
    good = Scripted("good")
    errors: list[AgentFailedError] = []
    bus = MessageBus()

    async def on_error(error: AgentFailedError) -> None:  # async handlers are awaited
        errors.append(error)

    async with AgentRunner(
        bus, [bad, good], on_agent_error=on_error, retry=NO_RETRY, max_batch=1
    ) as runner:
        failing = to(bad, fail=True)
        await bus.publish(failing)
        await bus.publish(to(good))
        with anyio.fail_after(5):
            await runner.wait_until(lambda r: r.idle)
        # the failing agent goes on with its next message; the others never noticed
        assert bus.has_subscribers(to(bad))
        await bus.publish(to(bad))
        await bus.publish(to(good))
        with anyio.fail_after(5):
            await runner.wait_until(lambda r: r.idle)
    [error] = errors
    assert error.agent_id == bad.id
    assert isinstance(error.__cause__, RuntimeError)
    assert runner.errors == [error]
    assert bus.metrics.get("runtime_agent_errors_total", labels={"agent": "bad"}) == 1
    assert [d.message.id for d in runner.dead_letters] == [failing.id]
    assert len(bad.calls) == 2
    assert len(good.calls) == 2


@pytest.mark.parametrize(
    "bad_result",
    [None, "SendMessage", [{"type": "SendMessage"}], [Message(sender="x")]],
)
async def test_agent_returning_something_other_than_decisions_is_reported(bad_result: Any) -> None:
    agent = Scripted("sloppy", lambda *a: bad_result)
    runner = await run_until_idle(MessageBus(), [agent], to(agent), retry=NO_RETRY)
    assert len(runner.errors) == 1


async def test_update_of_an_unknown_task_is_reported() -> None:
    agent = Scripted("lost", lambda *a: [UpdateTask("no-such-task", TaskState.FAILED)])
    runner = await run_until_idle(MessageBus(), [agent], to(agent), retry=NO_RETRY)
    assert "no-such-task" in str(runner.errors[0])


async def test_stop_drains_queued_messages_and_refuses_new_ones() -> None:
    gate = anyio.Event()
    seen: list[int] = []

    class Slow(Agent):
        async def adecide(self, messages: list[Message], tasks: list[Task], **kw: Any) -> Any:
            await gate.wait()
            seen.extend(m.payload["n"] for m in messages)
            return []

    agent = Slow(Identity(), name="slow")
    bus = MessageBus()
    runner = AgentRunner(bus, [agent], max_batch=1)
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)
        for i in range(4):
            await bus.publish(to(agent, n=i))
        await anyio.wait_all_tasks_blocked()  # message 0 is in flight, 1-3 queued
        runner.stop()
        assert await bus.publish(to(agent, n=99)) == 0
        gate.set()
    assert seen == [0, 1, 2, 3]
    assert runner.finished


async def test_topic_subscriptions_per_agent_by_name_or_id() -> None:
    a, b = Scripted("a"), Scripted("b")
    bus = MessageBus()
    async with AgentRunner(bus, [a, b], topics={"a": ["alerts.#"], b.id: ["alerts.disk"]}) as r:
        await bus.publish(Message(sender="ops", topics=["alerts.disk"]))
        await bus.publish(Message(sender="ops", topics=["alerts.cpu"]))
        with anyio.fail_after(5):
            await r.wait_until(lambda r: r.idle)
    assert sum(len(c["messages"]) for c in a.calls) == 2
    assert sum(len(c["messages"]) for c in b.calls) == 1


async def test_runner_runs_only_once() -> None:
    runner = AgentRunner(MessageBus(), [Scripted("x")])
    async with runner:
        pass
    with pytest.raises(UsageError):
        await runner.run()


@pytest.mark.parametrize(
    ("agents", "kwargs"),
    [
        ([], {}),
        (["not an agent"], {}),
        (None, {}),
        ("dup", {}),
        ("one", {"max_batch": 0}),
        ("one", {"max_tool_steps": -1}),
        ("one", {"tasks": ["t"]}),
        ("one", {"topics": {"stranger": ["x"]}}),
        ("one", {"topics": {"one": "not a list"}}),
        ("one", {"on_agent_error": 5}),
        ("one", {"store": {}}),
        ("one", {"retry": 3}),
        ("one", {"sleep": 1}),
        ("one", {"max_dead_letters": 0}),
        ("one", {"store": MemoryStore(), "record_retention": 0}),
    ],
)
def test_invalid_runner_arguments_are_usage_errors(agents: Any, kwargs: dict[str, Any]) -> None:
    one = Scripted("one")
    if agents == "dup":
        agents = [one, one]
    elif agents == "one":
        agents = [one]
    with pytest.raises(UsageError):
        AgentRunner(MessageBus(), agents, **kwargs)


def test_a_dead_letter_bound_past_any_deques_length_means_no_bound() -> None:
    runner = AgentRunner(MessageBus(), [Scripted("one")], max_dead_letters=2**70)  # OverflowError
    assert runner.dead_letters == []


def test_runner_needs_a_bus() -> None:
    with pytest.raises(UsageError):
        AgentRunner("bus", [Scripted("x")])  # type: ignore[arg-type]
