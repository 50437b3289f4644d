"""Token-bucket rate limiting of messages: ``RateLimiter`` and ``RateLimitHook``.

```python
from converge.extensions.rate_limit import RateLimiter, RateLimitHook, TokenBucketConfig

limiter = RateLimiter(sender_config=TokenBucketConfig(capacity=10, refill_tokens_per_sec=2))
limiter.allow_message(message, direction="egress")   # True or False, takes tokens
await limiter.acquire_message(message, direction="egress", timeout=5)  # waits
bus = MessageBus(hooks=[RateLimitHook(limiter)])
```
"""

from __future__ import annotations

from converge.extensions.rate_limit.bucket import TokenBucketConfig
from converge.extensions.rate_limit.hook import RateLimitHook
from converge.extensions.rate_limit.limiter import DIRECTIONS, RateLimiter

__all__ = ["DIRECTIONS", "RateLimitHook", "RateLimiter", "TokenBucketConfig"]
