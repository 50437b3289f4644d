"""In-process metrics: counters, gauges and histograms, with Prometheus text output."""

from __future__ import annotations

import bisect
import math
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from converge._repr import safe_repr
from converge.errors import UsageError

__all__ = ["DEFAULT_BUCKETS", "MetricsCollector"]

DEFAULT_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*\Z")

LabelKey = tuple[tuple[str, str], ...]


@dataclass(slots=True)
class _Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        if not self.counts:
            self.counts = [0] * len(self.buckets)
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self.counts):
            self.counts[index] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[int]:
        out, running = [], 0
        for c in self.counts or [0] * len(self.buckets):
            running += c
            out.append(running)
        return out


_LABEL_CACHE: dict[tuple[tuple[Any, Any], ...], LabelKey] = {}
_LABEL_CACHE_SIZE = 4096


def _label_key(labels: Mapping[str, Any] | None) -> LabelKey:
    if not labels:
        return ()
    # Hot paths pass the same few label sets again and again: validate and sort once.
    try:
        raw = tuple(labels.items())
        return _LABEL_CACHE[raw]
    except (KeyError, TypeError, AttributeError):
        pass
    if not isinstance(labels, Mapping):
        raise UsageError(f"labels must be a dict of names to values, not {type(labels).__name__}")
    for name in labels:
        if not isinstance(name, str) or not _LABEL_RE.match(name) or name.startswith("__"):
            raise UsageError(f"invalid metric label name {safe_repr(name)}")
    key = tuple(sorted((k, str(v)) for k, v in labels.items()))
    try:
        if len(_LABEL_CACHE) >= _LABEL_CACHE_SIZE:
            _LABEL_CACHE.clear()
        _LABEL_CACHE[raw] = key
    except TypeError:  # an unhashable label value: fine, just not cached
        pass
    return key


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _series(name: str, key: LabelKey, extra: tuple[tuple[str, str], ...] = ()) -> str:
    pairs = key + extra
    if not pairs:
        return name
    return name + "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


