"""RedisStore: a Store on a Redis server, shared by processes on many machines.

Built on `coredis <https://coredis.readthedocs.io>`_, which runs on anyio, so the same
store works under asyncio and trio. Install it with ``pip install -e ".[redis]"``.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import math
import os
import random
import re
import threading
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Final, TypeVar, cast

import anyio
import anyio.lowlevel
import anyio.to_thread

from converge._redis_durability import warn_if_lossy
from converge._redis_errors import redis_error
from converge._redis_url import check_redis_url, masked_url
from converge._sorting import sort_yielding
from converge._sync import LoopLocal, Portal, check_sync_allowed
from converge.core.store import (
    Store,
    UpdateFn,
    check_changes,
    split_change,
    validate_key,
    validate_prefix,
    validate_ttl,
)
from converge.errors import (
    ClosedError,
    MissingDependencyError,
    StoreCorruptedError,
    StoreError,
    UsageError,
)
from converge.extensions.storage import _redis_index
from converge.extensions.storage._codec import (
    SerializerName,
    check_keys,
    check_timeout,
    check_update,
    get_serializer,
    key_bytes,
    key_from_bytes,
)

try:
    import coredis
    import coredis.exceptions
    from coredis.response._callbacks import NoopCallback
    from coredis.retry import NoRetryPolicy
except ImportError as exc:  # pragma: no cover - the dev extra installs coredis
    raise MissingDependencyError(
        "RedisStore needs the coredis client: pip install -e '.[redis]' (from a converge checkout)"
    ) from exc

__all__ = ["RedisStore"]

T = TypeVar("T")
R = TypeVar("R")

_Client = coredis.Redis[bytes]
_GLOB_SPECIAL: Final = re.compile(rb"([\\*?\[\]])")
_SCAN_COUNT: Final = 1000
# Separates the namespace from the key; namespaces may not contain it, so the first one
# in a Redis key ends the namespace and no namespace can read or list another's keys.
_DELIMITER: Final = ":"
_UPDATE_ATTEMPTS: Final = 100
# Updates of one loop lock the stripes of their keys. 64 stripes made unrelated updates
# wait for each other: 32 concurrent inbound events, 8 keys each, collided so often that
# a gateway accepted 2,000 events/s with a p99 of 89 ms; with 65,536 (locks made on
# demand, dropped when free) 2,500/s and 14-17 ms.
_UPDATE_STRIPES: Final = 1 << 16


@contextlib.asynccontextmanager
async def _stripes_held(locks: dict[int, anyio.Lock], stripes: list[int]) -> AsyncIterator[None]:
    """Hold the locks of ``stripes`` (sorted, so that no two updates wait for each other
    in a cycle), each made on demand and dropped once nobody holds or awaits it (a lock
    passes straight to its next waiter when released).

    A free lock is taken without a checkpoint (0.5 µs, where ``async with lock`` took
    5.5 µs): the update awaits Redis anyway.
    """
    taken: list[anyio.Lock] = []
    try:
        for stripe in stripes:
            lock = locks.get(stripe)
            if lock is None:
                lock = locks[stripe] = anyio.Lock()
            try:
                lock.acquire_nowait()
            except anyio.WouldBlock:
                await lock.acquire()
            taken.append(lock)
        yield
    finally:
        for lock in reversed(taken):
            lock.release()
        for stripe in stripes:
            lock = locks.get(stripe)
            if lock is not None and not lock.locked():
                del locks[stripe]


class _LoopClient:
    """One event loop's client, and how many ``async with`` scopes hold its pool open."""

    __slots__ = ("client", "depth")

    def __init__(self, client: _Client) -> None:
        self.client = client
        self.depth = 0


