"""Decision JSON: prompts, the structured-output tool, and parsing untrusted model output."""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from converge.core import (
    InvokeTool,
    Message,
    SendMessage,
    Task,
    TaskState,
    ToolRegistry,
    UpdateTask,
)
from converge.errors import DecisionParseError, UsageError
from converge.extensions.llm.decisions_json import (
    DEFAULT_SYSTEM_PROMPT,
    EMIT_DECISIONS_TOOL,
    decisions_tool,
    parse_decisions,
    render_turn,
    system_prompt,
)
from nesting import deep_list

ME = "agent-me"
SEND = {"type": "SendMessage", "message": {"recipient": "bob", "payload": {"text": "hi"}}}
UPDATE = {"type": "UpdateTask", "task_id": "t1", "state": "completed", "result": 42}


@pytest.fixture
def registry() -> ToolRegistry:
    registry = ToolRegistry()

    @registry.tool
    def search(query: str, limit: int = 5) -> list[str]:
        """Search the web.

        Args:
            query: What to look for.
            limit: Most results.
        """
        return [query] * limit

    return registry


# -- parsing ---------------------------------------------------------------------------


def test_plain_json_array_parses_and_fills_the_sender() -> None:
    decisions = parse_decisions(json.dumps([SEND, UPDATE]), sender=ME)
    send, update = decisions
    assert isinstance(send, SendMessage)
    assert send.message.sender == ME
    assert send.message.recipient == "bob"
    assert dict(send.message.payload) == {"text": "hi"}
    assert update == UpdateTask("t1", TaskState.COMPLETED, result=42)


def test_empty_array_means_no_decisions() -> None:
    assert parse_decisions("[]", sender=ME) == []


@pytest.mark.parametrize(
    "text",
    [
        "```json\n" + json.dumps([UPDATE]) + "\n```",
        "```\n" + json.dumps([UPDATE]) + "\n```",
        "Sure! Here are my decisions:\n```json\n" + json.dumps([UPDATE]) + "\n```\nDone.",
        "I think " + json.dumps([UPDATE]) + " is right.",
        "Plan: {not json} then " + json.dumps([UPDATE]),
        json.dumps({"decisions": [UPDATE]}),
        json.dumps(UPDATE),
        "  \n" + json.dumps([UPDATE]) + "\n\n",
    ],
    ids=[
        "fenced-json",
        "fenced-bare",
        "fence-in-prose",
        "prose-around",
        "junk-braces-first",
        "decisions-wrapper",
        "single-object",
        "whitespace",
    ],
)
def test_tolerated_wrappings_parse_to_the_same_decisions(text: str) -> None:
    assert parse_decisions(text, sender=ME) == [UpdateTask("t1", "completed", result=42)]


@pytest.mark.parametrize(
    "output",
    [
        "",
        "I cannot help with that.",
        "42",
        '"a string"',
        "[1, 2]",
        '[{"type": "SendMessage", "message": "hi"}]',
        '[{"type": "SendMessage", "message": {"payload": "not an object"}}]',
        '[{"type": "SendMessage", "message": {"payload": {}, "topics": "a.b"}}]',
        '[{"type": "LaunchMissiles"}]',
        '[{"type": "UpdateTask", "task_id": "t1"}]',
        '[{"type": "UpdateTask", "task_id": "t1", "state": "exploded"}]',
        '[{"type": "InvokeTool", "tool_name": "search", "params": {}, "evil": 1}]',
        '{"decisions": "all of them"}',
        '[{"type": "UpdateTask", "task_id": "t1", "state": "completed", "result": NaN}]',
        "[" * 5000,
        "[" * 20000 + "]" * 20000,
        '[{"type": "UpdateTask", "task_id": "t", "state": "completed", "result": 1'
        + "0" * 5000
        + "}]",
    ],
    ids=[
        "empty",
        "refusal",
        "number",
        "string",
        "non-objects",
        "message-not-object",
        "payload-not-object",
        "topics-not-list",
        "unknown-type",
        "missing-state",
        "bad-state",
        "extra-field",
        "decisions-not-list",
        "nan",
        "unclosed-nesting",
        "deep-nesting",
        "huge-integer",
    ],
)
def test_malformed_output_raises_decision_parse_error(output: str) -> None:
    with pytest.raises(DecisionParseError):
        parse_decisions(output, sender=ME)


def test_one_bad_decision_rejects_the_whole_answer() -> None:
    with pytest.raises(DecisionParseError, match="decision 1"):
        parse_decisions(json.dumps([UPDATE, {"type": "Nope"}]), sender=ME)


