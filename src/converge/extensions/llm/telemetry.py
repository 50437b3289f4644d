"""Traces and metrics of model calls: OpenTelemetry (GenAI semantic conventions) and
:class:`~converge.core.MetricsCollector` counters.

Every provider call goes through one :class:`Telemetry`: a span per call (``chat
{model}``, kind CLIENT) with the ``gen_ai.*`` attributes of the OpenTelemetry GenAI
semantic conventions, a span event per retry, and the conventions' metrics
(``gen_ai.client.operation.duration``, ``gen_ai.client.token.usage``). OpenTelemetry is
optional (``pip install -e ".[otel]"``): without ``opentelemetry-api`` installed, or
without an SDK configured, this is a no-op. Independently, a ``MetricsCollector`` given to
the provider (``metrics_collector=``) counts calls, errors by type, tokens and latency.

:func:`tool_span` wraps a tool invocation in an ``execute_tool {name}`` span, for agent
loops and runtimes::

    with telemetry.tool_span("add", call_id=call.id):
        result = await registry.acall("add", call.arguments)
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from converge._repr import safe_repr
from converge.core import MetricsCollector
from converge.errors import UsageError
from converge.extensions.llm.protocol import ChatResult

try:  # optional extra "otel"
    from opentelemetry import metrics as _otel_metrics
    from opentelemetry import trace as _otel_trace
except ImportError:  # pragma: no cover - the dev extra installs it
    _otel_metrics = None  # type: ignore[assignment]
    _otel_trace = None  # type: ignore[assignment]

__all__ = [
    "OTEL_AVAILABLE",
    "CallRecord",
    "Telemetry",
    "default_telemetry",
    "error_type",
    "tool_span",
]

#: Whether ``opentelemetry-api`` is importable (spans and OTel metrics are emitted).
OTEL_AVAILABLE = _otel_trace is not None

_SCOPE = "converge.extensions.llm"
#: ``gen_ai.provider.name`` values of the semantic conventions.
_PROVIDER_NAMES = {"openai": "openai", "anthropic": "anthropic", "mistral": "mistral_ai"}
_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48)
_NULL = nullcontext()
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)


_RECHECK = 1.0  # seconds between looks at whether a global SDK provider was installed
_global: dict[str, float | bool] = {"traces": False, "metrics": False, "checked": -_RECHECK}


def _globals_configured() -> tuple[bool, bool]:
    """Whether real (SDK) tracer / meter providers were installed globally.

    Until then spans and metrics of the global providers are skipped outright. Looking
    costs microseconds (environment lookups), so it is done at most once a second; once
    installed a provider cannot be replaced, so True sticks.
    """
    traces, metrics = bool(_global["traces"]), bool(_global["metrics"])
    if traces and metrics:
        return True, True
    now = time.monotonic()
    if now - float(_global["checked"]) < _RECHECK:
        return traces, metrics
    _global["checked"] = now
    if _otel_trace is not None and not traces:
        provider = _otel_trace.get_tracer_provider()
        traces = not isinstance(
            provider, _otel_trace.ProxyTracerProvider | _otel_trace.NoOpTracerProvider
        )
        _global["traces"] = traces
    if _otel_metrics is not None and not metrics:
        meter_provider = _otel_metrics.get_meter_provider()
        metrics = not isinstance(meter_provider, _otel_metrics.NoOpMeterProvider) and (
            type(meter_provider).__name__ != "_ProxyMeterProvider"
        )
        _global["metrics"] = metrics
    return traces, metrics


def error_type(exc: BaseException) -> str:
    """The ``error.type`` of an exception: its class name (low cardinality)."""
    return type(exc).__name__


class CallRecord:
    """One model call being recorded; made by :meth:`Telemetry.start_call`.

    Call :meth:`retry` for each retry and :meth:`end` exactly once.
    """

    __slots__ = (
        "_done",
        "_labels",
        "_metering",
        "_model",
        "_provider",
        "_start",
        "_telemetry",
        "span",
    )

    def __init__(
        self, telemetry: Telemetry, provider: str, model: str, span: Any, label: str
    ) -> None:
        self._telemetry = telemetry
        self._provider = provider
        self._model = model
        self._labels = {"provider": label, "model": model}
        self._start = time.perf_counter()
        self._done = False
        self._metering = telemetry._metering()
        #: The OpenTelemetry span (None without OpenTelemetry).
        self.span = span

    def retry(self, attempt: int, error: BaseException, delay: float) -> None:
        """Record that attempt ``attempt`` (1-based) failed and will be retried.

        Args:
            attempt: The failed attempt's number.
            error: Its classified error.
            delay: Seconds waited before the next attempt.
        """
        kind = error_type(error)
        if self.span is not None and self.span.is_recording():
            self.span.add_event(
                "gen_ai.client.retry",
                {"error.type": kind, "converge.attempt": attempt, "converge.retry_delay": delay},
            )
        collector = self._telemetry.metrics_collector
        if collector is not None:
            collector.inc(
                "llm_retries_total",
                labels={**self._labels, "error_type": kind},
                help="Model call attempts that failed and were retried.",
            )
        if self._metering:
            self._telemetry._retries.add(
                1, {"gen_ai.provider.name": self._provider, "error.type": kind}
            )

    def end(self, result: ChatResult | None = None, error: BaseException | None = None) -> None:
        """Finish the record with the call's result or its error (idempotent).

        Raises:
            UsageError: If ``result`` is not a ChatResult or ``error`` not an exception.
        """
        if (result is not None and not isinstance(result, ChatResult)) or (
            error is not None and not isinstance(error, BaseException)
        ):
            raise UsageError("end takes a ChatResult and/or an exception")
        if self._done:
            return
        self._done = True
        seconds = time.perf_counter() - self._start
        telemetry = self._telemetry
        span = self.span
        kind = error_type(error) if error is not None else None
        if span is not None:
            if span.is_recording():
                if result is not None:
                    _set_result(span, result)
                if error is not None:
                    span.set_attribute("error.type", kind)
                    span.record_exception(error)
                    span.set_status(_otel_trace.Status(_otel_trace.StatusCode.ERROR, str(error)))
            span.end()
        otel_attrs: dict[str, Any] | None = None
        if self._metering:
            otel_attrs = {
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": self._provider,
                "gen_ai.request.model": self._model,
            }
            if result is not None and result.model:
                otel_attrs["gen_ai.response.model"] = result.model
            if kind is not None:
                otel_attrs["error.type"] = kind
            telemetry._duration.record(seconds, otel_attrs)
        collector = telemetry.metrics_collector
        if collector is not None:
            collector.inc("llm_calls_total", labels=self._labels, help="Model calls made.")
            collector.observe(
                "llm_call_duration_seconds",
                seconds,
                labels=self._labels,
                buckets=_DURATION_BUCKETS,
                help="Seconds per model call, retries included.",
            )
            if kind is not None:
                collector.inc(
                    "llm_errors_total",
                    labels={**self._labels, "error_type": kind},
                    help="Model calls that failed, by error type.",
                )
        if result is None:
            return
        usage = result.usage
        counts = (
            ("input", usage.input_tokens),
            ("output", usage.output_tokens),
            ("cache_read", usage.cache_read_tokens),
            ("cache_write", usage.cache_write_tokens),
            ("reasoning", usage.reasoning_tokens),
        )
        for token_type, count in counts:
            if count is None:
                continue
            if collector is not None:
                collector.inc(
                    "llm_tokens_total",
                    count,
                    labels={**self._labels, "type": token_type},
                    help="Tokens reported by the provider, by type.",
                )
            if self._metering and token_type in ("input", "output"):
                assert otel_attrs is not None
                telemetry._tokens.record(count, {**otel_attrs, "gen_ai.token.type": token_type})


def _set_result(span: Any, result: ChatResult) -> None:
    if result.model:
        span.set_attribute("gen_ai.response.model", result.model)
    if result.response_id:
        span.set_attribute("gen_ai.response.id", result.response_id)
    if result.raw_stop_reason:
        span.set_attribute("gen_ai.response.finish_reasons", [result.raw_stop_reason])
    span.set_attribute("converge.stop_reason", result.stop_reason)
    usage = result.usage
    if usage.input_tokens is not None:
        span.set_attribute("gen_ai.usage.input_tokens", usage.input_tokens)
    if usage.output_tokens is not None:
        span.set_attribute("gen_ai.usage.output_tokens", usage.output_tokens)
    if usage.cache_read_tokens is not None:
        span.set_attribute("gen_ai.usage.cache_read.input_tokens", usage.cache_read_tokens)
    if usage.cache_write_tokens is not None:
        span.set_attribute("gen_ai.usage.cache_creation.input_tokens", usage.cache_write_tokens)
    if usage.reasoning_tokens is not None:
        span.set_attribute("gen_ai.usage.reasoning.output_tokens", usage.reasoning_tokens)


def _arguments_text(arguments: Mapping[str, Any]) -> str:
    """Tool arguments for a span: JSON (other values as text), or their shortened repr
    when JSON has no form for them (keys that are not strings, nesting too deep); a
    span attribute never fails the tool call."""
    try:
        return json.dumps(arguments, default=str)
    except Exception:  # TypeError, RecursionError, or a __str__'s own error
        return safe_repr(arguments)


class Telemetry:
    """Where model calls are reported.

    Args:
        tracer_provider: An OpenTelemetry ``TracerProvider``; None uses the global one
            (a no-op until an SDK is configured).
        meter_provider: An OpenTelemetry ``MeterProvider``; None uses the global one.
        metrics_collector: Counters, errors by type, tokens and a latency histogram go
            here too when given: ``llm_calls_total``, ``llm_errors_total{error_type}``,
            ``llm_retries_total{error_type}``, ``llm_tokens_total{type}`` (``input``,
            ``output``, ``cache_read``, ``cache_write``, ``reasoning``),
            ``llm_call_duration_seconds``; all labelled ``provider`` and ``model``, plus
            ``llm_tool_calls_total{tool}`` / ``llm_tool_errors_total{tool,error_type}``
            from :meth:`tool_span`. ``provider`` is converge's name (``"mistral"``, as in
            ``ProviderError.provider``); spans and OpenTelemetry metrics use the semantic
            conventions' (``"mistral_ai"``).
        capture_content: Record tool-call arguments on tool spans
            (``gen_ai.tool.call.arguments``); off by default, as they may hold
            personal data.
        otel: False switches OpenTelemetry off (only the collector is used).
    """

    def __init__(
        self,
        *,
        tracer_provider: Any = None,
        meter_provider: Any = None,
        metrics_collector: MetricsCollector | None = None,
        capture_content: bool = False,
        otel: bool = True,
    ) -> None:
        if metrics_collector is not None and not isinstance(metrics_collector, MetricsCollector):
            raise UsageError("metrics_collector must be a MetricsCollector or None")
        if not isinstance(capture_content, bool) or not isinstance(otel, bool):
            raise UsageError("capture_content and otel must be bools")
        self.metrics_collector = metrics_collector
        self.capture_content = capture_content
        self._tracer: Any = None
        self._own_tracer = tracer_provider is not None
        self._own_meter = meter_provider is not None
        self._duration: Any = None
        self._tokens: Any = None
        self._retries: Any = None
        if otel and _otel_trace is not None and _otel_metrics is not None:
            for name, given, method in (
                ("tracer_provider", tracer_provider, "get_tracer"),
                ("meter_provider", meter_provider, "get_meter"),
            ):
                if given is not None and not callable(getattr(given, method, None)):
                    raise UsageError(
                        f"{name} must be an OpenTelemetry provider (with {method}()) or "
                        f"None, not {type(given).__name__}"
                    )
            self._tracer = _otel_trace.get_tracer(_SCOPE, tracer_provider=tracer_provider)
            meter = _otel_metrics.get_meter(_SCOPE, meter_provider=meter_provider)
            self._duration = meter.create_histogram(
                "gen_ai.client.operation.duration",
                unit="s",
                description="GenAI operation duration",
                explicit_bucket_boundaries_advisory=list(_DURATION_BUCKETS),
            )
            self._tokens = meter.create_histogram(
                "gen_ai.client.token.usage",
                unit="{token}",
                description="Number of input and output tokens used",
                explicit_bucket_boundaries_advisory=list(_TOKEN_BUCKETS),
            )
            self._retries = meter.create_counter(
                "converge.llm.retries", unit="{retry}", description="Model call retries"
            )
        elif otel and (tracer_provider is not None or meter_provider is not None):
            raise UsageError(
                "tracer_provider/meter_provider need OpenTelemetry: "
                "pip install -e '.[otel]' (from a converge checkout)"
            )

    def _tracing(self) -> bool:
        return self._tracer is not None and (self._own_tracer or _globals_configured()[0])

    def _metering(self) -> bool:
        return self._duration is not None and (self._own_meter or _globals_configured()[1])

    def with_collector(self, collector: MetricsCollector | None) -> Telemetry:
        """This telemetry, reporting to ``collector`` as well (self when it is None)."""
        if collector is None or collector is self.metrics_collector:
            return self
        if not isinstance(collector, MetricsCollector):
            raise UsageError("metrics_collector must be a MetricsCollector or None")
        other = Telemetry.__new__(Telemetry)
        other.metrics_collector = collector
        other.capture_content = self.capture_content
        other._tracer = self._tracer
        other._own_tracer = self._own_tracer
        other._own_meter = self._own_meter
        other._duration = self._duration
        other._tokens = self._tokens
        other._retries = self._retries
        return other

    def start_call(
        self,
        *,
        provider: str,
        model: str,
        server: tuple[str, int | None] | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> CallRecord:
        """Begin recording one call (the span starts now, not as the current span).

        Args:
            provider: converge's provider name (``"openai"``, ``"anthropic"``,
                ``"mistral"``).
            model: The requested model.
            server: ``(host, port)`` of the API, for ``server.address``/``server.port``.
            attributes: Extra request attributes (``gen_ai.request.*``).

        Raises:
            UsageError: For an argument of the wrong type.
        """
        if not isinstance(provider, str) or not isinstance(model, str):
            raise UsageError("provider and model must be strings")
        if server is not None and not (
            isinstance(server, tuple)
            and len(server) == 2
            and isinstance(server[0], str)
            and server[0]
            and (server[1] is None or isinstance(server[1], int))
        ):
            raise UsageError("server must be a (host, port or None) tuple, or None")
        if attributes is not None and not isinstance(attributes, Mapping):
            raise UsageError("attributes must be a mapping or None")
        name = _PROVIDER_NAMES.get(provider, provider)
        span = None
        if self._tracing():
            attrs: dict[str, Any] = {
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": name,
                "gen_ai.system": name,
                "gen_ai.request.model": model,
            }
            if server is not None:
                attrs["server.address"] = server[0]
                if server[1] is not None:
                    attrs["server.port"] = server[1]
            if attributes:
                attrs.update((k, v) for k, v in attributes.items() if v is not None)
            span = self._tracer.start_span(
                f"chat {model}", kind=_otel_trace.SpanKind.CLIENT, attributes=attrs
            )
        return CallRecord(self, name, model, span, provider)

    def current(self, record: CallRecord) -> AbstractContextManager[Any]:
        """Make ``record``'s span the current one (so HTTP client spans nest under it).

        Raises:
            UsageError: If ``record`` is not a CallRecord.
        """
        if not isinstance(record, CallRecord):
            raise UsageError("current takes the CallRecord start_call returned")
        if record.span is None:
            return _NULL
        return _otel_trace.use_span(record.span, end_on_exit=False)

    @contextmanager
    def tool_span(
        self,
        name: str,
        *,
        call_id: str | None = None,
        arguments: Mapping[str, Any] | None = None,
        description: str | None = None,
    ) -> Iterator[Any]:
        """A span (``execute_tool {name}``) around one tool invocation.

        An exception leaving the block is recorded (``error.type``, status ERROR) and
        re-raised. Yields the span (None without OpenTelemetry).

        Args:
            name: The tool's name (``gen_ai.tool.name``).
            call_id: The model's tool-call id (``gen_ai.tool.call.id``).
            arguments: The call's arguments; recorded only with ``capture_content``.
            description: The tool's description (``gen_ai.tool.description``).
        """
        if not isinstance(name, str) or not name:
            raise UsageError("tool name must be a non-empty string")
        collector = self.metrics_collector
        labels = {"tool": name}
        if collector is not None:
            collector.inc("llm_tool_calls_total", labels=labels, help="Tool invocations.")
        if not self._tracing():
            try:
                yield None
            except BaseException as exc:
                if collector is not None and isinstance(exc, Exception):
                    collector.inc(
                        "llm_tool_errors_total",
                        labels={**labels, "error_type": error_type(exc)},
                        help="Tool invocations that raised, by error type.",
                    )
                raise
            return
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": name,
            "gen_ai.tool.type": "function",
        }
        if call_id is not None:
            attrs["gen_ai.tool.call.id"] = call_id
        if description:
            attrs["gen_ai.tool.description"] = description
        if arguments is not None and self.capture_content:
            attrs["gen_ai.tool.call.arguments"] = _arguments_text(arguments)
        with self._tracer.start_as_current_span(
            f"execute_tool {name}",
            kind=_otel_trace.SpanKind.INTERNAL,
            attributes=attrs,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield span
            except BaseException as exc:
                if isinstance(exc, Exception):
                    span.set_attribute("error.type", error_type(exc))
                    span.record_exception(exc)
                    span.set_status(_otel_trace.Status(_otel_trace.StatusCode.ERROR, str(exc)))
                    if collector is not None:
                        collector.inc(
                            "llm_tool_errors_total",
                            labels={**labels, "error_type": error_type(exc)},
                            help="Tool invocations that raised, by error type.",
                        )
                raise


_default: Telemetry | None = None


def default_telemetry() -> Telemetry:
    """The process-wide :class:`Telemetry` on OpenTelemetry's global providers."""
    global _default
    if _default is None:
        _default = Telemetry()
    return _default


@contextmanager
def tool_span(
    name: str,
    *,
    call_id: str | None = None,
    arguments: Mapping[str, Any] | None = None,
    description: str | None = None,
    telemetry: Telemetry | None = None,
) -> Iterator[Any]:
    """:meth:`Telemetry.tool_span` on ``telemetry`` (default: :func:`default_telemetry`).

    Args:
        name: The tool's name.
        call_id: The model's tool-call id.
        arguments: The call's arguments (recorded only with ``capture_content``).
        description: The tool's description.
        telemetry: Where to report; None for the global OpenTelemetry providers.

    Raises:
        UsageError: If ``telemetry`` is not a :class:`Telemetry`, or ``name`` is not a
            non-empty string.
    """
    if telemetry is not None and not isinstance(telemetry, Telemetry):
        raise UsageError(f"telemetry must be a Telemetry or None, not {type(telemetry).__name__}")
    target = telemetry if telemetry is not None else default_telemetry()
    with target.tool_span(
        name, call_id=call_id, arguments=arguments, description=description
    ) as span:
        yield span
