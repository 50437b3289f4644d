"""A MemoryStore that counts its store calls (how many a path makes)."""

from __future__ import annotations

from typing import Any

from converge.extensions.storage import MemoryStore

__all__ = ["CountingUpdates"]


class CountingUpdates(MemoryStore):
    """A MemoryStore that counts its ``aupdate`` calls in ``updates`` and its ``aget``
    calls in ``gets``."""

    updates = 0
    gets = 0

    async def aupdate(self, keys: Any, fn: Any, *, ttl: float | None = None) -> Any:
        self.updates += 1
        return await super().aupdate(keys, fn, ttl=ttl)

    async def aget(self, key: str) -> Any | None:
        self.gets += 1
        return await super().aget(key)