def test_non_text_output_is_rejected() -> None:
    with pytest.raises(DecisionParseError, match="text"):
        parse_decisions({"decisions": []}, sender=ME)


def test_oversized_output_is_rejected_unread() -> None:
    text = json.dumps([UPDATE]) + " " * 200
    with pytest.raises(DecisionParseError, match="cap"):
        parse_decisions(text, sender=ME, max_chars=100)
    assert parse_decisions(text, sender=ME, max_chars=len(text)) != []


def test_too_many_decisions_are_rejected() -> None:
    with pytest.raises(DecisionParseError, match="cap"):
        parse_decisions(json.dumps([UPDATE] * 5), sender=ME, max_decisions=4)


def test_send_message_may_not_claim_another_sender() -> None:
    spoof = {"type": "SendMessage", "message": {"sender": "the-boss", "payload": {}}}
    with pytest.raises(DecisionParseError, match="sender"):
        parse_decisions(json.dumps([spoof]), sender=ME)
    own = {"type": "SendMessage", "message": {"sender": ME, "payload": {}}}
    assert len(parse_decisions(json.dumps([own]), sender=ME)) == 1


def test_send_message_from_a_model_may_not_carry_a_signature() -> None:
    signed = {"type": "SendMessage", "message": {"payload": {}, "signature": "AAAA"}}
    with pytest.raises(DecisionParseError, match="signature"):
        parse_decisions(json.dumps([signed]), sender=ME)


def test_invoke_tool_must_name_a_registered_tool(registry: ToolRegistry) -> None:
    call = {"type": "InvokeTool", "tool_name": "rm_rf", "params": {}}
    with pytest.raises(DecisionParseError, match="rm_rf"):
        parse_decisions(json.dumps([call]), sender=ME, tool_registry=registry)


def test_invoke_tool_without_a_registry_is_rejected() -> None:
    call = {"type": "InvokeTool", "tool_name": "search", "params": {"query": "x"}}
    with pytest.raises(DecisionParseError, match="no tools"):
        parse_decisions(json.dumps([call]), sender=ME)


@pytest.mark.parametrize(
    "params",
    [{}, {"query": 5}, {"query": "x", "limit": "many"}, {"query": "x", "rogue": True}],
    ids=["missing", "wrong-type", "wrong-optional-type", "unexpected"],
)
def test_invoke_tool_arguments_must_match_the_tool_schema(
    registry: ToolRegistry, params: dict[str, Any]
) -> None:
    call = {"type": "InvokeTool", "tool_name": "search", "params": params}
    with pytest.raises(DecisionParseError):
        parse_decisions(json.dumps([call]), sender=ME, tool_registry=registry)


def test_valid_invoke_tool_parses(registry: ToolRegistry) -> None:
    call = {"type": "InvokeTool", "tool_name": "search", "params": {"query": "x"}}
    (decision,) = parse_decisions(json.dumps([call]), sender=ME, tool_registry=registry)
    assert isinstance(decision, InvokeTool)
    assert decision.tool_name == "search"
    assert dict(decision.params) == {"query": "x"}


def _without_assigned(data: dict[str, Any]) -> dict[str, Any]:
    data = dict(data)
    data.pop("call_id", None)
    if "message" in data:
        data["message"] = {k: v for k, v in data["message"].items() if k not in ("id", "timestamp")}
    return data


def test_decisions_round_trip_except_the_ids_converge_assigns(registry: ToolRegistry) -> None:
    decisions = [
        SendMessage(Message(sender=ME, recipient="b", topics=("x.y",), payload={"n": [1, 2]})),
        InvokeTool("search", {"query": "q"}, call_id="c1"),
        UpdateTask("t9", TaskState.FAILED, result="boom"),
    ]
    text = json.dumps([d.to_dict() for d in decisions])
    parsed = parse_decisions(text, sender=ME, tool_registry=registry)
    assert [_without_assigned(d.to_dict()) for d in parsed] == [
        _without_assigned(d.to_dict()) for d in decisions
    ]


