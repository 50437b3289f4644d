"""RedisStore's prefix index: listing a prefix without scanning the whole database.

Sans-I/O: the Lua scripts (built per namespace) and what their replies mean.

``SCAN MATCH`` visits every key of the database, whatever the pattern: every namespace,
every retained record, every replay claim. That is about 0.6 s of Redis CPU per million
keys for each listing, and the durable queues list their open records on every poll. So
a prefix that is listed becomes *watched*:

* the namespace's watch hash (``<namespace>:\\xffwatch``) maps each watched prefix to
  its state: ``"0"`` while its index is being built, else the server time (ms) it was
  last checked against a full scan;
* each watched prefix has a sorted set (``<namespace>:\\xffidx:<prefix>``) of the keys
  under it, all scored 0 (so ordered by their bytes: listed a page at a time, by a
  cursor that concurrent writes cannot shift), plus a sentinel member (``\\xff``, last)
  that tells an index from a lost one;
* every script that writes a key (the store's own writes, and ``arun_script``'s
  scripts, wrapped) checks whether that key exists now and adds it to, or removes it
  from, the index of every watched prefix it falls under, atomically with the write;
* a listing of a watched prefix reads its index a page (one short script) at a time,
  and checks each member with ``EXISTS``: members whose key expired or was deleted
  behind the store's back are dropped, not listed;
* the first listing of a prefix, a listing that finds its index lost, and once an
  hour one listing (the others go on reading the index meanwhile) scan the database
  instead, and index what they find: keys written before the prefix was watched, or by
  a process that does not keep the index (an older converge), are found then.

Keys of the form ``<namespace>:<key>`` never hold the byte ``0xff`` (store keys are
UTF-8), so the index's keys can never be store keys, in any namespace.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Final

__all__ = [
    "BUILD",
    "IndexScripts",
    "LISTED",
    "PAGE",
    "REFRESH_MS",
    "SCAN",
    "WATCH_LIMIT",
    "index_scripts",
    "wrap_script",
]

PAGE: Final = 1000
"""Most index members one listing script reads (a short step for the server)."""
WATCH_LIMIT: Final = 32
"""Most watched prefixes per namespace: each costs every write a comparison; listings
of further prefixes scan the database."""
REFRESH_MS: Final = 3_600_000
"""How often (ms) a watched prefix's listing is checked against a full scan."""

# The first element of a listing's reply.
LISTED: Final = 1  # then the next cursor, then live keys under the prefix (relative)
SCAN: Final = 0  # not watched (too many watched prefixes): scan, index nothing
BUILD: Final = -1  # watched, but the index is not built (or was lost): scan, then index


def _lua_string(raw: bytes) -> str:
    """A Lua string literal holding exactly ``raw`` (decimal escapes: any byte)."""
    return '"' + "".join(f"\\{byte}" for byte in raw) + '"'


def _prelude(namespace: bytes) -> str:
    # cv_ names: a wrapped user script runs in a function of its own, below these.
    return f"""
local cv_ns = {_lua_string(namespace)}
local cv_meta = cv_ns .. "\\255watch"
local cv_idx = cv_ns .. "\\255idx:"
local cv_watched
local function cv_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function cv_reindex(key)
  if cv_watched == nil then cv_watched = redis.call('HKEYS', cv_meta) end
  if #cv_watched == 0 then return end
  local rel = string.sub(key, #cv_ns + 1)
  local exists
  for _, prefix in ipairs(cv_watched) do
    if string.sub(rel, 1, #prefix) == prefix then
      if exists == nil then exists = redis.call('EXISTS', key) == 1 end
      if exists then
        redis.call('ZADD', cv_idx .. prefix, 0, rel)
      else
        redis.call('ZREM', cv_idx .. prefix, rel)
      end
    end
  end
end
"""


# KEYS[1]; ARGV: value, PX in ms ("" for none), "nx" for put-if-absent (else "").
# Returns 1 if written, 0 if NX found the key.
_PUT: Final = """
local written
if ARGV[2] == '' then
  if ARGV[3] == 'nx' then
    written = redis.call('SET', KEYS[1], ARGV[1], 'NX')
  else
    written = redis.call('SET', KEYS[1], ARGV[1])
  end
elseif ARGV[3] == 'nx' then
  written = redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'NX')
else
  written = redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
if not written then return 0 end
cv_reindex(KEYS[1])
return 1
"""

_DELETE: Final = """
redis.call('DEL', KEYS[1])
cv_reindex(KEYS[1])
return 0
"""

