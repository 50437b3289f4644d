"""The agent runner: inbox -> ``adecide`` -> decisions, for a set of agents in one task group."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import anyio
import anyio.abc

from converge import _sync
from converge.core.agent import Agent
from converge.core.decisions import Decision, InvokeTool, SendMessage, UpdateTask
from converge.core.hooks import MessageHook
from converge.core.message import Message
from converge.core.task import Task
from converge.errors import AgentFailedError, ConvergeError, UsageError
from converge.runtime.bus import MessageBus, Subscription

__all__ = ["AgentErrorHandler", "AgentRunner", "RunResult", "arun_agents", "run_agents"]

_log = logging.getLogger("converge.runtime")

#: ``on_agent_error(error)``; may be a plain function or a coroutine function.
AgentErrorHandler = Callable[[AgentFailedError], Awaitable[None] | None]


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_agents(agents: object) -> tuple[Agent, ...]:
    if isinstance(agents, Agent) or not isinstance(agents, Iterable):
        raise UsageError("agents must be a sequence of Agent")
    checked = tuple(agents)
    seen: set[str] = set()
    for agent in checked:
        if not isinstance(agent, Agent):
            raise UsageError(f"agents must be Agent instances, not {agent!r}")
        if agent.id in seen:
            raise UsageError(f"agent {agent.name!r} is listed twice")
        seen.add(agent.id)
    if not checked:
        raise UsageError("give at least one agent")
    return checked


def _check_tasks(tasks: object) -> dict[str, Task]:
    if isinstance(tasks, Task) or not isinstance(tasks, Iterable):
        raise UsageError("tasks must be a sequence of Task")
    out: dict[str, Task] = {}
    for task in tasks:
        if not isinstance(task, Task):
            raise UsageError(f"tasks must be Task instances, not {task!r}")
        out[task.id] = task
    return out


class AgentRunner:
    """Runs agents on a :class:`~converge.runtime.MessageBus`, one task per agent.

    Each agent gets a subscription (its :attr:`~converge.core.agent.Agent.id`, plus the
    topic patterns given for it in ``topics``). Its loop waits for a message, takes up to
    ``max_batch`` queued messages, calls ``await agent.adecide(messages, tasks)`` and
    executes the decisions in order:

    * :class:`~converge.core.decisions.SendMessage`: ``await bus.publish(message)``
      (waiting for inbox space: backpressure).
    * :class:`~converge.core.decisions.InvokeTool`: ``agent.tool_registry.ainvoke``; the
      result becomes a tool observation ``{"tool_name", "params", "call_id", "result"}``
      (a failure: ``"result": {"error": text}`` plus ``"error": text``). When a step
      invoked tools, ``adecide`` is called again with the same messages and
      ``tool_observations=`` every observation of this batch so far, at most
      ``max_tool_steps`` times.
    * :class:`~converge.core.decisions.UpdateTask`: replaces the task in the shared task
      set (an unknown task id is reported as an agent error).

    If ``tasks`` is not empty each agent is called once at start with no messages, so
    task-driven agents can begin. An agent that raises (or returns something that is not
    a list of decisions, or exceeds ``max_tool_steps``) is reported: an
    :class:`~converge.errors.AgentFailedError` (the original error is its ``__cause__``)
    goes to ``on_agent_error``, to :attr:`errors` and to the
    ``runtime_agent_errors_total{agent}`` counter. The other agents go on; the failing
    one stops (its subscription closes), or skips the batch and goes on when
    ``continue_on_error`` is true.

    :meth:`stop` is graceful: subscriptions close (nothing new is accepted), every agent
    finishes what is already in its inbox, and :meth:`run` returns. As an async context
    manager the runner runs in the background of the ``async with`` block and stops
    gracefully at its end.

    Two agents that publish to each other with both inboxes full wait for each other
    forever; size inboxes for the traffic, or publish from agents that also read.

    Args:
        bus: The bus to subscribe and publish on.
        agents: The agents (distinct ids).
        tasks: The initial shared task set.
        topics: Extra topic patterns per agent, keyed by agent id or name.
        max_batch: Most messages handed to one ``adecide`` call.
        max_tool_steps: Most follow-up ``adecide`` calls per batch for tool results.
        on_agent_error: Called with each :class:`~converge.errors.AgentFailedError`.
        continue_on_error: Keep a failing agent running (its failed batch is skipped).
        inbox_size: Capacity of each agent's inbox; the bus default when None.

    Raises:
        UsageError: For invalid arguments (no agents, duplicates, bad sizes, ...).
    """

    def __init__(
        self,
        bus: MessageBus,
        agents: Sequence[Agent],
        *,
        tasks: Sequence[Task] = (),
        topics: Mapping[str, Sequence[str]] | None = None,
        max_batch: int = 10,
        max_tool_steps: int = 8,
        on_agent_error: AgentErrorHandler | None = None,
        continue_on_error: bool = False,
        inbox_size: int | None = None,
    ) -> None:
        if not isinstance(bus, MessageBus):
            raise UsageError("bus must be a MessageBus")
        self.bus = bus
        self.agents = _check_agents(agents)
        self._tasks = _check_tasks(tasks)
        self.max_batch = _check_int("max_batch", max_batch, 1)
        self.max_tool_steps = _check_int("max_tool_steps", max_tool_steps, 0)
        if on_agent_error is not None and not callable(on_agent_error):
            raise UsageError("on_agent_error must be callable or None")
        self.on_agent_error = on_agent_error
        self.continue_on_error = bool(continue_on_error)
        topics = {} if topics is None else topics
        if not isinstance(topics, Mapping):
            raise UsageError("topics must map agent ids or names to topic patterns")
        known = {a.id for a in self.agents} | {a.name for a in self.agents}
        unknown = set(topics) - known
        if unknown:
            raise UsageError(f"topics names unknown agents: {sorted(unknown)}")
        self.errors: list[AgentFailedError] = []
        self._subs: dict[str, Subscription] = {}
        for agent in self.agents:
            patterns = topics.get(agent.id, topics.get(agent.name, ()))
            self._subs[agent.id] = bus.subscribe(agent.id, topics=patterns, inbox_size=inbox_size)
        self._busy = 0
        self._stopping = False
        self._started = False
        self._finished = False
        # set (and replaced) whenever a batch ends or the task set changes; created on
        # the loop that waits on it
        self._activity: anyio.Event | None = None
        self._task_group: anyio.abc.TaskGroup | None = None

    # -- state -------------------------------------------------------------------------

    @property
    def tasks(self) -> list[Task]:
        """A snapshot of the shared task set."""
        return list(self._tasks.values())

    def add_task(self, task: Task) -> None:
        """Add (or replace) a task in the shared set; agents see it on their next call."""
        if not isinstance(task, Task):
            raise UsageError("add_task takes a Task")
        self._tasks[task.id] = task
        self._changed()

    @property
    def idle(self) -> bool:
        """True when no agent is working and every inbox is empty."""
        return self._busy == 0 and not any(len(s) for s in self._subs.values())

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called."""
        return self._stopping

    @property
    def finished(self) -> bool:
        """True once :meth:`run` has returned (every agent stopped)."""
        return self._finished

    def _changed(self) -> None:
        if self._activity is not None:
            self._activity.set()
            self._activity = anyio.Event()

    async def wait_until(self, predicate: Callable[[AgentRunner], bool]) -> None:
        """Return once ``predicate(runner)`` is true; checked after every batch.

        Also returns when every agent has stopped, whatever the predicate says.
        """
        if not callable(predicate):
            raise UsageError("predicate must be callable")
        while not predicate(self) and not self._finished:
            if self._activity is None:
                self._activity = anyio.Event()
            await self._activity.wait()

    # -- running -----------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run every agent until :meth:`stop` (or until all of them stopped).

        Compatible with ``await task_group.start(runner.run)``, which returns once the
        agents are listening.

        Raises:
            UsageError: If this runner was already started.
        """
        if self._started:
            raise UsageError("an AgentRunner runs once; create a new one")
        self._started = True
        if self._activity is None:
            self._activity = anyio.Event()
        kickoff = bool(self._tasks)
        try:
            async with anyio.create_task_group() as tg:
                for agent in self.agents:
                    if kickoff:
                        self._busy += 1  # counted before the task runs: not idle yet
                    tg.start_soon(self._agent_loop, agent, self._subs[agent.id], kickoff)
                task_status.started()
        finally:
            for sub in self._subs.values():
                sub.close()
            self._finished = True
            self._changed()

    def stop(self) -> None:
        """Stop gracefully: accept nothing new, finish what the inboxes hold. Idempotent."""
        if self._stopping:
            return
        self._stopping = True
        for sub in self._subs.values():
            sub.close()
        self._changed()

    async def _agent_loop(self, agent: Agent, sub: Subscription, kickoff: bool) -> None:
        if kickoff:
            try:
                ok = await self._handle(agent, [])
            finally:
                self._busy -= 1
                self._changed()
            if not ok and not self.continue_on_error:
                sub.close()
                return
        while True:
            try:
                first = await sub.receive()
            except anyio.EndOfStream:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    batch.append(sub.receive_nowait())
                except (anyio.WouldBlock, anyio.EndOfStream):
                    break
            self._busy += 1
            try:
                ok = await self._handle(agent, batch)
            finally:
                self._busy -= 1
                self._changed()
            if not ok and not self.continue_on_error:
                sub.close()
                # the closed inbox still holds what was accepted: drop it visibly
                dropped = len(sub)
                if dropped:
                    _log.warning("agent %s stopped with %d queued messages", agent.name, dropped)
                return

    async def _handle(self, agent: Agent, batch: list[Message]) -> bool:
        """Decide and execute for one batch; report and return False on failure."""
        metrics = self.bus.metrics
        labels = {"agent": agent.name}
        metrics.inc("runtime_batches_total", labels=labels)
        observations: list[dict[str, Any]] = []
        step = 0
        try:
            while True:
                if observations:
                    result = await agent.adecide(
                        batch, self.tasks, tool_observations=list(observations)
                    )
                else:
                    result = await agent.adecide(batch, self.tasks)
                decisions = self._check_decisions(result)
                invoked = False
                for decision in decisions:
                    if isinstance(decision, InvokeTool):
                        invoked = True
                        observations.append(await self._invoke(agent, decision))
                    else:
                        await self._execute(agent, decision)
                if not invoked:
                    return True
                step += 1
                if step > self.max_tool_steps:
                    raise UsageError(
                        f"agent kept invoking tools past max_tool_steps={self.max_tool_steps}"
                    )
        except Exception as exc:
            await self._report(agent, exc)
            return False

    @staticmethod
    def _check_decisions(result: object) -> list[Decision]:
        if not isinstance(result, list | tuple):
            raise UsageError(f"adecide must return a list of decisions, not {result!r}")
        for decision in result:
            if not isinstance(decision, Decision):
                raise UsageError(f"adecide returned {decision!r}, which is not a Decision")
        return list(result)

    async def _execute(self, agent: Agent, decision: Decision) -> None:
        if isinstance(decision, SendMessage):
            await self.bus.publish(decision.message)
        elif isinstance(decision, UpdateTask):
            task = self._tasks.get(decision.task_id)
            if task is None:
                raise UsageError(f"UpdateTask names unknown task {decision.task_id!r}")
            self._tasks[task.id] = task.with_state(decision.state, decision.result)
            self._changed()
        else:
            raise UsageError(f"the runner cannot execute {decision!r}")

    async def _invoke(self, agent: Agent, decision: InvokeTool) -> dict[str, Any]:
        observation: dict[str, Any] = {
            "tool_name": decision.tool_name,
            "params": dict(decision.params),
            "call_id": decision.call_id,
        }
        self.bus.metrics.inc("runtime_tool_calls_total", labels={"agent": agent.name})
        try:
            if agent.tool_registry is None:
                raise UsageError(f"agent {agent.name!r} has no tool registry")
            observation["result"] = await agent.tool_registry.ainvoke(
                decision.tool_name, decision.params
            )
        except ConvergeError as exc:
            # the agent sees the failure and may recover; its loop goes on
            observation["result"] = {"error": str(exc)}
            observation["error"] = str(exc)
        return observation

    async def _report(self, agent: Agent, exc: Exception) -> None:
        error = AgentFailedError(f"agent {agent.name!r} failed: {exc!r}", agent_id=agent.id)
        error.__cause__ = exc
        self.errors.append(error)
        self.bus.metrics.inc("runtime_agent_errors_total", labels={"agent": agent.name})
        _log.warning("%s", error, exc_info=exc)
        if self.on_agent_error is None:
            return
        try:
            outcome = self.on_agent_error(error)
            if inspect.isawaitable(outcome):
                await outcome
        except Exception:
            _log.exception("on_agent_error raised while handling %s", error)

    # -- context manager ---------------------------------------------------------------

    async def __aenter__(self) -> AgentRunner:
        if self._task_group is not None or self._started:
            raise UsageError("an AgentRunner runs once; create a new one")
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._task_group = tg
        await tg.start(self.run)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        self.stop()
        assert self._task_group is not None
        return await self._task_group.__aexit__(exc_type, exc, tb)


@dataclass(frozen=True, slots=True)
class RunResult:
    """What :func:`run_agents` returns.

    Attributes:
        tasks: The task set when the run ended.
        errors: Every agent failure reported during the run.
        timed_out: True if the run ended because ``timeout`` elapsed.
    """

    tasks: tuple[Task, ...]
    errors: tuple[AgentFailedError, ...]
    timed_out: bool


def _check_timeout(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise UsageError(f"{name} must be a number of seconds >= 0 or None, got {value!r}")
    return float(value)


async def arun_agents(
    agents: Sequence[Agent],
    *,
    messages: Sequence[Message] = (),
    tasks: Sequence[Task] = (),
    until: Callable[[AgentRunner], bool] | None = None,
    timeout: float | None = None,  # noqa: ASYNC109 - the documented script-level deadline
    hooks: Sequence[MessageHook] = (),
    topics: Mapping[str, Sequence[str]] | None = None,
    inbox_size: int = 100,
    max_batch: int = 10,
    max_tool_steps: int = 8,
    on_agent_error: AgentErrorHandler | None = None,
    drain_timeout: float | None = 10.0,
) -> RunResult:
    """Run ``agents`` on a fresh bus until ``until`` holds, the system idles, or a timeout.

    Args:
        agents: The agents.
        messages: Published (in order) once the agents listen.
        tasks: The initial task set.
        until: ``until(runner) -> bool``, checked after every batch; when None the run
            ends once no agent is working and every inbox is empty.
        timeout: Seconds before the run is stopped; None for no limit.
        hooks: Message hooks for the bus.
        topics: Topic patterns per agent id or name.
        inbox_size: Capacity of every inbox.
        max_batch: Most messages per ``adecide`` call.
        max_tool_steps: Most tool follow-up calls per batch.
        on_agent_error: Called with each agent failure.
        drain_timeout: Seconds the graceful stop may take before the agents are
            cancelled; None waits as long as it takes.

    Returns:
        The final tasks, the reported errors and whether the timeout ended the run.

    Raises:
        UsageError: For invalid arguments.
    """
    timeout = _check_timeout("timeout", timeout)
    drain_timeout = _check_timeout("drain_timeout", drain_timeout)
    if until is not None and not callable(until):
        raise UsageError("until must be callable or None")
    if isinstance(messages, str | Message) or not isinstance(messages, Sequence):
        raise UsageError("messages must be a sequence of Message")
    for message in messages:
        if not isinstance(message, Message):
            raise UsageError(f"messages must be Message instances, not {message!r}")
    predicate: Callable[[AgentRunner], bool] = until if until is not None else _idle
    bus = MessageBus(hooks=hooks, inbox_size=inbox_size)
    runner = AgentRunner(
        bus,
        agents,
        tasks=tasks,
        topics=topics,
        max_batch=max_batch,
        max_tool_steps=max_tool_steps,
        on_agent_error=on_agent_error,
    )
    timed_out = False
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)
        with anyio.move_on_after(timeout if timeout is not None else float("inf")) as scope:
            for message in messages:
                await bus.publish(message)
            await runner.wait_until(predicate)
        timed_out = scope.cancelled_caught
        runner.stop()
        with anyio.move_on_after(drain_timeout if drain_timeout is not None else float("inf")):
            await runner.wait_until(_finished)
        tg.cancel_scope.cancel()
    bus.close()
    return RunResult(tuple(runner.tasks), tuple(runner.errors), timed_out)


def _idle(runner: AgentRunner) -> bool:
    return runner.idle


def _finished(runner: AgentRunner) -> bool:
    return runner.finished


def run_agents(
    agents: Sequence[Agent],
    *,
    messages: Sequence[Message] = (),
    tasks: Sequence[Task] = (),
    until: Callable[[AgentRunner], bool] | None = None,
    timeout: float | None = None,
    hooks: Sequence[MessageHook] = (),
    topics: Mapping[str, Sequence[str]] | None = None,
    inbox_size: int = 100,
    max_batch: int = 10,
    max_tool_steps: int = 8,
    on_agent_error: AgentErrorHandler | None = None,
    drain_timeout: float | None = 10.0,
) -> RunResult:
    """Synchronous form of :func:`arun_agents`, for scripts.

    Raises:
        SyncInEventLoopError: On an event-loop thread (``await arun_agents(...)`` there).
    """
    return _sync.run(
        arun_agents,
        agents,
        async_name="converge.runtime.arun_agents",
        messages=messages,
        tasks=tasks,
        until=until,
        timeout=timeout,
        hooks=hooks,
        topics=topics,
        inbox_size=inbox_size,
        max_batch=max_batch,
        max_tool_steps=max_tool_steps,
        on_agent_error=on_agent_error,
        drain_timeout=drain_timeout,
    )
