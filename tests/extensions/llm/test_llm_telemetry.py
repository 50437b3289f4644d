"""Spans and metrics of provider calls, retries and tool invocations (OpenTelemetry
GenAI semantic conventions, recorded by the SDK's in-memory exporters), and the
MetricsCollector counters."""

from __future__ import annotations

from typing import Any

import pytest
from llm_fake_server import FakeLLMServer
from llm_helpers import FakeTime, Wire
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from converge.core import MetricsCollector
from converge.errors import ProviderAuthError, ResponseTruncatedError, UsageError
from converge.extensions.llm import telemetry
from converge.extensions.llm.telemetry import Telemetry, tool_span
from nesting import deep_list

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "hi"}]
PROVIDER_NAMES = {"openai": "openai", "anthropic": "anthropic", "mistral": "mistral_ai"}


class Recorded:
    """A Telemetry on in-memory span and metric exporters."""

    def __init__(self, collector: MetricsCollector | None = None) -> None:
        self.spans = InMemorySpanExporter()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.reader = InMemoryMetricReader()
        self.telemetry = Telemetry(
            tracer_provider=tracer_provider,
            meter_provider=MeterProvider(metric_readers=[self.reader]),
            metrics_collector=collector,
        )

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def metrics(self) -> dict[str, list[Any]]:
        data = self.reader.get_metrics_data()
        out: dict[str, list[Any]] = {}
        if data is None:
            return out
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    out.setdefault(metric.name, []).extend(metric.data.data_points)
        return out


@pytest.fixture
def recorded() -> Recorded:
    return Recorded(MetricsCollector())


def _provider(wire: Wire, server: FakeLLMServer, recorded: Recorded, fake_time: FakeTime) -> Any:
    return wire.provider(
        server,
        retry_policy=fake_time.policy(),
        telemetry=recorded.telemetry,
    )


async def test_a_call_makes_one_client_span_with_gen_ai_attributes(
    wire: Wire, server: FakeLLMServer, recorded: Recorded, fake_time: FakeTime
) -> None:
    provider = _provider(wire, server, recorded, fake_time)
    server.push(wire.chat("Hello"))
    result = await provider.acomplete(MESSAGES, max_tokens=100)
    (span,) = recorded.finished()
    attrs = dict(span.attributes or {})
    assert span.name == f"chat {provider.model}"
    assert span.kind == SpanKind.CLIENT
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == PROVIDER_NAMES[wire.name]
    assert attrs["gen_ai.system"] == PROVIDER_NAMES[wire.name]
    assert attrs["gen_ai.request.model"] == provider.model
    assert attrs["gen_ai.request.max_tokens"] == 100
    assert attrs["gen_ai.response.model"] == result.model
    assert attrs["gen_ai.response.id"] == result.response_id
    assert attrs["gen_ai.response.finish_reasons"] == (result.raw_stop_reason,)
    assert attrs["gen_ai.usage.input_tokens"] == wire.usage.input_tokens
    assert attrs["gen_ai.usage.output_tokens"] == wire.usage.output_tokens
    assert attrs["server.address"] == "127.0.0.1"
    assert span.status.status_code != StatusCode.ERROR
    metrics = recorded.metrics()
    (duration,) = metrics["gen_ai.client.operation.duration"]
    assert duration.count == 1
    assert duration.attributes["gen_ai.provider.name"] == PROVIDER_NAMES[wire.name]
    tokens = {
        p.attributes["gen_ai.token.type"]: p.sum for p in metrics["gen_ai.client.token.usage"]
    }
    assert tokens == {"input": wire.usage.input_tokens, "output": wire.usage.output_tokens}
    await provider.aclose()


async def test_retries_are_span_events_and_counted(
    wire: Wire, server: FakeLLMServer, recorded: Recorded, fake_time: FakeTime
) -> None:
    provider = _provider(wire, server, recorded, fake_time)
    server.push(wire.error(503, "busy", None), wire.chat("ok"))
    await provider.achat(MESSAGES)
    (span,) = recorded.finished()
    (event,) = span.events
    assert event.name == "gen_ai.client.retry"
    assert event.attributes is not None
    assert event.attributes["error.type"] == "ProviderResponseError"
    assert event.attributes["converge.attempt"] == 1
    collector = recorded.telemetry.metrics_collector
    assert collector is not None
    labels = {"provider": wire.name, "model": provider.model}
    assert (
        collector.get("llm_retries_total", labels={**labels, "error_type": "ProviderResponseError"})
        == 1
    )
    assert collector.get("llm_calls_total", labels=labels) == 1
    (retries,) = recorded.metrics()["converge.llm.retries"]
    assert retries.value == 1
    await provider.aclose()


