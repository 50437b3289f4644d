"""Optional extensions: storage, crypto, llm, rate_limit, connectors."""

from __future__ import annotations

__all__: list[str] = []
