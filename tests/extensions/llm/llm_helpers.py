"""Per-API reply builders behind one interface, and a recording clock for retry tests."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio.lowlevel
import llm_fake_server as fake

from converge.extensions.llm import (
    AnthropicProvider,
    MistralProvider,
    OpenAIProvider,
    RetryPolicy,
    Usage,
)
from converge.extensions.llm._base import SDKProvider


@dataclass(frozen=True)
class Wire:
    """How one API's provider is built and how its server answers."""

    name: str
    cls: type[SDKProvider]
    url: Callable[[fake.FakeLLMServer], str]
    chat: Callable[..., fake.Reply]
    stream: Callable[[Iterable[str]], fake.Reply]
    tool: Callable[[str, str], fake.Reply]
    error: Callable[[int, str, Mapping[str, str] | None], fake.Reply]
    usage: Usage
    env_var: str

    def provider(self, server: fake.FakeLLMServer, **kwargs: Any) -> SDKProvider:
        kwargs.setdefault("api_key", "test-key")
        kwargs.setdefault("base_url", self.url(server))
        return self.cls(**kwargs)


WIRES = {
    "openai": Wire(
        "openai",
        OpenAIProvider,
        lambda s: s.openai_url,
        fake.openai_chat,
        fake.openai_stream,
        fake.openai_tool_call,
        lambda status, msg, headers: fake.openai_error(status, msg, headers=headers),
        Usage(11, 7),
        "OPENAI_API_KEY",
    ),
    "anthropic": Wire(
        "anthropic",
        AnthropicProvider,
        lambda s: s.anthropic_url,
        fake.anthropic_message,
        fake.anthropic_stream,
        lambda name, args: fake.anthropic_tool_use(name, json.loads(args)),
        lambda status, msg, headers: fake.anthropic_error(status, msg, headers=headers),
        Usage(13, 5),
        "ANTHROPIC_API_KEY",
    ),
    "mistral": Wire(
        "mistral",
        MistralProvider,
        lambda s: s.mistral_url,
        fake.mistral_chat,
        fake.mistral_stream,
        fake.mistral_tool_call,
        lambda status, msg, headers: fake.error(status, {"message": msg}, headers),
        Usage(17, 3),
        "MISTRAL_API_KEY",
    ),
}


class FakeTime:
    """A clock that only moves when the retry policy sleeps on it."""

    def __init__(self, wall: float = 1_700_000_000.0) -> None:
        self.now = 0.0
        self.wall = wall
        self.sleeps: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await anyio.lowlevel.checkpoint()

    def clock(self) -> float:
        return self.now

    def wall_clock(self) -> float:
        return self.wall + self.now

    def policy(self, **kwargs: Any) -> RetryPolicy:
        """A policy on this clock, without jitter."""
        return RetryPolicy(
            sleep=self.sleep,
            clock=self.clock,
            wall_clock=self.wall_clock,
            random=lambda: 0.0,
            **kwargs,
        )
