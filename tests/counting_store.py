"""A MemoryStore that counts its store calls (how many a path makes)."""

from __future__ import annotations

from typing import Any

from converge.extensions.storage import MemoryStore

__all__ = ["CountingUpdates"]


class CountingUpdates(MemoryStore):
    """A MemoryStore that counts its ``aupdate`` calls in ``updates`` (those that
    changed something in ``writes``), its ``aget`` calls in ``gets`` (the keys read in
    ``got``) and its ``alist`` calls by prefix in ``listings``."""

    updates = 0
    writes = 0

    def __init__(self) -> None:
        super().__init__()
        self.got: list[str] = []
        self.listings: dict[str, int] = {}

    @property
    def gets(self) -> int:
        return len(self.got)

    async def aupdate(self, keys: Any, fn: Any, *, ttl: float | None = None) -> Any:
        self.updates += 1

        def counted(current: dict[str, Any]) -> Any:
            changes, result = fn(current)
            self.writes += bool(changes)
            return changes, result

        return await super().aupdate(keys, counted, ttl=ttl)

    async def aget(self, key: str) -> Any | None:
        self.got.append(key)
        return await super().aget(key)

    async def alist(self, prefix: str = "") -> list[str]:
        self.listings[prefix] = self.listings.get(prefix, 0) + 1
        return await super().alist(prefix)