class RedisStore(Store):
    """A Store on a Redis server (via coredis, on asyncio and trio).

    * ``put_if_absent`` is ``SET key value NX PX ttl`` in one script: atomic, so at most
      one caller wins across every process and machine sharing the server.
    * TTLs are Redis expiries (``PX``, milliseconds, server clock).
    * ``list(prefix)`` reads the prefix's index, which every write script keeps; the
      first listing of a prefix builds it with a ``SCAN`` (see :meth:`alist`).
    * Keys are stored as ``<namespace>:<key>``; a namespace may not contain ``:``, so
      stores (or applications) with different namespaces share one database and never
      see each other's keys (namespace ``"app"`` does not see ``"app2"``'s).

    Connections: coredis keeps connections in tasks of a task group, so a pool lives
    inside an ``async with`` scope. Enter the store once, in a task that outlives its use,
    and every task on that event loop shares one pool::

        async with RedisStore("redis://localhost:6379/0") as store:
            await store.aput("k", "v")

    Used without ``async with``, each async call opens (and closes) its own connection:
    correct, but a round trip slower. The sync methods run on an event loop owned by the
    store (a :class:`converge._sync.Portal`) that keeps one pool open until :meth:`close`.

    Args:
        url: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS) or
            ``unix:///path/to/socket``.
        namespace: Name separating this store's keys from others' in the database (for
            example ``"myapp"``; no ``:``). The default ``""`` stores keys as ``:<key>``.
        serializer: ``"pickle"`` or ``"json"`` (the safe choice if others can write to
            the server).
        connect_timeout: Seconds to wait for a connection.
        timeout: Seconds any one call may take in all, connecting included. Nothing is
            retried automatically: a write that got no answer in time raises
            :class:`~converge.errors.StoreOutcomeUnknownError`.

    Raises:
        UsageError: For an invalid argument or URL.
    """

    atomic_put_if_absent = True
    supports_locking = True

    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        *,
        namespace: str = "",
        serializer: SerializerName = "pickle",
        connect_timeout: float = 5.0,
        timeout: float = 10.0,
    ) -> None:
        check_redis_url(url)
        if not isinstance(namespace, str):
            raise UsageError(f"namespace must be str, not {type(namespace).__name__}")
        if _DELIMITER in namespace:
            raise UsageError(
                f"namespace {namespace!r} contains {_DELIMITER!r}, which separates the "
                f"namespace from the key in Redis (keys are stored as "
                f"'<namespace>{_DELIMITER}<key>'); drop it, e.g. namespace="
                f"{namespace.replace(_DELIMITER, '') or 'app'!r}"
            )
        self._url = url
        self._name = namespace
        self._namespace = key_bytes(namespace) + _DELIMITER.encode()
        self._scripts = _redis_index.index_scripts(self._namespace)
        self._serializer = get_serializer(serializer)
        self._connect_timeout = check_timeout(connect_timeout, "connect_timeout")
        self._timeout = check_timeout(timeout, "timeout")
        try:
            self._new_client()  # validates the URL; connects nothing
        except (ValueError, TypeError, coredis.exceptions.RedisError) as exc:
            raise UsageError(f"invalid Redis URL {self._safe_url}: {exc}") from exc
        self._update_locks: LoopLocal[dict[int, anyio.Lock]] = LoopLocal(dict)
        self._clients: LoopLocal[_LoopClient] = LoopLocal(lambda: _LoopClient(self._new_client()))
        self._portal = Portal()
        self._keeper_lock = threading.Lock()
        self._keeper: threading.Thread | None = None
        self._keeper_pid = 0
        self._keeper_stop: anyio.Event | None = None
        self._closed = False
        self._settings_read = False
        #: How many ``update`` attempts lost to a concurrent writer and ran again.
        self.update_conflicts = 0

    @property
    def namespace(self) -> str:
        """The namespace: keys are stored in Redis as ``<namespace>:<key>``."""
        return self._name

    @property
    def serializer(self) -> SerializerName:
        """``"pickle"`` or ``"json"``."""
        return self._serializer.name

    @property
    def _safe_url(self) -> str:
        return repr(masked_url(self._url))

    def __repr__(self) -> str:
        return f"RedisStore({self._safe_url}, namespace={self.namespace!r})"

    # -- connections -------------------------------------------------------------------

    def _new_client(self) -> _Client:
        return coredis.Redis.from_url(
            self._url,
            decode_components=True,  # a password may be percent-encoded, as URLs require
            decode_responses=False,
            connect_timeout=self._connect_timeout,
            stream_timeout=self._timeout,
            # Never resend a command on its own: a SET NX retried after a timeout can
            # find our own value and report it as someone else's.
            retry_policy=NoRetryPolicy(),
        )

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"{self!r} was closed")

    def _map_error(self, exc: BaseException, write_key: str | None = None) -> BaseException | None:
        """converge's error for ``exc``; a write that got no answer is an unknown outcome."""
        return redis_error(exc, server=self._safe_url, timeout=self._timeout, write_key=write_key)

    async def _call(
        self,
        op: Callable[[_Client], Awaitable[T]],
        *,
        write_key: str | None = None,
        sent: Callable[[], bool] | None = None,
    ) -> T:
        """Run ``op`` with this loop's pooled client, or a connection of its own.

        The whole call, connecting included, is bounded by ``timeout``, and nothing is
        retried: a write (``write_key``) that may have reached the server raises
        :class:`~converge.errors.StoreOutcomeUnknownError` (``sent`` says whether the
        write was sent yet, when ``op`` reads first).
        """
        self._check_open()
        holder = self._clients.get()
        try:
            with anyio.fail_after(self._timeout):
                if holder.depth > 0:
                    return await op(holder.client)
                failure: Exception | None = None
                async with self._new_client() as client:
                    try:
                        result = await op(client)
                    except Exception as exc:
                        # Leave the pool cleanly, so that its task group does not wrap
                        # our error in an ExceptionGroup, and raise it as is afterwards.
                        failure = exc
                if failure is not None:
                    raise failure
                return result
        except Exception as exc:
            unknown = write_key if sent is None or sent() else None
            mapped = self._map_error(exc, unknown)
            if mapped is None:
                raise
            raise mapped from exc

    async def __aenter__(self) -> RedisStore:
        """Open a connection pool shared by every task on this event loop."""
        self._check_open()
        holder = self._clients.get()
        if holder.depth == 0:
            try:
                await holder.client.__aenter__()
            except Exception as exc:
                mapped = self._map_error(exc)
                if mapped is None:
                    raise
                raise mapped from exc
            await self._check_settings(holder.client)
        holder.depth += 1
        return self

    async def _check_settings(self, client: _Client) -> None:
        # Once per store, when a pool opens: warn if Redis may evict or forget our keys.
        if not self._settings_read:
            with anyio.move_on_after(self._timeout):
                self._settings_read = await warn_if_lossy(
                    client,
                    server=self._safe_url,
                    holds="RedisStore keys (a gateway's accepted events, replay claims, outbox)",
                )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close this loop's pool and, when leaving the outermost scope, the store."""
        holder = self._clients.get()
        holder.depth -= 1
        if holder.depth > 0:
            return
        try:
            await holder.client.__aexit__(None, None, None)
        except Exception as exc:
            mapped = self._map_error(exc)
            if mapped is None:
                raise
            raise mapped from exc
        finally:
            await self.aclose()

    # -- the sync side: a portal whose loop keeps one pool open --------------------------

    async def _hold_pool(self, ready: threading.Event) -> None:
        holder = self._clients.get()
        stop = self._keeper_stop = anyio.Event()
        async with holder.client:
            await self._check_settings(holder.client)
            holder.depth += 1
            try:
                ready.set()
                await stop.wait()
            finally:
                holder.depth -= 1

    def _ensure_keeper(self) -> None:
        with self._keeper_lock:
            self._check_open()
            alive = self._keeper is not None and self._keeper.is_alive()
            if alive and self._keeper_pid == os.getpid():
                return
            ready = threading.Event()
            failure: builtins.list[BaseException] = []

            def keep() -> None:
                try:
                    self._portal.call(self._hold_pool, ready, async_name="RedisStore")
                except BaseException as exc:  # reported to the waiting caller
                    failure.append(exc)
                finally:
                    ready.set()

            thread = threading.Thread(target=keep, name="converge-redis-pool", daemon=True)
            thread.start()
            ready.wait()
            if failure:
                raise failure[0]
            self._keeper, self._keeper_pid = thread, os.getpid()

    def _stop_keeper(self) -> None:
        with self._keeper_lock:
            thread, self._keeper = self._keeper, None
            stop, self._keeper_stop = self._keeper_stop, None
            same_process = self._keeper_pid == os.getpid()
        if thread is not None and stop is not None and same_process and thread.is_alive():
            with contextlib.suppress(ClosedError):
                self._portal.call(_set_event, stop, async_name="RedisStore.aclose")
            thread.join(timeout=self._timeout)
        self._portal.close()

    def _sync(self, method: str, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        check_sync_allowed(f"RedisStore.{method}")
        self._ensure_keeper()
        return self._portal.call(func, *args, async_name=f"RedisStore.{method}", **kwargs)

    # -- values ------------------------------------------------------------------------

    def _redis_key(self, key: str) -> bytes:
        return self._namespace + key_bytes(key)

    def _encode(self, key: str, value: Any) -> bytes:
        return bytes([self._serializer.tag]) + self._serializer.dumps(key, value)

    def _decode(self, key: str, blob: object) -> Any:
        if not isinstance(blob, bytes) or not blob:
            raise StoreCorruptedError(key, "stored value is not a tagged blob")
        return self._serializer.loads(key, blob[0], memoryview(blob)[1:])

    # -- async surface -----------------------------------------------------------------

    async def aget(self, key: str) -> Any | None:
        """Return the value under ``key``, or None if absent or expired."""
        name = self._redis_key(validate_key(key))
        blob = await self._call(lambda c: c.get(name))
        return None if blob is None else self._decode(key, blob)

    async def aput(self, key: str, value: Any, *, ttl: float | None = None) -> None:
        """Store ``value`` under ``key`` (``SET``, with ``PX`` for a TTL)."""
        name = self._redis_key(validate_key(key))
        px = _px(validate_ttl(ttl))
        blob = self._encode(key, value)
        script = self._scripts.put
        args = [blob, px, ""]
        await self._call(lambda c: _eval(c, script, [name], args), write_key=key)

    async def adelete(self, key: str) -> None:
        """Delete ``key``; deleting an absent key is not an error."""
        name = self._redis_key(validate_key(key))
        script = self._scripts.delete
        await self._call(lambda c: _eval(c, script, [name], []), write_key=key)

    async def alist(self, prefix: str = "") -> builtins.list[str]:
        """Return the live keys starting with ``prefix``, sorted.

        A prefix listed before is read from its index: O(keys under it), however many
        keys the database holds. Its first listing, a check once an hour, the empty
        prefix and prefixes past the watch limit (32 per namespace) scan the database
        (``SCAN MATCH``): O(every key). See :mod:`~converge.extensions.storage._redis_index`.
        """
        rel = key_bytes(validate_prefix(prefix))
        scripts = self._scripts

        async def listing(client: _Client) -> builtins.list[str]:
            mode, keys, cursor = _redis_index.SCAN, [], b""
            while rel:  # the empty prefix is every key: never watched
                args = [rel, _redis_index.WATCH_LIMIT, _redis_index.REFRESH_MS, cursor]
                reply = await _eval(client, scripts.list, [], [*args, _redis_index.PAGE])
                mode = int(reply[0])
                if mode != _redis_index.LISTED:
                    break  # not watched, or its index is not built (or was lost)
                keys += await self._decoded(reply[2:], 0)
                cursor = reply[1]
                if not cursor:
                    return keys
            found = await self._scan(client, rel, index=mode == _redis_index.BUILD)
            if mode == _redis_index.BUILD:  # every key under the prefix is indexed now
                await _eval(client, scripts.ready, [], [rel])
            return await self._decoded(found, len(self._namespace))

        return await sort_yielding(await self._call(listing))

    async def _scan(self, client: _Client, rel: bytes, *, index: bool) -> builtins.list[bytes]:
        """Every Redis key of this namespace starting with ``rel`` (``SCAN MATCH``);
        with ``index``, each batch is indexed as it arrives."""
        pattern = _GLOB_SPECIAL.sub(rb"\\\1", self._namespace + rel) + b"*"
        found: set[bytes] = set()  # SCAN may return a key more than once
        cursor: int | None = 0
        while True:
            cursor, batch = await client.scan(cursor, match=pattern, count=_SCAN_COUNT)
            if batch and index:
                await _eval(client, self._scripts.reindex, batch, [])
            found.update(batch)
            if not cursor:
                return builtins.list(found)

    @staticmethod
    async def _decoded(raws: Sequence[bytes], strip: int) -> builtins.list[str]:
        # A batch at a time, the loop given back between: no one step decodes every key.
        keys: builtins.list[str] = []
        for start in range(0, len(raws), _SCAN_COUNT):
            for raw in raws[start : start + _SCAN_COUNT]:
                try:
                    keys.append(key_from_bytes(raw[strip:]))
                except UnicodeDecodeError:
                    continue  # not a key this store wrote (the index's own keys, too)
            await anyio.lowlevel.checkpoint()
        return keys

    async def aput_if_absent(self, key: str, value: Any, *, ttl: float | None = None) -> bool:
        """Store ``value`` only if ``key`` is absent (``SET NX PX``); atomic."""
        name = self._redis_key(validate_key(key))
        px = _px(validate_ttl(ttl))
        blob = self._encode(key, value)
        script = self._scripts.put
        args = [blob, px, "nx"]
        stored = await self._call(lambda c: _eval(c, script, [name], args), write_key=key)
        return bool(stored == 1)

    async def arun_script(
        self,
        source: str,
        keys: Sequence[str],
        args: Sequence[str | bytes | int | float] = (),
    ) -> Any:
        """Run a Lua script on the server, atomically, in one round trip.

        ``EVALSHA`` with the script's SHA-1; if the server does not know the script yet
        (``NOSCRIPT``: first use, a restart, ``SCRIPT FLUSH``), ``EVAL`` sends it whole,
        which also caches it. The script sees the store's Redis key names in ``KEYS``
        (namespace included) and must touch only those: after it (even if it fails),
        the store re-reads each of them for its prefix index (see :meth:`alist`). A
        script whose first line declares ``#!lua flags=no-writes`` runs as it is.
        Replies come back as coredis returns them (strings as ``bytes``).

        Used by :class:`~converge.extensions.rate_limit.RateLimiter` for one-round-trip
        decisions on the server's clock.

        Raises:
            StoreOutcomeUnknownError: If no answer came within ``timeout`` (the script may
                have run).
            StoreError: If the script failed.
            UsageError: For a ``source``, ``keys`` or ``args`` of the wrong kind.
        """
        if not isinstance(source, str) or not source.strip():
            raise UsageError("source must be a Lua script (a non-empty str)")
        names = [self._redis_key(key) for key in check_keys(keys)]
        if isinstance(args, str | bytes) or not isinstance(args, Sequence):
            raise UsageError("args must be a sequence, such as a list")
        for arg in args:
            if isinstance(arg, bool) or not isinstance(arg, str | bytes | int | float):
                raise UsageError(f"a script argument is a str, bytes or number, not {arg!r}")
        script = _redis_index.wrap_script(source, self._namespace)
        return await self._call(
            lambda c: _eval(c, script, names, list(args)),
            write_key=keys[0] if keys else "<script>",
        )

    def run_script(
        self,
        source: str,
        keys: Sequence[str],
        args: Sequence[str | bytes | int | float] = (),
    ) -> Any:
        """Sync form of :meth:`arun_script`."""
        return self._sync("arun_script", self.arun_script, source, keys, args)

    async def atime(self) -> float:
        """The Redis server's clock (``TIME``), in Unix seconds.

        Every process sharing the server reads the same clock, so lease ends computed
        from it hold across hosts whose own clocks disagree.
        """

        async def server_time(client: _Client) -> Any:
            # coredis's time() mangles the microseconds; parse the raw reply.
            return await client.execute_command(
                client.create_request(b"TIME", callback=NoopCallback())
            )

        reply = await self._call(server_time)
        try:
            seconds, micros = (int(part) for part in reply)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"Redis at {self._safe_url} answered TIME with {reply!r}") from exc
        return seconds + micros / 1_000_000

    async def aupdate(self, keys: Sequence[str], fn: UpdateFn[R], *, ttl: float | None = None) -> R:
        """Atomically read ``keys``, let ``fn`` compute changes, and write them.

        An optimistic transaction in two round trips: ``MGET`` the keys, run ``fn``, then
        one script applies the changes only if every key still holds what was read (a
        compare-and-set on the server); if another client changed a key meanwhile, the
        whole step runs again (so ``fn`` may run more than once). Atomic across every
        client of the server.

        Returns:
            The ``result`` part of ``fn``'s return value.

        Raises:
            StoreError: If the keys stayed contended for 100 attempts.
        """
        names = check_update(keys, fn)
        seconds = validate_ttl(ttl)
        if not names:  # nothing to read or write
            self._check_open()
            no_changes, outcome = fn({})
            check_changes(names, no_changes)
            return outcome
        redis_keys = [self._redis_key(key) for key in names]
        # Whether the current attempt has sent EXEC with writes in it: a timeout after
        # that is an unknown outcome, before it nothing was written.
        committing = [False]

        async def transaction(client: _Client) -> tuple[bool, R | None]:
            committing[0] = False
            blobs = await client.mget(redis_keys)
            current = {
                key: None if blob is None else self._decode(key, blob)
                for key, blob in zip(names, blobs, strict=True)
            }
            changes, result = fn(current)
            check_changes(names, changes)
            if not changes:
                return True, result  # read only: MGET is one atomic snapshot
            args: list[bytes | str] = []
            for blob in blobs:
                args += ("0", "") if blob is None else ("1", blob)
            for key in names:
                if key not in changes:
                    args += ("k", "", "")
                    continue
                value, key_ttl = split_change(changes[key], seconds)
                if value is None:
                    args += ("d", "", "")
                else:
                    args += ("s", self._encode(key, value), _px(key_ttl))
            committing[0] = True  # from here a timeout leaves the outcome unknown
            applied = await _eval(client, self._scripts.cas, redis_keys, args)
            if not applied:
                self.update_conflicts += 1
                return False, None  # a key changed since it was read: run again
            return True, result

        stripes = sorted({zlib.crc32(name) % _UPDATE_STRIPES for name in redis_keys})
        locks = self._update_locks.get()
        try:
            # One deadline for the whole update: waiting for our own stripe locks and
            # every optimistic attempt included.
            with anyio.fail_after(self._timeout):
                # Updates of the same keys from this process and loop queue up here
                # rather than fail each other's compare-and-set; the script guards
                # against everyone else.
                async with _stripes_held(locks, stripes):
                    for attempt in range(_UPDATE_ATTEMPTS):
                        done, result = await self._call(
                            transaction, write_key=names[0], sent=lambda: committing[0]
                        )
                        if done:
                            return cast(R, result)
                        await anyio.sleep(random.uniform(0, 0.001 * min(attempt + 1, 20)))
        except TimeoutError as exc:
            mapped = self._map_error(exc, names[0] if committing[0] else None)
            raise cast(BaseException, mapped) from exc
        raise StoreError(
            f"update of {names!r} on Redis at {self._safe_url} lost to concurrent writers "
            f"{_UPDATE_ATTEMPTS} times in a row"
        )

    async def aclose(self) -> None:
        """Close the sync side's pool and loop; later calls raise ClosedError."""
        if self._closed:
            return
        self._closed = True
        if self._keeper is not None:
            await anyio.to_thread.run_sync(self._stop_keeper)
        else:
            self._portal.close()

    # -- sync surface ------------------------------------------------------------------

    def get(self, key: str) -> Any | None:
        """Retrieve a value."""
        return self._sync("aget", self.aget, validate_key(key))

    def put(self, key: str, value: Any, *, ttl: float | None = None) -> None:
        """Store a value."""
        self._sync("aput", self.aput, validate_key(key), value, ttl=validate_ttl(ttl))

    def delete(self, key: str) -> None:
        """Delete a value."""
        self._sync("adelete", self.adelete, validate_key(key))

    def list(self, prefix: str = "") -> builtins.list[str]:
        """List keys starting with prefix."""
        return self._sync("alist", self.alist, validate_prefix(prefix))

    def put_if_absent(self, key: str, value: Any, *, ttl: float | None = None) -> bool:
        """Store value only if key is absent; atomic (``SET NX``).

        Returns:
            True if stored, False if key existed.
        """
        return self._sync(
            "aput_if_absent", self.aput_if_absent, validate_key(key), value, ttl=validate_ttl(ttl)
        )

    def update(self, keys: Sequence[str], fn: UpdateFn[R], *, ttl: float | None = None) -> R:
        """Atomic read-modify-write (sync form of :meth:`aupdate`)."""
        result: R = self._sync(
            "aupdate", self.aupdate, check_update(keys, fn), fn, ttl=validate_ttl(ttl)
        )
        return result

    def close(self) -> None:
        """Close the sync side's pool and loop; later calls raise ClosedError."""
        if self._closed:
            return
        if self._keeper is not None:
            check_sync_allowed("RedisStore.aclose")
        self._closed = True
        self._stop_keeper()


_SHAS: dict[str, str] = {}


def _script_sha(source: str) -> str:
    sha = _SHAS.get(source)
    if sha is None:
        sha = _SHAS[source] = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()
    return sha


async def _eval(client: _Client, source: str, keys: Sequence[bytes], args: Sequence[Any]) -> Any:
    """Run a Lua script: ``EVALSHA``, or ``EVAL`` (which caches it) if the server does
    not know it yet (first use, a restart, ``SCRIPT FLUSH``)."""
    try:
        return await client.evalsha(_script_sha(source), keys, args)
    except coredis.exceptions.NoScriptError:
        return await client.eval(source, keys, args)


def _px(ttl: float | None) -> str:
    """A TTL as the scripts' ``PX`` argument: milliseconds, or "" for none."""
    return "" if ttl is None else str(max(1, math.ceil(ttl * 1000)))


async def _set_event(event: anyio.Event) -> None:
    event.set()
