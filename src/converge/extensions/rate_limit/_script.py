"""The rate limiter's decision as one Lua script on a Redis server, on the server's clock.

Sans-I/O: the script texts, the arguments they take and the replies they give. The
limiter runs them through a store that offers ``arun_script`` (``RedisStore``): one
round trip per decision, no optimistic retries, and one clock (Redis ``TIME``)
for every process and host.

Lua numbers are doubles, exact up to 2**53, so the script works in integer
*microseconds* since the epoch (about 1.8e15 today), not the nanoseconds of
:mod:`~converge.extensions.rate_limit.bucket`. The microsecond parameters are derived
from the configuration the same way (interval rounded up, the full bucket rounded down
from the exact capacity), so they never admit more than the configuration says.

Bucket values are stored as ``J<tat in microseconds>``: the JSON form a RedisStore
writes, so ``store.get(key)`` reads a bucket as an int. A bucket holding anything else
is reported as corrupt, never overwritten.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from converge.extensions.rate_limit.bucket import NEVER, BucketParams, TokenBucketConfig

__all__ = [
    "CORRUPT",
    "RELEASE",
    "RESERVE",
    "micro_params",
    "Reply",
    "parse_reserve",
    "release_args",
    "reserve_args",
]

_US: Final = 1_000_000
CORRUPT: Final = -2
"""First element of a reply whose bucket (index in the second element) is corrupt."""

# KEYS: the buckets. ARGV[1]: longest wait in us ("" = any, -1 = compute only);
# ARGV[2]: TTL in ms (0 = none); then interval, tolerance, refills (1/0) per bucket.
# Reply: {wait, admitted, then old and new tat per bucket as strings}, or
# {-1, 0} (never), or {-2, index} (corrupt bucket). Mirrors bucket.reserve().
RESERVE: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local max_wait = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local tats = {}
local wait = 0
for i = 1, #KEYS do
  local v = redis.call('GET', KEYS[i])
  local tat = 0
  if v then
    if string.sub(v, 1, 1) ~= 'J' then return {-2, i} end
    tat = tonumber(string.sub(v, 2))
    if not tat then return {-2, i} end
  end
  tats[i] = tat
  local interval = tonumber(ARGV[3 * i])
  local tolerance = tonumber(ARGV[3 * i + 1])
  if tolerance < interval then return {-1, 0} end
  local w = tat + interval - tolerance - now
  if w > 0 then
    if ARGV[3 * i + 2] ~= '1' then return {-1, 0} end
    if w > wait then wait = w end
  end
end
if max_wait and wait > max_wait then return {wait, 0} end
local at = now + wait
local reply = {wait, 1}
for i = 1, #KEYS do
  local base = tats[i]
  if base < at then base = at end
  local new = string.format('%.0f', base + tonumber(ARGV[3 * i]))
  if ttl > 0 then
    redis.call('SET', KEYS[i], 'J' .. new, 'PX', ttl)
  else
    redis.call('SET', KEYS[i], 'J' .. new)
  end
  reply[#reply + 1] = string.format('%.0f', tats[i])
  reply[#reply + 1] = new
end
return reply
"""

# KEYS: the buckets; ARGV[1]: TTL in ms (0 = none); then old and mine per bucket.
# Gives a cancelled reservation back where nobody reserved after it (as
# RateLimiter._release_local does in memory).
RELEASE: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ttl = tonumber(ARGV[1])
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == 'J' .. ARGV[2 * i + 1] then
    local old = ARGV[2 * i]
    if tonumber(old) > now then
      if ttl > 0 then
        redis.call('SET', KEYS[i], 'J' .. old, 'PX', ttl)
      else
        redis.call('SET', KEYS[i], 'J' .. old)
      end
    else
      redis.call('DEL', KEYS[i])
    end
  end
end
return 0
"""


def micro_params(config: TokenBucketConfig) -> BucketParams:
    """``config`` in integer microseconds, the script's unit (Lua numbers are exact only
    to 2**53)."""
    return BucketParams.from_config(config, ticks_per_sec=_US)


@dataclass(frozen=True, slots=True)
class Reply:
    """A decoded reply of :data:`RESERVE`.

    Attributes:
        wait_ns: The wait in nanoseconds, or :data:`~converge.extensions.rate_limit.bucket.NEVER`.
        taken: ``(old, new)`` tat strings per bucket when admitted, else None (for
            :func:`release_args`).
        corrupt: Index of a bucket whose stored value is not the script's, else None.
    """

    wait_ns: int
    taken: list[tuple[str, str]] | None
    corrupt: int | None = None


def reserve_args(
    params: Sequence[BucketParams], max_wait_ns: int | None, ttl: float | None
) -> list[str | int]:
    """``ARGV`` for :data:`RESERVE`; ``max_wait_ns`` as for ``bucket.reserve``."""
    if max_wait_ns is None:
        bound: str | int = ""
    elif max_wait_ns < 0:
        bound = -1
    else:
        bound = max_wait_ns // 1000  # never wait longer than allowed
    args: list[str | int] = [bound, _ttl_ms(ttl)]
    for p in params:
        args += [p.interval, p.tolerance, 1 if p.refills else 0]
    return args


def parse_reserve(reply: object) -> Reply:
    """Decode what :data:`RESERVE` returned (lists of ints and bytes)."""
    if not isinstance(reply, list | tuple) or len(reply) < 2:
        raise ValueError(f"unexpected rate-limit script reply {reply!r}")
    wait, admitted = int(reply[0]), int(reply[1])
    if wait == CORRUPT:
        return Reply(NEVER, None, corrupt=admitted - 1)
    if wait == NEVER:
        return Reply(NEVER, None)
    if not admitted:
        return Reply(wait * 1000, None)
    tats = [_text(item) for item in reply[2:]]
    return Reply(wait * 1000, list(zip(tats[0::2], tats[1::2], strict=True)))


def release_args(taken: Sequence[tuple[str, str]], ttl: float | None) -> list[str | int]:
    """``ARGV`` for :data:`RELEASE`."""
    args: list[str | int] = [_ttl_ms(ttl)]
    for old, mine in taken:
        args += [old, mine]
    return args


def _ttl_ms(ttl: float | None) -> int:
    return 0 if ttl is None else max(1, math.ceil(ttl * 1000))


def _text(item: object) -> str:
    return item.decode("ascii") if isinstance(item, bytes) else str(item)
