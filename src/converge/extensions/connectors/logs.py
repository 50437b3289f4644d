"""Event log lines: one per accepted, rejected, delivered, retried and dead-lettered event.

Every line goes to the ``converge.events`` logger and carries the provider or target,
the event or action id, a status and, where known, the latency. Payloads and signature
headers never appear at INFO; :func:`log_payload` writes a redacted payload at DEBUG.
Rejections are logged at INFO, at most a few per provider and reason per minute (a
flood of forged requests cannot flood the log; the count of the lines left out is
reported on the next one).

:func:`configure_logging` sets up the root logger the way ``converge gateway`` does:
ISO timestamps, ``text`` or ``json`` lines, the HTTP clients (httpx, httpx2) quiet unless at DEBUG.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import IO, Any, Literal

from converge._repr import safe_repr
from converge.errors import ConfigurationError

__all__ = [
    "EVENT_LOGGER",
    "LOG_FORMATS",
    "JsonFormatter",
    "RejectionLimiter",
    "TextFormatter",
    "configure_logging",
    "log_accepted",
    "log_dead",
    "log_delivered",
    "log_payload",
    "log_rejected",
    "log_retried",
    "redact_headers",
    "redact_payload",
]

#: Name of the logger every event line goes to.
EVENT_LOGGER = "converge.events"
#: The values ``log_format`` accepts.
LOG_FORMATS = ("text", "json")
_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")

_log = logging.getLogger(EVENT_LOGGER)

# Header names whose values prove or grant something: never logged, at any level.
_SECRET_HEADER = re.compile(
    r"signature|authorization|cookie|token|secret|api[-_]?key|x-hub-signature", re.IGNORECASE
)
# Payload keys whose values are redacted in DEBUG payload dumps.
_SECRET_KEY = re.compile(
    r"secret|password|passwd|token|api[-_]?key|authorization|credential|private[-_]?key|"
    r"signature|cookie|session",
    re.IGNORECASE,
)
_REDACTED = "[redacted]"
_MAX_VALUE = 200  # characters of one field value in a line
_MAX_PAYLOAD = 4096  # characters of a DEBUG payload dump
_BARE = re.compile(r"^[A-Za-z0-9_.:/@+\-]+\Z")


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``headers`` with signature, token and cookie values replaced.

    Args:
        headers: Request headers.

    Returns:
        The headers, every secret-bearing value replaced by ``"[redacted]"``.
    """
    return {
        name: _REDACTED if _SECRET_HEADER.search(name) else value for name, value in headers.items()
    }


def redact_payload(value: Any) -> Any:
    """A copy of a JSON value with the values of secret-looking keys replaced.

    Keys naming a secret, password, token, API key, credential, signature, cookie or
    session anywhere in the document are redacted.

    Args:
        value: A JSON-compatible value.

    Returns:
        The redacted copy.
    """
    if isinstance(value, Mapping):
        return {
            key: _REDACTED
            if isinstance(key, str) and _SECRET_KEY.search(key)
            else redact_payload(v)
            for key, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact_payload(v) for v in value]
    return value


def _field(value: Any) -> str:
    """One ``key=value`` value: bare when safe, else JSON-quoted (no log injection)."""
    if isinstance(value, float):
        return f"{value:.1f}"
    text = value if isinstance(value, str) else str(value)
    if len(text) > _MAX_VALUE:
        text = text[:_MAX_VALUE] + "..."
    return text if _BARE.match(text) else json.dumps(text)


def _emit(level: int, event: str, fields: dict[str, Any]) -> None:
    if not _log.isEnabledFor(level):
        return
    kept = {k: v for k, v in fields.items() if v is not None}
    text = " ".join([event, *(f"{k}={_field(v)}" for k, v in kept.items())])
    # makeRecord + handle, not log(): the caller's frame is of no use here and looking it
    # up is most of the cost of a line (this runs once per request).
    record = _log.makeRecord(
        _log.name,
        level,
        __file__,
        0,
        text,
        (),  # no arguments: a "%" in a value is printed as is
        None,
        extra={"converge_event": event, "converge_fields": kept},
    )
    _log.handle(record)


def _ms(latency_ms: float | None) -> float | None:
    return None if latency_ms is None else round(float(latency_ms), 1)


def log_accepted(
    provider: str,
    event_id: str,
    *,
    status: str = "accepted",
    latency_ms: float | None = None,
    forwarded_to: str | None = None,
) -> None:
    """Log one accepted inbound event (INFO).

    Args:
        provider: Provider name.
        event_id: The provider's event id.
        status: ``"accepted"`` (or ``"duplicate"``).
        latency_ms: Time from the request to the answer.
        forwarded_to: Target it is forwarded to, if any.
    """
    if not _log.isEnabledFor(logging.INFO):  # once per request: skip building the line
        return
    _emit(
        logging.INFO,
        "inbound.accepted" if status == "accepted" else f"inbound.{status}",
        {
            "provider": provider,
            "event_id": event_id,
            "status": status,
            "latency_ms": _ms(latency_ms),
            "forward_to": forwarded_to,
        },
    )


