"""The small core every converge extension builds on."""

from __future__ import annotations

from converge.core.agent import Agent
from converge.core.decisions import (
    Decision,
    InvokeTool,
    SendMessage,
    UpdateTask,
    decision_from_dict,
)
from converge.core.hooks import MessageHook
from converge.core.identity import Identity
from converge.core.memory import ShortTermMemory
from converge.core.message import Message, Topic
from converge.core.metrics import MetricsCollector
from converge.core.store import Store
from converge.core.task import Task, TaskState
from converge.core.tools import Tool, ToolRegistry

__all__ = [
    "Agent",
    "Decision",
    "Identity",
    "InvokeTool",
    "Message",
    "MessageHook",
    "MetricsCollector",
    "SendMessage",
    "ShortTermMemory",
    "Store",
    "Task",
    "TaskState",
    "Tool",
    "ToolRegistry",
    "Topic",
    "UpdateTask",
    "decision_from_dict",
]
