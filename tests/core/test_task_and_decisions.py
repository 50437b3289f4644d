"""Tasks and decisions: validation and the decision JSON format."""

from __future__ import annotations

from typing import Any

import pytest

from converge.core import (
    InvokeTool,
    Message,
    SendMessage,
    Task,
    TaskState,
    UpdateTask,
    decision_from_dict,
)
from converge.errors import FormatError, UsageError


def test_task_moves_through_states_immutably() -> None:
    task = Task(objective="sum", inputs={"a": 1})
    done = task.with_state("completed", result=3)
    assert task.state is TaskState.PENDING
    assert done.state is TaskState.COMPLETED
    assert done.result == 3
    assert done.id == task.id
    assert Task.from_dict(done.to_dict()) == done


@pytest.mark.parametrize(
    "data", [{"objective": "x", "state": "nope"}, {"inputs": {}}, {"objective": "x", "bad": 1}, []]
)
def test_malformed_task_dict_raises_format_error(data: Any) -> None:
    with pytest.raises(FormatError):
        Task.from_dict(data)


def test_unknown_task_state_is_usage_error() -> None:
    with pytest.raises(UsageError):
        Task(objective="x", state="flying")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="unknown task state"):
        Task(objective="x").with_state("flying")  # raised ValueError


def test_decisions_round_trip_through_json_form() -> None:
    decisions = [
        SendMessage(Message(sender="a", recipient="b", payload={"t": 1})),
        InvokeTool("search", {"q": "x"}, call_id="c1"),
        UpdateTask("t1", TaskState.COMPLETED, result={"ok": True}),
    ]
    for decision in decisions:
        assert decision_from_dict(decision.to_dict()) == decision


def test_send_message_gets_the_agents_sender_when_missing() -> None:
    decision = decision_from_dict(
        {"type": "SendMessage", "message": {"recipient": "b", "payload": {"x": 1}}}, sender="me"
    )
    assert isinstance(decision, SendMessage)
    assert decision.message.sender == "me"


@pytest.mark.parametrize(
    "data",
    [
        {"type": "Launch"},
        {"tool_name": "x"},
        {"type": "InvokeTool"},
        {"type": "InvokeTool", "tool_name": "x", "params": [1]},
        {"type": "InvokeTool", "tool_name": "", "params": {}},
        {"type": "InvokeTool", "tool_name": "x", "surprise": 1},
        {"type": "SendMessage"},
        {"type": "SendMessage", "message": {"payload": {}}},
        {"type": "UpdateTask", "task_id": "t"},
        {"type": "UpdateTask", "task_id": "t", "state": "flying"},
        "SendMessage",
    ],
)
def test_malformed_decisions_raise_format_error(data: Any) -> None:
    with pytest.raises(FormatError):
        decision_from_dict(data)