async def test_a_failed_call_records_error_type_on_span_and_counters(
    wire: Wire, server: FakeLLMServer, recorded: Recorded, fake_time: FakeTime
) -> None:
    provider = _provider(wire, server, recorded, fake_time)
    server.push(wire.error(401, "bad key", None))
    with pytest.raises(ProviderAuthError):
        await provider.achat(MESSAGES)
    (span,) = recorded.finished()
    assert span.status.status_code == StatusCode.ERROR
    assert (span.attributes or {})["error.type"] == "ProviderAuthError"
    collector = recorded.telemetry.metrics_collector
    assert collector is not None
    labels = {"provider": wire.name, "model": provider.model}
    assert (
        collector.get("llm_errors_total", labels={**labels, "error_type": "ProviderAuthError"}) == 1
    )
    (duration,) = recorded.metrics()["gen_ai.client.operation.duration"]
    assert duration.attributes["error.type"] == "ProviderAuthError"
    await provider.aclose()


async def test_truncation_is_recorded_with_its_finish_reason_and_error(
    server: FakeLLMServer, recorded: Recorded, fake_time: FakeTime
) -> None:
    import llm_fake_server as fake
    from llm_helpers import WIRES

    provider = _provider(WIRES["openai"], server, recorded, fake_time)
    server.push(fake.openai_chat("cut", finish_reason="length"))
    with pytest.raises(ResponseTruncatedError):
        await provider.achat(MESSAGES)
    (span,) = recorded.finished()
    attrs = dict(span.attributes or {})
    assert attrs["gen_ai.response.finish_reasons"] == ("length",)
    assert attrs["error.type"] == "ResponseTruncatedError"
    assert attrs["gen_ai.usage.output_tokens"] == 7
    await provider.aclose()


async def test_a_stream_is_one_span_ended_when_the_stream_ends(
    wire: Wire, server: FakeLLMServer, recorded: Recorded, fake_time: FakeTime
) -> None:
    provider = _provider(wire, server, recorded, fake_time)
    server.push(wire.stream(["a", "b"]))
    stream = provider.chat_stream(MESSAGES)
    assert await stream.__anext__() == "a"
    assert recorded.finished() == []
    assert await stream.acollect() == "ab"
    (span,) = recorded.finished()
    assert (span.attributes or {})["gen_ai.usage.output_tokens"] == wire.usage.output_tokens
    await provider.aclose()


async def test_tokens_by_type_reach_the_metrics_collector(
    server: FakeLLMServer, fake_time: FakeTime
) -> None:
    import llm_fake_server as fake
    from llm_helpers import WIRES

    collector = MetricsCollector()
    provider = WIRES["anthropic"].provider(
        server, retry_policy=fake_time.policy(), metrics_collector=collector
    )
    cache = {"cache_read_input_tokens": 100, "cache_creation_input_tokens": 20}
    server.push(fake.anthropic_message("x", input_tokens=5, output_tokens=9, usage=cache))
    await provider.achat(MESSAGES)
    labels = {"provider": "anthropic", "model": provider.model}
    tokens = {
        kind: collector.get("llm_tokens_total", labels={**labels, "type": kind})
        for kind in ("input", "output", "cache_read", "cache_write", "reasoning")
    }
    assert tokens == {
        "input": 125,
        "output": 9,
        "cache_read": 100,
        "cache_write": 20,
        "reasoning": 0,
    }
    histogram = collector.snapshot()["histograms"]
    assert any(k.startswith("llm_call_duration_seconds") for k in histogram)
    await provider.aclose()


