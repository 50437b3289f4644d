"""A ReAct loop: run an agent's ``InvokeTool`` decisions and feed the results back.

Each step asks the agent to decide (with the observations so far); its ``InvokeTool``
decisions run through the tool registry and become observations for the next step; the
loop ends at the first step with no ``InvokeTool``. Steps and tokens are bounded.
:class:`~converge.extensions.llm.LLMAgent` sends the observations back as native
assistant ``tool_calls`` and ``tool`` result messages. Each tool call is announced on the
agent's progress events (:class:`~converge.core.events.ToolInvoked`, then
:class:`~converge.core.events.ToolResult`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from converge import _sync
from converge.core.agent import Agent
from converge.core.decisions import Decision, InvokeTool
from converge.core.events import EventEmitter, ToolInvoked, ToolResult
from converge.core.message import Message
from converge.core.task import Task
from converge.core.tools import ToolRegistry
from converge.errors import BudgetExceededError, ToolError, UsageError
from converge.extensions.llm.protocol import Usage
from converge.extensions.llm.telemetry import tool_span

__all__ = ["ReActResult", "arun_react", "run_react"]


@dataclass(frozen=True, slots=True)
class ReActResult:
    """What a ReAct loop produced.

    Attributes:
        decisions: Every non-``InvokeTool`` decision of every step, in order (the final
            step's last).
        observations: One ``{"tool_name", "params", "call_id", "step", "result"}`` (or
            ``"error"`` instead of ``"result"``) per tool call made; ``step`` is the
            number of the step that made the call.
        steps: How many times the agent was asked to decide.
        usage: Tokens used by all steps (as far as the provider reported them: counts
            no step reported stay None).
    """

    decisions: tuple[Decision, ...]
    observations: tuple[dict[str, Any], ...]
    steps: int
    usage: Usage

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise UsageError("steps must be a non-negative integer")
        if not isinstance(self.usage, Usage):
            raise UsageError("usage must be a Usage")


def _check(max_steps: int, max_tokens: int | None) -> None:
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise UsageError("max_steps must be a positive integer")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise UsageError("max_tokens must be a positive integer or None")


def _listed(name: str, items: Any) -> list[Any]:
    """``items`` as a list, once (so a generator is not used up by the first step)."""
    if isinstance(items, str | bytes | Mapping) or not isinstance(items, Iterable):
        raise UsageError(f"{name} must be a list, not {type(items).__name__}")
    return list(items)


async def _observe(
    registry: ToolRegistry,
    call: InvokeTool,
    step: int,
    events: EventEmitter | None,
    source: str,
) -> dict[str, Any]:
    observation: dict[str, Any] = {
        "tool_name": call.tool_name,
        "params": dict(call.params),
        "call_id": call.call_id,
        "step": step,
    }
    if events is not None and events.wants(ToolInvoked):
        events.emit(
            ToolInvoked(
                source=source,
                tool_name=call.tool_name,
                arguments=dict(call.params),
                tool_call_id=call.call_id,
            )
        )
    try:
        # an ``execute_tool`` span (and tool counters) per invocation; the error, if any,
        # leaves the span recorded before it becomes an observation
        with tool_span(call.tool_name, call_id=call.call_id, arguments=call.params):
            observation["result"] = await registry.ainvoke(call.tool_name, call.params)
    except ToolError as exc:
        cause = exc.__cause__
        observation["error"] = f"{type(cause).__name__}: {cause}" if cause else str(exc)
    if events is not None and events.wants(ToolResult):
        events.emit(
            ToolResult(
                source=source,
                tool_name=call.tool_name,
                tool_call_id=call.call_id,
                result=observation.get("result"),
                error=observation.get("error"),
            )
        )
    return observation


async def arun_react(
    agent: Agent,
    messages: Sequence[Message],
    tasks: Sequence[Task],
    *,
    max_steps: int = 8,
    max_tokens: int | None = None,
    tool_registry: ToolRegistry | None = None,
    events: EventEmitter | None = None,
) -> ReActResult:
    """Run ``agent`` until it stops invoking tools.

    A tool that raises (or gets invalid arguments) does not end the loop: the error text
    becomes its observation, so the model can recover.

    Args:
        agent: The deciding agent (typically an :class:`~converge.extensions.llm.LLMAgent`);
            its ``adecide`` must accept ``tool_observations``. Token usage is read from its
            ``last_usage`` after each step.
        messages: Incoming messages (the same each step).
        tasks: Tasks (the same each step).
        max_steps: Most ``adecide`` calls.
        max_tokens: Token budget over all steps; None for none. Counted as
            :attr:`Usage.total_tokens <converge.extensions.llm.Usage.total_tokens>`:
            input plus output tokens, where prompt-cache reads and writes are part of
            the input and reasoning tokens part of the output (each token once). A step
            whose usage the provider did not report counts as 0.
        tool_registry: Where tools run; the agent's ``tool_registry`` by default.
        events: Where :class:`~converge.core.events.ToolInvoked` and
            :class:`~converge.core.events.ToolResult` go; the agent's ``events`` by
            default.

    Returns:
        The :class:`ReActResult`.

    Raises:
        BudgetExceededError: When a step still invokes tools after ``max_steps`` steps, or
            the steps so far used more than ``max_tokens`` tokens and more are needed.
        UsageError: For invalid arguments or an agent without a tool registry.
    """
    _check(max_steps, max_tokens)
    if not isinstance(agent, Agent):
        raise UsageError("agent must be a converge.core.Agent")
    registry = tool_registry if tool_registry is not None else agent.tool_registry
    if not isinstance(registry, ToolRegistry):
        raise UsageError("a ReAct loop needs a ToolRegistry (on the agent or as tool_registry)")
    if events is None:
        events = getattr(agent, "events", None)
    if events is not None and not isinstance(events, EventEmitter):
        raise UsageError("events must be a converge.core.events.EventEmitter")
    messages, tasks = _listed("messages", messages), _listed("tasks", tasks)
    decided: list[Decision] = []
    observations: list[dict[str, Any]] = []
    usage = Usage(None, None)
    for step in range(1, max_steps + 1):
        decisions = await agent.adecide(
            list(messages), list(tasks), tool_observations=list(observations) or None
        )
        step_usage = getattr(agent, "last_usage", None)
        if isinstance(step_usage, Usage):
            usage = usage + step_usage
        calls = [d for d in decisions if isinstance(d, InvokeTool)]
        decided.extend(d for d in decisions if not isinstance(d, InvokeTool))
        if not calls:
            return ReActResult(tuple(decided), tuple(observations), step, usage)
        if step == max_steps:
            raise BudgetExceededError(
                f"ReAct loop still invoking tools after max_steps={max_steps} steps"
            )
        if max_tokens is not None and usage.total_tokens > max_tokens:
            raise BudgetExceededError(
                f"ReAct loop used {usage.total_tokens} tokens in {step} step(s), over the "
                f"budget of {max_tokens}"
            )
        for call in calls:
            observations.append(await _observe(registry, call, step, events, agent.id))
    raise AssertionError("unreachable")  # pragma: no cover


def run_react(
    agent: Agent,
    messages: Sequence[Message],
    tasks: Sequence[Task],
    *,
    max_steps: int = 8,
    max_tokens: int | None = None,
    tool_registry: ToolRegistry | None = None,
    events: EventEmitter | None = None,
) -> ReActResult:
    """Synchronous :func:`arun_react`, for scripts (on the agent's own loop when it has one).

    Args:
        agent: As for :func:`arun_react`.
        messages: As for :func:`arun_react`.
        tasks: As for :func:`arun_react`.
        max_steps: As for :func:`arun_react`.
        max_tokens: As for :func:`arun_react`.
        tool_registry: As for :func:`arun_react`.
        events: As for :func:`arun_react`.

    Returns:
        The :class:`ReActResult`.

    Raises:
        SyncInEventLoopError: When called on an event-loop thread.
    """
    kwargs: dict[str, Any] = {
        "max_steps": max_steps,
        "max_tokens": max_tokens,
        "tool_registry": tool_registry,
        "events": events,
    }
    run_sync = getattr(agent, "run_sync", None)
    if callable(run_sync):
        result: ReActResult = run_sync(
            arun_react, agent, messages, tasks, async_name="arun_react", **kwargs
        )
        return result
    return _sync.run(arun_react, agent, messages, tasks, async_name="arun_react", **kwargs)
