"""Prompting for, and parsing of, the decision JSON a model answers with (sans-I/O).

The format is the one :mod:`converge.core.decisions` defines: a list of objects whose
``"type"`` is the decision class name::

    [{"type": "SendMessage", "message": {"recipient": "b", "payload": {"text": "hi"}}},
     {"type": "InvokeTool", "tool_name": "search", "params": {"q": "x"}},
     {"type": "UpdateTask", "task_id": "t1", "state": "completed", "result": 42}]

Model output is untrusted. :func:`parse_decisions` tolerates code fences and prose around
the JSON, accepts ``{"decisions": [...]}`` (the structured-output tool's arguments) and a
single decision object, and rejects everything else with
:class:`~converge.errors.DecisionParseError`: oversized output, wrong types, unknown
tools, invalid tool arguments, a ``SendMessage`` claiming another sender.

converge assigns message ids, timestamps and tool call ids, always: values the model
supplies for them (for example by imitating its history) are dropped, so two answers can
never name the same message. Tool call ids are 9 letters and digits, a format every
provider's API accepts in tool-call history (Mistral's rule is the strictest).
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Mapping, Sequence
from typing import Any

from converge._repr import json_text, safe_repr
from converge.core.decisions import Decision, InvokeTool, decision_from_dict
from converge.core.message import Message
from converge.core.task import Task, TaskState
from converge.core.tools import ToolRegistry
from converge.errors import DecisionParseError, FormatError, ToolError, UsageError

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "EMIT_DECISIONS_TOOL",
    "MAX_DECISIONS",
    "MAX_OUTPUT_CHARS",
    "decisions_tool",
    "parse_decisions",
    "render_turn",
    "system_prompt",
]

EMIT_DECISIONS_TOOL = "emit_decisions"
"""Name of the tool the structured-output path makes the model call."""

MAX_OUTPUT_CHARS = 100_000
"""Default cap on model output accepted for parsing, in characters."""

MAX_DECISIONS = 64
"""Default cap on decisions in one answer."""

DEFAULT_SYSTEM_PROMPT = (
    "You are an autonomous agent in a multi-agent system. You receive messages from other "
    "agents and task updates, and you decide what to do next."
)
"""The role description used when ``LLMAgent`` gets no ``system_prompt``."""

_FORMAT = """Your agent id is {agent_id}.

Answer with a JSON array of decisions and nothing else: no prose, no code fences.
Each decision is an object whose "type" names it:
- {{"type": "SendMessage", "message": {{"recipient": "<agent id or null>", \
"topics": ["<topic>"], "payload": {{<JSON object>}}, "task_id": "<task id or null>"}}}}
- {{"type": "UpdateTask", "task_id": "<task id>", \
"state": "pending|running|completed|failed|cancelled", "result": <JSON value>}}{invoke}
Answer [] when nothing needs doing."""

_INVOKE = """
- {"type": "InvokeTool", "tool_name": "<tool name>", "params": {<arguments>}}
Invoke only the tools listed below, with arguments matching their JSON schema. Tool \
results come back to you as "tool_observations"."""

_STRUCTURED = """Your agent id is {agent_id}.

