"""The message runtime: a bus that applies ``MessageHook`` s, and an agent runner.

```python
from converge.runtime import AgentRunner, MessageBus

async with MessageBus(hooks=[RateLimitHook(limiter)]) as bus:
    async with AgentRunner(bus, [planner, worker]) as runner:
        await bus.publish(Message(sender="user", recipient=planner.id, payload={...}))
        await runner.wait_until(lambda r: r.idle)
```

From a script: ``run_agents([planner, worker], messages=[...], timeout=30)``.
"""

from __future__ import annotations

from converge.runtime.acks import AckListener
from converge.runtime.bus import MessageBus, Sink, Subscription
from converge.runtime.policy import AgentRetry
from converge.runtime.runner import (
    AgentErrorHandler,
    AgentRunner,
    DeadLetter,
    RunResult,
    arun_agents,
    run_agents,
)

__all__ = [
    "AckListener",
    "AgentErrorHandler",
    "AgentRetry",
    "AgentRunner",
    "DeadLetter",
    "MessageBus",
    "RunResult",
    "Sink",
    "Subscription",
    "arun_agents",
    "run_agents",
]
