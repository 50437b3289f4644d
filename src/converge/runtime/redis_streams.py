"""Agents in many processes: a bridge between a :class:`MessageBus` and Redis Streams.

Redis is the engine (streams, consumer groups, ``XACK``, ``XAUTOCLAIM``); this module only
connects it to the in-process bus, so an agent's code and its runner do not change when
its peers move to another process or host. Needs the ``redis`` extra (coredis), which runs
on asyncio and trio.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

import anyio
import anyio.abc

from converge._numbers import check_positive
from converge._redis_durability import warn_if_lossy
from converge._redis_errors import redis_error
from converge._redis_url import check_redis_url, masked_url
from converge.core.message import Message, Topic
from converge.errors import BusFullError, MissingDependencyError, UsageError
from converge.runtime.bus import MessageBus

__all__ = ["RedisStreamsBridge"]

_log = logging.getLogger("converge.runtime")

_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")

# One round trip: refuse (0) when some consumer group's backlog (entries read but not
# acknowledged, plus entries not read yet) reached the bound; otherwise append. Once the
# stream holds more than the bound, trim what every group has acknowledged: the entries
# before the oldest one some group still needs (its oldest pending entry, else the last
# it read). An entry read and never acknowledged is never trimmed, however much traffic
# passes it (a dead consumer's, until it is claimed). With no group yet, keep the newest.
_ADD_SCRIPT: Final = """
local function older(a, b)
  local am, as = string.match(a, '(%d+)-(%d+)')
  local bm, bs = string.match(b, '(%d+)-(%d+)')
  if tonumber(am) ~= tonumber(bm) then return tonumber(am) < tonumber(bm) end
  return tonumber(as) < tonumber(bs)
