"""The ``Agent`` base class."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from converge import _sync
from converge.core.decisions import Decision, InvokeTool
from converge.core.identity import Identity
from converge.errors import UsageError

if TYPE_CHECKING:
    from converge.core.message import Message
    from converge.core.task import Task
    from converge.core.tools import ToolRegistry

__all__ = ["Agent"]


class Agent:
    """An agent: an identity plus a ``decide`` policy.

    Subclasses override :meth:`adecide` (for policies that do I/O, such as calling a
    model) or :meth:`decide` (for pure, fast policies); the other form is derived.

    Args:
        identity: The agent's cryptographic identity.
        tool_registry: Tools the runtime may invoke on this agent's behalf.
        name: A readable name; defaults to the identity fingerprint's first 12 hex digits.
    """

    def __init__(
        self,
        identity: Identity,
        tool_registry: ToolRegistry | None = None,
        *,
        name: str | None = None,
    ) -> None:
        if not isinstance(identity, Identity):
            raise UsageError("identity must be a converge.core.identity.Identity")
        self.identity = identity
        self.tool_registry = tool_registry
        self.name = name or identity.fingerprint[:12]

    @property
    def id(self) -> str:
        """The agent's id on the bus: its identity fingerprint."""
        return self.identity.fingerprint

    async def adecide(
        self, messages: list[Message], tasks: list[Task], **kwargs: Any
    ) -> list[Decision]:
        """Return the decisions for this batch of messages and tasks.

        The default runs :meth:`decide` (which must then not block).
        """
        if type(self).decide is Agent.decide:
            return []
        return self.decide(messages, tasks, **kwargs)

    async def ainvoke_tool(self, decision: InvokeTool) -> Any:
        """Run one tool this agent decided to invoke (the runtime calls this).

        The default validates and calls it through :attr:`tool_registry`; subclasses may
        wrap it (``LLMAgent`` records an OpenTelemetry ``execute_tool`` span).

        Raises:
            UsageError: If ``decision`` is not an ``InvokeTool``, or the agent has no tool
                registry.
            ToolError: If the tool is unknown, its arguments are invalid, or it failed.
        """
        if not isinstance(decision, InvokeTool):
            raise UsageError(f"ainvoke_tool takes an InvokeTool, not {type(decision).__name__}")
        if self.tool_registry is None:
            raise UsageError(f"agent {self.name!r} has no tool registry")
        return await self.tool_registry.ainvoke(decision.tool_name, decision.params)

    def decide(self, messages: list[Message], tasks: list[Task], **kwargs: Any) -> list[Decision]:
        """Synchronous form of :meth:`adecide`, for scripts.

        In async code, ``await agent.adecide(...)`` instead.
        """
        if type(self).adecide is Agent.adecide:
            return []
        return _sync.run(
            self.adecide, messages, tasks, async_name=f"{type(self).__name__}.adecide", **kwargs
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
