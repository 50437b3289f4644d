"""The ``Store`` contract: an async key-value store with TTLs and atomic put-if-absent."""

from __future__ import annotations

import builtins
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Final, TypeVar

import anyio

from converge import _sync
from converge._numbers import positive_float
from converge.errors import UsageError

__all__ = [
    "MAX_TTL",
    "Store",
    "UpdateFn",
    "WithTTL",
    "check_changes",
    "split_change",
    "validate_key",
    "validate_prefix",
    "validate_ttl",
]

R = TypeVar("R")

MAX_TTL: Final = 10_000_000_000.0
"""The longest TTL every backend accepts, in seconds (about 317 years).

One limit for all backends, so a TTL valid on one is valid on all: Redis stores expiries
as 64-bit milliseconds since the epoch, and beyond this limit file and SQLite expiries
would lose sub-second precision. Pass ``ttl=None`` for "never expires"."""

#: ``fn(current) -> (changes, result)`` for :meth:`Store.aupdate`: ``current`` maps each
#: requested key to its value (None if absent); ``changes`` maps keys to new values
#: (None deletes; :class:`WithTTL` gives one key its own TTL); ``result`` is handed back
#: to the caller.
UpdateFn = Callable[[dict[str, Any | None]], tuple[Mapping[str, Any | None], R]]


def validate_key(key: object) -> str:
    """Return ``key`` if it is a usable store key, else raise.

    Raises:
        UsageError: If ``key`` is not a non-empty ``str``.
    """
    if not isinstance(key, str):
        raise UsageError(f"store keys must be str, not {type(key).__name__}")
    if not key:
        raise UsageError("store keys must not be empty")
    return key


def validate_prefix(prefix: object) -> str:
    """Return ``prefix`` if it is a ``str`` (empty allowed), else raise ``UsageError``."""
    if not isinstance(prefix, str):
        raise UsageError(f"list() prefix must be str, not {type(prefix).__name__}")
    return prefix


def validate_ttl(ttl: object) -> float | None:
    """Return ``ttl`` as seconds (or None) if it is a positive number up to :data:`MAX_TTL`.

    Every backend validates TTLs with this one function, so a TTL accepted by one is
    accepted by all.

    Raises:
        UsageError: For zero, negative, NaN, infinite, too large or non-numeric values.
    """
    if ttl is None:
        return None
    if type(ttl) is float and 0.0 < ttl <= MAX_TTL:  # the common case (NaN fails it)
        return ttl
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise UsageError(f"ttl must be a number of seconds or None, not {type(ttl).__name__}")
    seconds = positive_float(ttl)
    if seconds is None:
        raise UsageError(f"ttl must be a positive finite number of seconds, got {ttl!r}")
    if seconds > MAX_TTL:
        raise UsageError(
            f"ttl must be at most {MAX_TTL:.0f} seconds (about 317 years), got {ttl!r}; "
            "pass ttl=None for a key that never expires"
        )
    return seconds


@dataclass(frozen=True, slots=True)
class WithTTL:
    """A value in the ``changes`` of an update function, with a TTL of its own.

    ``{"lease": WithTTL(owner, 30), "log": entry}`` writes ``lease`` expiring in 30 s
    and ``log`` with the TTL of the :meth:`Store.aupdate` call. ``ttl=None`` keeps the
    key until it is deleted, whatever the call's TTL.

    Attributes:
        value: The value to store (not None: return None itself to delete a key).
        ttl: Seconds until the key expires, or None for never.

    Raises:
        UsageError: If ``value`` is None or ``ttl`` is invalid (see :func:`validate_ttl`).
    """

    value: Any
    ttl: float | None

    def __post_init__(self) -> None:
        if self.value is None:
            raise UsageError("WithTTL(None, ...) cannot store None; put None itself to delete")
        object.__setattr__(self, "ttl", validate_ttl(self.ttl))


def split_change(value: Any, ttl: float | None) -> tuple[Any, float | None]:
    """Unwrap one value of an update's ``changes``: ``(value, ttl to write it with)``.

    A :class:`WithTTL` brings its own TTL; any other value (None: delete) gets ``ttl``,
    the TTL of the update call.
    """
    if isinstance(value, WithTTL):
        return value.value, value.ttl
    return value, ttl


def check_changes(keys: Sequence[str], changes: Mapping[str, Any]) -> None:
    """Raise ``UsageError`` unless ``changes`` is a mapping over a subset of ``keys``."""
    if type(changes) is not dict and not isinstance(changes, Mapping):
        raise UsageError("an update function must return (changes_mapping, result)")
    stray = changes.keys() - set(keys) if changes else None
    if stray:
        raise UsageError(f"update function changed keys it did not read: {sorted(stray)}")