def test_tool_span_records_the_invocation_and_its_error() -> None:
    recorded = Recorded(MetricsCollector())
    with tool_span("add", call_id="c1", arguments={"a": 1}, telemetry=recorded.telemetry):
        pass
    with (
        pytest.raises(ZeroDivisionError),
        recorded.telemetry.tool_span("div", call_id="c2"),
    ):
        _ = 1 / 0
    ok, failed = recorded.finished()
    assert ok.name == "execute_tool add"
    assert dict(ok.attributes or {}) == {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": "add",
        "gen_ai.tool.type": "function",
        "gen_ai.tool.call.id": "c1",
    }  # arguments only with capture_content=True
    assert failed.status.status_code == StatusCode.ERROR
    assert (failed.attributes or {})["error.type"] == "ZeroDivisionError"
    collector = recorded.telemetry.metrics_collector
    assert collector is not None
    assert collector.get("llm_tool_calls_total", labels={"tool": "div"}) == 1
    assert (
        collector.get(
            "llm_tool_errors_total", labels={"tool": "div", "error_type": "ZeroDivisionError"}
        )
        == 1
    )


def test_tool_span_captures_arguments_only_when_asked() -> None:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    target = Telemetry(tracer_provider=tracer_provider, capture_content=True)
    with target.tool_span("add", arguments={"a": 1}):
        pass
    (span,) = spans.get_finished_spans()
    assert (span.attributes or {})["gen_ai.tool.call.arguments"] == '{"a": 1}'


def test_arguments_json_cannot_encode_are_recorded_as_text_and_the_tool_still_runs() -> None:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    target = Telemetry(tracer_provider=tracer_provider, capture_content=True)
    ran = []
    for arguments in ({(1, 2): "tuple key"}, {"a": deep_list()}):  # TypeError, RecursionError
        with target.tool_span("add", arguments=arguments):
            ran.append(True)
    assert ran == [True, True]
    first, second = (
        (s.attributes or {})["gen_ai.tool.call.arguments"] for s in spans.get_finished_spans()
    )
    assert first == "{(1, 2): 'tuple key'}"
    assert str(second).startswith("{'a': [[[")


def test_without_opentelemetry_telemetry_is_a_no_op_but_still_counts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(telemetry, "_otel_trace", None)
    monkeypatch.setattr(telemetry, "_otel_metrics", None)
    collector = MetricsCollector()
    target = Telemetry(metrics_collector=collector)
    record = target.start_call(provider="openai", model="m")
    assert record.span is None
    with target.current(record):
        record.retry(1, RuntimeError("x"), 0.5)
    record.end()
    with target.tool_span("t") as span:
        assert span is None
    assert collector.get("llm_calls_total", labels={"provider": "openai", "model": "m"}) == 1
    with pytest.raises(UsageError, match="otel"):
        Telemetry(tracer_provider=object())


def test_bad_telemetry_arguments_raise_usage_error() -> None:
    with pytest.raises(UsageError):
        Telemetry(metrics_collector=object())  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        Telemetry().tool_span("").__enter__()
    with pytest.raises(UsageError, match="tracer_provider"):
        Telemetry(tracer_provider="global")
    with pytest.raises(UsageError, match="meter_provider"):
        Telemetry(meter_provider=object())
    # Each of these raised TypeError, AttributeError or IndexError.
    for kwargs in (
        {"provider": [], "model": "m"},
        {"provider": "openai", "model": "m", "server": ""},
        {"provider": "openai", "model": "m", "attributes": object()},
    ):
        with pytest.raises(UsageError):
            Telemetry().start_call(**kwargs)
    with pytest.raises(UsageError):
        Telemetry().current(None)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        Telemetry().start_call(provider="openai", model="m").end(result="x")  # type: ignore[arg-type]


async def test_a_stream_retried_before_its_first_delta_records_the_retry(
    server: FakeLLMServer, recorded: Recorded, fake_time: FakeTime
) -> None:
    import json

    from llm_helpers import WIRES

    wire = WIRES["anthropic"]
    provider = _provider(wire, server, recorded, fake_time)
    failing = wire.stream(["never shown"])
    assert failing.events is not None
    event = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    failing.events.insert(1, f"event: error\ndata: {json.dumps(event)}\n\n".encode())
    server.push(failing, wire.stream(["ok"]))
    assert await provider.chat_stream(MESSAGES).acollect() == "ok"
    (span,) = recorded.finished()
    assert [e.name for e in span.events] == ["gen_ai.client.retry"]
    assert (span.events[0].attributes or {})["error.type"] == "ProviderOverloadedError"
    await provider.aclose()


