"""What the request check accepts, every SDK can send: a property over any call.

``build_request`` is the one gate before the OpenAI, Anthropic and Mistral SDKs encode a
call as JSON and HTTP headers. Any value it lets through that the SDKs then fail on (a
lone surrogate, an object, NaN, a header line break) surfaces as a Python error from deep
inside an SDK instead of a ``UsageError`` naming the field.
"""

from __future__ import annotations

import json
import math
from typing import Any

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from converge.errors import UsageError
from converge.extensions.llm._request import ChatRequest, ToolSpec, build_request
from converge.extensions.llm.protocol import ToolCall
from nesting import deep_list

# Text that UTF-8 cannot hold (lone surrogates), control characters, and plain words.
_TEXT = st.one_of(st.text(max_size=6), st.sampled_from(["ok", "a\ud800", "\udc80", "x\r\ny"]))
_ATOMS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),  # NaN and infinities included
    _TEXT,
    st.builds(object),
)
_VALUES = st.recursive(
    _ATOMS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(_TEXT, st.integers()), inner, max_size=3),
    ),
    max_leaves=8,
)


def _schema(extra: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({"type": st.just("object")}, optional={"properties": extra})


_TOOL = st.fixed_dictionaries(
    {"name": _TEXT.filter(bool), "parameters": _schema(_VALUES)},
    optional={"description": _TEXT},
)
_CALL = st.fixed_dictionaries(
    {"id": _TEXT.filter(bool), "name": _TEXT.filter(bool)},
    optional={"arguments": st.dictionaries(_TEXT, _VALUES, max_size=2)},
)
_MESSAGES = st.lists(
    st.one_of(
        st.fixed_dictionaries({"role": st.sampled_from(["system", "user"]), "content": _TEXT}),
        st.fixed_dictionaries(
            {"role": st.just("user"), "content": st.lists(_TEXT, min_size=1, max_size=2)}
        ),
        st.fixed_dictionaries(
            {
                "role": st.just("user"),
                "content": st.lists(
                    st.fixed_dictionaries(
                        {"type": st.just("image"), "url": _TEXT.map(lambda t: "https://x/" + t)},
                        optional={"name": _TEXT},
                    ),
                    min_size=1,
                    max_size=1,
                ),
            }
        ),
        st.fixed_dictionaries(
            {
                "role": st.just("assistant"),
                "content": st.none(),
                "tool_calls": st.lists(_CALL, min_size=1, max_size=2),
            }
        ),
        st.fixed_dictionaries(
            {"role": st.just("tool"), "tool_call_id": _TEXT.filter(bool), "content": _TEXT},
            optional={"name": _TEXT},
        ),
    ),
    min_size=1,
    max_size=3,
)
_OPTION_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "model": _TEXT,
    "stop": st.one_of(_TEXT, st.lists(_TEXT, max_size=2)),
    "reasoning_effort": _TEXT,
    "tools": st.lists(_TOOL, max_size=2),
    "extra_body": st.dictionaries(_TEXT, _VALUES, max_size=2),
    "response_format": st.dictionaries(_TEXT, _VALUES, max_size=2),
    "thinking": st.dictionaries(_TEXT, _VALUES, max_size=2),
    "extra_headers": st.dictionaries(
        st.sampled_from(["x-trace", "x-id", "bad name", "x:y", ""]), _TEXT, max_size=2
    ),
    "emit_decisions_tool": _TOOL,
}
# One or two options a call: with all of them, nearly every call is refused for one of
# them, and the others are never looked at past the refusal.
_OPTIONS = st.lists(
    st.one_of(*(st.tuples(st.just(k), v) for k, v in _OPTION_VALUES.items())),
    min_size=0,
    max_size=2,
).map(lambda pairs: {**dict(pairs), "use_structured_output": True})


