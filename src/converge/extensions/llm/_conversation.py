"""The chat messages :class:`~converge.extensions.llm.LLMAgent` builds (sans-I/O).

Native tool-call history (contract D shapes), the re-ask turn after invalid output, and
content parts lifted out of inbound message payloads.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from converge._repr import safe_repr
from converge.core.decisions import Decision, InvokeTool, SendMessage
from converge.core.message import Message
from converge.core.task import Task
from converge.errors import UsageError
from converge.extensions.llm.decisions_json import EMIT_DECISIONS_TOOL, render_turn

__all__ = [
    "PARTS_KEY",
    "assistant_turn",
    "check_observations",
    "memory_decisions",
    "observation_turns",
    "reask_turns",
    "user_turn",
]

PARTS_KEY = "parts"
"""Payload key whose list of content parts is sent to the model as native parts."""

_PART_TYPES = frozenset({"image", "document"})
_RESULT_CHARS = 8_000
_ECHO_CHARS = 4_000


def _clip(text: str, cap: int) -> str:
    text = text if len(text) <= cap else text[:cap] + "...(truncated)"
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates no request can carry
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _text(value: Any) -> str:
    """A tool result (or error) as text: JSON when it is JSON data, else its repr."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return safe_repr(value)


def memory_decisions(decisions: Sequence[Decision]) -> list[dict[str, Any]]:
    """Decisions as the model should see them again: without converge-assigned fields.

    Message ids, timestamps and senders are converge's, never the model's: keeping them
    out of the history stops a model from imitating (reusing) them.
    """
    out = []
    for decision in decisions:
        data = decision.to_dict()
        if isinstance(decision, SendMessage):
            data["message"] = {
                k: v
                for k, v in data["message"].items()
                if k not in ("id", "timestamp", "sender", "signature")
            }
        out.append(data)
    return out


def assistant_turn(decisions: Sequence[Decision]) -> dict[str, Any]:
    """The assistant message recording one step's decisions.

    ``InvokeTool`` decisions become native ``tool_calls`` (id = the decision's
    ``call_id``); the other decisions are the message's JSON text (``""`` when none).
    """
    calls = [d for d in decisions if isinstance(d, InvokeTool)]
    rest = [d for d in decisions if not isinstance(d, InvokeTool)]
    if not calls:
        return {"role": "assistant", "content": json.dumps(memory_decisions(rest), default=repr)}
    return {
        "role": "assistant",
        "content": json.dumps(memory_decisions(rest), default=repr) if rest else "",
        "tool_calls": [
            {"id": c.call_id, "name": c.tool_name, "arguments": dict(c.params)} for c in calls
        ],
    }


def _result_text(observation: Mapping[str, Any]) -> str:
    if "error" in observation:
        return _clip(f"Error: {_text(observation['error'])}", _RESULT_CHARS)
    return _clip(_text(observation.get("result")), _RESULT_CHARS)


def _tool_message(observation: Mapping[str, Any], call_id: str) -> dict[str, Any]:
    return {
        "role": "tool",
        "tool_call_id": call_id,
        "name": observation.get("tool_name", ""),
        "content": _result_text(observation),
    }


def _call_id(observation: Mapping[str, Any], index: int) -> str:
    call_id = observation.get("call_id")
    return call_id if isinstance(call_id, str) and call_id else f"call_{index}"


def check_observations(observations: Any) -> list[Mapping[str, Any]]:
    """``tool_observations`` as a list, its fields checked (results and errors are the
    tools' data, rendered whatever they are).

    Raises:
        UsageError: For a field of the wrong type.
    """
    if observations is None:
        return []
    if not isinstance(observations, list | tuple):
        raise UsageError("tool_observations must be a list of dicts or None")
    for i, obs in enumerate(observations):
        where = f"tool_observations[{i}]"
        if not isinstance(obs, Mapping):
            raise UsageError("tool_observations must be a list of dicts or None")
        name = obs.get("tool_name")
        if not isinstance(name, str) or not name:
            raise UsageError(f"{where}['tool_name'] must be a non-empty string")
        params = obs.get("params")
        if params is not None and not isinstance(params, Mapping):
            raise UsageError(f"{where}['params'] must be a dict or None")
        call_id = obs.get("call_id")
        if call_id is not None and not isinstance(call_id, str):
            raise UsageError(f"{where}['call_id'] must be a string or None")
        step = obs.get("step")
        if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
            raise UsageError(f"{where}['step'] must be an integer or None")
    return list(observations)


