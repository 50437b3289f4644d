"""Benchmark what converge's LLM layer adds per call on top of the raw SDKs.

Every implementation talks over real HTTP to the same loopback stub (the fake server of
``tests/extensions/llm``), which answers instantly, so the difference between two rows is
the client-side cost. Cases:

* ``<provider>.achat``: ``OpenAIProvider``/``AnthropicProvider``/``MistralProvider.achat``
  (validation, retry wrapper, error mapping, response checks, usage) against the bare SDK
  call an application would write (``client.chat.completions.create(...)`` and reading the
  text).
* ``<provider>.adecide``: ``LLMAgent.adecide`` with structured output (prompt building,
  the ``emit_decisions`` tool schema, parsing and validating decisions) against the bare
  SDK call carrying the same prompt and tool, plus ``json.loads`` of the arguments.

asyncio for all; ``[trio]`` rows for OpenAI (its SDK runs on trio) and Mistral (whose SDK
is asyncio-only, so both sides use its sync client in a worker thread there).

Prints one JSON object per line (``case``, ``impl``, ``ops_per_s`` = 1 / median call
latency) and a table of ratios and added milliseconds per call on stderr.

Usage: ``python benchmarks/llm_overhead.py [--quick]``
"""

from __future__ import annotations

import functools
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from _bench import Column, Results, arg_parser, print_ratio_table
from converge.core import Identity, Task, ToolRegistry
from converge.extensions.llm import (
    AnthropicProvider,
    LLMAgent,
    MistralProvider,
    OpenAIProvider,
    decisions_tool,
)

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Say hello."},
]
DECISIONS = json.dumps(
    {"decisions": [{"type": "UpdateTask", "task_id": "t1", "state": "completed", "result": 1}]}
)


def load_test_module(path: Path) -> Any:
    """A tests' helper module, loaded by path (benchmarks are not a package) and
    registered under its file name, as the tests import it."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def load_fake_server() -> Any:
    """The tests' loopback LLM server module (after ``tests/loopback.py``, which it uses)."""
    load_test_module(ROOT / "tests" / "loopback.py")
    return load_test_module(ROOT / "tests" / "extensions" / "llm" / "llm_fake_server.py")


Impls = dict[str, Callable[[], Awaitable[object]]]
Cleanup = Callable[[], Awaitable[None]]


def compare(
    make: Callable[[], Awaitable[tuple[Impls, Cleanup]]],
    backend: str,
    seconds: float,
    repeats: int,
) -> dict[str, float]:
    """Calls per second of each implementation on one event loop, from the median call
    latency: after a warm-up (which also sizes the run to about ``seconds`` per
    implementation and repeat), single calls alternate between the implementations (in
    turn-swapping order) so that background load hits them alike; the median of all
    calls resists the outliers such load causes."""

    async def main() -> dict[str, float]:
        impls, cleanup = await make()
        try:
            per_call = 0.0
            for fn in impls.values():
                for _ in range(3):
                    start = time.perf_counter()
                    await fn()
                    per_call = max(per_call, time.perf_counter() - start)
            ops = max(5, int(seconds / per_call)) * repeats
            samples: dict[str, list[float]] = {name: [] for name in impls}
            order = list(impls.items())
            for _ in range(ops):
                order.reverse()
                for name, fn in order:
                    start = time.perf_counter()
                    await fn()
                    samples[name].append(time.perf_counter() - start)
            return {name: 1 / statistics.median(times) for name, times in samples.items()}
        finally:
            await cleanup()

    return anyio.run(main, backend=backend)


def agent_for(provider: Any) -> tuple[LLMAgent, list[dict[str, str]], dict[str, Any]]:
    registry = ToolRegistry()

    @registry.tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    agent = LLMAgent(Identity(), provider, tool_registry=registry, use_structured_output=True)
    prompt = agent.build_prompt([], [Task(objective="add", id="t1")])
    return agent, prompt, decisions_tool(registry)