def test_model_supplied_message_ids_and_timestamps_are_replaced(registry: ToolRegistry) -> None:
    # A model imitating its history repeats an id: the two messages must stay distinct.
    old = Message(sender=ME, recipient="b", payload={"n": 1}, timestamp=1)
    echo = dict(old.to_dict(), signature=None)
    answer = json.dumps(
        [
            {"type": "SendMessage", "message": echo},
            {"type": "SendMessage", "message": {**echo, "payload": {"n": 2}}},
            {"type": "InvokeTool", "tool_name": "search", "params": {"query": "q"}, "call_id": "c"},
            {"type": "InvokeTool", "tool_name": "search", "params": {"query": "q"}, "call_id": "c"},
        ]
    )
    first, second, call1, call2 = parse_decisions(answer, sender=ME, tool_registry=registry)
    assert isinstance(first, SendMessage)
    assert isinstance(second, SendMessage)
    assert len({old.id, first.message.id, second.message.id}) == 3
    assert first.message.timestamp > 1
    assert isinstance(call1, InvokeTool)
    assert isinstance(call2, InvokeTool)
    assert len({"c", call1.call_id, call2.call_id}) == 3


@pytest.mark.parametrize(
    "text",
    [
        "The format is a list such as [] when idle. My answer: " + json.dumps([UPDATE]),
        "Empty would be `[]`, but here: " + json.dumps({"decisions": [UPDATE]}),
        "Options: {} or [] -> " + json.dumps([UPDATE]) + " (and [] otherwise)",
        "```json\n[]\n```\nActually:\n```json\n" + json.dumps([UPDATE]) + "\n```",
        '[] then [{"nested": [[]]}] then ' + json.dumps([UPDATE]),
    ],
    ids=["prose-empty-first", "wrapper-after", "both-sides", "fences", "nested-empty"],
)
def test_an_empty_list_in_prose_does_not_hide_the_real_answer(text: str) -> None:
    assert parse_decisions(text, sender=ME) == [UpdateTask("t1", "completed", result=42)]


def test_an_empty_list_followed_by_broken_decision_json_is_an_error() -> None:
    text = 'Nothing yet: []. Final: [{"type": "UpdateTask", "task_id": "t1", "state": }]'
    with pytest.raises(DecisionParseError, match="empty decision list"):
        parse_decisions(text, sender=ME)


def test_an_empty_answer_in_prose_still_means_no_decisions() -> None:
    assert parse_decisions("Nothing needs doing, so: []", sender=ME) == []
    assert parse_decisions("```json\n[]\n```", sender=ME) == []


def test_decisions_nested_in_the_answer_are_not_separate_candidates() -> None:
    text = "Answer: " + json.dumps([UPDATE, SEND]) + " done"
    assert len(parse_decisions(text, sender=ME)) == 2


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_never_raises_anything_but_decision_parse_error(text: str) -> None:
    with contextlib.suppress(DecisionParseError):
        parse_decisions(text, sender=ME)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["type", "message", "payload", "task_id", "state", "tool_name", "x"]),
            children,
            max_size=4,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_json_values, max_size=4))
def test_arbitrary_json_never_raises_anything_but_decision_parse_error(value: Any) -> None:
    with contextlib.suppress(DecisionParseError):
        parse_decisions(json.dumps(value), sender=ME)


# -- prompts ---------------------------------------------------------------------------


def test_fallback_system_prompt_explains_the_format_and_lists_tools(
    registry: ToolRegistry,
) -> None:
    text = system_prompt(ME, tool_registry=registry)
    assert text.startswith(DEFAULT_SYSTEM_PROMPT)
    assert ME in text
    for kind in ("SendMessage", "UpdateTask", "InvokeTool"):
        assert f'"type": "{kind}"' in text
    assert json.dumps(registry.schemas(), ensure_ascii=False) in text


def test_fallback_prompt_without_tools_does_not_offer_invoke_tool() -> None:
    text = system_prompt(ME)
    assert "InvokeTool" not in text
    assert "Tools:" not in text


def test_custom_role_description_keeps_the_format_instructions() -> None:
    text = system_prompt(ME, base="You are a pirate.")
    assert text.startswith("You are a pirate.")
    assert DEFAULT_SYSTEM_PROMPT not in text
    assert "JSON array of decisions" in text


def test_structured_prompt_points_at_the_tool_not_at_inline_json(registry: ToolRegistry) -> None:
    text = system_prompt(ME, tool_registry=registry, structured=True)
    assert EMIT_DECISIONS_TOOL in text
    assert "InvokeTool" in text
    assert json.dumps(registry.schemas(), ensure_ascii=False) not in text


def test_decisions_tool_carries_each_tool_schema(registry: ToolRegistry) -> None:
    tool = decisions_tool(registry)
    assert tool["name"] == EMIT_DECISIONS_TOOL
    assert tool["parameters"]["type"] == "object"
    variants = tool["parameters"]["properties"]["decisions"]["items"]["anyOf"]
    kinds = [v["properties"]["type"]["enum"] for v in variants]
    assert kinds == [["SendMessage"], ["UpdateTask"], ["InvokeTool"]]
    invoke = variants[2]
    assert invoke["properties"]["tool_name"]["enum"] == ["search"]
    assert invoke["properties"]["params"] == registry.get("search").parameters
    assert len(decisions_tool()["parameters"]["properties"]["decisions"]["items"]["anyOf"]) == 2


