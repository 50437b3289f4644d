"""LimitedProvider: shared concurrency, tokens- and requests-per-minute, on a fake clock."""

from __future__ import annotations

import math
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from llm_fake_server import FakeLLMServer
from llm_helpers import WIRES

from converge.core import Identity, Task
from converge.errors import RateLimitTimeoutError, ResponseTruncatedError, UsageError
from converge.extensions.llm import (
    ChatResult,
    FallbackProvider,
    LimitedProvider,
    LLMAgent,
    Usage,
)
from converge.extensions.llm.limits import estimate_tokens
from converge.extensions.llm.testing import FunctionProvider, ScriptedProvider
from nesting import deep_list

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "hi"}]  # estimated at 1 token


class FakeClock:
    """Monotonic seconds that move only when a limiter sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await anyio.lowlevel.checkpoint()


@pytest.fixture
def fake() -> FakeClock:
    return FakeClock()


def limited(provider: Any, fake: FakeClock, **kwargs: Any) -> LimitedProvider:
    return LimitedProvider(provider, clock=fake.clock, sleep=fake.sleep, **kwargs)


async def test_concurrency_is_bounded_and_shared_by_every_caller() -> None:
    in_flight = peak = 0

    async def reply(messages: Any, **kwargs: Any) -> str:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await anyio.sleep(0.01)
        in_flight -= 1
        return "[]"

    shared = LimitedProvider(FunctionProvider(reply), max_concurrency=2)
    agents = [LLMAgent(Identity(), shared) for _ in range(3)]
    async with anyio.create_task_group() as tg:
        for agent in agents:
            for _ in range(3):
                tg.start_soon(agent.adecide, [], [])
    assert peak == 2
    assert len(shared.provider.calls) == 9


async def test_tokens_per_minute_waits_for_the_bucket_to_refill(fake: FakeClock) -> None:
    # 600 tokens a minute = 10 a second; each call really uses 300.
    provider = ScriptedProvider([("a", Usage(250, 50))] * 4)
    shared = limited(provider, fake, tokens_per_minute=600)
    for _ in range(2):  # a full bucket: two calls at once
        await shared.acomplete(MESSAGES)
    assert fake.sleeps == []
    await shared.acomplete(MESSAGES)  # the bucket is empty: 1 token needs 0.1 s
    assert fake.sleeps == [pytest.approx(0.1)]
    await shared.acomplete(MESSAGES)  # and now 300 tokens of debt: 30 s
    assert fake.sleeps[1] == pytest.approx(30.0, abs=0.2)
    assert shared.last_usage == Usage(250, 50)


async def test_cache_and_reasoning_tokens_are_counted_once(fake: FakeClock) -> None:
    usage = Usage(100, 50, cache_read_tokens=80, cache_write_tokens=10, reasoning_tokens=40)
    shared = limited(ScriptedProvider([("a", usage)]), fake, tokens_per_minute=1000)
    await shared.acomplete(MESSAGES)
    assert shared.tokens_available == pytest.approx(850, abs=1)


async def test_unknown_usage_keeps_the_estimate(fake: FakeClock) -> None:
    class NoUsage:
        async def achat(self, messages: Any, **kwargs: Any) -> str:
            return "x"

    shared = limited(NoUsage(), fake, tokens_per_minute=1000)
    await shared.acomplete(MESSAGES, max_tokens=99)
    assert shared.tokens_available == pytest.approx(900, abs=1)


def test_the_estimate_counts_the_prompt_and_the_output_limit() -> None:
    messages = [
        {"role": "user", "content": "x" * 400},
        {
            "role": "user",
            "content": [{"type": "text", "text": "y" * 40}, {"type": "image", "url": "u"}],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "1", "name": "f", "arguments": {}}],
        },
    ]
    base = estimate_tokens(messages, {})
    assert 111 <= base <= 130
    assert estimate_tokens(messages, {"max_tokens": 1000}) == base + 1000
    assert estimate_tokens(messages, {"max_completion_tokens": 7, "max_tokens": 1}) == base + 7


async def test_requests_per_minute(fake: FakeClock) -> None:
    shared = limited(ScriptedProvider(["a"] * 3), fake, requests_per_minute=2)
    for _ in range(3):
        await shared.achat(MESSAGES)
    assert fake.sleeps == [pytest.approx(30.0)]


async def test_a_wait_over_max_wait_raises_at_once_and_charges_nothing(fake: FakeClock) -> None:
    provider = ScriptedProvider([("a", Usage(660, 0)), "b"])
    shared = limited(provider, fake, tokens_per_minute=600, max_wait=5)
    await shared.acomplete(MESSAGES)  # 60 tokens over: the next one is 6.1 s away
    available = shared.tokens_available
    with pytest.raises(RateLimitTimeoutError) as caught:
        await shared.acomplete(MESSAGES)
    assert caught.value.retry_after == pytest.approx(6.1, abs=0.01)
    assert shared.tokens_available == available
    assert fake.sleeps == []
    assert len(provider.calls) == 1


async def test_a_saturated_provider_falls_back_to_the_next(fake: FakeClock) -> None:
    busy = limited(
        ScriptedProvider([("a", Usage(600, 0))]), fake, tokens_per_minute=600, max_wait=0
    )
    spare = ScriptedProvider(["from spare"])
    provider = FallbackProvider([busy, spare])
    assert (await provider.acomplete(MESSAGES)).text == "a"
    assert (await provider.acomplete(MESSAGES)).text == "from spare"


async def test_a_cancelled_waiter_gives_its_reservation_back(fake: FakeClock) -> None:
    started = anyio.Event()

    async def slow_sleep(seconds: float) -> None:
        started.set()
        await anyio.sleep_forever()

    shared = LimitedProvider(
        ScriptedProvider([("a", Usage(600, 0))]),
        tokens_per_minute=600,
        clock=fake.clock,
        sleep=slow_sleep,
    )
    await shared.acomplete(MESSAGES)  # drains the bucket
    before = shared.tokens_available
    async with anyio.create_task_group() as tg:
        tg.start_soon(shared.acomplete, MESSAGES)
        await started.wait()
        tg.cancel_scope.cancel()
    assert shared.tokens_available == before


async def test_a_truncated_answer_still_settles_its_usage(fake: FakeClock) -> None:
    cut = ChatResult("x", Usage(100, 200), stop_reason="length")
    shared = limited(ScriptedProvider([cut]), fake, tokens_per_minute=1000)
    with pytest.raises(ResponseTruncatedError):
        await shared.acomplete(MESSAGES)
    assert shared.tokens_available == pytest.approx(700, abs=1)


async def test_a_stream_holds_a_slot_until_it_ends_and_settles(fake: FakeClock) -> None:
    provider = ScriptedProvider([("one two", Usage(10, 5)), "three"])
    shared = limited(provider, fake, max_concurrency=1, tokens_per_minute=600)
    stream = shared.chat_stream(MESSAGES)
    assert await stream.__anext__() == "one"
    with anyio.move_on_after(0.05) as scope:  # the only slot is taken
        await shared.achat(MESSAGES)
    assert scope.cancelled_caught
    assert await stream.acollect() == "one two"
    assert stream.usage == Usage(10, 5)
    assert shared.tokens_available == pytest.approx(585, abs=1)
    assert await shared.achat(MESSAGES) == "three"


async def test_an_agent_on_a_limited_real_provider(server: FakeLLMServer) -> None:
    wire = WIRES["openai"]
    provider = wire.provider(server, max_retries=0)
    try:
        shared = limited(provider, FakeClock(), max_concurrency=4, tokens_per_minute=100_000)
        done = '[{"type": "UpdateTask", "task_id": "t1", "state": "completed"}]'
        server.push(wire.chat(done))
        agent = LLMAgent(Identity(), shared)
        (decision,) = await agent.adecide([], [Task(objective="x", id="t1")])
        assert decision.to_dict()["state"] == "completed"
        assert agent.last_usage == wire.usage
        assert shared.tokens_available == pytest.approx(100_000 - wire.usage.total_tokens, abs=5)
    finally:
        await provider.aclose()


def test_sync_surface_runs_on_its_own_loop() -> None:
    shared = LimitedProvider(ScriptedProvider(["a", "b", "c"]), max_concurrency=1)
    try:
        assert shared.chat(MESSAGES) == "a"
        assert shared.chat_with_usage(MESSAGES)[0] == "b"
        assert shared.complete(MESSAGES).text == "c"
    finally:
        shared.close()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_concurrency": 0},
        {"max_concurrency": 1.5},
        {"tokens_per_minute": -1},
        {"tokens_per_minute": math.inf},
        {"requests_per_minute": True},
        {"max_wait": -1},
        {"clock": 5},
    ],
)
def test_invalid_limits_raise_usage_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        LimitedProvider(ScriptedProvider([]), **kwargs)
    with pytest.raises(UsageError):
        LimitedProvider(object())


async def test_a_provider_that_cannot_stream_streams_its_answer_whole(fake: FakeClock) -> None:
    class AchatOnly:
        async def achat(self, messages: Any, **kwargs: Any) -> str:
            return "all at once"

    shared = limited(AchatOnly(), fake, max_concurrency=1)
    stream = shared.chat_stream(MESSAGES)
    assert [d async for d in stream] == ["all at once"]
    assert stream.usage == Usage(None, None)


@pytest.mark.parametrize("max_wait", [1e300, 2.0**62])
async def test_a_max_wait_too_long_to_count_means_no_limit(max_wait: float) -> None:
    # 1e300 s has no nanosecond count a float can hold: every call raised OverflowError.
    for limits in ({"tokens_per_minute": 1000}, {"requests_per_minute": 10}):
        shared = LimitedProvider(ScriptedProvider(["x"]), max_wait=max_wait, **limits)
        assert shared.max_wait is None
        assert await shared.achat(MESSAGES) == "x"
    assert LimitedProvider(ScriptedProvider([]), max_wait=1e9).max_wait == 1e9


def test_estimate_tokens_refuses_options_that_are_not_a_mapping() -> None:
    with pytest.raises(UsageError, match="kwargs"):
        estimate_tokens([], None)  # type: ignore[arg-type]


def test_estimate_tokens_never_fails_on_malformed_messages() -> None:
    deep = deep_list()
    calls = [{"role": "assistant", "content": "", "tool_calls": deep}]
    assert estimate_tokens(calls, {}) == estimate_tokens([{"role": "assistant", "content": ""}], {})
    parts = [{"type": "text", "text": deep}, {"type": "text", "text": "a" * 40}, "b" * 40]
    assert 20 <= estimate_tokens([{"role": "user", "content": parts}], {}) <= 22
    assert estimate_tokens(None, {"max_tokens": 5}) == 5


@pytest.mark.parametrize(
    "message",
    [
        {"role": "assistant", "content": None, "tool_calls": deep_list()},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c", "name": "f", "arguments": {"a": deep_list()}}],
        },
        {"role": "user", "content": [{"type": "text", "text": deep_list()}]},
        {"role": [], "content": "x"},
    ],
)
async def test_malformed_messages_get_the_providers_usage_error(message: dict[str, Any]) -> None:
    with pytest.raises(UsageError) as direct:
        await ScriptedProvider(["x"]).achat([message])
    shared = LimitedProvider(ScriptedProvider(["x"]), tokens_per_minute=1000)
    with pytest.raises(UsageError) as wrapped:
        await shared.achat([message])
    assert str(wrapped.value) == str(direct.value)


@pytest.mark.parametrize("streamed", [False, True], ids=["achat", "chat_stream"])
async def test_a_refused_request_gives_its_reservation_back(
    fake: FakeClock, streamed: bool
) -> None:
    provider = ScriptedProvider(["ok"])
    shared = limited(provider, fake, tokens_per_minute=1000, requests_per_minute=1, max_wait=0)
    full = shared.tokens_available
    bad = [{"role": "wizard", "content": "x"}]

    async def call() -> object:
        return await (shared.chat_stream(bad).acollect() if streamed else shared.achat(bad))

    for _ in range(3):  # each took the minute's only request and its tokens, for nothing
        with pytest.raises(UsageError):
            await call()
        assert shared.tokens_available == full
    assert await shared.achat(MESSAGES) == "ok"  # RateLimitTimeoutError before