end
local limit = tonumber(ARGV[1])
local groups = {}
if redis.call('EXISTS', KEYS[1]) == 1 then
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local info = {}
    for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
    local lag = tonumber(info['lag']) or redis.call('XLEN', KEYS[1])
    if tonumber(info['pending']) + lag >= limit then return 0 end
    groups[#groups + 1] = info
  end
end
if #groups == 0 then
  return redis.call('XADD', KEYS[1], 'MAXLEN', '~', limit, '*', 'm', ARGV[2])
end
local id = redis.call('XADD', KEYS[1], '*', 'm', ARGV[2])
if redis.call('XLEN', KEYS[1]) > limit then
  local keep = nil
  for _, info in ipairs(groups) do
    local need = info['last-delivered-id']
    if tonumber(info['pending']) > 0 then
      need = redis.call('XPENDING', KEYS[1], info['name'])[2]
    end
    if keep == nil or older(need, keep) then keep = need end
  end
  redis.call('XTRIM', KEYS[1], 'MINID', '~', keep)
end
return id
"""

# While nothing on the local bus receives an imported topic, look again this often, and
# warn once when that has lasted this long.
_NOBODY_POLL_SEC: Final = 0.05
_NOBODY_WARN_SEC: Final = 10.0


def _check_name(what: str, value: object) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise UsageError(f"{what} must be 1-128 letters, digits, '_', '.', ':', '-'")
    return value


def _check_topics(what: str, topics: object) -> tuple[str, ...]:
    if isinstance(topics, str) or not isinstance(topics, Sequence):
        raise UsageError(f"{what} must be a sequence of topic names")
    for topic in topics:
        if not isinstance(topic, str):
            raise UsageError(f"{what} must hold topic names (str)")
        Topic(topic)  # validates; patterns are not streams
    return tuple(topics)


@dataclass(frozen=True, slots=True)
class _Entry:
    stream: str
    entry_id: str


class RedisStreamsBridge:
    """Carries a bus's messages between processes over Redis Streams.

    * **Export.** Every message published on the local bus on one of ``export_topics`` is
      appended to the stream of each of its exported topics (``{prefix}:{topic}``) before
      ``publish`` returns: a durable hand-off, like an outbox sink. When a consumer group's
      backlog on that stream reaches ``maxlen``, ``publish`` raises
      :class:`~converge.errors.BusFullError` (backpressure across processes). Once a
      stream holds more than ``maxlen`` entries, an export trims those every group has
      acknowledged; an entry some group read and did not acknowledge is kept however
      much traffic follows it (a dead consumer's, until it is claimed). A stream no
      group reads yet keeps its newest ``maxlen`` entries.
    * **Import.** For each of ``import_topics``, the bridge reads the stream in consumer
      group ``group`` (one group per role: processes running the same agents share a group
      and split the work) and publishes each message on the local bus with its original
      id, waiting for inbox space. An entry is acknowledged (``XACK``) only once the local
      bus settles the message, that is when every acking subscriber (an
      :class:`~converge.runtime.AgentRunner` acknowledges after its decisions are
      durable) has acknowledged it. A message a subscriber gives up (``adead_letter``) is
      acknowledged too and copied to ``{prefix}:dead``. It reads only while something on
      the local bus receives the topic (a subscription or a sink), so it may be entered
      before the runner; a message whose receiver went away as it was read (a runner
      stopping first) stays pending, for another consumer to claim.
    * **Dead consumers.** Entries read by a consumer that then died stay pending in
      Redis; every ``claim_idle_sec`` the bridge takes over those idle that long
      (``XAUTOCLAIM``) and delivers them again, same message ids: at-least-once, with the
      runner's decision records making the effects happen once. An entry deleted from
      the stream before it was acknowledged (``XDEL`` by another program) is logged as
      an error when its claim finds it gone.

    Messages keep their hooks' semantics: ``pre_send`` hooks run in the publishing process,
    and the receiving bus runs its own hooks when the bridge publishes there.

    Use it as an async context manager on the loop that runs the bus::

        async with RedisStreamsBridge(bus, "redis://localhost:6379/0",
                                      import_topics=["issues.opened"], group="triage"):
            async with AgentRunner(bus, [agent]) as runner:
                ...

    Args:
        bus: The local bus.
        url: ``redis://``, ``rediss://`` or ``unix://`` URL.
        export_topics: Topic names whose local messages go to Redis.
        import_topics: Topic names read from Redis into the local bus.
        group: The consumer group of this process's role (needed to import).
        consumer: This process's consumer name in the group; host and pid by default.
        prefix: Stream key prefix.
        maxlen: The most entries a group may have outstanding on a stream.
        batch: Most entries read at once.
        block_sec: How long one read waits for new entries.
        claim_idle_sec: Pending entries idle this long are taken from their consumer.
        timeout_sec: Seconds an export (its ``XADD``) or an acknowledgement may take.

    A ``publish`` whose export fails raises converge's store errors: Redis unreachable,
    :class:`~converge.errors.StoreUnavailableError` (nothing was added); no answer
    within ``timeout_sec``, :class:`~converge.errors.StoreOutcomeUnknownError` (the
    entry may have been added: publishing again is safe, as consumers take a message
    id once); another Redis error, :class:`~converge.errors.StoreError`.

    Raises:
        UsageError: For invalid arguments.
        MissingDependencyError: Without coredis (``pip install -e ".[redis]"``).
    """

    def __init__(
        self,
        bus: MessageBus,
        url: str,
        *,
        export_topics: Sequence[str] = (),
        import_topics: Sequence[str] = (),
        group: str | None = None,
        consumer: str | None = None,
        prefix: str = "converge:bus",
        maxlen: int = 100_000,
        batch: int = 64,
        block_sec: float = 1.0,
        claim_idle_sec: float = 30.0,
        timeout_sec: float = 10.0,
    ) -> None:
        if not isinstance(bus, MessageBus):
            raise UsageError("bus must be a MessageBus")
        check_redis_url(url)
        self.bus = bus
        self.export_topics = _check_topics("export_topics", export_topics)
        self.import_topics = _check_topics("import_topics", import_topics)
        if self.import_topics and group is None:
            raise UsageError("importing topics needs a consumer group name (group=...)")
        self.group = _check_name("group", group) if group is not None else None
        self.consumer = _check_name(
            "consumer", consumer if consumer is not None else f"{os.uname().nodename}-{os.getpid()}"
        )
        self.prefix = _check_name("prefix", prefix)
        self.maxlen = int(check_positive("maxlen", maxlen, integer=True))
        self.batch = int(check_positive("batch", batch, integer=True))
        self.block_ms = max(1, int(check_positive("block_sec", block_sec) * 1000))
        self.claim_idle_ms = max(1, int(check_positive("claim_idle_sec", claim_idle_sec) * 1000))
        self.timeout_sec = check_positive("timeout_sec", timeout_sec)
        self._server = repr(masked_url(url))
        try:
            import coredis
        except ImportError as exc:  # pragma: no cover - the dev extra installs coredis
            raise MissingDependencyError(
                "RedisStreamsBridge needs coredis: "
                "pip install -e '.[redis]' (from a converge checkout)"
            ) from exc
        self._client: Any = coredis.Redis.from_url(
            url, decode_components=True, decode_responses=True
        )
        self._add: Any = None
        # message id -> the stream entries it came from, until the local bus settles it
        self._inflight: dict[str, list[_Entry]] = {}
        self._task_group: anyio.abc.TaskGroup | None = None

    def stream(self, topic: str) -> str:
        """The stream key of ``topic``."""
        return f"{self.prefix}:{topic}"

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> RedisStreamsBridge:
        if self._task_group is not None:
            raise UsageError("a RedisStreamsBridge is entered once")
        await self._client.__aenter__()
        try:
            with anyio.move_on_after(self.timeout_sec):
                await warn_if_lossy(
                    self._client,
                    server=self._server,
                    holds="stream entries (messages between processes)",
                )
            self._add = self._client.register_script(_ADD_SCRIPT)
            for topic in self.import_topics:
                await self._create_group(self.stream(topic))
            self.bus.add_ack_listener(self)
            if self.export_topics:
                self.bus.add_sink(list(self.export_topics), self._export)
            tg = anyio.create_task_group()
            await tg.__aenter__()
            self._task_group = tg
            for topic in self.import_topics:
                tg.start_soon(self._import_loop, topic)
        except BaseException:
            await self._client.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.bus.remove_sink(self._export)
        self.bus.remove_ack_listener(self)
        tg, self._task_group = self._task_group, None
        try:
            if tg is not None:
                tg.cancel_scope.cancel()
                await tg.__aexit__(None, None, None)
        finally:
            await self._client.__aexit__(exc_type, exc, tb)

    async def _create_group(self, stream: str) -> None:
        import coredis.exceptions

        # the group may exist: created by another process of the same role
        with contextlib.suppress(coredis.exceptions.StreamDuplicateConsumerGroupError):
            await self._client.xgroup_create(stream, self.group, identifier="0", mkstream=True)

    # -- export ------------------------------------------------------------------------

    async def _export(self, message: Message) -> None:
        if message.id in self._inflight:
            return  # imported from Redis: it is already there
        data = json.dumps(message.to_dict(), separators=(",", ":"))
        for topic in message.topics:
            if topic.name not in self.export_topics:
                continue
            stream = self.stream(topic.name)
            try:
                with anyio.fail_after(self.timeout_sec):
                    added = await self._add(keys=[stream], args=[self.maxlen, data])
            except Exception as exc:
                mapped = redis_error(
                    exc, server=self._server, timeout=self.timeout_sec, write_key=stream
                )
                if mapped is None:
                    raise
                raise mapped from exc
            if not added:
                raise BusFullError(
                    f"a consumer group of {stream} has {self.maxlen} messages outstanding; "
                    "retry later (or raise maxlen)"
                )

    # -- import ------------------------------------------------------------------------

    async def _import_loop(self, topic: str) -> None:
        import coredis.exceptions

        stream = self.stream(topic)
        # Entries are read only while something on the local bus receives the topic: one
        # read with nobody to take it would sit in this consumer's pending list until
        # another claimed it (before, it was acknowledged, and the message lost).
        probe = Message(sender="converge.redis-streams", topics=(Topic(topic),))
        next_claim = anyio.current_time()
        lost = False
        while True:
            await self._await_receiver(probe, stream)
            try:
                if lost:
                    await self._create_group(stream)
                    lost = False
                if anyio.current_time() >= next_claim:
                    await self._claim_idle(stream)
                    next_claim = anyio.current_time() + self.claim_idle_ms / 2000
                block = min(self.block_ms, max(1, int((next_claim - anyio.current_time()) * 1000)))
                found = await self._client.xreadgroup(
                    self.group, self.consumer, {stream: ">"}, count=self.batch, block=block
                )
                for entry in (found or {}).get(stream, ()):
                    await self._deliver(stream, entry.identifier, entry.field_values)
            except (coredis.exceptions.StreamConsumerGroupError, coredis.exceptions.UnblockedError):
                # The stream or its group is gone: Redis lost its data (restarted without
                # persistence, flushed) or someone deleted them. What they held is gone
                # with them; the group is made again, so what comes next is carried.
                _log.warning("redis streams: %s lost its consumer group; creating it again", stream)
                lost = True
            except (
                coredis.exceptions.ConnectionError,
                coredis.exceptions.ReadOnlyError,  # a primary turned replica (failover)
                OSError,
                TimeoutError,
            ) as exc:
                _log.warning("redis streams: reading %s failed (%s); retrying", stream, exc)
                await anyio.sleep(1.0)

    async def _await_receiver(self, probe: Message, stream: str) -> None:
        """Return once something on the bus receives ``probe``'s topic (at once, mostly)."""
        since, warned = anyio.current_time(), False
        while not self.bus.has_subscribers(probe):
            if not warned and anyio.current_time() - since >= _NOBODY_WARN_SEC:
                warned = True
                _log.warning(
                    "redis streams: nothing on the local bus receives %r; not reading %s "
                    "until something does",
                    probe.topics[0].name,
                    stream,
                )
            await anyio.sleep(_NOBODY_POLL_SEC)

    async def _claim_idle(self, stream: str) -> None:
        start = "0-0"
        while True:
            reply = await self._client.xautoclaim(
                stream, self.group, self.consumer, self.claim_idle_ms, start, count=self.batch
            )
            start, entries = reply[0], reply[1]
            if len(reply) > 2 and reply[2]:
                # Redis dropped them from the group's pending list as it answered: only
                # this log line is left of them.
                _log.error(
                    "redis streams: %d entries of %s were deleted (XDEL, or a trim by "
                    "another program) before group %s acknowledged them; their messages "
                    "are lost: %s",
                    len(reply[2]),
                    stream,
                    self.group,
                    ", ".join(reply[2]),
                )
            for entry in entries:
                await self._deliver(stream, entry.identifier, entry.field_values)
            if start == "0-0" or not entries:
                return

    async def _deliver(self, stream: str, entry_id: str, fields: Any) -> None:
        entry = _Entry(stream, entry_id)
        try:
            message = Message.from_dict(json.loads(fields["m"]))
        except Exception as exc:  # a foreign or damaged entry: set it aside, never loop on it
            _log.error("redis streams: entry %s of %s is not a message: %s", entry_id, stream, exc)
            await self._bury(entry, {"entry": entry_id, "error": "not a converge message"})
            return
        held = self._inflight.setdefault(message.id, [])
        if entry in held:
            return  # reclaimed while still being handled here
        held.append(entry)
        try:
            delivered = await self.bus.publish(message, wait=True)
        except BaseException:
            self._let_go(message.id, entry)
            raise
        if delivered:
            return
        if not self.bus.has_subscribers(message):
            # Its receiver went away while it was read (a runner stopping first): leave
            # it pending; a live consumer claims it after claim_idle_sec.
            self._let_go(message.id, entry)
            return
        # a hook dropped it: the bus settles nothing for a publish that reached nobody,
        # so acknowledge it now
        await self.on_settled(message)

    def _let_go(self, message_id: str, entry: _Entry) -> None:
        """Forget ``entry`` of a message not handed on: it stays pending in Redis."""
        held = self._inflight[message_id]
        held.remove(entry)
        if not held:
            del self._inflight[message_id]

    async def _bury(self, entry: _Entry, record: dict[str, Any]) -> None:
        with anyio.fail_after(self.timeout_sec):
            await self._client.xadd(
                f"{self.prefix}:dead",
                {"m": json.dumps({**record, "stream": entry.stream}, separators=(",", ":"))},
                trim_strategy=_maxlen_token(),
                threshold=self.maxlen,
            )
        await self._ack(entry)

    async def _ack(self, entry: _Entry) -> None:
        # Not acknowledged (Redis down, no answer in time): the entry stays pending and is
        # claimed and delivered again, and its consumer takes that message id once.
        with anyio.fail_after(self.timeout_sec):
            await self._client.xack(entry.stream, self.group, [entry.entry_id])

    # -- the bus's acknowledgements (AckListener) --------------------------------------

    async def on_settled(self, message: Message) -> None:
        """Every local acking subscriber is done with ``message``: ``XACK`` its entries."""
        _check_message(message)
        for entry in self._inflight.pop(message.id, ()):
            await self._ack(entry)

    async def on_dead(self, message: Message, consumer: str, reason: str) -> None:
        """A local subscriber gave ``message`` up: keep it in ``{prefix}:dead``, ``XACK``."""
        _check_message(message)
        for entry in self._inflight.pop(message.id, ()):
            await self._bury(
                entry, {"message": message.to_dict(), "consumer": consumer, "reason": reason}
            )


def _check_message(message: object) -> None:
    if not isinstance(message, Message):  # the bus calls these with the settled Message
        raise UsageError(f"message must be a Message, not {type(message).__name__}")


def _maxlen_token() -> Any:
    from coredis.tokens import PureToken

    return PureToken.MAXLEN