class RejectionLimiter:
    """At most ``burst`` lines per key in each ``window_sec`` window (sans-I/O).

    Keys are ``(provider, reason)``; at most ``max_keys`` are tracked (the oldest is
    forgotten first), so unknown provider names cannot grow it.

    Args:
        burst: Lines allowed per key and window.
        window_sec: Window length in seconds.
        max_keys: Keys tracked at most.
        clock: Monotonic seconds.
    """

    def __init__(
        self,
        burst: int = 5,
        window_sec: float = 60.0,
        *,
        max_keys: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = burst
        self.window_sec = window_sec
        self.max_keys = max_keys
        self._clock = clock
        # key -> [window start, lines logged in it, lines suppressed since the last one]
        self._state: OrderedDict[tuple[str, str], list[float]] = OrderedDict()
        self._lock = threading.Lock()

    def allow(self, key: tuple[str, str]) -> tuple[bool, int]:
        """Whether a line for ``key`` may be written now.

        Returns:
            ``(allowed, suppressed)``: ``suppressed`` counts the lines left out since the
            last allowed one (report it on this line).
        """
        now = self._clock()
        with self._lock:
            state = self._state.get(key)
            if state is None:
                state = self._state[key] = [now, 0, 0]
                while len(self._state) > self.max_keys:
                    self._state.popitem(last=False)
            else:
                self._state.move_to_end(key)
            if now - state[0] >= self.window_sec:
                state[0], state[1] = now, 0
            if state[1] >= self.burst:
                state[2] += 1
                return False, 0
            state[1] += 1
            suppressed, state[2] = int(state[2]), 0
            return True, suppressed


_rejections = RejectionLimiter()


def log_rejected(
    provider: str,
    reason: str,
    *,
    status_code: int,
    event_id: str | None = None,
    latency_ms: float | None = None,
    limiter: RejectionLimiter | None = None,
) -> bool:
    """Log one rejected inbound request (INFO), rate-limited per provider and reason.

    Args:
        provider: Provider name (``"_unknown"`` for a path naming no provider).
        reason: The rejection reason sent to the client (``bad_signature``, ...).
        status_code: The HTTP status answered.
        event_id: The event id, when it was read before the rejection.
        latency_ms: Time from the request to the answer.
        limiter: The limiter to use (a module-wide one by default).

    Returns:
        True if a line was written.
    """
    if not _log.isEnabledFor(logging.INFO):
        return False
    allowed, suppressed = (limiter or _rejections).allow((provider, reason))
    if not allowed:
        return False
    _emit(
        logging.INFO,
        "inbound.rejected",
        {
            "provider": provider,
            "event_id": event_id,
            "status": status_code,
            "reason": reason,
            "latency_ms": _ms(latency_ms),
            "suppressed": suppressed or None,
        },
    )
    return True


def log_delivered(
    target: str,
    action_id: str,
    *,
    status_code: int | None,
    latency_ms: float | None = None,
    attempts: int | None = None,
) -> None:
    """Log one outbound action delivered (INFO).

    Args:
        target: Target name.
        action_id: Outbox id.
        status_code: The target's HTTP status.
        latency_ms: The delivering attempt's latency.
        attempts: Attempts it took.
    """
    _emit(
        logging.INFO,
        "outbound.delivered",
        {
            "target": target,
            "event_id": action_id,
            "status": status_code,
            "latency_ms": _ms(latency_ms),
            "attempts": attempts,
        },
    )


def log_retried(
    target: str,
    action_id: str,
    *,
    status_code: int | None,
    error: str | None = None,
    latency_ms: float | None = None,
    attempts: int | None = None,
    retry_in_sec: float | None = None,
) -> None:
    """Log one failed attempt that will be retried (INFO).

    Args:
        target: Target name.
        action_id: Outbox id.
        status_code: The target's HTTP status, None when there was no answer.
        error: Why the attempt failed (``"status 503"``, ``"timeout"``, ...).
        latency_ms: The attempt's latency.
        attempts: Attempts made so far.
        retry_in_sec: Seconds until the next attempt.
    """
    _emit(
        logging.INFO,
        "outbound.retry",
        {
            "target": target,
            "event_id": action_id,
            "status": status_code,
            "error": error,
            "latency_ms": _ms(latency_ms),
            "attempts": attempts,
            "retry_in_sec": None if retry_in_sec is None else round(float(retry_in_sec), 2),
        },
    )


def log_dead(
    target: str,
    action_id: str,
    *,
    reason: str,
    status_code: int | None = None,
    latency_ms: float | None = None,
    attempts: int | None = None,
    kind: Literal["inbound", "outbound"] = "outbound",
) -> None:
    """Log one event or action dead-lettered (WARNING).

    Args:
        target: Target name (the provider's for an inbound event).
        action_id: Outbox (or inbox) id.
        reason: Why it was given up.
        status_code: The last HTTP status, if any.
        latency_ms: The last attempt's latency.
        attempts: Attempts made.
        kind: ``"outbound"`` (a delivery) or ``"inbound"`` (an accepted event).
    """
    _emit(
        logging.WARNING,
        f"{kind}.dead",
        {
            "target" if kind == "outbound" else "provider": target,
            "event_id": action_id,
            "status": status_code,
            "reason": reason,
            "latency_ms": _ms(latency_ms),
            "attempts": attempts,
        },
    )


def log_payload(
    kind: str,
    name: str,
    event_id: str,
    payload: Any,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Log a redacted payload and headers at DEBUG (nothing at INFO and above).

    Args:
        kind: ``"inbound"`` or ``"outbound"``.
        name: Provider or target name.
        event_id: Event or action id.
        payload: The JSON payload (secret-looking keys are redacted).
        headers: Headers (signature headers are redacted).
    """
    if not _log.isEnabledFor(logging.DEBUG):
        return
    text = json.dumps(redact_payload(payload), separators=(",", ":"), default=str)
    if len(text) > _MAX_PAYLOAD:
        text = text[:_MAX_PAYLOAD] + "..."
    fields: dict[str, Any] = {"name": name, "event_id": event_id, "payload": text}
    if headers is not None:
        fields["headers"] = json.dumps(redact_headers(headers), separators=(",", ":"))
    # Not through _field(): the payload may be long; json.dumps quotes it safely.
    line = f"{kind}.payload name={_field(name)} event_id={_field(event_id)} payload={text!s}"
    if headers is not None:
        line += f" headers={fields['headers']}"
    _log.debug("%s", line, extra={"converge_event": f"{kind}.payload", "converge_fields": fields})


_second: list[Any] = [None, ""]  # the last whole second formatted, and its text


def _iso(created: float) -> str:
    whole = int(created)
    if _second[0] != whole:  # one strftime per second, not per line
        _second[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _second[0] = whole
    return f"{_second[1]}.{int((created - whole) * 1000):03d}Z"


class TextFormatter(logging.Formatter):
    """``2026-01-31T12:00:00.123Z INFO converge.events inbound.accepted provider=...``."""

    def format(self, record: logging.LogRecord) -> str:
        """Format one record as a line (a traceback, if any, follows it)."""
        line = f"{_iso(record.created)} {record.levelname} {record.name} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``message`` and, for
    event lines, ``event`` and each field (``provider``, ``event_id``, ``status``, ...)."""

    def format(self, record: logging.LogRecord) -> str:
        """Format one record as a JSON line."""
        out: dict[str, Any] = {
            "ts": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
        }
        event = getattr(record, "converge_event", None)
        if event is not None:
            out["event"] = event
            out.update(getattr(record, "converge_fields", {}))
        out["message"] = record.getMessage()
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"), default=str)


def configure_logging(
    level: str | int = "info",
    log_format: Literal["text", "json"] = "text",
    *,
    stream: IO[str] | None = None,
) -> logging.Handler:
    """Send every log record to ``stream`` as ``text`` or ``json`` lines.

    Replaces the root logger's handlers with one handler; httpx(2) and httpcore(2) log only
    warnings unless ``level`` is ``"debug"``.

    Args:
        level: ``critical``, ``error``, ``warning``, ``info`` or ``debug``, or the
            ``logging`` constant (``logging.INFO``).
        log_format: ``"text"`` or ``"json"``.
        stream: Where lines go (stderr by default).

    Returns:
        The installed handler.

    Raises:
        ConfigurationError: For an unknown level or format.
    """
    if log_format not in LOG_FORMATS:
        raise ConfigurationError(
            f"log_format must be one of {LOG_FORMATS}, not {safe_repr(log_format)}"
        )
    if isinstance(level, int) and not isinstance(level, bool):  # logging.INFO and the like
        numeric = level if logging.getLevelName(level) in _LEVELS else None
    else:
        numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else None
    if not isinstance(numeric, int):
        raise ConfigurationError(f"unknown log level {safe_repr(level)}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    quiet = logging.DEBUG if numeric <= logging.DEBUG else logging.WARNING
    for name in ("httpx", "httpcore", "httpx2", "httpcore2"):
        logging.getLogger(name).setLevel(quiet)
    # uvicorn's own logging config gives its loggers handlers and stops propagation;
    # their lines must come out in the same format, through the one root handler.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        server_log = logging.getLogger(name)
        server_log.handlers.clear()
        server_log.setLevel(logging.NOTSET)
        server_log.propagate, server_log.disabled = True, False
    return handler
