"""The no-network providers shipped for users' tests, and the package surface."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from converge.errors import ProviderRateLimitError, UsageError
from converge.extensions.llm import ChatResult, ChatStream, LLMProvider, Usage
from converge.extensions.llm.testing import FunctionProvider, ProviderCall, ScriptedProvider
from nesting import deep_list

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "hello there"}]


async def test_scripted_provider_replays_replies_in_order() -> None:
    provider = ScriptedProvider(["one", ("two", Usage(5, 6))])
    assert await provider.achat(MESSAGES) == "one"
    assert await provider.achat_with_usage(MESSAGES) == ("two", Usage(5, 6))
    assert provider.remaining == 0
    assert [c.messages for c in provider.calls] == [tuple(MESSAGES)] * 2


async def test_scripted_provider_raises_scripted_exceptions() -> None:
    failure = ProviderRateLimitError("slow", provider="test", retry_after=1)
    provider = ScriptedProvider([failure, "after"])
    with pytest.raises(ProviderRateLimitError):
        await provider.achat(MESSAGES)
    assert await provider.achat(MESSAGES) == "after"


async def test_running_out_of_replies_is_a_clear_usage_error() -> None:
    provider = ScriptedProvider(["only"])
    await provider.achat(MESSAGES)
    with pytest.raises(UsageError, match="ran out of replies after 1 call"):
        await provider.achat(MESSAGES)


def test_scripted_provider_rejects_odd_script_items() -> None:
    with pytest.raises(UsageError):
        ScriptedProvider([42])  # type: ignore[list-item]


@pytest.mark.parametrize("reason", [{}, ["stop"], None, "bogus"])
def test_a_stop_reason_that_is_not_one_of_the_names_is_a_usage_error(reason: Any) -> None:
    # A dict or a list raised TypeError (unhashable) from the membership test.
    with pytest.raises(UsageError, match="stop_reason must be one of"):
        ChatResult(text="", stop_reason=reason)
    with pytest.raises(UsageError, match="stop_reason must be one of"):
        FunctionProvider(lambda messages: "", stop_reason=reason)


async def test_usage_is_estimated_when_not_scripted() -> None:
    provider = ScriptedProvider(["a reply of some length"])
    _, usage = await provider.achat_with_usage(MESSAGES)
    assert usage.input_tokens > 0
    assert usage.output_tokens > 0
    assert provider.last_usage == usage


async def test_function_provider_gets_messages_and_options() -> None:
    seen: list[tuple[Any, dict[str, Any]]] = []

    def reply(messages: list[dict[str, str]], **kwargs: Any) -> str:
        seen.append((messages, kwargs))
        return "echo: " + messages[-1]["content"]

    provider = FunctionProvider(reply)
    assert await provider.achat(MESSAGES, temperature=0) == "echo: hello there"
    assert seen == [(MESSAGES, {"temperature": 0})]
    assert provider.calls == [ProviderCall(tuple(MESSAGES), {"temperature": 0})]


async def test_function_provider_accepts_async_functions() -> None:
    async def reply(messages: list[dict[str, str]], **kwargs: Any) -> str:
        await anyio.lowlevel.checkpoint()
        return "async"

    assert await FunctionProvider(reply).achat(MESSAGES) == "async"


def test_function_provider_sync_surface_calls_sync_functions_directly() -> None:
    provider = FunctionProvider(lambda messages, **kw: "sync")
    assert provider.chat(MESSAGES) == "sync"
    assert provider.chat_with_usage(MESSAGES)[0] == "sync"


def test_function_provider_sync_surface_runs_async_functions() -> None:
    async def reply(messages: list[dict[str, str]], **kwargs: Any) -> str:
        return "ran"

    assert FunctionProvider(reply).chat(MESSAGES) == "ran"


async def test_sync_function_is_callable_on_the_event_loop_thread() -> None:
    assert FunctionProvider(lambda messages, **kw: "in-memory").chat(MESSAGES) == "in-memory"


async def test_messages_are_validated_like_the_real_providers() -> None:
    provider = ScriptedProvider(["unused"])
    with pytest.raises(UsageError):
        await provider.achat([{"role": "robot", "content": "x"}])
    assert provider.remaining == 1


async def test_non_text_reply_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="not str"):
        await FunctionProvider(lambda messages, **kw: 42).achat(MESSAGES)


async def test_stream_yields_word_deltas_then_usage() -> None:
    provider = ScriptedProvider([("Hello brave new world", Usage(1, 4))])
    stream = provider.chat_stream(MESSAGES)
    assert isinstance(stream, ChatStream)
    deltas = [d async for d in stream]
    assert deltas == ["Hello", " brave", " new", " world"]
    assert stream.usage == Usage(1, 4)


async def test_stream_finish_callbacks_receive_the_usage() -> None:
    seen: list[Usage] = []
    stream = ScriptedProvider([("x", Usage(2, 3))]).chat_stream(MESSAGES)
    stream.on_finish(seen.append)
    assert await stream.acollect() == "x"
    assert seen == [Usage(2, 3)]


def test_test_providers_satisfy_the_provider_protocol() -> None:
    assert isinstance(ScriptedProvider([]), LLMProvider)
    assert isinstance(FunctionProvider(lambda m, **k: ""), LLMProvider)


def test_usage_validates_and_adds() -> None:
    assert Usage(1, 2) + Usage(3, 4) == Usage(4, 6)
    assert Usage(1, 2).total_tokens == 3
    with pytest.raises(UsageError):
        Usage(-1, 0)
    with pytest.raises(UsageError):
        Usage(1.5, 0)  # type: ignore[arg-type]


def test_importing_the_extension_imports_no_sdk() -> None:
    code = (
        "import sys, converge.extensions.llm, converge.extensions.llm.testing;"
        "print([m for m in ('openai', 'anthropic', 'mistralai', 'httpx2') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


async def test_chat_stream_validates_messages_before_streaming() -> None:
    provider = ScriptedProvider(["unused"])
    with pytest.raises(UsageError):
        provider.chat_stream([{"role": "user"}])
    assert provider.remaining == 1


async def _no_yield(stream: ChatStream) -> str:
    return "x"


def test_chat_stream_arguments_are_validated() -> None:
    with pytest.raises(UsageError):
        ChatStream("not callable")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="one argument"):
        ChatStream(lambda: None)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="not list"):
        ChatStream(lambda stream: ["x"])  # type: ignore[arg-type,return-value]
    with pytest.raises(UsageError, match="not coroutine"):
        ChatStream(_no_yield)  # type: ignore[arg-type]
    stream = ScriptedProvider(["x"]).chat_stream(MESSAGES)
    with pytest.raises(UsageError):
        stream.on_finish(42)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        stream.finish({"input_tokens": 1})  # type: ignore[arg-type]


async def test_a_source_yielding_what_is_not_text_is_refused_and_closed() -> None:
    closed = []

    async def numbers(stream: ChatStream) -> AsyncIterator[str]:
        try:
            yield "a"
            yield 1  # type: ignore[misc]
        finally:
            closed.append(True)

    stream = ChatStream(numbers)
    with pytest.raises(UsageError, match="str deltas"):  # .text raised TypeError
        await stream.acollect()
    assert stream.text == "a"
    assert stream.done
    assert closed == [True]


# -- results, stop reasons, structured output -------------------------------------------


async def test_acomplete_returns_a_chat_result_with_usage_and_ids() -> None:
    from converge.extensions.llm import ChatResult

    provider = ScriptedProvider([("hi", Usage(4, 2)), "there"], model="m1")
    first = await provider.acomplete(MESSAGES)
    assert isinstance(first, ChatResult)
    assert (first.text, first.usage, first.stop_reason, first.model) == (
        "hi",
        Usage(4, 2),
        "stop",
        "m1",
    )
    second = await provider.acomplete(MESSAGES)
    assert second.response_id != first.response_id
    assert provider.model == "m1"


@pytest.mark.parametrize(
    ("stop", "error"),
    [
        ("length", "ResponseTruncatedError"),
        ("content_filter", "ContentFilteredError"),
        ("refusal", "ResponseRefusedError"),
    ],
)
async def test_a_configured_stop_reason_raises_its_typed_error_unless_partial(
    stop: str, error: str
) -> None:
    import converge.errors

    provider = FunctionProvider(lambda messages, **kw: "partial", stop_reason=stop)
    with pytest.raises(getattr(converge.errors, error)) as caught:
        await provider.acomplete(MESSAGES)
    assert caught.value.result.text == "partial"  # type: ignore[attr-defined]
    with pytest.raises(getattr(converge.errors, error)):
        await provider.achat(MESSAGES)
    result = await provider.acomplete(MESSAGES, allow_partial=True)
    assert result.stop_reason == stop
    assert await provider.achat(MESSAGES, allow_partial=True) == "partial"
    assert provider.complete(MESSAGES, allow_partial=True).stop_reason == stop


async def test_scripted_chat_results_are_returned_as_given() -> None:
    from converge.errors import ResponseTruncatedError
    from converge.extensions.llm import ChatResult

    cut = ChatResult('{"decis', Usage(9, 1024), stop_reason="length", raw_stop_reason="length")
    provider = ScriptedProvider([cut])
    with pytest.raises(ResponseTruncatedError, match="token limit") as caught:
        await provider.acomplete(MESSAGES)
    assert caught.value.result is cut  # type: ignore[attr-defined]
    assert provider.last_usage == Usage(9, 1024)


async def test_structured_replies_come_back_as_a_native_tool_call() -> None:
    tool = {"name": "emit", "description": "", "parameters": {"type": "object"}}
    provider = ScriptedProvider(['{"decisions": []}', "prose instead"])
    options = {"use_structured_output": True, "emit_decisions_tool": tool}
    result = await provider.acomplete(MESSAGES, **options)
    (call,) = result.tool_calls
    assert (call.name, call.arguments, result.stop_reason) == (
        "emit",
        {"decisions": []},
        "tool_calls",
    )
    assert result.text == ""
    assert await provider.achat(MESSAGES, **options) == "prose instead"


async def test_stream_sets_the_result_and_raises_a_truncation_at_the_end() -> None:
    from converge.errors import ResponseTruncatedError

    provider = FunctionProvider(lambda messages, **kw: "one two three", stop_reason="length")
    stream = provider.chat_stream(MESSAGES)
    deltas: list[str] = []

    async def read() -> None:
        async for delta in stream:
            deltas.append(delta)

    with pytest.raises(ResponseTruncatedError):
        await read()
    assert "".join(deltas) == "one two three"
    assert stream.stop_reason == "length"
    partial = provider.chat_stream(MESSAGES, allow_partial=True)
    assert await partial.acollect() == "one two three"


async def test_contract_d_messages_are_accepted_and_bad_ones_rejected() -> None:
    provider = ScriptedProvider(["ok"])
    history = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "look"},
                {"type": "image", "url": "https://x.test/a.png"},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "name": "f", "arguments": {}}],
        },
        {"role": "tool", "tool_call_id": "c1", "name": "f", "content": "42"},
    ]
    assert await provider.achat(history) == "ok"
    assert provider.calls[0].messages == tuple(history)
    with pytest.raises(UsageError):
        await provider.achat([{"role": "tool", "content": "42"}])  # no tool_call_id
    with pytest.raises(UsageError):
        await provider.achat([{"role": "user", "content": [{"type": "video"}]}])


def test_stop_reason_and_model_are_checked() -> None:
    with pytest.raises(UsageError):
        FunctionProvider(lambda m, **k: "", stop_reason="tired")
    with pytest.raises(UsageError):
        ScriptedProvider([], model="")


@pytest.mark.parametrize("replies", [object(), None, 42, "one reply", b"[]"])
def test_a_script_that_is_not_a_list_of_replies_is_a_usage_error(replies: Any) -> None:
    with pytest.raises(UsageError, match="replies must be a list"):
        ScriptedProvider(replies)


@pytest.mark.parametrize(
    ("arguments", "match"),
    [({"a": object()}, "JSON cannot encode"), ({"a": deep_list()}, "nested too deeply")],
)
async def test_a_scripted_tool_call_whose_arguments_have_no_json_is_a_usage_error(
    arguments: dict[str, Any], match: str
) -> None:
    from converge.extensions.llm import ToolCall

    call = ToolCall("c", "emit", arguments)
    provider = ScriptedProvider([ChatResult("", tool_calls=(call,), stop_reason="tool_calls")] * 2)
    with pytest.raises(UsageError, match=match):
        await provider.achat(MESSAGES)
    with pytest.raises(UsageError, match=match):
        provider.chat(MESSAGES)
