"""A MemoryStore that counts its atomic updates (how many store calls a path makes)."""

from __future__ import annotations

from typing import Any

from converge.extensions.storage import MemoryStore

__all__ = ["CountingUpdates"]


class CountingUpdates(MemoryStore):
    """A MemoryStore that counts its ``aupdate`` calls in ``updates``."""

    updates = 0

    async def aupdate(self, keys: Any, fn: Any, *, ttl: float | None = None) -> Any:
        self.updates += 1
        return await super().aupdate(keys, fn, ttl=ttl)
