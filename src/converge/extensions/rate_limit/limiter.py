"""``RateLimiter``: token buckets per direction for the whole flow, each sender and each topic."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio

from converge._numbers import wait_seconds
from converge._repr import safe_repr
from converge.core.message import Message
from converge.core.store import Store
from converge.errors import (
    ConfigurationError,
    RateLimitTimeoutError,
    StoreCorruptedError,
    SyncInEventLoopError,
    UsageError,
)
from converge.extensions.rate_limit import _script
from converge.extensions.rate_limit.bucket import NEVER as _NEVER
from converge.extensions.rate_limit.bucket import BucketParams, TokenBucketConfig, reserve

__all__ = ["DIRECTIONS", "RateLimiter"]

#: The directions a message can be checked in: leaving an agent, or reaching one.
DIRECTIONS: tuple[str, ...] = ("egress", "ingress")

_NS = 1_000_000_000
# The in-memory buckets of a kind (senders, topics) live in this many dicts, picked by
# the key's hash: one dict of 700,000 buckets took 30-38 ms to grow (a resize rehashes
# every entry at once), a 64th of it well under a millisecond.
_SHARDS = 64
_SHARD_MASK = _SHARDS - 1  # written out as 63 on the hot path
# A shard is swept (full buckets forgotten) once it holds this many entries, and then
# again whenever it doubles; sweeping is O(live buckets of the shard), so the amortised
# cost per decision stays O(1) and memory stays within ~2x the live buckets.
_SWEEP_MIN = 16
# Store keys expire this long after their bucket is full again: clocks of the limiter and
# the store differ slightly, and a full bucket lingering a little longer reads the same.
_TTL_MARGIN_S = 1.0
# A TTL longer than this (a non-refilling bucket) is not worth setting.
_TTL_MAX_S = 1e9

_Ref = tuple[dict[str, int], str]
# (wait, [(old_tat, new_tat) per bucket] or None when not admitted); the tats are ints,
# or the script's strings of microseconds on a Redis store
_Outcome = tuple[int, list[tuple[Any, Any]] | None]


class _Table:
    """The in-memory buckets of one kind (key to TAT), in ``_SHARDS`` dicts."""

    __slots__ = ("limits", "shards")

    def __init__(self) -> None:
        self.shards: list[dict[str, int]] = [{} for _ in range(_SHARDS)]
        # per shard: it is swept once it holds more buckets than this
        self.limits = [_SWEEP_MIN] * _SHARDS

    def shard(self, key: str) -> dict[str, int]:
        """The dict holding ``key``'s bucket."""
        return self.shards[hash(key) & _SHARD_MASK]

    def settle(self, key: str, now: int) -> None:
        """Sweep the shard of ``key`` (just written) if it has grown past its limit."""
        index = hash(key) & _SHARD_MASK
        shard = self.shards[index]
        if len(shard) > self.limits[index]:
            self.limits[index] = _sweep(shard, now)

    def __len__(self) -> int:
        return sum(len(shard) for shard in self.shards)


def _sweep(shard: dict[str, int], now: int) -> int:
    """Forget the full buckets of ``shard``; return its next sweep threshold."""
    for key in [k for k, tat in shard.items() if tat <= now]:
        del shard[key]
    return max(_SWEEP_MIN, 2 * len(shard))


class _Lane:
    """The in-memory buckets of one direction, and its store key prefixes."""

    __slots__ = (
        "glob",
        "prefix",
        "sender_limits",
        "sender_shards",
        "senders",
        "topic_limits",
        "topic_shards",
        "topics",
    )

    def __init__(self, prefix: str) -> None:
        self.glob: dict[str, int] = {}
        self.senders = _Table()
        self.topics = _Table()
        # the tables' lists again, one attribute away for the hot path
        self.sender_shards, self.sender_limits = self.senders.shards, self.senders.limits
        self.topic_shards, self.topic_limits = self.topics.shards, self.topics.limits
        self.prefix = prefix


def _check_config(name: str, value: object) -> BucketParams | None:
    if value is None:
        return None
    if not isinstance(value, TokenBucketConfig):
        raise ConfigurationError(f"{name} must be a TokenBucketConfig or None")
    return value.params()