class MetricsCollector:
    """Thread-safe counters, gauges and histograms.

    A metric name has one kind for its lifetime; label sets distinguish series.
    Safe to call from the event loop (no I/O, a short lock) and from threads.

    Args:
        namespace: Optional prefix joined to every name with ``_``.
    """

    def __init__(self, namespace: str = "") -> None:
        if not isinstance(namespace, str) or (namespace and not _NAME_RE.match(namespace)):
            raise UsageError(f"invalid metrics namespace {safe_repr(namespace)}")
        self._namespace = namespace
        self._lock = threading.Lock()
        self._kinds: dict[str, str] = {}
        self._help: dict[str, str] = {}
        self._counters: dict[str, dict[LabelKey, float]] = {}
        self._gauges: dict[str, dict[LabelKey, float]] = {}
        self._histograms: dict[str, dict[LabelKey, _Histogram]] = {}
        self._buckets: dict[str, tuple[float, ...]] = {}

    def _name(self, name: str, kind: str, help_text: str | None) -> str:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise UsageError(f"invalid metric name {safe_repr(name)}")
        full = f"{self._namespace}_{name}" if self._namespace else name
        known = self._kinds.setdefault(full, kind)
        if known != kind:
            raise UsageError(f"metric {full!r} is a {known}, not a {kind}")
        if help_text:
            self._help[full] = help_text
        return full

    @staticmethod
    def _value(value: float) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UsageError(f"metric values are numbers, not {type(value).__name__}")
        try:
            return float(value)
        except OverflowError:  # an int no float holds
            raise UsageError("metric value is too large for a float") from None

    def inc(
        self,
        name: str,
        value: float = 1,
        *,
        labels: Mapping[str, Any] | None = None,
        help: str | None = None,
    ) -> None:
        """Add ``value`` (>= 0) to a counter."""
        amount = self._value(value)
        if amount < 0 or math.isnan(amount):
            raise UsageError("counters only go up; use gauge() for values that fall")
        key = _label_key(labels)
        with self._lock:
            series = self._counters.setdefault(self._name(name, "counter", help), {})
            series[key] = series.get(key, 0.0) + amount

    def gauge(
        self,
        name: str,
        value: float,
        *,
        labels: Mapping[str, Any] | None = None,
        help: str | None = None,
    ) -> None:
        """Set a gauge to ``value``."""
        amount = self._value(value)
        key = _label_key(labels)
        with self._lock:
            self._gauges.setdefault(self._name(name, "gauge", help), {})[key] = amount

    def observe(
        self,
        name: str,
        value: float,
        *,
        labels: Mapping[str, Any] | None = None,
        buckets: Sequence[float] | None = None,
        help: str | None = None,
    ) -> None:
        """Record ``value`` in a histogram (buckets fixed by the first observation)."""
        amount = self._value(value)
        if math.isnan(amount):
            raise UsageError("cannot observe NaN")
        key = _label_key(labels)
        with self._lock:
            full = self._name(name, "histogram", help)
            if full not in self._buckets:
                try:
                    chosen = tuple(sorted(float(b) for b in (buckets or DEFAULT_BUCKETS)))
                except (TypeError, ValueError, OverflowError):
                    chosen = ()
                if not chosen or any(math.isnan(b) for b in chosen):
                    raise UsageError("histogram buckets must be non-empty numbers")
                if chosen[-1] != math.inf:
                    chosen += (math.inf,)
                self._buckets[full] = chosen
            series = self._histograms.setdefault(full, {})
            hist = series.get(key)
            if hist is None:
                hist = series[key] = _Histogram(self._buckets[full])
            hist.observe(amount)

    def get(self, name: str, *, labels: Mapping[str, Any] | None = None) -> float:
        """Current value of a counter or gauge series (0 when never set)."""
        if not isinstance(name, str):
            raise UsageError(f"invalid metric name {safe_repr(name)}")
        full = f"{self._namespace}_{name}" if self._namespace else name
        key = _label_key(labels)
        with self._lock:
            for table in (self._counters, self._gauges):
                if full in table:
                    return table[full].get(key, 0.0)
        return 0.0

    def snapshot(self) -> dict[str, Any]:
        """A plain-dict copy: ``{"counters": {...}, "gauges": {...}, "histograms": {...}}``.

        Series keys are the metric name, with ``{label="value",...}`` appended when the
        series has labels; histograms map to ``{"count", "sum", "buckets"}``.
        """
        with self._lock:
            return {
                "counters": {
                    _series(n, k): v for n, s in self._counters.items() for k, v in s.items()
                },
                "gauges": {_series(n, k): v for n, s in self._gauges.items() for k, v in s.items()},
                "histograms": {
                    _series(n, k): {
                        "count": h.count,
                        "sum": h.total,
                        "buckets": dict(zip(h.buckets, h.cumulative(), strict=True)),
                    }
                    for n, s in self._histograms.items()
                    for k, h in s.items()
                },
            }

    def reset(self) -> None:
        """Forget every metric."""
        with self._lock:
            for table in (
                self._kinds,
                self._help,
                self._counters,
                self._gauges,
                self._histograms,
                self._buckets,
            ):
                table.clear()

    def format_prometheus(self) -> str:
        """Render every metric in the Prometheus text exposition format (0.0.4)."""
        lines: list[str] = []
        with self._lock:
            for name in sorted(self._kinds):
                kind = self._kinds[name]
                if name in self._help:
                    lines.append(f"# HELP {name} {_escape(self._help[name])}")
                lines.append(f"# TYPE {name} {kind}")
                if kind == "histogram":
                    for key, hist in sorted(self._histograms.get(name, {}).items()):
                        for bound, count in zip(hist.buckets, hist.cumulative(), strict=True):
                            le = (("le", _number(bound)),)
                            lines.append(f"{_series(name + '_bucket', key, le)} {count}")
                        lines.append(f"{_series(name + '_sum', key)} {_number(hist.total)}")
                        lines.append(f"{_series(name + '_count', key)} {hist.count}")
                    continue
                table = self._counters if kind == "counter" else self._gauges
                for key, value in sorted(table.get(name, {}).items()):
                    lines.append(f"{_series(name, key)} {_number(value)}")
        return "\n".join(lines) + "\n" if lines else ""
