"""Tasks: units of work handed to agents through ``decide(messages, tasks)``."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from converge._repr import safe_repr
from converge.core.message import new_id
from converge.errors import FormatError, UsageError

__all__ = ["Task", "TaskState"]


class TaskState(enum.StrEnum):
    """Lifecycle of a task."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


def _state(value: TaskState | str) -> TaskState:
    """``value`` as a :class:`TaskState`; a UsageError for anything else."""
    if not isinstance(value, str):  # Enum's own error would repr it (RecursionError)
        raise UsageError(f"task state must be a str, not {type(value).__name__}")
    try:
        return TaskState(value)
    except ValueError:
        raise UsageError(
            f"unknown task state {safe_repr(value)}; one of {[s.value for s in TaskState]}"
        ) from None


@dataclass(frozen=True, slots=True, kw_only=True)
class Task:
    """An immutable task record; use :meth:`with_state` to move it along.

    Args:
        objective: What should be achieved, in words.
        inputs: JSON-compatible inputs.
        state: Where the task is in its lifecycle.
        result: The outcome, once completed or failed.
        id: Unique id; 128 random bits as hex by default.
    """

    objective: str
    inputs: Mapping[str, Any] = field(default_factory=dict)
    state: TaskState = TaskState.PENDING
    result: Any = None
    id: str = field(default_factory=new_id)

    def __post_init__(self) -> None:
        if not isinstance(self.objective, str):
            raise UsageError("objective must be a string")
        if not isinstance(self.id, str) or not self.id:
            raise UsageError("id must be a non-empty string")
        if not isinstance(self.inputs, Mapping):
            raise UsageError("inputs must be a mapping")
        object.__setattr__(self, "state", _state(self.state))

    def with_state(self, state: TaskState | str, result: Any = None) -> Task:
        """Return a copy in ``state`` (with ``result``, when given)."""
        new_result = self.result if result is None else result
        return replace(self, state=_state(state), result=new_result)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dict."""
        return {
            "id": self.id,
            "objective": self.objective,
            "inputs": dict(self.inputs),
            "state": self.state.value,
            "result": self.result,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Task:
        """Build a task from :meth:`to_dict` output.

        Raises:
            FormatError: On missing, unknown or mistyped fields.
        """
        if not isinstance(data, Mapping):
            raise FormatError("a task is a mapping")
        allowed = {"id", "objective", "inputs", "state", "result"}
        unknown = set(data) - allowed
        if unknown:
            raise FormatError(f"unknown task fields: {sorted(unknown)}")
        if "objective" not in data:
            raise FormatError("task is missing 'objective'")
        try:
            return cls(**dict(data))
        except UsageError as exc:
            raise FormatError(str(exc)) from exc