def _timeout_ns(timeout: object) -> int | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise UsageError(f"timeout must be a number of seconds or None, not {safe_repr(timeout)}")
    seconds = wait_seconds(timeout)
    if seconds is None:
        raise UsageError(f"timeout must be >= 0 seconds, got {safe_repr(timeout)}")
    if math.isinf(seconds):
        return None
    return math.ceil(seconds * _NS)


def _seconds(wait: int) -> float:
    return math.inf if wait == _NEVER else wait / _NS


class RateLimiter:
    """Token-bucket rate limiting of messages, per direction.

    A message checked in a direction (``"egress"`` when it leaves an agent, ``"ingress"``
    when it reaches one) takes one token from every bucket it touches in that direction:
    the global bucket, its sender's bucket and one bucket per distinct topic, each only
    when the matching config is given. It takes a token from **all of them or from
    none**: a denied message never drains the buckets it did pass.

    Without a ``store``, buckets live in memory: a decision is a few integer operations
    under a short lock, with no store round trip and no thread hop, so the sync methods
    work anywhere (the event-loop thread included). Full buckets are forgotten, so memory
    stays bounded by the buckets that are actually partly drained, however many senders
    and topics pass through.

    With a ``store``, each decision is one :meth:`~converge.core.store.Store.aupdate` over
    all the buckets the message touches; with a store whose ``supports_locking`` is true
    (``FileStore(locking=True)``, ``SQLiteStore``) the decision is atomic across every
    process sharing the store. Bucket keys carry a TTL that lets them expire once full.

    On a store that runs server-side scripts (``RedisStore``, which has ``arun_script``)
    and with the default clock, each decision is instead one Lua script on the server:
    one round trip, no optimistic retries, and the server's clock (``TIME``) for every
    process and host. A custom ``clock`` keeps the ``aupdate`` path (virtual time cannot
    reach the server).

    Args:
        store: Shared bucket state; None keeps buckets in this object's memory.
        global_config: One bucket shared by every message (per direction).
        sender_config: One bucket per ``message.sender`` (per direction).
        topic_config: One bucket per topic name (per direction).
        clock: Integer nanoseconds from a clock that never goes backwards. Defaults to
            ``time.monotonic_ns`` in memory and ``time.time_ns`` with a store (processes,
            or hosts, sharing a store must share a clock). It may be called from a
            worker thread.
        sleep: ``await sleep(seconds)``, used by :meth:`acquire_message`; defaults to
            ``anyio.sleep``. Tests pass one that advances a virtual clock.
        key_prefix: Prefix of the store keys.

    Raises:
        ConfigurationError: If a config is not a :class:`TokenBucketConfig`.
        UsageError: For a store that is not a ``Store``, a non-callable clock or sleep, or
            an empty key prefix.
    """

    def __init__(
        self,
        *,
        store: Store | None = None,
        global_config: TokenBucketConfig | None = None,
        sender_config: TokenBucketConfig | None = None,
        topic_config: TokenBucketConfig | None = None,
        clock: Callable[[], int] | None = None,
        sleep: Callable[[float], Awaitable[Any]] | None = None,
        key_prefix: str = "converge:ratelimit:",
    ) -> None:
        if store is not None and not isinstance(store, Store):
            raise UsageError("store must be a converge Store or None")
        if clock is not None and not callable(clock):
            raise UsageError("clock must be a callable returning integer nanoseconds")
        if sleep is not None and not callable(sleep):
            raise UsageError("sleep must be an async callable taking seconds")
        if not isinstance(key_prefix, str) or not key_prefix:
            raise UsageError("key_prefix must be a non-empty string")
        self.store = store
        self.global_config = global_config
        self.sender_config = sender_config
        self.topic_config = topic_config
        self._global = _check_config("global_config", global_config)
        self._sender = _check_config("sender_config", sender_config)
        self._topic = _check_config("topic_config", topic_config)
        default_clock = time.monotonic_ns if store is None else time.time_ns
        self._clock: Callable[[], int] = clock if clock is not None else default_clock
        self._sleep: Callable[[float], Awaitable[Any]] = sleep if sleep is not None else anyio.sleep
        self._lock = threading.Lock()
        self._lanes: dict[str, _Lane] = {d: _Lane(f"{key_prefix}{d}:") for d in DIRECTIONS}
        self._tolerance = max(
            (p.tolerance for p in (self._global, self._sender, self._topic) if p is not None),
            default=0,
        )
        # One Lua script per decision when the store can run one, on the server's clock.
        self._scripted = (
            store is not None and clock is None and callable(getattr(store, "arun_script", None))
        )
        g, s, t = (
            None if c is None else _script.micro_params(c)
            for c in (global_config, sender_config, topic_config)
        )
        self._micro = (g, s, t)

    def __repr__(self) -> str:
        return (
            f"RateLimiter(store={self.store!r}, global_config={self.global_config!r}, "
            f"sender_config={self.sender_config!r}, topic_config={self.topic_config!r})"
        )

    # -- argument checks ---------------------------------------------------------------

    def _lane(self, message: object, direction: object) -> _Lane:
        try:
            lane = self._lanes.get(direction)  # type: ignore[call-overload]
        except TypeError:
            lane = None
        if lane is None:
            raise UsageError(f"direction must be 'egress' or 'ingress', got {safe_repr(direction)}")
        if not isinstance(message, Message):
            raise UsageError(f"expected a converge Message, got {type(message).__name__}")
        result: _Lane = lane
        return result

    # -- the decision ------------------------------------------------------------------

    def allow_message(self, message: Message, *, direction: str) -> bool:
        """Take one token from every bucket ``message`` touches, or from none.

        Args:
            message: The message to admit.
            direction: ``"egress"`` or ``"ingress"``.

        Returns:
            True if admitted (tokens taken), False if any bucket is short (none taken).

        Raises:
            UsageError: For an unknown direction or a non-Message.
            SyncInEventLoopError: With a blocking store, on the event-loop thread (await
                :meth:`aallow_message` there).
            StoreError: If the store fails or holds a corrupt bucket.
        """
        # _lane() inlined: this is the hot path
        try:
            lane = self._lanes[direction]
        except (KeyError, TypeError):
            lane = self._lane(message, direction)  # raises the UsageError
        if not isinstance(message, Message):
            self._lane(message, direction)
        if self.store is not None:
            return self._store_call(lane, message, 0, "aallow_message")[1] is not None
        return self._allow_local(lane, message)

    async def aallow_message(self, message: Message, *, direction: str) -> bool:
        """Async form of :meth:`allow_message`.

        In memory this completes without a thread hop or store round trip; with a store it
        is one ``aupdate``.
        """
        try:
            lane = self._lanes[direction]
        except (KeyError, TypeError):
            lane = self._lane(message, direction)  # raises the UsageError
        if not isinstance(message, Message):
            self._lane(message, direction)
        if self.store is not None:
            return (await self._astore_reserve(lane, message, 0))[1] is not None
        return self._allow_local(lane, message)

    def _allow_local(self, lane: _Lane, message: Message) -> bool:
        # The hot path: `reserve` inlined for max_wait == 0, nothing allocated except for
        # messages with several topics. acquire/release rather than `with`: measurably
        # cheaper per call.
        gp, sp, tp = self._global, self._sender, self._topic
        lock = self._lock
        lock.acquire()
        try:
            now = self._clock()
            if gp is not None:
                tat = lane.glob.get("", 0)
                new_g = (tat if tat > now else now) + gp.interval
                if new_g - now > gp.tolerance:
                    return False
            if sp is not None:
                sender = message.sender
                shard = hash(sender) & 63  # _SHARD_MASK
                senders = lane.sender_shards[shard]
                tat = senders.get(sender, 0)
                new_s = (tat if tat > now else now) + sp.interval
                if new_s - now > sp.tolerance:
                    return False
            if tp is not None and message.topics:
                interval, tolerance = tp.interval, tp.tolerance
                names = message.topics
                if len(names) == 1:
                    name = names[0].name
                    index = hash(name) & 63  # _SHARD_MASK
                    named = lane.topic_shards[index]
                    tat = named.get(name, 0)
                    new_t = (tat if tat > now else now) + interval
                    if new_t - now > tolerance:
                        return False
                    named[name] = new_t
                    if len(named) > lane.topic_limits[index]:
                        lane.topic_limits[index] = _sweep(named, now)
                else:
                    topics, news = lane.topics, {}
                    for topic in names:
                        name = topic.name
                        if name not in news:
                            tat = topics.shard(name).get(name, 0)
                            new_t = (tat if tat > now else now) + interval
                            if new_t - now > tolerance:
                                return False
                            news[name] = new_t
                    for name, new_t in news.items():
                        topics.shard(name)[name] = new_t
                        topics.settle(name, now)
            if gp is not None:
                lane.glob[""] = new_g
            if sp is not None:
                senders[sender] = new_s
                if len(senders) > lane.sender_limits[shard]:
                    lane.sender_limits[shard] = _sweep(senders, now)
            return True
        finally:
            lock.release()

    # -- the generic path: retry_after and acquire -------------------------------------

    def _plan(self, lane: _Lane, message: Message) -> tuple[list[_Ref], list[BucketParams]]:
        refs: list[_Ref] = []
        params: list[BucketParams] = []
        if self._global is not None:
            refs.append((lane.glob, ""))
            params.append(self._global)
        if self._sender is not None:
            refs.append((lane.senders.shard(message.sender), message.sender))
            params.append(self._sender)
        if self._topic is not None:
            for name in dict.fromkeys(t.name for t in message.topics):
                refs.append((lane.topics.shard(name), name))
                params.append(self._topic)
        return refs, params

    def _store_keys(
        self, lane: _Lane, message: Message, configs: tuple[Any, Any, Any] | None = None
    ) -> tuple[list[str], list[Any]]:
        """The bucket keys ``message`` touches, with their params (``configs``: another
        form of the three, such as the script's microseconds)."""
        g, s, t = configs if configs is not None else (self._global, self._sender, self._topic)
        keys: list[str] = []
        params: list[Any] = []
        if g is not None:
            keys.append(lane.prefix + "global")
            params.append(g)
        if s is not None:
            keys.append(lane.prefix + "sender:" + message.sender)
            params.append(s)
        if t is not None:
            for name in dict.fromkeys(topic.name for topic in message.topics):
                keys.append(lane.prefix + "topic:" + name)
                params.append(t)
        return keys, params

    def _reserve_local(
        self, lane: _Lane, message: Message, max_wait: int | None
    ) -> tuple[int, list[tuple[_Ref, int, int]] | None]:
        refs, params = self._plan(lane, message)
        with self._lock:
            now = self._clock()
            tats = [table.get(key, 0) for table, key in refs]
            wait, new = reserve(tats, now, params, max_wait)
            if new is None:
                return wait, None
            for (table, key), tat in zip(refs, new, strict=True):
                table[key] = tat
            if self._sender is not None:
                lane.senders.settle(message.sender, now)
            if self._topic is not None:
                for topic in message.topics:
                    lane.topics.settle(topic.name, now)
            return wait, list(zip(refs, tats, new, strict=True))

    def _release_local(self, taken: list[tuple[_Ref, int, int]]) -> None:
        # Give a cancelled reservation back, bucket by bucket, only where nobody reserved
        # after it: later reservations were timed assuming this one, so undoing it under
        # them would let two messages through in one slot.
        with self._lock:
            now = self._clock()
            for (table, key), old, mine in taken:
                if table.get(key) == mine:
                    if old > now:
                        table[key] = old
                    else:
                        del table[key]

    def retry_after(self, message: Message, *, direction: str) -> float:
        """Seconds until :meth:`allow_message` would admit ``message`` (nothing is taken).

        Returns:
            ``0.0`` if it would be admitted now, ``math.inf`` if it never can be
            (capacity below one token, or a drained bucket that does not refill).

        Raises:
            UsageError: For an unknown direction or a non-Message.
        """
        lane = self._lane(message, direction)
        if self.store is not None:
            return _seconds(self._store_call(lane, message, -1, "aretry_after")[0])
        refs, params = self._plan(lane, message)
        with self._lock:
            now = self._clock()
            wait, _ = reserve([t.get(k, 0) for t, k in refs], now, params, -1)
        return _seconds(wait)

    async def aretry_after(self, message: Message, *, direction: str) -> float:
        """Async form of :meth:`retry_after`."""
        lane = self._lane(message, direction)
        if self.store is None:
            return self.retry_after(message, direction=direction)
        return _seconds((await self._astore_reserve(lane, message, -1))[0])

    async def acquire_message(
        self,
        message: Message,
        *,
        direction: str,
        timeout: float | None = None,  # noqa: ASYNC109 - a wait bound the API documents
    ) -> float:
        """Wait until ``message`` is admitted, then return.

        The tokens are reserved at once, in arrival order, for the earliest instant every
        bucket can give one; the call then sleeps exactly until that instant (no polling).
        Waiters are therefore served first come, first served, also across processes
        sharing a store. If the call is cancelled while sleeping, its reservation is given
        back where no later waiter depends on it.

        Args:
            message: The message to admit.
            direction: ``"egress"`` or ``"ingress"``.
            timeout: Longest wait in seconds; None waits as long as needed.

        Returns:
            The seconds waited (0.0 when admitted at once).

        Raises:
            RateLimitTimeoutError: At once, without taking anything, when the wait would
                exceed ``timeout`` or the message can never be admitted; its
                ``retry_after`` is the wait needed (``math.inf`` for never).
            UsageError: For an unknown direction, a non-Message or a negative timeout.
        """
        lane = self._lane(message, direction)
        max_wait = _timeout_ns(timeout)
        if self.store is not None:
            return await self._acquire_store(lane, message, max_wait, timeout)
        wait, taken = self._reserve_local(lane, message, max_wait)
        if taken is None:
            raise _timeout_error(wait, timeout)
        if wait:
            try:
                await self._sleep(wait / _NS)
            except BaseException:
                self._release_local(taken)
                raise
        return wait / _NS

    # -- store-backed decisions --------------------------------------------------------

    def _update_fn(
        self, keys: list[str], params: list[BucketParams], max_wait: int | None
    ) -> Callable[[dict[str, Any | None]], tuple[Mapping[str, Any], _Outcome]]:
        clock = self._clock

        def decide(current: dict[str, Any | None]) -> tuple[dict[str, Any], _Outcome]:
            now = clock()
            tats = [_stored_tat(k, current.get(k)) for k in keys]
            wait, new = reserve(tats, now, params, max_wait)
            if new is None:
                return {}, (wait, None)
            return dict(zip(keys, new, strict=True)), (wait, list(zip(tats, new, strict=True)))

        return decide

    def _ttl(self, max_wait: int | None) -> float | None:
        seconds = (self._tolerance + max(max_wait or 0, 0)) / _NS + _TTL_MARGIN_S
        return None if seconds > _TTL_MAX_S else seconds

    def _store_call(
        self, lane: _Lane, message: Message, max_wait: int, async_name: str
    ) -> _Outcome:
        assert self.store is not None
        if self._scripted:
            keys, micro = self._store_keys(lane, message, self._micro)
            if not keys:
                return 0, []
            args = _script.reserve_args(micro, max_wait, self._ttl(max_wait))
            try:
                reply = self.store.run_script(_script.RESERVE, keys, args)  # type: ignore[attr-defined]
            except SyncInEventLoopError:
                raise SyncInEventLoopError(
                    "this rate limiter's store blocks; on the event-loop thread use "
                    f"'await RateLimiter.{async_name}(...)' instead"
                ) from None
            return _decoded(keys, reply)
        keys, params = self._store_keys(lane, message)
        if not keys:
            return 0, []
        try:
            return self.store.update(
                keys, self._update_fn(keys, params, max_wait), ttl=self._ttl(max_wait)
            )
        except SyncInEventLoopError:
            raise SyncInEventLoopError(
                "this rate limiter's store blocks; on the event-loop thread use "
                f"'await RateLimiter.{async_name}(...)' instead"
            ) from None

    async def _ascript(self, keys: list[str], micro: list[Any], max_wait: int | None) -> _Outcome:
        """One decision as one script on the server (see :mod:`._script`)."""
        args = _script.reserve_args(micro, max_wait, self._ttl(max_wait))
        reply = await self.store.arun_script(_script.RESERVE, keys, args)  # type: ignore[union-attr]
        return _decoded(keys, reply)

    async def _astore_reserve(self, lane: _Lane, message: Message, max_wait: int) -> _Outcome:
        assert self.store is not None
        if self._scripted:
            keys, micro = self._store_keys(lane, message, self._micro)
            return await self._ascript(keys, micro, max_wait) if keys else (0, [])
        keys, params = self._store_keys(lane, message)
        if not keys:
            return 0, []
        return await self.store.aupdate(
            keys, self._update_fn(keys, params, max_wait), ttl=self._ttl(max_wait)
        )

    async def _acquire_store(
        self,
        lane: _Lane,
        message: Message,
        max_wait: int | None,
        timeout: float | None,  # noqa: ASYNC109 - only named in the error message
    ) -> float:
        assert self.store is not None
        keys, params = self._store_keys(lane, message, self._micro if self._scripted else None)
        if not keys:
            return 0.0
        # The TTL must outlast the wait, which is known only inside the update: try with
        # the given bound (0 when unbounded) and, when unbounded, retry with a bound that
        # covers the wait just seen.
        bound = 0 if max_wait is None else max_wait
        while True:
            if self._scripted:
                wait, taken = await self._ascript(keys, params, bound)
            else:
                wait, taken = await self.store.aupdate(
                    keys, self._update_fn(keys, params, bound), ttl=self._ttl(bound)
                )
            if taken is not None or max_wait is not None or wait == _NEVER:
                break
            bound = max(2 * wait, wait + _NS)
        if taken is None:
            raise _timeout_error(wait, timeout)
        if wait:
            try:
                await self._sleep(wait / _NS)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._release_store(keys, taken, bound)
                raise
        return wait / _NS

    async def _release_store(
        self, keys: list[str], taken: list[tuple[Any, Any]], bound: int
    ) -> None:
        assert self.store is not None
        if self._scripted:
            args = _script.release_args(taken, self._ttl(bound))
            await self.store.arun_script(_script.RELEASE, keys, args)  # type: ignore[attr-defined]
            return
        clock = self._clock

        def give_back(current: dict[str, Any | None]) -> tuple[dict[str, Any], None]:
            # same rule as _release_local: only where nobody reserved after us
            now = clock()
            changes: dict[str, Any] = {}
            for key, (old, mine) in zip(keys, taken, strict=True):
                if current.get(key) == mine:
                    changes[key] = old if old > now else None
            return changes, None

        await self.store.aupdate(keys, give_back, ttl=self._ttl(bound))


def _decoded(keys: list[str], reply: object) -> _Outcome:
    try:
        decoded = _script.parse_reserve(reply)
    except (ValueError, TypeError) as exc:
        raise StoreCorruptedError(keys[0], f"the rate-limit script answered {reply!r}") from exc
    if decoded.corrupt is not None:
        raise StoreCorruptedError(
            keys[decoded.corrupt], "a rate-limit bucket holds an integer timestamp"
        )
    return decoded.wait_ns, decoded.taken


def _stored_tat(key: str, value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise StoreCorruptedError(key, "a rate-limit bucket holds an integer timestamp")
    return value


def _timeout_error(wait: int, timeout: float | None) -> RateLimitTimeoutError:
    if wait == _NEVER:
        return RateLimitTimeoutError(
            "this message can never be admitted: a bucket's capacity is below one token "
            "or it is drained and does not refill",
            retry_after=math.inf,
        )
    return RateLimitTimeoutError(
        f"admitting this message needs a {wait / _NS:.6g} s wait, more than the "
        f"{timeout!r} s timeout",
        retry_after=wait / _NS,
    )
