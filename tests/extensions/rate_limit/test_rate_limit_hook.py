"""RateLimitHook: egress on send, ingress on receive, drop counters, and on the bus."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import pytest
from rl_helpers import VirtualClock, msg

from converge.core import Agent, Identity, Message, MessageHook, MetricsCollector, SendMessage
from converge.errors import StoreUnavailableError, UsageError
from converge.extensions.rate_limit import RateLimiter, RateLimitHook, TokenBucketConfig
from converge.extensions.storage import MemoryStore
from converge.runtime import AgentRunner, MessageBus

pytestmark = pytest.mark.anyio


def hook_with(capacity: float, metrics: MetricsCollector | None = None) -> RateLimitHook:
    limiter = RateLimiter(sender_config=TokenBucketConfig(capacity, 0.001), clock=VirtualClock())
    return RateLimitHook(limiter, metrics_collector=metrics)


def test_hook_is_a_message_hook() -> None:
    assert isinstance(hook_with(1), MessageHook)


def test_pre_send_is_egress_and_counts_drops() -> None:
    metrics = MetricsCollector()
    hook = hook_with(2, metrics)
    message = msg("alice")
    assert [hook.pre_send(message) for _ in range(4)] == [message, message, None, None]
    assert metrics.get("rate_limit_egress_dropped_total") == 2
    assert metrics.get("rate_limit_ingress_dropped_total") == 0
    # ingress has its own buckets
    assert hook.post_receive(message) is message


def test_post_receive_is_ingress_and_counts_drops() -> None:
    metrics = MetricsCollector()
    hook = hook_with(1, metrics)
    message = msg("alice")
    assert hook.post_receive(message) is message
    assert hook.post_receive(message) is None
    assert metrics.get("rate_limit_ingress_dropped_total") == 1


async def test_async_forms_use_the_same_buckets_and_counters() -> None:
    metrics = MetricsCollector()
    hook = hook_with(1, metrics)
    message = msg("alice")
    assert await hook.apre_send(message) is message
    assert await hook.apre_send(message) is None
    assert await hook.apost_receive(message) is message
    assert await hook.apost_receive(message) is None
    assert metrics.get("rate_limit_egress_dropped_total") == 1
    assert metrics.get("rate_limit_ingress_dropped_total") == 1


def test_hook_without_a_collector_keeps_its_own() -> None:
    hook = hook_with(0.5)
    hook.pre_send(msg())
    assert hook.metrics_collector.get("rate_limit_egress_dropped_total") == 1


def test_on_error_counts_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    hook = hook_with(1)
    with caplog.at_level(logging.WARNING, logger="converge.rate_limit"):
        hook.on_error("pre_send", RuntimeError("store down"), {"message": msg()})
    assert (
        hook.metrics_collector.get("rate_limit_hook_errors_total", labels={"stage": "pre_send"})
        == 1
    )
    assert "store down" in caplog.text


@pytest.mark.parametrize("context", [None, "message", 7, ["message"]])
def test_on_error_with_a_context_that_is_not_a_mapping_still_counts_and_logs(
    context: Any, caplog: pytest.LogCaptureFixture
) -> None:
    hook = hook_with(1)
    with caplog.at_level(logging.WARNING, logger="converge.rate_limit"):
        hook.on_error("post_receive", RuntimeError("store down"), context)
    labels = {"stage": "post_receive"}
    assert hook.metrics_collector.get("rate_limit_hook_errors_total", labels=labels) == 1
    assert "for message ?: RuntimeError('store down')" in caplog.text


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [(("limiter",), {}), ((None,), {}), (("ok",), {"metrics_collector": {}})],
)
def test_invalid_hook_arguments_are_usage_errors(args: tuple[Any, ...], kwargs: Any) -> None:
    if args == ("ok",):
        args = (RateLimiter(),)
    with pytest.raises(UsageError):
        RateLimitHook(*args, **kwargs)


async def test_failing_store_drops_the_message_through_on_error() -> None:
    class DownStore(MemoryStore):
        def update(self, keys: Any, fn: Any, *, ttl: float | None = None) -> Any:
            raise StoreUnavailableError("store is down")

    metrics = MetricsCollector()
    hook = RateLimitHook(
        RateLimiter(store=DownStore(), sender_config=TokenBucketConfig(5, 1)),
        metrics_collector=metrics,
    )
    bus = MessageBus(hooks=[hook], metrics=metrics)
    sub = bus.subscribe("bob")
    assert await bus.publish(msg("alice", recipient="bob")) == 0
    assert len(sub) == 0
    assert metrics.get("rate_limit_hook_errors_total", labels={"stage": "pre_send"}) == 1


# -- end to end on the runtime ---------------------------------------------------------


class Talker(Agent):
    """Sends ``per_tick`` messages to ``sink`` for every tick message it receives."""

    def __init__(self, name: str, per_tick: int, sink: Agent) -> None:
        super().__init__(Identity(), name=name)
        self.per_tick, self.sink = per_tick, sink

    def decide(self, messages: list[Message], tasks: list[Any], **kw: Any) -> list[Any]:
        return [
            SendMessage(Message(sender=self.id, recipient=self.sink.id, payload={"i": i}))
            for _ in messages
            for i in range(self.per_tick)
        ]


class Sink(Agent):
    def __init__(self) -> None:
        super().__init__(Identity(), name="sink")
        self.received: dict[str, int] = {}

    def decide(self, messages: list[Message], tasks: list[Any], **kw: Any) -> list[Any]:
        for m in messages:
            self.received[m.sender] = self.received.get(m.sender, 0) + 1
        return []


async def test_chatty_agent_is_throttled_and_quiet_agent_is_not() -> None:
    clock = VirtualClock()
    limiter = RateLimiter(sender_config=TokenBucketConfig(5, 1), clock=clock)
    metrics = MetricsCollector()
    bus = MessageBus(hooks=[RateLimitHook(limiter, metrics_collector=metrics)], metrics=metrics)
    sink = Sink()
    chatty = Talker("chatty", per_tick=20, sink=sink)
    quiet = Talker("quiet", per_tick=1, sink=sink)
    async with AgentRunner(bus, [chatty, quiet, sink]) as runner:
        for _ in range(3):  # three ticks, one virtual second apart
            for agent in (chatty, quiet):
                # ticks come from the operator, who is not rate limited by sender
                await bus.publish(Message(sender=f"operator-{agent.name}", recipient=agent.id))
            with anyio.fail_after(5):
                await runner.wait_until(lambda r: r.idle)
            clock.advance(1)
    # chatty: a burst of 5, then 1 token per second refilled between ticks
    assert sink.received[chatty.id] == 5 + 1 + 1
    assert sink.received[quiet.id] == 3
    # ticks to the agents are egress+ingress too, one per operator sender per tick: never dropped
    assert metrics.get("rate_limit_egress_dropped_total") == 3 * 20 - 7
    assert metrics.get("rate_limit_ingress_dropped_total") == 0
