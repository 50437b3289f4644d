"""FallbackProvider: which failures move on, every surface, streams, the real SDKs."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from llm_fake_server import FakeLLMServer
from llm_helpers import WIRES

from converge.core import Identity, Task, UpdateTask
from converge.errors import (
    ProviderAuthError,
    ProviderConnectionError,
    ProviderOverloadedError,
    ProviderRateLimitError,
    ProviderResponseError,
    ProviderTimeoutError,
    RateLimitTimeoutError,
    ResponseIncompleteError,
    ResponseTruncatedError,
    UsageError,
)
from converge.extensions.llm import (
    ChatResult,
    FallbackProvider,
    LimitedProvider,
    LLMAgent,
    ToolCall,
    Usage,
)
from converge.extensions.llm.fallback import is_fallback_error
from converge.extensions.llm.testing import FunctionProvider, ScriptedProvider
from nesting import deep_list

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "hello"}]

FALLS_BACK = [
    ProviderOverloadedError("busy", provider="a", status_code=529),
    ProviderResponseError("HTTP 503", provider="a", status_code=503),
    ProviderTimeoutError("slow", provider="a"),
    ProviderConnectionError("refused", provider="a"),
    ProviderRateLimitError("429 beyond the cap", provider="a", status_code=429, retry_after=600),
    RateLimitTimeoutError("local limit", retry_after=30),
    ResponseIncompleteError("cut", provider="a", result=ChatResult("", stop_reason="incomplete")),
]
RAISED = [
    ProviderAuthError("bad key", provider="a", status_code=401),
    ProviderResponseError("HTTP 400", provider="a", status_code=400),
    ProviderResponseError("malformed body", provider="a", status_code=200),
    ResponseTruncatedError("cut", provider="a", result=ChatResult("x", stop_reason="length")),
    UsageError("bad option"),
    RuntimeError("a bug in a custom provider"),
]


@pytest.mark.parametrize("failure", FALLS_BACK, ids=lambda e: type(e).__name__)
async def test_outages_move_the_call_to_the_next_provider(failure: Exception) -> None:
    seen: list[tuple[Any, BaseException]] = []
    first, second = ScriptedProvider([failure]), ScriptedProvider([("ok", Usage(3, 1))])
    provider = FallbackProvider([first, second], on_fallback=lambda p, e: seen.append((p, e)))
    assert is_fallback_error(failure)
    result = await provider.acomplete(MESSAGES)
    assert result.text == "ok"
    assert provider.last_provider is second
    assert provider.last_usage == Usage(3, 1)
    assert seen == [(first, failure)]


@pytest.mark.parametrize("failure", RAISED, ids=lambda e: f"{type(e).__name__}-{e}")
async def test_caller_errors_and_answers_are_raised_without_falling_back(
    failure: Exception,
) -> None:
    second = ScriptedProvider(["never"])
    provider = FallbackProvider([ScriptedProvider([failure]), second])
    assert not is_fallback_error(failure)
    with pytest.raises(type(failure)):
        await provider.acomplete(MESSAGES)
    assert second.calls == []


async def test_when_every_provider_fails_the_last_error_is_raised() -> None:
    last = ProviderTimeoutError("also slow", provider="c")
    provider = FallbackProvider(
        [
            ScriptedProvider([FALLS_BACK[0]]),
            ScriptedProvider([FALLS_BACK[1]]),
            ScriptedProvider([last]),
        ]
    )
    with pytest.raises(ProviderTimeoutError) as caught:
        await provider.achat(MESSAGES)
    assert caught.value is last


async def test_a_custom_policy_decides_what_falls_back() -> None:
    provider = FallbackProvider(
        [ScriptedProvider([RuntimeError("flaky")]), ScriptedProvider(["ok"])],
        should_fallback=lambda exc: isinstance(exc, RuntimeError),
    )
    assert await provider.achat(MESSAGES) == "ok"


async def test_every_async_surface_and_older_provider_shapes() -> None:
    class ChatOnly:
        def chat(self, messages: Any, **kwargs: Any) -> str:
            return "from chat"

    class AchatOnly:
        async def achat(self, messages: Any, **kwargs: Any) -> str:
            raise ProviderOverloadedError("busy", provider="x")

    provider = FallbackProvider([AchatOnly(), ChatOnly()])
    assert await provider.achat(MESSAGES) == "from chat"
    text, usage = await provider.achat_with_usage(MESSAGES)
    assert text == "from chat"
    assert usage == Usage(None, None)
    assert (await provider.acomplete(MESSAGES)).stop_reason == "stop"


async def test_structured_output_passes_through_as_the_tool_arguments() -> None:
    tool = {"name": "emit", "description": "", "parameters": {"type": "object"}}
    provider = FallbackProvider([ScriptedProvider([FALLS_BACK[0]]), ScriptedProvider(['{"a": 1}'])])
    text = await provider.achat(MESSAGES, use_structured_output=True, emit_decisions_tool=tool)
    assert json.loads(text) == {"a": 1}


def test_sync_surface_uses_each_providers_own_sync_methods() -> None:
    provider = FallbackProvider(
        [ScriptedProvider([FALLS_BACK[2]] * 3), ScriptedProvider(["a", "b", "c"])]
    )
    assert provider.chat(MESSAGES) == "a"
    assert provider.chat_with_usage(MESSAGES)[0] == "b"
    assert provider.complete(MESSAGES).text == "c"
    with pytest.raises(ProviderAuthError):
        FallbackProvider([ScriptedProvider([RAISED[0]]), ScriptedProvider(["x"])]).chat(MESSAGES)


async def test_a_stream_falls_back_before_its_first_delta_only() -> None:
    provider = FallbackProvider(
        [ScriptedProvider([FALLS_BACK[0]]), ScriptedProvider([("one two", Usage(2, 2))])]
    )
    stream = provider.chat_stream(MESSAGES)
    assert await stream.acollect() == "one two"
    assert stream.usage == Usage(2, 2)
    assert stream.result is not None
    assert provider.last_provider is provider.providers[1]

    def broken(messages: Any, **kwargs: Any) -> str:
        return "partial answer"

    mid = FallbackProvider(
        [FunctionProvider(broken, stop_reason="length"), ScriptedProvider(["never"])]
    )
    stream = mid.chat_stream(MESSAGES)
    with pytest.raises(ResponseTruncatedError):
        await stream.acollect()
    assert stream.text == "partial answer"
    assert mid.providers[1].calls == []


@pytest.mark.parametrize(
    "args",
    [([],), ("provider",), ([object()],)],
)
def test_invalid_arguments_raise_usage_error(args: tuple[Any, ...]) -> None:
    with pytest.raises(UsageError):
        FallbackProvider(*args)


def test_invalid_callbacks_raise_usage_error() -> None:
    with pytest.raises(UsageError):
        FallbackProvider([ScriptedProvider([])], should_fallback="yes")  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        FallbackProvider([ScriptedProvider([])], on_fallback=1)  # type: ignore[arg-type]


# -- on the real SDKs, against the loopback wire-format server ---------------------------


@pytest.fixture
async def pair(server: FakeLLMServer) -> AsyncIterator[tuple[Any, Any]]:
    first = WIRES["openai"].provider(server, max_retries=0)
    second = WIRES["anthropic"].provider(server, max_retries=0)
    yield first, second
    await first.aclose()
    await second.aclose()


@pytest.mark.parametrize("status", [500, 503, 529])
async def test_a_5xx_from_the_first_api_is_answered_by_the_second(
    pair: tuple[Any, Any], server: FakeLLMServer, status: int
) -> None:
    openai_wire, anthropic_wire = WIRES["openai"], WIRES["anthropic"]
    server.push(openai_wire.error(status, "down", None), anthropic_wire.chat("from claude"))
    provider = FallbackProvider(list(pair))
    result = await provider.acomplete(MESSAGES)
    assert result.text == "from claude"
    assert provider.last_provider is pair[1]
    assert "/chat/completions" in server.requests[0].path
    assert "/messages" in server.requests[1].path


async def test_auth_failure_of_the_first_api_is_not_hidden(
    pair: tuple[Any, Any], server: FakeLLMServer
) -> None:
    server.push(WIRES["openai"].error(401, "bad key", None))
    with pytest.raises(ProviderAuthError):
        await FallbackProvider(list(pair)).acomplete(MESSAGES)
    assert len(server.requests) == 1


async def test_an_agent_on_a_fallback_provider_decides(
    pair: tuple[Any, Any], server: FakeLLMServer
) -> None:
    done = json.dumps([{"type": "UpdateTask", "task_id": "t1", "state": "completed"}])
    server.push(WIRES["openai"].error(503, "down", None), WIRES["anthropic"].chat(done))
    agent = LLMAgent(Identity(), FallbackProvider(list(pair)))
    decisions = await agent.adecide([], [Task(objective="x", id="t1")])
    assert decisions == [UpdateTask("t1", "completed")]
    assert agent.last_usage == WIRES["anthropic"].usage


async def test_a_real_stream_falls_back_when_the_first_api_is_down(
    pair: tuple[Any, Any], server: FakeLLMServer
) -> None:
    server.push(WIRES["openai"].error(503, "down", None), WIRES["anthropic"].stream(["a", "b"]))
    stream = FallbackProvider(list(pair)).chat_stream(MESSAGES)
    async with stream:
        assert [d async for d in stream] == ["a", "b"]
    assert stream.usage == WIRES["anthropic"].usage


async def test_providers_that_cannot_stream_answer_a_stream_in_one_delta() -> None:
    class ChatOnly:
        def chat(self, messages: Any, **kwargs: Any) -> str:
            return '[{"type": "UpdateTask", "task_id": "t1", "state": "running"}]'

    agent = LLMAgent(Identity(), FallbackProvider([ScriptedProvider([FALLS_BACK[3]]), ChatOnly()]))
    deltas: list[Any] = []
    agent.events.subscribe(deltas.append)
    decisions = await agent.adecide([], [Task(objective="x", id="t1")])
    assert decisions == [UpdateTask("t1", "running")]
    assert [type(e).__name__ for e in deltas].count("TextDelta") == 1


async def test_the_agents_call_finished_event_names_the_model_that_answered() -> None:
    from converge.core.events import CallFinished, CallStarted

    first = ScriptedProvider([FALLS_BACK[0]], model="primary")
    second = ScriptedProvider(["[]"], model="backup")
    agent = LLMAgent(Identity(), FallbackProvider([first, second]))
    seen: list[Any] = []
    agent.events.subscribe(seen.append, types=(CallStarted, CallFinished))
    await agent.adecide([], [])
    started, finished = seen
    assert started.model == "primary"
    assert finished.model == "backup"


@pytest.mark.parametrize("through", ["agent", "fallback"])
async def test_a_sync_provider_stuck_in_its_thread_lets_the_caller_go_when_cancelled(
    through: str,
) -> None:
    # chat() of a sync-only provider runs in a worker thread; cancelled, the caller used
    # to wait for it to return.
    release = threading.Event()

    class Stuck:
        def chat(self, messages: Any, **kwargs: Any) -> str:
            release.wait(10)
            return "[]"

    started = time.monotonic()
    try:
        with anyio.move_on_after(0.3):
            if through == "agent":
                await LLMAgent(Identity(), Stuck()).adecide([], [Task(objective="x", id="t1")])
            else:
                await FallbackProvider([Stuck()]).achat(MESSAGES)
    finally:
        release.set()
    assert time.monotonic() - started < 3


@pytest.mark.parametrize(
    "value", [math.nan, math.inf, object(), deep_list()], ids=["nan", "inf", "object", "deep"]
)
async def test_structured_tool_arguments_without_json_are_a_malformed_response(
    value: Any,
) -> None:
    # The arguments are the model's output: an unusable reply, not a Python error.
    tool = {"name": "emit", "parameters": {"type": "object"}}
    options = {"use_structured_output": True, "emit_decisions_tool": tool}
    call = ToolCall("i", "emit", {"a": value})
    reply = ChatResult("", tool_calls=(call,), stop_reason="tool_calls")
    provider = FallbackProvider([ScriptedProvider([reply] * 2)])
    with pytest.raises(ProviderResponseError, match=r"malformed response.*'emit'") as caught:
        await provider.achat(MESSAGES, **options)
    assert caught.value.status_code == 200
    assert caught.value.provider == "FallbackProvider"
    assert not is_fallback_error(caught.value)
    with pytest.raises(ProviderResponseError, match="not JSON"):
        provider.chat(MESSAGES, **options)
    limited = LimitedProvider(ScriptedProvider([reply]))
    with pytest.raises(ProviderResponseError, match="not JSON"):
        await limited.achat(MESSAGES, **options)