# aupdate's compare-and-set. KEYS: the keys read. ARGV: per key, whether it existed
# ("1"/"0") and the value read; then per key an operation ("k" keep, "d" delete, "s" set),
# the new value and its TTL in milliseconds ("" for none). Returns 1 if applied, 0 if a
# key no longer holds what was read.
_CAS: Final = """
local n = #KEYS
for i = 1, n do
  local current = redis.call('GET', KEYS[i])
  if ARGV[2 * i - 1] == '0' then
    if current then return 0 end
  elseif current ~= ARGV[2 * i] then
    return 0
  end
end
local base = 2 * n
for i = 1, n do
  local op = ARGV[base + 3 * i - 2]
  if op == 'd' then
    redis.call('DEL', KEYS[i])
    cv_reindex(KEYS[i])
  elseif op == 's' then
    local px = ARGV[base + 3 * i]
    if px == '' then
      redis.call('SET', KEYS[i], ARGV[base + 3 * i - 1])
    else
      redis.call('SET', KEYS[i], ARGV[base + 3 * i - 1], 'PX', px)
    end
    cv_reindex(KEYS[i])
  end
end
return 1
"""

# KEYS: keys a scan found. Indexes each as it is now.
_REINDEX: Final = """
for i = 1, #KEYS do cv_reindex(KEYS[i]) end
return 0
"""

# ARGV: the prefix (relative to the namespace), WATCH_LIMIT, REFRESH_MS, the cursor (the
# last member of the previous page; "" for the first page), PAGE. Reply: LISTED, the
# next cursor ("" after the last page), then this page's live keys; or SCAN, or BUILD.
_LIST: Final = """
local prefix, cursor = ARGV[1], ARGV[4]
local idx = cv_idx .. prefix
if cursor == '' then
  local state = redis.call('HGET', cv_meta, prefix)
  if not state then
    if redis.call('HLEN', cv_meta) >= tonumber(ARGV[2]) then return {0} end
    redis.call('HSET', cv_meta, prefix, '0')
    return {-1}
  end
  if state == '0' then return {-1} end
  if redis.call('EXISTS', idx) == 0 then  -- lost (evicted, deleted): build it again
    redis.call('HSET', cv_meta, prefix, '0')
    return {-1}
  end
  local now = cv_now()
  if now - tonumber(state) > tonumber(ARGV[3]) then
    -- this caller checks the index against a scan; the others go on reading it
    redis.call('HSET', cv_meta, prefix, string.format('%.0f', now))
    return {-1}
  end
  cursor = '-'
else
  if redis.call('EXISTS', idx) == 0 then return {-1} end  -- lost since the first page
  cursor = '(' .. cursor
end
local page = redis.call('ZRANGEBYLEX', idx, cursor, '+', 'LIMIT', 0, tonumber(ARGV[5]))
local out = {1, ''}
if #page == tonumber(ARGV[5]) then out[2] = page[#page] end
for _, rel in ipairs(page) do
  if rel ~= "\\255" then
    if redis.call('EXISTS', cv_ns .. rel) == 1 then
      out[#out + 1] = rel
    else
      redis.call('ZREM', idx, rel)
    end
  end
end
return out
"""

# ARGV: a prefix whose scan has indexed every key under it. Marks its index built.
_READY: Final = """
local prefix = ARGV[1]
if redis.call('HGET', cv_meta, prefix) ~= '0' then return 0 end
redis.call('ZADD', cv_idx .. prefix, 0, "\\255")
redis.call('HSET', cv_meta, prefix, string.format('%.0f', cv_now()))
return 1
"""


@dataclass(frozen=True)
class IndexScripts:
    """One namespace's scripts (Lua source text)."""

    put: str
    delete: str
    cas: str
    reindex: str
    list: str
    ready: str


@functools.lru_cache(maxsize=64)
def index_scripts(namespace: bytes) -> IndexScripts:
    """The scripts of the namespace whose Redis keys start with ``namespace``."""
    prelude = _prelude(namespace)
    return IndexScripts(
        *(prelude + body for body in (_PUT, _DELETE, _CAS, _REINDEX, _LIST, _READY))
    )


@functools.lru_cache(maxsize=256)
def wrap_script(source: str, namespace: bytes) -> str:
    """``source`` run as a function, then every key in ``KEYS`` indexed as it is now
    (whether the function returned or failed: its error is raised after).

    A first line of flags (``#!lua ...``) stays the first line; a script flagged
    ``no-writes`` changes no key, and runs as it is.
    """
    shebang = ""
    if source.startswith("#!"):
        shebang, _, source = source.partition("\n")
        if "no-writes" in shebang:
            return f"{shebang}\n{source}"
        shebang += "\n"
    return (
        f"{shebang}{_prelude(namespace)}"
        f"local function cv_user()\n{source}\nend\n"
        # A script that fails keeps the writes it made before failing: index them too.
        "local cv_ok, cv_result = pcall(cv_user)\n"
        "for i = 1, #KEYS do cv_reindex(KEYS[i]) end\n"
        "if not cv_ok then error(cv_result) end\n"
        "return cv_result\n"
    )
