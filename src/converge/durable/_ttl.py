"""Per-key TTLs inside one atomic update (the Store contract's ``WithTTL``).

Contract A adds ``converge.core.store.WithTTL``; every backend then honours it inside
``aupdate``. This module is the one place that bridges to it: on a checkout without it,
the same name is defined here and :func:`aupdate` emulates it (the update runs without
TTLs, then each TTL is applied by a second update that rewrites the unchanged value).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from converge.core import store as _store_module
from converge.core.store import Store, UpdateFn

__all__ = ["NATIVE_TTL", "WithTTL", "aupdate", "store_time"]

R = TypeVar("R")

_native = getattr(_store_module, "WithTTL", None)
#: True when the Store contract supports ``WithTTL`` natively.
NATIVE_TTL = _native is not None

if _native is not None:
    WithTTL = _native
else:  # pragma: no cover - only before contract A lands

    @dataclass(frozen=True, slots=True)
    class WithTTL:  # type: ignore[no-redef]
        """A value with its own TTL inside an update's ``changes`` mapping.

        Attributes:
            value: The value to store.
            ttl: Seconds until it expires; None keeps it until deleted.
        """

        value: Any
        ttl: float | None


async def aupdate(store: Store, keys: Sequence[str], fn: UpdateFn[R]) -> R:
    """``store.aupdate(keys, fn)`` where ``fn``'s changes may hold :class:`WithTTL` values."""
    if NATIVE_TTL:
        return await store.aupdate(keys, fn)
    wishes: dict[str, tuple[Any, float]] = {}  # pragma: no cover - fallback

    def plain(current: dict[str, Any | None]) -> tuple[Mapping[str, Any | None], R]:
        changes, result = fn(current)
        wishes.clear()  # fn may run again when an optimistic transaction retries
        out: dict[str, Any | None] = {}
        for key, value in changes.items():
            if isinstance(value, WithTTL):
                if value.ttl is not None:
                    wishes[key] = (value.value, value.ttl)
                value = value.value
            out[key] = value
        return out, result

    result = await store.aupdate(keys, plain)
    for key, (value, ttl) in wishes.items():

        def again(
            current: dict[str, Any | None], key: str = key, value: Any = value
        ) -> tuple[dict[str, Any], None]:
            return ({key: value} if current.get(key) == value else {}), None

        await store.aupdate([key], again, ttl=ttl)
    return result


async def store_time(store: Store) -> float | None:
    """The store's clock (``Store.atime``, contract A), or None if it has none."""
    atime = getattr(store, "atime", None)
    if atime is None:
        return None
    value = await atime()
    return float(value)
