"""Decisions: what an agent's ``decide`` asks the runtime to do.

Each decision has a JSON form whose ``"type"`` is the class name::

    {"type": "SendMessage", "message": {"recipient": "b", "payload": {"text": "hi"}}}
    {"type": "InvokeTool", "tool_name": "search", "params": {"q": "x"}, "call_id": "c1"}
    {"type": "UpdateTask", "task_id": "t1", "state": "completed", "result": 42}
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from converge._repr import safe_repr
from converge.core.message import Message, new_id
from converge.core.task import TaskState
from converge.core.task import _state as _task_state
from converge.errors import FormatError, UsageError

__all__ = [
    "Decision",
    "InvokeTool",
    "SendMessage",
    "UpdateTask",
    "decision_from_dict",
    "decisions_from_json",
    "decisions_to_json",
]


@dataclass(frozen=True, slots=True)
class Decision:
    """Base of every decision."""

    type_name: ClassVar[str] = "Decision"

    def to_dict(self) -> dict[str, Any]:
        """The decision's JSON form (see the module docstring)."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class SendMessage(Decision):
    """Send ``message`` on the bus."""

    message: Message
    type_name: ClassVar[str] = "SendMessage"

    def __post_init__(self) -> None:
        if not isinstance(self.message, Message):
            raise UsageError("SendMessage.message must be a Message")

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type_name, "message": self.message.to_dict()}


@dataclass(frozen=True, slots=True)
class InvokeTool(Decision):
    """Call a registered tool; its result comes back as a tool observation."""

    tool_name: str
    params: Mapping[str, Any] = field(default_factory=dict)
    call_id: str = field(default_factory=new_id)
    type_name: ClassVar[str] = "InvokeTool"

    def __post_init__(self) -> None:
        if not isinstance(self.tool_name, str) or not self.tool_name:
            raise UsageError("InvokeTool.tool_name must be a non-empty string")
        if not isinstance(self.params, Mapping):
            raise UsageError("InvokeTool.params must be a mapping")
        if not isinstance(self.call_id, str) or not self.call_id:
            raise UsageError("InvokeTool.call_id must be a non-empty string")

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type_name,
            "tool_name": self.tool_name,
            "params": dict(self.params),
            "call_id": self.call_id,
        }


@dataclass(frozen=True, slots=True)
class UpdateTask(Decision):
    """Move a task to ``state`` (with a result)."""

    task_id: str
    state: TaskState
    result: Any = None
    type_name: ClassVar[str] = "UpdateTask"

    def __post_init__(self) -> None:
        if not isinstance(self.task_id, str) or not self.task_id:
            raise UsageError("UpdateTask.task_id must be a non-empty string")
        object.__setattr__(self, "state", _task_state(self.state))

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type_name,
            "task_id": self.task_id,
            "state": self.state.value,
            "result": self.result,
        }


def decision_from_dict(data: Mapping[str, Any], *, sender: str | None = None) -> Decision:
    """Parse one decision from its JSON form.

    Args:
        data: A mapping with a ``"type"`` key naming the decision class.
        sender: Filled into a ``SendMessage`` whose message names no sender (a model
            producing decisions for an agent does not know the agent's id).

    Raises:
        FormatError: If the type is unknown or a field is missing or of the wrong type.
    """
    if not isinstance(data, Mapping):
        raise FormatError(f"a decision is a JSON object, not {type(data).__name__}")
    kind = data.get("type")
    fields = {k: v for k, v in data.items() if k != "type"}
    try:
        if kind == "SendMessage":
            raw = fields.get("message")
            if not isinstance(raw, Mapping):
                raise FormatError("SendMessage needs a 'message' object")
            raw = dict(raw)
            if sender is not None:
                raw.setdefault("sender", sender)
            return SendMessage(Message.from_dict(raw))
        if kind == "InvokeTool":
            extra = set(fields) - {"tool_name", "params", "call_id"}
            if extra:
                raise FormatError(f"unknown InvokeTool fields: {sorted(extra)}")
            if "tool_name" not in fields:
                raise FormatError("InvokeTool needs 'tool_name'")
            return InvokeTool(**fields)
        if kind == "UpdateTask":
            extra = set(fields) - {"task_id", "state", "result"}
            if extra or "task_id" not in fields or "state" not in fields:
                raise FormatError("UpdateTask needs 'task_id' and 'state' (and optional 'result')")
            return UpdateTask(**fields)
    except (UsageError, TypeError) as exc:
        raise FormatError(f"invalid {kind} decision: {exc}") from exc
    raise FormatError(f"unknown decision type {kind!r}; one of SendMessage, InvokeTool, UpdateTask")


def decisions_to_json(decisions: Iterable[Decision]) -> list[dict[str, Any]]:
    """The JSON form of ``decisions``, exact enough to execute them again.

    Messages keep their ids, timestamps and signatures and tool calls their call ids, so
    decisions recorded before execution and read back after a crash produce the same
    message ids (which receivers and the outbox deduplicate on).

    Raises:
        UsageError: For something that is not a Decision, or ``decisions`` not iterable.
    """
    if not isinstance(decisions, Iterable) or isinstance(decisions, str | bytes | Mapping):
        raise UsageError(
            f"decisions must be an iterable of Decision, not {safe_repr(decisions):.80}"
        )
    out = []
    for decision in decisions:
        if not isinstance(decision, Decision):
            raise UsageError(f"not a Decision: {safe_repr(decision)}")
        out.append(decision.to_dict())
    return out


def decisions_from_json(data: object) -> list[Decision]:
    """Read back what :func:`decisions_to_json` wrote (ids and call ids unchanged).

    Raises:
        FormatError: If ``data`` is not a list of decision objects.
    """
    if not isinstance(data, list):
        raise FormatError(f"recorded decisions are a JSON list, not {type(data).__name__}")
    out: list[Decision] = []
    for item in data:
        if isinstance(item, Mapping) and item.get("type") == "SendMessage":
            raw = item.get("message")
            if not isinstance(raw, Mapping) or set(item) - {"type", "message"}:
                raise FormatError("a recorded SendMessage holds exactly one 'message' object")
            out.append(SendMessage(Message.from_dict(raw)))
        else:
            out.append(decision_from_dict(item))
    return out