class Store(ABC):
    """An async key-value store.

    Backends implement the ``a``-prefixed coroutines; the synchronous methods the seed
    documents (``get``, ``put``, ...) are shims over them (see ``converge._sync``), which a
    backend may override with a direct call where that is cheaper.

    Values are arbitrary Python objects for pickle-based backends, JSON-compatible values
    for JSON ones. A key with an expired TTL reads as absent.

    Attributes:
        atomic_put_if_absent: True when :meth:`aput_if_absent` is atomic.
        supports_locking: True when the backend can coordinate several processes:
            :meth:`aupdate` is then atomic across every process sharing the store
            (for FileStore, when constructed with ``locking=True``).
    """

    atomic_put_if_absent: ClassVar[bool] = False
    supports_locking: ClassVar[bool] = False

    _update_lock: _sync.LoopLocal[anyio.Lock] | None = None

    # -- the async contract ------------------------------------------------------------

    @abstractmethod
    async def aget(self, key: str) -> Any | None:
        """Return the value stored under ``key``, or None if absent or expired."""

    @abstractmethod
    async def aput(self, key: str, value: Any, *, ttl: float | None = None) -> None:
        """Store ``value`` under ``key``, replacing any previous value.

        Args:
            key: Non-empty string.
            value: The value.
            ttl: Seconds until the key expires; None keeps it until deleted.
        """

    @abstractmethod
    async def adelete(self, key: str) -> None:
        """Delete ``key``; deleting an absent key is not an error."""

    @abstractmethod
    async def alist(self, prefix: str = "") -> builtins.list[str]:
        """Return the live keys that start with ``prefix``, sorted."""

    async def aput_if_absent(self, key: str, value: Any, *, ttl: float | None = None) -> bool:
        """Store ``value`` only if ``key`` is absent (or expired).

        Returns:
            True if stored, False if the key existed. This default is not atomic;
            backends with ``atomic_put_if_absent = True`` override it.
        """
        if await self.aget(key) is not None:
            return False
        await self.aput(key, value, ttl=ttl)
        return True

    async def aupdate(
        self,
        keys: Sequence[str],
        fn: UpdateFn[R],
        *,
        ttl: float | None = None,
    ) -> R:
        """Atomically read ``keys``, let ``fn`` compute changes, and write them.

        ``fn`` must be pure and quick: backends may run it in a worker thread, or run it
        again when an optimistic transaction conflicts. Backends make the read-compute-write
        atomic against every other writer of the store, across processes when
        :attr:`supports_locking` is true; this generic fallback only serialises
        :meth:`aupdate` calls made on one event loop.

        Args:
            keys: The keys ``fn`` reads; ``fn`` may only change these.
            fn: ``fn(current) -> (changes, result)``; see :data:`UpdateFn`.
            ttl: TTL applied to every key written, except values wrapped in
                :class:`WithTTL`, which bring their own.

        Returns:
            The ``result`` part of ``fn``'s return value.

        Raises:
            UsageError: For invalid keys, or when ``fn`` changes a key it did not read.
        """
        names = [validate_key(k) for k in keys]
        validate_ttl(ttl)
        if self._update_lock is None:
            self._update_lock = _sync.LoopLocal(anyio.Lock)
        async with self._update_lock.get():
            current = {k: await self.aget(k) for k in names}
            changes, result = fn(current)
            check_changes(names, changes)
            for key, change in changes.items():
                value, seconds = split_change(change, ttl)
                if value is None:
                    await self.adelete(key)
                else:
                    await self.aput(key, value, ttl=seconds)
        return result

    async def atime(self) -> float:
        """The store's clock, in Unix seconds.

        Processes that share a store compare times they read here (lease ends, for
        example), so a backend shared across hosts answers with one clock for all of
        them: :class:`~converge.extensions.storage.RedisStore` asks the server (``TIME``).
        This default is this host's wall clock, ``time.time()``.
        """
        return time.time()

    async def aclose(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release the backend's resources. Idempotent."""

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- the documented sync surface ---------------------------------------------------

    def _async_name(self, method: str) -> str:
        return f"{type(self).__name__}.{method}"

    def get(self, key: str) -> Any | None:
        """Retrieve a value (sync form of :meth:`aget`)."""
        return _sync.run(self.aget, key, async_name=self._async_name("aget"))

    def put(self, key: str, value: Any, *, ttl: float | None = None) -> None:
        """Store a value (sync form of :meth:`aput`)."""
        _sync.run(self.aput, key, value, ttl=ttl, async_name=self._async_name("aput"))

    def delete(self, key: str) -> None:
        """Delete a value (sync form of :meth:`adelete`)."""
        _sync.run(self.adelete, key, async_name=self._async_name("adelete"))

    def list(self, prefix: str = "") -> builtins.list[str]:
        """List keys starting with prefix (sync form of :meth:`alist`)."""
        return _sync.run(self.alist, prefix, async_name=self._async_name("alist"))

    def put_if_absent(self, key: str, value: Any, *, ttl: float | None = None) -> bool:
        """Store value only if key is absent (sync form of :meth:`aput_if_absent`).

        Returns:
            True if stored, False if key existed.
        """
        return _sync.run(
            self.aput_if_absent, key, value, ttl=ttl, async_name=self._async_name("aput_if_absent")
        )

    def update(self, keys: Sequence[str], fn: UpdateFn[R], *, ttl: float | None = None) -> R:
        """Atomic read-modify-write (sync form of :meth:`aupdate`)."""
        result: R = _sync.run(
            self.aupdate, keys, fn, ttl=ttl, async_name=self._async_name("aupdate")
        )
        return result

    def close(self) -> None:
        """Release resources (sync form of :meth:`aclose`)."""
        _sync.run(self.aclose, async_name=self._async_name("aclose"))

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
