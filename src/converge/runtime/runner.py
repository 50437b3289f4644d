"""The agent runner: inbox -> ``adecide`` -> decisions, for a set of agents in one task group."""

from __future__ import annotations

import inspect
import logging
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any

import anyio
import anyio.abc

from converge import _sync
from converge._numbers import check_int, wait_seconds
from converge._repr import safe_repr
from converge.core.agent import Agent
from converge.core.decisions import Decision, InvokeTool, SendMessage, UpdateTask
from converge.core.events import DecisionsMade, EventEmitter, ToolInvoked, ToolResult
from converge.core.hooks import MessageHook
from converge.core.message import Message
from converge.core.store import Store
from converge.core.task import Task
from converge.errors import (
    AgentFailedError,
    BudgetExceededError,
    ClosedError,
    ConvergeError,
    UsageError,
)
from converge.runtime.bus import MessageBus, Subscription
from converge.runtime.policy import AgentRetry
from converge.runtime.records import DecisionLog, DecisionRecord, RecordedElsewhere, Step

__all__ = [
    "AgentErrorHandler",
    "AgentRunner",
    "DeadLetter",
    "RunResult",
    "arun_agents",
    "run_agents",
]

_log = logging.getLogger("converge.runtime")

#: ``on_agent_error(error)``; may be a plain function or a coroutine function.
AgentErrorHandler = Callable[[AgentFailedError], Awaitable[None] | None]