def run(quick: bool) -> list[dict[str, Any]]:
    fake = load_fake_server()
    server = fake.FakeLLMServer().start()
    seconds, repeats = (0.05, 1) if quick else (1.0, 5)
    results = Results()
    emit = results.add_rates

    try:
        # -- OpenAI ------------------------------------------------------------------
        import openai

        def openai_client() -> Any:
            return openai.AsyncOpenAI(api_key="k", base_url=server.openai_url, max_retries=0)

        async def openai_chat() -> tuple[Impls, Cleanup]:
            provider = OpenAIProvider("k", base_url=server.openai_url)
            client = openai_client()

            async def raw() -> str | None:
                response = await client.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=MESSAGES,  # type: ignore[arg-type]
                )
                return response.choices[0].message.content

            async def cleanup() -> None:
                await provider.aclose()
                await client.close()

            return {"converge": functools.partial(provider.achat, MESSAGES), "openai": raw}, cleanup

        async def openai_decide() -> tuple[Impls, Cleanup]:
            provider = OpenAIProvider("k", base_url=server.openai_url)
            agent, prompt, tool = agent_for(provider)
            client = openai_client()

            async def raw() -> object:
                response = await client.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=prompt,  # type: ignore[arg-type]
                    tools=[{"type": "function", "function": tool}],  # type: ignore[list-item]
                    tool_choice={"type": "function", "function": {"name": tool["name"]}},
                )
                call = response.choices[0].message.tool_calls[0]  # type: ignore[index]
                return json.loads(call.function.arguments)  # type: ignore[union-attr]

            async def cleanup() -> None:
                await provider.aclose()
                await client.close()

            decide = functools.partial(agent.adecide, [], [Task(objective="add", id="t1")])
            return {"converge": decide, "openai": raw}, cleanup

        server.default = fake.openai_chat("Hello!")
        emit("openai.achat", compare(openai_chat, "asyncio", seconds, repeats))
        emit("openai.achat[trio]", compare(openai_chat, "trio", seconds, repeats))
        server.default = fake.openai_tool_call("emit_decisions", DECISIONS)
        emit("openai.adecide", compare(openai_decide, "asyncio", seconds, repeats))

        # -- Anthropic ---------------------------------------------------------------
        import anthropic

        def anthropic_client() -> Any:
            return anthropic.AsyncAnthropic(
                api_key="k", base_url=server.anthropic_url, max_retries=0
            )

        async def anthropic_chat() -> tuple[Impls, Cleanup]:
            provider = AnthropicProvider("k", base_url=server.anthropic_url)
            client = anthropic_client()

            async def raw() -> str:
                response = await client.messages.create(
                    model="claude-sonnet-4-20250514",
                    max_tokens=1024,
                    system=MESSAGES[0]["content"],
                    messages=MESSAGES[1:],  # type: ignore[arg-type]
                )
                return "".join(b.text for b in response.content if b.type == "text")

            async def cleanup() -> None:
                await provider.aclose()
                await client.close()

            return {
                "converge": functools.partial(provider.achat, MESSAGES),
                "anthropic": raw,
            }, cleanup

        async def anthropic_decide() -> tuple[Impls, Cleanup]:
            provider = AnthropicProvider("k", base_url=server.anthropic_url)
            agent, prompt, tool = agent_for(provider)
            client = anthropic_client()

            async def raw() -> object:
                response = await client.messages.create(
                    model="claude-sonnet-4-20250514",
                    max_tokens=1024,
                    system=prompt[0]["content"],
                    messages=prompt[1:],  # type: ignore[arg-type]
                    tools=[
                        {
                            "name": tool["name"],
                            "description": tool["description"],
                            "input_schema": tool["parameters"],
                        }
                    ],
                    tool_choice={"type": "tool", "name": tool["name"]},
                )
                # the SDK already decoded the tool input: no JSON round trip for the peer
                return next(b for b in response.content if b.type == "tool_use").input

            async def cleanup() -> None:
                await provider.aclose()
                await client.close()

            decide = functools.partial(agent.adecide, [], [Task(objective="add", id="t1")])
            return {"converge": decide, "anthropic": raw}, cleanup

        server.default = fake.anthropic_message("Hello!")
        emit("anthropic.achat", compare(anthropic_chat, "asyncio", seconds, repeats))
        server.default = fake.anthropic_tool_use("emit_decisions", json.loads(DECISIONS))
        emit("anthropic.adecide", compare(anthropic_decide, "asyncio", seconds, repeats))

        # -- Mistral -----------------------------------------------------------------
        from mistralai.client import Mistral

        async def mistral_chat() -> tuple[Impls, Cleanup]:
            provider = MistralProvider("k", base_url=server.mistral_url)
            client = Mistral(api_key="k", server_url=server.mistral_url, retry_config=None)
            on_asyncio = _backend() == "asyncio"

            async def raw() -> object:
                kwargs: dict[str, Any] = {"model": "mistral-small-latest", "messages": MESSAGES}
                if on_asyncio:
                    response = await client.chat.complete_async(**kwargs)
                else:
                    response = await anyio.to_thread.run_sync(
                        functools.partial(client.chat.complete, **kwargs)
                    )
                return response.choices[0].message.content

            async def cleanup() -> None:
                await provider.aclose()
                await anyio.to_thread.run_sync(client.__exit__, None, None, None)
                if on_asyncio:
                    await client.__aexit__(None, None, None)

            return {
                "converge": functools.partial(provider.achat, MESSAGES),
                "mistralai": raw,
            }, cleanup

        server.default = fake.mistral_chat("Hello!")
        emit("mistral.achat", compare(mistral_chat, "asyncio", seconds, repeats))
        emit("mistral.achat[trio]", compare(mistral_chat, "trio", seconds, repeats))
    finally:
        server.stop()
    return results.rows


def _backend() -> str:
    import sniffio

    return sniffio.current_async_library()


# The client-side cost per call: converge's latency minus the bare SDK call's.
ADDED = Column("added", 12, lambda ours, peer: f"{1000 / ours - 1000 / peer:>+9.3f} ms")


def main() -> None:
    args = arg_parser(__doc__).parse_args()
    print_ratio_table(run(args.quick), widths=(22, 11, 12, 10), extra=ADDED)


if __name__ == "__main__":
    main()
