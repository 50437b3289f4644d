"""Values nested past what ``json`` can encode or ``repr`` can show (RecursionError)."""

from __future__ import annotations

from typing import Any


def deep_list(depth: int = 10_000) -> list[Any]:
    """A list nested ``depth`` deep."""
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


def deep_dict(depth: int = 10_000) -> dict[str, Any]:
    """A dict nested ``depth`` deep under the key ``"a"``."""
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value