async def test_a_stream_closed_early_ends_its_span_without_an_error(
    wire: Wire, server: FakeLLMServer, recorded: Recorded, fake_time: FakeTime
) -> None:
    provider = _provider(wire, server, recorded, fake_time)
    server.push(wire.stream(["a", "b", "c"]))
    async with provider.chat_stream(MESSAGES) as stream:
        assert await stream.__anext__() == "a"
    (span,) = recorded.finished()
    assert span.status.status_code != StatusCode.ERROR
    assert "error.type" not in (span.attributes or {})
    await provider.aclose()


def test_the_package_imports_and_records_nothing_without_opentelemetry() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['opentelemetry'] = None  # as if the otel extra were not installed\n"
        "from converge.core import MetricsCollector\n"
        "from converge.extensions.llm import telemetry\n"
        "assert not telemetry.OTEL_AVAILABLE\n"
        "m = MetricsCollector()\n"
        "t = telemetry.Telemetry(metrics_collector=m)\n"
        "r = t.start_call(provider='openai', model='x')\n"
        "assert r.span is None\n"
        "r.end()\n"
        "with telemetry.tool_span('t') as span:\n"
        "    assert span is None\n"
        "assert m.get('llm_calls_total', labels={'provider': 'openai', 'model': 'x'}) == 1\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


async def test_every_tool_the_react_loop_runs_is_an_execute_tool_span(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from converge.core import Identity, ToolRegistry
    from converge.extensions.llm import LLMAgent, arun_react
    from converge.extensions.llm.testing import FunctionProvider

    recorded = Recorded(MetricsCollector())
    monkeypatch.setattr(telemetry, "default_telemetry", lambda: recorded.telemetry)
    registry = ToolRegistry()

    @registry.tool
    def div(a: int, b: int) -> float:
        """Divide a by b."""
        return a / b

    def reply(messages: list[dict[str, Any]], **kwargs: Any) -> str:
        if messages[-1]["role"] != "tool":
            return '[{"type": "InvokeTool", "tool_name": "div", "params": {"a": 2, "b": 0}}]'
        return "[]"

    agent = LLMAgent(Identity(), FunctionProvider(reply), tool_registry=registry)
    result = await arun_react(agent, [], [])
    (observation,) = result.observations
    assert "ZeroDivisionError" in observation["error"]
    (span,) = [s for s in recorded.finished() if s.name == "execute_tool div"]
    assert (span.attributes or {})["gen_ai.tool.call.id"] == observation["call_id"]
    assert span.status.status_code == StatusCode.ERROR


async def test_a_tool_the_runner_invokes_for_an_llm_agent_is_an_execute_tool_span(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import anyio

    from converge.core import Identity, Message, ToolRegistry
    from converge.extensions.llm import LLMAgent
    from converge.extensions.llm.testing import FunctionProvider
    from converge.runtime import AgentRunner, MessageBus

    recorded = Recorded(MetricsCollector())
    monkeypatch.setattr(telemetry, "default_telemetry", lambda: recorded.telemetry)
    registry = ToolRegistry()

    @registry.tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    def reply(messages: list[dict[str, Any]], **kwargs: Any) -> str:
        if messages[-1]["role"] != "tool":
            return '[{"type": "InvokeTool", "tool_name": "add", "params": {"a": 2, "b": 3}}]'
        return "[]"

    agent = LLMAgent(Identity(), FunctionProvider(reply), tool_registry=registry)
    async with MessageBus() as bus, AgentRunner(bus, [agent]) as runner:
        await bus.publish(Message(sender="user", recipient=agent.id, payload={"q": "2+3"}))
        with anyio.fail_after(10):
            await runner.wait_until(lambda r: r.idle)
    (span,) = [s for s in recorded.finished() if s.name == "execute_tool add"]
    assert span.status.status_code != StatusCode.ERROR
    collector = recorded.telemetry.metrics_collector
    assert collector is not None
    assert collector.get("llm_tool_calls_total", labels={"tool": "add"}) == 1


def test_tool_span_refuses_a_telemetry_that_is_not_one() -> None:
    with pytest.raises(UsageError, match="telemetry"), tool_span("add", telemetry=object()):  # type: ignore[arg-type]  # AttributeError
        pass
