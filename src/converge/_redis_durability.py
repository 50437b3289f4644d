"""Warnings when the Redis that holds converge's data may lose it without an error.

Two settings decide it, and a writer is never told when either strikes:

* ``maxmemory-policy``: with ``maxmemory`` set and a policy other than ``noeviction``, a
  full Redis deletes keys. A ``converge gateway`` on such a Redis answered ``202`` to
  3,000 events and kept 639 of them, and answered the senders' retries of the lost ones
  with ``202`` again (their replay claims were gone too). With ``noeviction``, a full
  Redis refuses the write instead, which converge reports as a ``503``.
* ``appendonly``: with ``no``, Redis writes its data to disk only in snapshots (``save``),
  so a crash or restart of Redis loses what was written since the last one. A gateway on
  Redis's default settings answered ``202`` to 1,000 events; after a ``kill -9`` of
  Redis, none of them was left. With ``appendonly yes``, all 1,000 were.

So ``RedisStore`` and ``RedisStreamsBridge`` read both when they open their pool, and
log a warning for each that can lose data.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["warn_if_lossy"]

_log = logging.getLogger("converge.redis")


async def _setting(client: Any, name: str) -> str | None:
    """One ``CONFIG GET`` value as text (one name per call: Redis 6 takes no more)."""
    reply = await client.config_get([name])
    if not reply:
        return None
    value = next(iter(reply.values()))
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


async def warn_if_lossy(client: Any, *, server: str, holds: str) -> bool:
    """Read the ``maxmemory-policy`` and ``appendonly`` settings of ``server`` (its
    masked URL) through the coredis ``client``, and log a warning for each that can lose
    data without an error; ``holds`` says what would be lost.

    Returns whether the settings could be read: ``CONFIG`` may be refused (managed
    services, ACLs) or the server be unreachable, and neither is an error here (the
    calls that follow report an unreachable server). Callers bound the wait.
    """
    import coredis.exceptions

    try:
        policy = await _setting(client, "maxmemory-policy")
        appendonly = await _setting(client, "appendonly")
        save = await _setting(client, "save") if appendonly == "no" else None
    except (coredis.exceptions.RedisError, OSError):
        return False
    if policy is None:
        return False
    if policy != "noeviction":
        _log.warning(
            "Redis at %s may evict keys when it is full (maxmemory-policy %s): %s can "
            "vanish with no error. Set maxmemory-policy noeviction: a full Redis then "
            "refuses writes, which converge reports (a 503 at the gateway)",
            server,
            policy,
            holds,
        )
    if appendonly == "no":
        _log.warning(
            "Redis at %s keeps its data on disk only in snapshots (appendonly no, save "
            "%r): a crash or restart of Redis loses the %s written since the last one, "
            "or all of them with no snapshots. Set appendonly yes: a Redis crash then "
            "loses nothing (with appendfsync everysec, a power loss at most a second)",
            server,
            save or "",
            holds,
        )
    return True
