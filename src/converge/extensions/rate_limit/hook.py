"""``RateLimitHook``: a :class:`~converge.core.hooks.MessageHook` that drops over-limit messages."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from converge.core.hooks import MessageHook
from converge.core.message import Message
from converge.core.metrics import MetricsCollector
from converge.errors import UsageError
from converge.extensions.rate_limit.limiter import RateLimiter

__all__ = ["RateLimitHook"]

_log = logging.getLogger("converge.rate_limit")

_EGRESS_DROPPED = "rate_limit_egress_dropped_total"
_INGRESS_DROPPED = "rate_limit_ingress_dropped_total"
_ERRORS = "rate_limit_hook_errors_total"


class RateLimitHook(MessageHook):
    """Rate-limit messages on the bus: sending is ``"egress"``, receiving ``"ingress"``.

    A message over the limit is dropped (the hook returns None) and counted in
    ``rate_limit_egress_dropped_total`` or ``rate_limit_ingress_dropped_total``. The
    runtime calls the async forms, which use :meth:`RateLimiter.aallow_message` (no
    thread hop in memory, one ``aupdate`` with a store).

    Args:
        rate_limiter: The limiter deciding.
        metrics_collector: Where drops and hook errors are counted; a private collector
            (readable as :attr:`metrics_collector`) when None.

    Raises:
        UsageError: If ``rate_limiter`` is not a :class:`RateLimiter`.
    """

    def __init__(
        self, rate_limiter: RateLimiter, *, metrics_collector: MetricsCollector | None = None
    ) -> None:
        if not isinstance(rate_limiter, RateLimiter):
            raise UsageError("rate_limiter must be a RateLimiter")
        if metrics_collector is not None and not isinstance(metrics_collector, MetricsCollector):
            raise UsageError("metrics_collector must be a MetricsCollector or None")
        self.rate_limiter = rate_limiter
        self.metrics_collector = (
            metrics_collector if metrics_collector is not None else MetricsCollector()
        )

    def _dropped(self, name: str) -> Message | None:
        self.metrics_collector.inc(name, help="Messages dropped by RateLimitHook.")
        return None

    def pre_send(self, message: Message) -> Message | None:
        """Admit ``message`` leaving its sender (``"egress"``), or drop it (None)."""
        if self.rate_limiter.allow_message(message, direction="egress"):
            return message
        return self._dropped(_EGRESS_DROPPED)

    def post_receive(self, message: Message) -> Message | None:
        """Admit ``message`` reaching a receiver (``"ingress"``), or drop it (None)."""
        if self.rate_limiter.allow_message(message, direction="ingress"):
            return message
        return self._dropped(_INGRESS_DROPPED)

    async def apre_send(self, message: Message) -> Message | None:
        """Async form of :meth:`pre_send` (the one the runtime calls)."""
        if await self.rate_limiter.aallow_message(message, direction="egress"):
            return message
        return self._dropped(_EGRESS_DROPPED)

    async def apost_receive(self, message: Message) -> Message | None:
        """Async form of :meth:`post_receive` (the one the runtime calls)."""
        if await self.rate_limiter.aallow_message(message, direction="ingress"):
            return message
        return self._dropped(_INGRESS_DROPPED)

    def on_error(self, stage: str, error: Exception, context: dict[str, Any]) -> None:
        """Count the failure in ``rate_limit_hook_errors_total{stage=...}`` and log it.

        The runtime drops the message; a limiter whose store is down therefore fails
        closed. An error handler never raises: a ``context`` that is not a mapping is
        read as one without a message.
        """
        self.metrics_collector.inc(
            _ERRORS, labels={"stage": stage}, help="RateLimitHook calls that raised."
        )
        message = context.get("message") if isinstance(context, Mapping) else None
        _log.warning(
            "rate-limit hook failed at %s for message %s: %r",
            stage,
            getattr(message, "id", "?"),
            error,
        )