def _plain(value: Any) -> Any:
    """The request as the JSON an SDK builds from it."""
    if isinstance(value, ToolSpec):
        return {
            "name": value.name,
            "description": value.description,
            "parameters": value.parameters,
        }
    if isinstance(value, ToolCall):
        return {"id": value.id, "name": value.name, "arguments": value.arguments}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _sendable(request: ChatRequest) -> None:
    body = {
        name: _plain(getattr(request, name))
        for name in ChatRequest.__dataclass_fields__
        if name != "extra_headers"
    }
    json.dumps(body, ensure_ascii=False, allow_nan=False).encode("utf-8")
    # h11 (httpx's HTTP/1.1) refuses what cannot go on the wire, as the SDKs' clients would.
    headers = [("host", "api.example"), *(request.extra_headers or {}).items()]
    h11.Request(method="POST", target="/v1", headers=headers)


def _check(messages: Any, options: dict[str, Any]) -> None:
    try:
        request = build_request(messages, options, default_model="m")
    except UsageError:
        return
    _sendable(request)


@settings(max_examples=300, deadline=None)
@given(messages=_MESSAGES)
def test_any_message_list_the_check_accepts_every_sdk_can_encode(
    messages: list[dict[str, Any]],
) -> None:
    _check(messages, {})


@settings(max_examples=300, deadline=None)
@given(options=_OPTIONS)
def test_any_options_the_check_accepts_every_sdk_can_encode(options: dict[str, Any]) -> None:
    # Plain messages, so that a call is refused for its options or not at all.
    _check([{"role": "user", "content": "hi"}], options)


def test_the_property_can_fail() -> None:
    # What it would see if a check were missing: a schema with NaN, a header line break.
    plain = build_request([{"role": "user", "content": "hi"}], {}, default_model="m").messages
    nan = ToolSpec("t", "d", {"type": "object", "maximum": math.nan})
    with pytest.raises(ValueError, match="not JSON compliant"):
        _sendable(ChatRequest(messages=plain, model="m", tools=(nan,)))
    with pytest.raises(h11.LocalProtocolError):
        _sendable(ChatRequest(messages=plain, model="m", extra_headers={"x-a": "v\r\nx: y"}))


@pytest.mark.parametrize(
    "message",
    [
        {"role": [], "content": "x"},
        {"role": {}, "content": "x"},
        {"role": deep_list(), "content": "x"},
        {"role": "user", "content": [{"type": []}]},
        {"role": "user", "content": [{"type": deep_list()}]},
        {"role": "user", "content": [{"type": "image", "data": "aGk=", "media_type": []}]},
    ],
)
def test_an_unhashable_role_part_type_or_media_type_is_a_usage_error(
    message: dict[str, Any],
) -> None:
    with pytest.raises(UsageError, match="must be"):
        build_request([message], {}, default_model="m")


def test_tool_call_arguments_nested_too_deeply_are_a_usage_error() -> None:
    call = {"id": "c", "name": "f", "arguments": {"a": deep_list()}}
    for calls in ([call], [ToolCall("c", "f", {"a": deep_list()})]):
        message = {"role": "assistant", "content": None, "tool_calls": calls}
        with pytest.raises(UsageError, match=r"tool_calls.*nested too deeply"):
            build_request([message], {}, default_model="m")


@pytest.mark.parametrize(
    "options",
    [
        {"tools": [{"name": "f", "parameters": {"type": "object", "properties": deep_list()}}]},
        {
            "use_structured_output": True,
            "emit_decisions_tool": {
                "name": "e",
                "parameters": {"type": "object", "x": deep_list()},
            },
        },
        {"response_format": {"type": "json_object", "x": deep_list()}},
        {"thinking": {"x": deep_list()}},
        {"extra_body": {"x": deep_list()}},
    ],
)
def test_options_nested_too_deeply_are_a_usage_error(options: dict[str, Any]) -> None:
    with pytest.raises(UsageError, match="nested too deeply"):
        build_request([{"role": "user", "content": "hi"}], options, default_model="m")