def observation_turns(
    observations: Sequence[Mapping[str, Any]], *, only_results: frozenset[str] | None = None
) -> list[dict[str, Any]]:
    """Native history for tool observations: per step, the assistant's ``tool_calls``
    message, then one ``tool`` message per result.

    Observations carrying the same ``"step"`` number share one assistant message
    (observations without one each form their own step).

    Args:
        observations: ``{"tool_name", "params", "call_id", "result" | "error"}`` dicts.
        only_results: When given, emit only the ``tool`` messages of these call ids (the
            assistant calls are already in the history).
    """
    out: list[dict[str, Any]] = []
    if only_results is not None:
        for i, obs in enumerate(observations):
            call_id = _call_id(obs, i)
            if call_id in only_results:
                out.append(_tool_message(obs, call_id))
        return out
    group: list[tuple[Mapping[str, Any], str]] = []
    step: object = object()

    def flush() -> None:
        if not group:
            return
        calls = [
            {
                "id": call_id,
                "name": obs["tool_name"],
                "arguments": dict(obs.get("params") or {}),
            }
            for obs, call_id in group
        ]
        out.append({"role": "assistant", "content": None, "tool_calls": calls})
        out.extend(_tool_message(obs, call_id) for obs, call_id in group)
        group.clear()

    for i, obs in enumerate(observations):
        this_step = obs.get("step", object())
        if this_step != step:
            flush()
            step = this_step
        group.append((obs, _call_id(obs, i)))
    flush()
    return out


def _is_part(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and value.get("type") in _PART_TYPES
        and (isinstance(value.get("url"), str) or isinstance(value.get("data"), str))
    ) or (
        isinstance(value, Mapping)
        and value.get("type") == "text"
        and isinstance(value.get("text"), str)
    )


def user_turn(messages: Sequence[Message], tasks: Sequence[Task]) -> tuple[dict[str, Any], str]:
    """This batch's user message, and its text-only form for memory.

    A message whose payload has a ``"parts"`` list of content parts (``{"type": "text",
    "text"}``, ``{"type": "image", "url" | "data", "media_type"}``, ``{"type":
    "document", "data", "media_type"}``) has its image and document parts sent as native
    content parts after the JSON text; in the JSON each is replaced by ``{"type":
    "image", "attachment": n}`` (n counting from 1 in the order attached). Text parts stay
    in the JSON. Without such parts the content is the JSON string alone.
    """
    text = render_turn(messages, tasks)
    attachments: list[dict[str, Any]] = []
    lifted: list[Message] = []
    for message in messages:
        payload = message.to_dict()["payload"]  # plain lists and dicts
        parts = payload.get(PARTS_KEY)
        if not (isinstance(parts, list) and parts and all(_is_part(p) for p in parts)):
            lifted.append(message)
            continue
        shown: list[Any] = []
        for part in parts:
            if part.get("type") in _PART_TYPES:
                attachments.append(dict(part))
                shown.append({"type": part["type"], "attachment": len(attachments)})
            else:
                shown.append(dict(part))
        lifted.append(
            dataclasses.replace(message, payload={**payload, PARTS_KEY: shown}, signature=None)
        )
    if not attachments:
        return {"role": "user", "content": text}, text
    text = render_turn(lifted, tasks)
    content: list[dict[str, Any]] = [{"type": "text", "text": text}, *attachments]
    return {"role": "user", "content": content}, text


def reask_turns(
    output: str,
    error: Exception,
    *,
    tool_call_id: str | None,
    structured: bool,
) -> list[dict[str, Any]]:
    """The two messages that send invalid output back to the model with the reason.

    Args:
        output: What the model answered (echoed, clipped).
        error: Why it was rejected.
        tool_call_id: The id of the model's native ``emit_decisions`` call, when it made
            one: the reason then comes back as that call's tool result.
        structured: Whether the model answers through the ``emit_decisions`` tool.
    """
    reason = f"That answer was rejected: {error}"
    if tool_call_id is not None:
        try:
            arguments = json.loads(output)
        except ValueError:
            arguments = {}
        if not isinstance(arguments, dict):
            arguments = {}
        return [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": tool_call_id, "name": EMIT_DECISIONS_TOOL, "arguments": arguments}
                ],
            },
            {
                "role": "tool",
                "tool_call_id": tool_call_id,
                "name": EMIT_DECISIONS_TOOL,
                "content": f"{reason}. Call {EMIT_DECISIONS_TOOL} again with valid decisions.",
            },
        ]
    again = (
        f"Call the {EMIT_DECISIONS_TOOL} tool again with valid decisions."
        if structured
        else "Answer again with only the JSON array of decisions."
    )
    return [
        {"role": "assistant", "content": _clip(output, _ECHO_CHARS) or "(empty)"},
        {"role": "user", "content": f"{reason}. {again}"},
    ]
