"""MetricsCollector: counters, gauges, histograms, labels, Prometheus text."""

from __future__ import annotations

import math
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from converge.core import MetricsCollector
from converge.errors import UsageError


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_counters_and_gauges_in_snapshot() -> None:
    m = MetricsCollector()
    m.inc("sent_total")
    m.inc("sent_total", 2)
    m.gauge("backlog", 7)
    m.gauge("backlog", 3)
    snap = m.snapshot()
    assert snap["counters"] == {"sent_total": 3}
    assert snap["gauges"] == {"backlog": 3}
    assert m.get("sent_total") == 3
    assert m.get("never") == 0


def test_labels_make_separate_series() -> None:
    m = MetricsCollector()
    m.inc("rejected_total", labels={"reason": "bad_signature"})
    m.inc("rejected_total", labels={"reason": "too_large"})
    m.inc("rejected_total", labels={"reason": "bad_signature"})
    assert m.get("rejected_total", labels={"reason": "bad_signature"}) == 2
    assert m.snapshot()["counters"] == {
        'rejected_total{reason="bad_signature"}': 2,
        'rejected_total{reason="too_large"}': 1,
    }


def test_prometheus_text_parses_with_prometheus_client() -> None:
    m = MetricsCollector(namespace="converge")
    m.inc("requests_total", 5, help="Requests seen.")
    m.inc("rejected_total", labels={"reason": 'quote " and \\ back\nslash'})
    m.gauge("breaker_open", 1, labels={"target": "crm"})
    m.gauge("temperature", -2.5)
    for v in (0.003, 0.2, 0.2, 7.0, 100.0):
        m.observe("latency_seconds", v)
    samples = parse(m.format_prometheus())
    assert samples[("converge_requests_total", ())] == 5
    assert samples[("converge_rejected_total", (("reason", 'quote " and \\ back\nslash'),))] == 1
    assert samples[("converge_breaker_open", (("target", "crm"),))] == 1
    assert samples[("converge_temperature", ())] == -2.5
    assert samples[("converge_latency_seconds_bucket", (("le", "0.005"),))] == 1
    assert samples[("converge_latency_seconds_bucket", (("le", "0.25"),))] == 3
    assert samples[("converge_latency_seconds_bucket", (("le", "10"),))] == 4
    assert samples[("converge_latency_seconds_bucket", (("le", "+Inf"),))] == 5
    assert samples[("converge_latency_seconds_count", ())] == 5
    assert samples[("converge_latency_seconds_sum", ())] == pytest.approx(107.403)


def test_histogram_snapshot_is_cumulative() -> None:
    m = MetricsCollector()
    m.observe("size", 3, buckets=[1, 5])
    m.observe("size", 0.5)
    hist = m.snapshot()["histograms"]["size"]
    assert hist == {"count": 2, "sum": 3.5, "buckets": {1.0: 1, 5.0: 2, math.inf: 2}}


def test_empty_collector_renders_empty_text() -> None:
    assert MetricsCollector().format_prometheus() == ""


def test_misuse_is_refused() -> None:
    m = MetricsCollector()
    m.inc("x_total")
    with pytest.raises(UsageError, match="is a counter"):
        m.gauge("x_total", 1)
    with pytest.raises(UsageError):
        m.inc("y_total", -1)
    with pytest.raises(UsageError):
        m.inc("bad name")
    with pytest.raises(UsageError):
        m.inc("z_total", labels={"bad-label": "v"})
    with pytest.raises(UsageError):
        m.gauge("g", "3")  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        m.observe("h", float("nan"))
    with pytest.raises(UsageError, match="namespace"):
        MetricsCollector(namespace=5)  # type: ignore[arg-type]  # raised TypeError
    with pytest.raises(UsageError, match="labels"):
        m.inc("x_total", labels=[("a", "b")])  # type: ignore[arg-type]  # AttributeError
    with pytest.raises(UsageError):
        m.get(["x_total"])  # type: ignore[arg-type]  # raised TypeError


def test_counters_are_exact_under_thread_contention() -> None:
    m = MetricsCollector()

    def work() -> None:
        for _ in range(5000):
            m.inc("hits_total", labels={"k": "v"})
            m.observe("lat", 0.01)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert m.get("hits_total", labels={"k": "v"}) == 40_000
    assert m.snapshot()["histograms"]["lat"]["count"] == 40_000