def test_render_turn_lists_messages_tasks_and_observations() -> None:
    message = Message(sender="bob", recipient=ME, topics=("chat",), payload={"q": "hi"})
    task = Task(objective="answer", id="t1")
    observation = {"tool_name": "search", "params": {"query": "x"}, "result": ["a"]}
    doc = json.loads(render_turn([message], [task], [observation]))
    assert doc["messages"] == [
        {
            "id": message.id,
            "sender": "bob",
            "recipient": ME,
            "topics": ["chat"],
            "payload": {"q": "hi"},
            "task_id": None,
        }
    ]
    assert doc["tasks"] == [task.to_dict()]
    assert doc["tool_observations"] == [observation]


def test_render_turn_truncates_huge_and_stringifies_odd_observations() -> None:
    big = {"tool_name": "dump", "result": "x" * 50_000}
    odd = {"tool_name": "obj", "result": object()}
    doc = json.loads(render_turn([], [], [big, odd]))
    first, second = doc["tool_observations"]
    assert len(first["result"]) < 9_000
    assert first["result"].endswith("(truncated)")
    assert "object object" in second["result"]


@pytest.mark.parametrize(
    ("call", "kwargs"),
    [
        (parse_decisions, {"text": "[]", "sender": ""}),
        (parse_decisions, {"text": "[]", "sender": ME, "tool_registry": "tools"}),
        (parse_decisions, {"text": "[]", "sender": ME, "max_chars": 0}),
        (parse_decisions, {"text": "[]", "sender": ME, "max_decisions": True}),
        (system_prompt, {"agent_id": ""}),
        (system_prompt, {"agent_id": ME, "base": 5}),
        (decisions_tool, {"tool_registry": ["search"]}),
        (render_turn, {"messages": ["hi"], "tasks": []}),
        (render_turn, {"messages": [], "tasks": [{"objective": "x"}]}),
        (render_turn, {"messages": [], "tasks": [], "tool_observations": ["x"]}),
    ],
)
def test_invalid_arguments_raise_usage_error(call: Any, kwargs: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        call(**kwargs)


def test_tool_call_ids_suit_every_api(registry: ToolRegistry) -> None:
    call = {"type": "InvokeTool", "tool_name": "search", "params": {"query": "x"}}
    ids = {
        d.call_id  # type: ignore[attr-defined]
        for d in parse_decisions(json.dumps([call] * 50), sender=ME, tool_registry=registry)
    }
    assert len(ids) == 50
    assert all(re.fullmatch(r"[A-Za-z0-9]{9}", i) for i in ids)  # Mistral's rule


class _BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def test_render_turn_renders_tool_results_json_cannot_encode_as_their_repr() -> None:
    # A tool may return anything: the agent keeps working, the model sees the repr.
    observations = [
        {"tool_name": "a", "result": {(1, 2): "a"}},
        {(1, 2): "key", "tool_name": "b"},
        {"tool_name": "c", "result": deep_list()},
        {"tool_name": "d", "result": {"x": _BadRepr(), (1,): 2}},
        {"tool_name": "e", "result": {(1,): "x" * 50_000}},
    ]
    doc = json.loads(render_turn([], [], observations))
    first, second, third, fourth, fifth = doc["tool_observations"]
    assert first["result"] == "{(1, 2): 'a'}"
    assert second == {"(1, 2)": "key", "tool_name": "b"}
    assert third["result"].startswith("[[[")
    assert len(third["result"]) < 100
    assert fourth["result"].startswith("{")
    assert fifth["result"].endswith("(truncated)")
    assert len(fifth["result"]) < 9_000


def test_render_turn_renders_task_fields_json_cannot_encode_as_their_repr() -> None:
    plain = Task(objective="plain", id="t0", result={"ok": [1]})
    deep = Task(objective="deep", id="t1", result=deep_list())
    keyed = Task(objective="keyed", id="t2", inputs={(1, 2): "a"})
    doc = json.loads(render_turn([], [plain, deep, keyed]))
    assert doc["tasks"][0] == plain.to_dict()
    assert doc["tasks"][1]["objective"] == "deep"
    assert doc["tasks"][1]["result"].startswith("[[[")
    assert doc["tasks"][2]["inputs"] == "{(1, 2): 'a'}"
