"""A value nested too deep for ``repr``, passed where a setting belongs, is refused with a
converge error: the message naming it must not itself raise ``RecursionError``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from converge.core import Message, MetricsCollector, Topic
from converge.core.decisions import UpdateTask
from converge.durable import QueueKeys
from converge.errors import ConvergeError
from converge.extensions.connectors import (
    OutboundTarget,
    ProviderProfile,
    WebhookRetryPolicy,
    WebhookSecurityPolicy,
)
from converge.extensions.connectors.logs import configure_logging
from converge.extensions.llm import ChatResult, Usage
from converge.extensions.llm import RetryPolicy as LLMRetryPolicy
from converge.extensions.rate_limit import RateLimiter
from converge.extensions.storage import MemoryStore, RedisStore
from converge.runtime import AgentRetry, MessageBus, run_agents
from nesting import deep_list

DEEP = deep_list()

CASES: dict[str, Callable[[], Any]] = {
    "WebhookSecurityPolicy.timestamp_skew_limit_sec": lambda: WebhookSecurityPolicy(
        timestamp_skew_limit_sec=DEEP
    ),
    "WebhookSecurityPolicy.allowed_content_types": lambda: WebhookSecurityPolicy(
        allowed_content_types=DEEP
    ),
    "WebhookSecurityPolicy.ip_allowlist": lambda: WebhookSecurityPolicy(ip_allowlist=DEEP),
    "ProviderProfile.name": lambda: ProviderProfile(
        name=DEEP, scheme="standard-webhooks", secret_ref="S"
    ),
    "OutboundTarget.name": lambda: OutboundTarget(name=DEEP, url="http://127.0.0.1:9/"),
    "WebhookRetryPolicy.compute_delay": lambda: WebhookRetryPolicy().compute_delay(DEEP),
    "configure_logging.log_format": lambda: configure_logging(log_format=DEEP),
    "llm.RetryPolicy.initial_delay": lambda: LLMRetryPolicy(initial_delay=DEEP),
    "Usage.input_tokens": lambda: Usage(input_tokens=DEEP),
    "ChatResult.stop_reason": lambda: ChatResult(text="", stop_reason=DEEP),
    "MemoryStore.clock": lambda: MemoryStore(clock=DEEP),
    "MemoryStore.serializer": lambda: MemoryStore(serializer=DEEP),
    "RedisStore.url": lambda: RedisStore(DEEP),
    "RedisStore.timeout": lambda: RedisStore("redis://127.0.0.1:9/0", timeout=DEEP),
    "MetricsCollector.namespace": lambda: MetricsCollector(namespace=DEEP),
    "Topic.name": lambda: Topic(DEEP),
    "UpdateTask.state": lambda: UpdateTask(task_id="t", state=DEEP),
    "QueueKeys.prefix": lambda: QueueKeys(DEEP),
    "AgentRetry.max_attempts": lambda: AgentRetry(max_attempts=DEEP),
    "AgentRetry.backoff": lambda: AgentRetry(backoff=DEEP),
    "MessageBus.inbox_size": lambda: MessageBus(inbox_size=DEEP),
    "MessageBus.hooks": lambda: MessageBus(hooks=DEEP),
    "run_agents.agents": lambda: run_agents(DEEP),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_setting_nested_too_deep_to_show_is_refused_with_a_converge_error(case: str) -> None:
    with pytest.raises(ConvergeError):
        CASES[case]()


@pytest.mark.anyio
async def test_a_wait_bound_nested_too_deep_to_show_is_refused_with_a_converge_error() -> None:
    with pytest.raises(ConvergeError):
        await RateLimiter().acquire_message(Message(sender="s"), direction="egress", timeout=DEEP)
