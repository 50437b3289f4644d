"""The runner test of issue 12, on the wire: a real OpenAI client gets a 429 whose
``Retry-After`` is beyond the provider's cap; the runner waits it out, calls the model
again, and the agent keeps receiving messages meanwhile.

The provider talks HTTP to the loopback fake server of the LLM tests
(``tests/extensions/llm/llm_fake_server.py``); only the runner's wait is a fake sleep.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from converge.core import Identity, Message
from converge.extensions.llm import LLMAgent, OpenAIProvider, RetryPolicy
from converge.runtime import AgentRunner, MessageBus

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "extensions" / "llm"))

from llm_fake_server import FakeLLMServer, openai_chat, openai_error

pytestmark = pytest.mark.anyio

OUT = "replies"


@pytest.fixture(scope="module")
def llm_server() -> Iterator[FakeLLMServer]:
    server = FakeLLMServer().start()
    yield server
    server.stop()


def answer(text: str) -> str:
    message = {"topics": [OUT], "payload": {"text": text}}
    return json.dumps([{"type": "SendMessage", "message": message}])


async def test_429_beyond_the_provider_cap_is_waited_out_by_the_runner(
    llm_server: FakeLLMServer,
) -> None:
    llm_server.reset()
    llm_server.push(
        openai_error(429, "slow down", type_="rate_limit_error", headers={"retry-after": "120"}),
        openai_chat(answer("first")),
        openai_chat(answer("second")),
    )
    provider = OpenAIProvider(
        "sk-test",
        base_url=llm_server.openai_url,
        retry_policy=RetryPolicy(max_retries=3, max_retry_after=60.0),
    )
    agent = LLMAgent(Identity(), provider, name="llm")
    waits: list[float] = []
    waiting, resume = anyio.Event(), anyio.Event()

    async def sleep(seconds: float) -> None:  # the runner's wait, without waiting
        waits.append(seconds)
        waiting.set()
        await resume.wait()

    bus = MessageBus()
    replies = bus.subscribe(topics=[OUT])
    async with AgentRunner(bus, [agent], sleep=sleep, max_batch=1) as runner:
        await bus.publish(Message(sender="user", recipient=agent.id, payload={"n": 1}))
        with anyio.fail_after(10):
            await waiting.wait()
        # the provider gave up at once (120 s > its 60 s cap); the agent still listens
        assert len(llm_server.requests) == 1
        assert await bus.publish(Message(sender="user", recipient=agent.id, payload={"n": 2}))
        resume.set()
        with anyio.fail_after(10):
            await runner.wait_until(lambda r: r.idle)
    await provider.aclose()
    assert waits == [120.0]
    assert len(llm_server.requests) == 3  # the 429, its repeat after the wait, message 2
    assert [replies.receive_nowait().payload["text"] for _ in range(2)] == ["first", "second"]
    assert runner.errors == []