def _check_agents(agents: object) -> tuple[Agent, ...]:
    if isinstance(agents, Agent) or not isinstance(agents, Iterable):
        raise UsageError("agents must be a sequence of Agent")
    checked = tuple(agents)
    seen: set[str] = set()
    for agent in checked:
        if not isinstance(agent, Agent):
            raise UsageError(f"agents must be Agent instances, not {safe_repr(agent)}")
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
            raise UsageError(f"tasks must be Task instances, not {safe_repr(task)}")
        out[task.id] = task
    return out


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message an agent gave up on after its bounded retries.

    Attributes:
        agent_id: The agent that gave up.
        message: The message (replay it with :meth:`AgentRunner.areplay`).
        reason: The last failure, as text.
        attempts: How many attempts were made.
        at: When it was given up (Unix seconds).
    """

    agent_id: str
    message: Message
    reason: str
    attempts: int
    at: float


class _Part:
    """Part of a delivered batch: its own record, its messages to acknowledge."""

    __slots__ = ("ack", "done", "messages", "record")

    def __init__(
        self, messages: Sequence[Message], ack: Sequence[Message], record: DecisionRecord | None
    ) -> None:
        self.messages = tuple(messages)  # what adecide sees
        self.ack = tuple(ack)  # the delivered messages it settles
        self.record = record
        self.done = False


class AgentRunner:
    """Runs agents on a :class:`~converge.runtime.MessageBus`, one task per agent.

    Each agent gets an acknowledging subscription (its
    :attr:`~converge.core.agent.Agent.id`, plus the topic patterns given for it in
    ``topics``). Its loop waits for a message, takes up to ``max_batch`` queued messages,
    calls ``await agent.adecide(messages, tasks)`` and executes the decisions in order:

    * :class:`~converge.core.decisions.SendMessage`: ``await bus.publish(message)``
      (waiting for inbox space: backpressure).
    * :class:`~converge.core.decisions.InvokeTool`: ``agent.tool_registry.ainvoke``; the
      result becomes a tool observation ``{"tool_name", "params", "call_id", "result"}``
      (a failure: ``"result": {"error": text}`` plus ``"error": text``). When a step
      invoked tools, ``adecide`` is called again with the same messages and
      ``tool_observations=`` every observation of this batch so far, at most
      ``max_tool_steps`` times; a step past that raises
      :class:`~converge.errors.BudgetExceededError`, as ``arun_react`` does.
    * :class:`~converge.core.decisions.UpdateTask`: replaces the task in the shared task
      set (an unknown task id is an agent failure).

    Then it acknowledges each message (``bus.aack``). With a ``store``, each step's
    decisions are recorded (:class:`~converge.runtime.records.DecisionLog`) before they
    are executed, and a redelivered message (same id) replays its recorded decisions
    instead of calling the agent again: side effects happen once when receivers
    deduplicate by message id (the outbox does). The first record of a message wins:
    a runner that decided messages another consumer recorded meanwhile (both were
    handed them, one claimed from the other) replays that record instead of executing
    its own decisions, and decides again only the messages nobody recorded; likewise
    the first tool observations recorded for a step are the ones the next step sees.

    A failure is retried (``retry``, an :class:`~converge.runtime.AgentRetry`): a rate
    limit with ``retry_after`` waits and runs the batch again (the agent keeps its queued
    messages and keeps receiving); other failures are retried with backoff, resuming
    from the last recorded step. When the attempts are used up, a batch of several
    messages is tried one message at a time; a message that still fails becomes a dead
    letter (``bus.adead_letter``, :attr:`dead_letters`, :meth:`areplay`), an
    :class:`~converge.errors.AgentFailedError` (the last error is its ``__cause__``) goes
    to ``on_agent_error``, :attr:`errors` and ``runtime_agent_errors_total{agent}``, and
    the agent goes on with its next message.

    If ``tasks`` is not empty each agent is called once at start with no messages, so
    task-driven agents can begin (a failure there is retried and reported the same way).

    :meth:`stop` is graceful: subscriptions close (nothing new is accepted), every agent
    finishes what is already in its inbox, and :meth:`run` returns. As an async context
    manager the runner runs in the background of the ``async with`` block and stops
    gracefully at its end. Messages left unprocessed by a cancellation are counted in
    ``bus_messages_dropped_total{stage="runner_cancelled"}`` and logged (unacknowledged:
    a durable inbox hands them out again).

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
        inbox_size: Capacity of each agent's inbox; the bus default when None.
        store: Where decisions are recorded before execution; None records them in
            memory for the retries only (nothing survives a restart).
        retry: The retry schedule; ``AgentRetry()`` when None.
        record_retention: Seconds a decision record is kept (it must outlast the
            redeliveries of its messages).
        max_dead_letters: Most dead letters :attr:`dead_letters` keeps (oldest go first,
            counted as drops).
        sleep: ``async sleep(seconds)`` used for retry waits; ``anyio.sleep`` when None
            (tests pass a fake one).
        events: Where progress events go (:mod:`converge.core.events`):
            :class:`~converge.core.events.ToolInvoked` and
            :class:`~converge.core.events.ToolResult` for each tool the runner runs,
            :class:`~converge.core.events.DecisionsMade` for each ``adecide`` step
            (unless it goes to the agent's own ``events``, where an ``LLMAgent``
            reports its decisions itself). None: each agent's ``events`` attribute,
            when it has one.

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
        inbox_size: int | None = None,
        store: Store | None = None,
        retry: AgentRetry | None = None,
        record_retention: float = 7 * 24 * 3600,
        max_dead_letters: int = 1000,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        events: EventEmitter | None = None,
    ) -> None:
        if not isinstance(bus, MessageBus):
            raise UsageError("bus must be a MessageBus")
        self.bus = bus
        self.agents = _check_agents(agents)
        self._tasks = _check_tasks(tasks)
        self.max_batch = check_int("max_batch", max_batch, 1)
        self.max_tool_steps = check_int("max_tool_steps", max_tool_steps, 0)
        if on_agent_error is not None and not callable(on_agent_error):
            raise UsageError("on_agent_error must be callable or None")
        self.on_agent_error = on_agent_error
        if retry is not None and not isinstance(retry, AgentRetry):
            raise UsageError("retry must be an AgentRetry or None")
        self.retry = retry if retry is not None else AgentRetry()
        if store is not None and not isinstance(store, Store):
            raise UsageError("store must be a converge Store or None")
        self._log = DecisionLog(store, retention=record_retention) if store is not None else None
        if sleep is not None and not callable(sleep):
            raise UsageError("sleep must be an async callable or None")
        self._sleep: Callable[[float], Awaitable[None]] = sleep or anyio.sleep
        if events is not None and not isinstance(events, EventEmitter):
            raise UsageError("events must be a converge.core.events.EventEmitter or None")
        self.events = events
        self._dead: deque[DeadLetter] = deque(
            maxlen=min(check_int("max_dead_letters", max_dead_letters, 1), sys.maxsize)
        )
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
            self._subs[agent.id] = bus.subscribe(
                agent.id, topics=patterns, inbox_size=inbox_size, ack=True
            )
        self._inflight: dict[str, list[Message]] = {}
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
        """True when no agent is working (or waiting to retry) and every inbox is empty."""
        return self._busy == 0 and not any(len(s) for s in self._subs.values())

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called."""
        return self._stopping

    @property
    def finished(self) -> bool:
        """True once :meth:`run` has returned (every agent stopped)."""
        return self._finished

    @property
    def dead_letters(self) -> list[DeadLetter]:
        """The messages agents gave up on, oldest first (at most ``max_dead_letters``)."""
        return list(self._dead)

    async def areplay(self, message_id: str) -> DeadLetter:
        """Hand a dead letter back to its agent (it is processed like a new delivery).

        With a durable inbox, replay its record there instead (the connector's inbox):
        the bus then redelivers it with acknowledgement tracking.

        Returns:
            The dead letter, now removed from :attr:`dead_letters`.

        Raises:
            UsageError: If no dead letter has that message id.
            ClosedError: If the runner has stopped.
        """
        for letter in self._dead:
            if letter.message.id == message_id:
                break
        else:
            raise UsageError(f"no dead letter with message id {message_id!r}")
        sub = self._subs[letter.agent_id]
        if sub.closed:
            raise ClosedError("the runner has stopped; replay after starting a new one")
        self._dead.remove(letter)
        if not await sub._put(letter.message):
            raise ClosedError("the runner stopped during the replay")
        return letter

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
            self._count_unprocessed()
            self._finished = True
            self._changed()

    def _count_unprocessed(self) -> None:
        # only a cancellation leaves work behind: a graceful stop drains every inbox
        left = sum(len(batch) for batch in self._inflight.values())
        left += sum(len(sub) for sub in self._subs.values())
        if left:
            self.bus.metrics.inc(
                "bus_messages_dropped_total", left, labels={"stage": "runner_cancelled"}
            )
            _log.warning(
                "agent runner cancelled with %d unprocessed messages (not acknowledged: a "
                "durable inbox hands them out again)",
                left,
            )

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
                await self._attempts(agent, sub, [])
            finally:
                self._busy -= 1
                self._changed()
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
            self._inflight[sub.consumer] = batch  # the consumer name is the agent id
            try:
                await self._attempts(agent, sub, batch)
                # only a cancellation skips this: the batch is then counted as dropped
                del self._inflight[sub.consumer]
            finally:
                self._busy -= 1
                self._changed()

    async def _plan(self, agent: Agent, batch: list[Message]) -> list[_Part]:
        if self._log is None or not batch:
            return [_Part(batch, batch, None)]
        found, fresh = await self._log.afind(agent.id, batch)
        parts = [_Part(f.record.messages, f.messages, f.record) for f in found]
        if found:
            self.bus.metrics.inc(
                "runtime_decisions_reused_total", len(found), labels={"agent": agent.name}
            )
        if fresh:
            parts.append(_Part(fresh, fresh, None))
        return parts

    async def _attempts(self, agent: Agent, sub: Subscription, batch: list[Message]) -> None:
        """Process ``batch`` with retries; dead-letter what still fails."""
        metrics = self.bus.metrics
        labels = {"agent": agent.name}
        metrics.inc("runtime_batches_total", labels=labels)
        parts: list[_Part] | None = None
        attempt = 0
        while True:
            try:
                if parts is None:
                    parts = await self._plan(agent, batch)
                index = 0
                while index < len(parts):
                    part = parts[index]
                    if not part.done:
                        try:
                            await self._run_part(agent, part)
                        except RecordedElsewhere:
                            # Another consumer recorded some of these messages first:
                            # replay what it recorded, decide the rest again.
                            parts[index : index + 1] = await self._plan(agent, list(part.ack))
                            continue
                        for message in part.ack:
                            await sub.aack(message)
                    index += 1
                return
            except Exception as exc:
                wait = self.retry.retry_after(exc)
                if wait is not None:
                    metrics.inc("runtime_rate_limit_waits_total", labels=labels)
                    _log.warning(
                        "agent %s is rate limited; running its batch again in %.3g s",
                        agent.name,
                        wait,
                    )
                    await self._sleep(wait)
                    continue
                attempt += 1
                if attempt >= self.retry.max_attempts or not self.retry.retryable(exc):
                    pending = [p for p in parts or [] if not p.done] or [_Part(batch, batch, None)]
                    await self._give_up(agent, sub, pending, exc, attempt)
                    return
                delay = self.retry.delay(attempt)
                metrics.inc("runtime_agent_retries_total", labels=labels)
                _log.warning(
                    "agent %s failed (attempt %d of %d), retrying in %.3g s: %r",
                    agent.name,
                    attempt,
                    self.retry.max_attempts,
                    delay,
                    exc,
                )
                await self._sleep(delay)

    async def _give_up(
        self,
        agent: Agent,
        sub: Subscription,
        parts: list[_Part],
        exc: Exception,
        attempts: int,
    ) -> None:
        for part in parts:
            if part.record is None and len(part.ack) > 1 and self.retry.retryable(exc):
                # nothing decided yet: find the failing message by trying them one by one
                for message in part.ack:
                    await self._attempts(agent, sub, [message])
                continue
            error = await self._report(agent, exc)
            reason = f"{error} after {attempts} attempt(s)"
            for message in part.ack:
                await self._dead_letter(agent, sub, message, reason, attempts)

    async def _dead_letter(
        self, agent: Agent, sub: Subscription, message: Message, reason: str, attempts: int
    ) -> None:
        if len(self._dead) == self._dead.maxlen:
            oldest = self._dead[0]
            self.bus.metrics.inc("bus_messages_dropped_total", labels={"stage": "dead_letters"})
            _log.warning(
                "dead letters full: message %s of agent %s is no longer kept for replay",
                oldest.message.id,
                oldest.agent_id,
            )
        self._dead.append(DeadLetter(agent.id, message, reason, attempts, time.time()))
        self.bus.metrics.inc("runtime_dead_letters_total", labels={"agent": agent.name})
        await sub.adead_letter(message, reason)

    async def _run_part(self, agent: Agent, part: _Part) -> None:
        """Decide (or replay what was recorded) and execute, step by step."""
        observations: list[dict[str, Any]] = []
        index = 0
        while True:
            known: tuple[dict[str, Any], ...] | None = None
            if part.record is None or index >= len(part.record.steps):
                decisions = await self._decide(agent, part.messages, observations)
                await self._record(agent, part, decisions)
            if part.record is not None:
                # recorded: a replay, ours, or the step another consumer appended first
                step = part.record.steps[index]
                decisions, known = list(step.decisions), step.observations
            calls = [d for d in decisions if isinstance(d, InvokeTool)]
            if calls and index >= self.max_tool_steps:
                raise BudgetExceededError(
                    f"agent {agent.name!r} still invoking tools after "
                    f"max_tool_steps={self.max_tool_steps} follow-up steps"
                )
            fresh: list[dict[str, Any]] = []
            for decision in decisions:
                if isinstance(decision, InvokeTool):
                    if known is not None and len(fresh) < len(known):
                        fresh.append(known[len(fresh)])
                    else:
                        fresh.append(await self._invoke(agent, decision))
                else:
                    await self._execute(agent, decision)
            if not calls:
                part.done = True
                return
            if known is None:
                await self._observe(part, fresh)
                if part.record is not None:  # ours, or another consumer's recorded first
                    fresh = list(part.record.steps[index].observations or fresh)
            observations.extend(fresh)
            index += 1

    async def _decide(
        self, agent: Agent, messages: Sequence[Message], observations: list[dict[str, Any]]
    ) -> list[Decision]:
        if observations:
            result = await agent.adecide(
                list(messages), self.tasks, tool_observations=list(observations)
            )
        else:
            result = await agent.adecide(list(messages), self.tasks)
        decisions = self._check_decisions(result)
        emitter = self._emitter(agent)
        if (
            emitter is not None
            and emitter is not getattr(agent, "events", None)
            and emitter.wants(DecisionsMade)
        ):
            emitter.emit(DecisionsMade(source=agent.id, decisions=tuple(decisions)))
        return decisions

    def _emitter(self, agent: Agent) -> EventEmitter | None:
        if self.events is not None:
            return self.events
        own = getattr(agent, "events", None)
        return own if isinstance(own, EventEmitter) else None

    async def _record(self, agent: Agent, part: _Part, decisions: list[Decision]) -> None:
        if not part.messages:
            return  # a kickoff call answers no message: nothing to redeliver
        if self._log is None:
            step = Step(tuple(decisions))
            if part.record is None:
                part.record = DecisionRecord("", agent.id, part.messages, (step,))
            else:
                part.record = replace(part.record, steps=(*part.record.steps, step))
        elif part.record is None:
            part.record = await self._log.acreate(agent.id, part.messages, decisions)
        else:
            part.record = await self._log.aappend(part.record, decisions)

    async def _observe(self, part: _Part, observations: list[dict[str, Any]]) -> None:
        record = part.record
        if record is None:
            return
        if self._log is None:
            last = record.steps[-1]
            steps = (*record.steps[:-1], Step(last.decisions, tuple(observations)))
            part.record = replace(record, steps=steps)
        else:
            part.record = await self._log.aobserve(record, observations)

    @staticmethod
    def _check_decisions(result: object) -> list[Decision]:
        if not isinstance(result, list | tuple):
            raise UsageError(f"adecide must return a list of decisions, not {safe_repr(result)}")
        for decision in result:
            if not isinstance(decision, Decision):
                raise UsageError(f"adecide returned {safe_repr(decision)}, which is not a Decision")
        return list(result)

    async def _execute(self, agent: Agent, decision: Decision) -> None:
        if isinstance(decision, SendMessage):
            if not await self.bus.publish(decision.message):
                self.bus.metrics.inc("bus_messages_dropped_total", labels={"stage": "no_receiver"})
                _log.warning(
                    "message %s from agent %s reached no receiver (recipient %r, topics %s)",
                    decision.message.id,
                    agent.name,
                    decision.message.recipient,
                    [t.name for t in decision.message.topics],
                )
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
        emitter = self._emitter(agent)
        if emitter is not None and emitter.wants(ToolInvoked):
            emitter.emit(
                ToolInvoked(
                    source=agent.id,
                    tool_name=decision.tool_name,
                    arguments=dict(decision.params),
                    tool_call_id=decision.call_id,
                )
            )
        try:
            observation["result"] = await agent.ainvoke_tool(decision)
        except ConvergeError as exc:
            # the agent sees the failure and may recover; its loop goes on
            observation["result"] = {"error": str(exc)}
            observation["error"] = str(exc)
        if emitter is not None and emitter.wants(ToolResult):
            failed = "error" in observation
            emitter.emit(
                ToolResult(
                    source=agent.id,
                    tool_name=decision.tool_name,
                    tool_call_id=decision.call_id,
                    result=None if failed else observation["result"],
                    error=observation["error"] if failed else None,
                )
            )
        return observation

    async def _report(self, agent: Agent, exc: Exception) -> AgentFailedError:
        error = AgentFailedError(f"agent {agent.name!r} failed: {exc!r}", agent_id=agent.id)
        error.__cause__ = exc
        self.errors.append(error)
        self.bus.metrics.inc("runtime_agent_errors_total", labels={"agent": agent.name})
        _log.warning("%s", error, exc_info=exc)
        if self.on_agent_error is not None:
            try:
                outcome = self.on_agent_error(error)
                if inspect.isawaitable(outcome):
                    await outcome
            except Exception:
                _log.exception("on_agent_error raised while handling %s", error)
        return error

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
    seconds = wait_seconds(value)
    if seconds is None:
        raise UsageError(f"{name} must be a number of seconds >= 0 or None, got {safe_repr(value)}")
    return seconds


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
    retry: AgentRetry | None = None,
    store: Store | None = None,
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
        retry: How failed batches are retried (see :class:`AgentRunner`).
        store: Where decisions are recorded before execution (see :class:`AgentRunner`).

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
            raise UsageError(f"messages must be Message instances, not {safe_repr(message)}")
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
        retry=retry,
        store=store,
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
    retry: AgentRetry | None = None,
    store: Store | None = None,
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
        retry=retry,
        store=store,
    )
