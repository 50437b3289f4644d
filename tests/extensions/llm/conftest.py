"""Fixtures for the LLM extension: one loopback fake server per session."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from llm_fake_server import FakeLLMServer
from llm_helpers import WIRES, FakeTime, Wire

from converge.extensions.llm._base import SDKProvider


@pytest.fixture(scope="session")
def llm_server() -> Iterator[FakeLLMServer]:
    """The fake OpenAI/Anthropic/Mistral server on 127.0.0.1 (started once)."""
    server = FakeLLMServer().start()
    yield server
    server.stop()


@pytest.fixture
def server(llm_server: FakeLLMServer) -> Iterator[FakeLLMServer]:
    """The fake server with an empty script and request log."""
    llm_server.reset()
    yield llm_server
    llm_server.reset()


@pytest.fixture(params=sorted(WIRES))
def wire(request: pytest.FixtureRequest) -> Wire:
    """Each API in turn."""
    return WIRES[str(request.param)]


@pytest.fixture
def fake_time() -> FakeTime:
    """A recording clock for retry policies."""
    return FakeTime()


@pytest.fixture
async def provider(
    wire: Wire, server: FakeLLMServer, fake_time: FakeTime
) -> AsyncIterator[SDKProvider]:
    """A provider of each API against the fake server, retrying on the fake clock."""
    instance = wire.provider(server, retry_policy=fake_time.policy())
    yield instance
    await instance.aclose()