Report your decisions by calling the {tool} tool exactly once, with every decision in \
its "decisions" array (an empty array when nothing needs doing).{invoke}"""

_STRUCTURED_INVOKE = """ To use a tool, add an \
InvokeTool decision naming it; its result comes back to you as "tool_observations"."""

_FENCE = re.compile(r"```[ \t]*[A-Za-z0-9_+-]*[ \t]*\r?\n(.*?)```", re.S)
_START = re.compile(r"[\[{]")
_MAX_SCAN_STARTS = 64
_OBSERVATION_CHARS = 8_000


def _check_registry(tool_registry: Any) -> None:
    if tool_registry is not None and not isinstance(tool_registry, ToolRegistry):
        raise UsageError("tool_registry must be a ToolRegistry or None")


def system_prompt(
    agent_id: str,
    *,
    base: str | None = None,
    tool_registry: ToolRegistry | None = None,
    structured: bool = False,
) -> str:
    """The system prompt: role description, then the decision-format instructions.

    Args:
        agent_id: The agent's id (filled into ``SendMessage`` senders).
        base: Role description; :data:`DEFAULT_SYSTEM_PROMPT` when None.
        tool_registry: Tools the model may invoke. On the fallback (text) path their
            schemas are listed in the prompt; on the structured path they are part of
            the :func:`decisions_tool` schema instead.
        structured: Whether the model answers through the :func:`decisions_tool` tool.
    """
    if not isinstance(agent_id, str) or not agent_id:
        raise UsageError("agent_id must be a non-empty string")
    if base is not None and not isinstance(base, str):
        raise UsageError("base must be a string or None")
    _check_registry(tool_registry)
    has_tools = tool_registry is not None and len(tool_registry) > 0
    head = DEFAULT_SYSTEM_PROMPT if base is None else base
    if structured:
        invoke = _STRUCTURED_INVOKE if has_tools else ""
        tail = _STRUCTURED.format(agent_id=agent_id, tool=EMIT_DECISIONS_TOOL, invoke=invoke)
        return f"{head}\n\n{tail}"
    text = f"{head}\n\n" + _FORMAT.format(agent_id=agent_id, invoke=_INVOKE if has_tools else "")
    if has_tools:
        assert tool_registry is not None
        text += "\n\nTools:\n" + json.dumps(tool_registry.schemas(), ensure_ascii=False)
    return text


def decisions_tool(tool_registry: ToolRegistry | None = None) -> dict[str, Any]:
    """The ``emit_decisions`` tool schema (``{"name", "description", "parameters"}``).

    Its one argument, ``decisions``, is an array whose items are ``SendMessage``,
    ``UpdateTask`` and, per registered tool, an ``InvokeTool`` variant carrying that
    tool's own parameter schema.

    Args:
        tool_registry: Tools the model may invoke.
    """
    _check_registry(tool_registry)
    send = {
        "type": "object",
        "properties": {
            "type": {"type": "string", "enum": ["SendMessage"]},
            "message": {
                "type": "object",
                "properties": {
                    "recipient": {"type": ["string", "null"]},
                    "topics": {"type": "array", "items": {"type": "string"}},
                    "payload": {"type": "object"},
                    "task_id": {"type": ["string", "null"]},
                },
                "required": ["payload"],
            },
        },
        "required": ["type", "message"],
    }
    update = {
        "type": "object",
        "properties": {
            "type": {"type": "string", "enum": ["UpdateTask"]},
            "task_id": {"type": "string"},
            "state": {"type": "string", "enum": [s.value for s in TaskState]},
            "result": {},
        },
        "required": ["type", "task_id", "state"],
    }
    variants: list[dict[str, Any]] = [send, update]
    for tool in tool_registry or ():
        variants.append(
            {
                "type": "object",
                "description": tool.description,
                "properties": {
                    "type": {"type": "string", "enum": ["InvokeTool"]},
                    "tool_name": {"type": "string", "enum": [tool.name]},
                    "params": tool.parameters,
                },
                "required": ["type", "tool_name", "params"],
            }
        )
    return {
        "name": EMIT_DECISIONS_TOOL,
        "description": "Emit this turn's decisions (messages to send, task updates, tool calls).",
        "parameters": {
            "type": "object",
            "properties": {"decisions": {"type": "array", "items": {"anyOf": variants}}},
            "required": ["decisions"],
        },
    }


def _clip(value: Any) -> Any:
    text = json_text(value)
    if text is None:
        value = text = safe_repr(value)
    if len(text) <= _OBSERVATION_CHARS:
        return value if _is_json(value) else text
    return text[:_OBSERVATION_CHARS] + "...(truncated)"


def _safe(value: Any) -> Any:
    """``value`` if it renders as JSON, else its repr (as text)."""
    return value if json_text(value) is not None else safe_repr(value)


def _key(key: Any) -> Any:
    return key if isinstance(key, str | int | float | None) else safe_repr(key)


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return False
    return True


def render_turn(
    messages: Sequence[Message],
    tasks: Sequence[Task],
    tool_observations: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """The user turn: this batch's messages, tasks and tool observations as JSON.

    Tool results and task inputs and results are arbitrary data, so rendering them never
    fails: a value JSON cannot encode (a key that is not a string, nesting too deep) is
    rendered as its ``repr`` text instead, so the model still sees it.

    Args:
        messages: Incoming messages.
        tasks: Task updates or assignments.
        tool_observations: ``{tool_name, params, result}`` (or ``error``) dicts from earlier
            ``InvokeTool`` decisions; long results are truncated.

    Raises:
        UsageError: If an argument has the wrong type.
    """
    if not isinstance(messages, list | tuple) or not all(isinstance(m, Message) for m in messages):
        raise UsageError("messages must be a list of Message")
    if not isinstance(tasks, list | tuple) or not all(isinstance(t, Task) for t in tasks):
        raise UsageError("tasks must be a list of Task")
    if tool_observations is not None and (
        not isinstance(tool_observations, list | tuple)
        or not all(isinstance(o, Mapping) for o in tool_observations)
    ):
        raise UsageError("tool_observations must be a list of dicts or None")
    doc: dict[str, Any] = {
        "messages": [
            {
                "id": m.id,
                "sender": m.sender,
                "recipient": m.recipient,
                "topics": [t.name for t in m.topics],
                "payload": m.to_dict()["payload"],
                "task_id": m.task_id,
            }
            for m in messages
        ],
        "tasks": [t.to_dict() for t in tasks],
    }
    if tool_observations:
        doc["tool_observations"] = [
            {_key(k): _clip(v) for k, v in o.items()} for o in tool_observations
        ]
    text = json_text(doc)
    if text is None:  # a task holds what JSON cannot encode: render it field by field
        doc["tasks"] = [{k: _safe(v) for k, v in t.items()} for t in doc["tasks"]]
        text = json.dumps(doc, ensure_ascii=False, default=repr)
    return text


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _loads(text: str) -> Any:
    return json.loads(text, parse_constant=_reject_constant)


def _decision_shaped(value: Any) -> bool:
    if isinstance(value, list):
        return all(isinstance(item, Mapping) for item in value)
    return isinstance(value, Mapping) and ("decisions" in value or "type" in value)


def _is_empty(value: Any) -> bool:
    if isinstance(value, Mapping) and "decisions" in value:
        value = value["decisions"]
    return isinstance(value, list) and not value


def _best(candidates: list[Any]) -> Any:
    """The answer among decision-shaped values: the last non-empty one, else the last."""
    for value in reversed(candidates):
        if not _is_empty(value):
            return value
    return candidates[-1]


def _extract(text: str) -> Any:
    """The decision JSON in ``text``.

    The whole text if it is JSON; else the decision-shaped fenced blocks, else the
    decision-shaped top-level JSON values found in the prose (values nested in an earlier
    one are not candidates). Among candidates, the last non-empty one is the answer: an
    empty ``[]`` mentioned in prose never hides the real list that follows it. An empty
    answer followed by a decision-looking value that is not valid JSON is rejected.
    """
    try:
        return _loads(text.strip())
    except (ValueError, RecursionError):
        pass
    fenced = []
    for match in _FENCE.finditer(text):
        try:
            value = _loads(match.group(1).strip())
        except (ValueError, RecursionError):
            continue
        if _decision_shaped(value):
            fenced.append(value)
    if fenced:
        return _best(fenced)
    decoder = json.JSONDecoder(parse_constant=_reject_constant)
    found: list[tuple[Any, int]] = []
    broken: list[int] = []  # starts of decision-looking values that are not valid JSON
    attempts = 0
    pos = 0
    while attempts < _MAX_SCAN_STARTS:
        hit = _START.search(text, pos)
        if hit is None:
            break
        attempts += 1
        pos = hit.start() + 1
        try:
            value, end = decoder.raw_decode(text, hit.start())
        except (ValueError, RecursionError):
            if '"type"' in text[hit.start() : hit.start() + 200]:
                broken.append(hit.start())
            continue
        if _decision_shaped(value):
            found.append((value, hit.start()))
            pos = end  # values nested in a candidate are not candidates themselves
    if found:
        value = _best([v for v, _ in found])
        at = max(a for v, a in found if v is value)
        if _is_empty(value) and any(b > at for b in broken):
            raise DecisionParseError(
                "the model output has an empty decision list followed by decision JSON that "
                f"is not valid: {text[:120]!r}"
            )
        return value
    raise DecisionParseError(f"no decision JSON found in the model output: {text[:120]!r}")


def parse_decisions(
    text: Any,
    *,
    sender: str,
    tool_registry: ToolRegistry | None = None,
    max_chars: int = MAX_OUTPUT_CHARS,
    max_decisions: int = MAX_DECISIONS,
) -> list[Decision]:
    """Parse untrusted model output into decisions; all of them or none.

    Args:
        text: The model's reply (or the structured tool call's arguments).
        sender: The agent's id: filled into ``SendMessage`` messages; any other sender
            the model claims is rejected.
        tool_registry: ``InvokeTool`` decisions must name a tool registered here, with
            arguments valid for its schema; without a registry they are rejected.
        max_chars: Longer output is rejected unread.
        max_decisions: More decisions than this are rejected.

    Raises:
        DecisionParseError: If the output is not a valid decision list.
        UsageError: For invalid arguments other than ``text``.
    """
    if not isinstance(sender, str) or not sender:
        raise UsageError("sender must be a non-empty string")
    _check_registry(tool_registry)
    for name, bound in (("max_chars", max_chars), ("max_decisions", max_decisions)):
        if isinstance(bound, bool) or not isinstance(bound, int) or bound < 1:
            raise UsageError(f"{name} must be a positive integer")
    if not isinstance(text, str):
        raise DecisionParseError(f"model output must be text, not {type(text).__name__}")
    if len(text) > max_chars:
        raise DecisionParseError(
            f"model output is {len(text)} characters, over the {max_chars}-character cap"
        )
    value = _extract(text)
    if isinstance(value, Mapping) and "decisions" in value:
        value = value["decisions"]
    elif isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list):
        raise DecisionParseError(f"decisions must be a JSON array, not {type(value).__name__}")
    if len(value) > max_decisions:
        raise DecisionParseError(f"{len(value)} decisions, over the cap of {max_decisions}")
    decisions = []
    for i, item in enumerate(value):
        try:
            decision = _one(item, sender, tool_registry)
        except (FormatError, UsageError, ToolError, TypeError, ValueError) as exc:
            if isinstance(exc, DecisionParseError):
                raise
            raise DecisionParseError(f"decision {i} is invalid: {exc}") from exc
        decisions.append(decision)
    return decisions


_CALL_ID_ALPHABET = string.ascii_letters + string.digits
_CALL_ID_LENGTH = 9


def _new_call_id() -> str:
    """A tool call id valid for every API: 9 letters and digits (Mistral's format, the
    strictest; OpenAI and Anthropic take it as is)."""
    return "".join(secrets.choice(_CALL_ID_ALPHABET) for _ in range(_CALL_ID_LENGTH))


_ASSIGNED = ("id", "timestamp")
"""``Message`` fields converge assigns; a model's values for them are dropped."""


def _one(item: Any, sender: str, tool_registry: ToolRegistry | None) -> Decision:
    if not isinstance(item, Mapping):
        raise FormatError(f"a decision is a JSON object, not {type(item).__name__}")
    item = dict(item)
    if item.get("type") == "SendMessage":
        message = item.get("message")
        if isinstance(message, Mapping):
            claimed = message.get("sender")
            if claimed is not None and claimed != sender:
                raise FormatError(f"a SendMessage may not claim sender {claimed!r}")
            if message.get("signature") is not None:
                raise FormatError("a SendMessage from a model may not carry a signature")
            # Ids and timestamps are converge's: a model imitating its history must not
            # reuse an id (the outbox keys idempotency on it) or backdate a message.
            item["message"] = {k: v for k, v in message.items() if k not in _ASSIGNED}
    elif item.get("type") == "InvokeTool":
        # converge's too: it pairs tool results with their call in the history
        item["call_id"] = _new_call_id()
    decision = decision_from_dict(item, sender=sender)
    if isinstance(decision, InvokeTool):
        if tool_registry is None:
            raise FormatError(f"InvokeTool {decision.tool_name!r}, but no tools are registered")
        tool_registry.validate(decision.tool_name, decision.params)
    return decision
