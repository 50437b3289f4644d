"""A warning when the Redis that holds converge's data may drop it to free memory.

A server with ``maxmemory`` set and a ``maxmemory-policy`` other than ``noeviction``
deletes keys when it is full, and the writer is never told: a ``converge gateway`` on
such a Redis answered ``202`` to 3,000 events and kept 639 of them, and answered the
senders' retries of the lost ones with ``202`` again (their replay claims were gone too).
With ``noeviction``, a full Redis refuses the write instead, which converge reports as a
``503``. So ``RedisStore`` and ``RedisStreamsBridge`` read the policy when they open
their pool, and log a warning naming it.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["warn_if_evicting"]

_log = logging.getLogger("converge.redis")


async def warn_if_evicting(client: Any, *, server: str, holds: str) -> bool:
    """Read the ``maxmemory-policy`` of ``server`` (its masked URL) through the coredis
    ``client``, and log a warning when it is not ``noeviction``; ``holds`` says what
    would be lost.

    Returns whether the policy could be read: ``CONFIG`` may be refused (managed
    services, ACLs) or the server be unreachable, and neither is an error here (the
    calls that follow report an unreachable server). Callers bound the wait.
    """
    import coredis.exceptions

    try:
        reply = await client.config_get(["maxmemory-policy"])
    except (coredis.exceptions.RedisError, OSError):
        return False
    if not reply:
        return False
    policy = next(iter(reply.values()))
    if isinstance(policy, bytes):
        policy = policy.decode(errors="replace")
    if policy != "noeviction":
        _log.warning(
            "Redis at %s may evict keys when it is full (maxmemory-policy %s): %s can "
            "vanish with no error. Set maxmemory-policy noeviction: a full Redis then "
            "refuses writes, which converge reports (a 503 at the gateway)",
            server,
            policy,
            holds,
        )
    return True
