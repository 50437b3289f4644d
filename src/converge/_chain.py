"""Walking an exception's chain: what caused it, and what caused that."""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["exception_chain"]


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then its cause (``__cause__``, else ``__context__``), and so on, each once."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__
