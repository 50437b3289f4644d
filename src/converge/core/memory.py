"""Short-term conversation memory, bounded by message count and/or a token budget."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from converge._repr import safe_repr
from converge.errors import UsageError

__all__ = ["ShortTermMemory", "approximate_tokens"]

_ROLES = frozenset({"system", "user", "assistant", "tool"})


def approximate_tokens(text: str) -> int:
    """A cheap token estimate (about four characters a token).

    Raises:
        UsageError: When ``text`` is not a string.
    """
    if not isinstance(text, str):
        raise UsageError("approximate_tokens takes a string")
    return len(text) // 4 + 1


class ShortTermMemory:
    """Recent conversation turns for an agent's prompt.

    Trimming drops the oldest whole turns: a turn starts at a ``user`` message and runs
    to the next one, so an assistant reply never loses its question and a ``tool``
    result never loses the assistant message that called it. When only one user turn
    remains (agent-driven loops), the oldest non-tool message and the tool results that
    follow it go together instead. ``system`` messages are pinned and never trimmed.
    The newest turn is kept whole even when it alone exceeds a bound.

    Args:
        max_messages: Most non-system messages kept; None for no count bound.
        max_tokens: Token budget for non-system messages; None for no token bound.
        token_counter: Counts a message's tokens (a non-negative int); defaults to
            :func:`approximate_tokens`.

    Raises:
        UsageError: For a bound that is not a positive integer or None, or a
            non-callable ``token_counter``.
    """

    def __init__(
        self,
        max_messages: int | None = 50,
        max_tokens: int | None = None,
        *,
        token_counter: Callable[[str], int] = approximate_tokens,
    ) -> None:
        for label, bound in (("max_messages", max_messages), ("max_tokens", max_tokens)):
            if bound is not None and (
                isinstance(bound, bool) or not isinstance(bound, int) or bound < 1
            ):
                raise UsageError(f"{label} must be a positive integer or None")
        if not callable(token_counter):
            raise UsageError("token_counter must be callable")
        self.max_messages = max_messages
        self.max_tokens = max_tokens
        self._count = token_counter
        self._system: list[dict[str, Any]] = []
        self._turns: list[tuple[dict[str, Any], int]] = []
        self._tokens = 0
        self._lock = threading.Lock()

    def append(self, role: str, content: str, **extra: Any) -> None:
        """Add a message; ``extra`` (e.g. ``tool_call_id``) is kept on the dict.

        Raises:
            UsageError: For an unknown role, non-string content, or a ``token_counter``
                that did not return a non-negative integer.
        """
        if not isinstance(role, str):
            raise UsageError(f"role must be a string, one of {sorted(_ROLES)}")
        if role not in _ROLES:
            raise UsageError(f"unknown role {safe_repr(role)}; one of {sorted(_ROLES)}")
        if not isinstance(content, str):
            raise UsageError("content must be a string")
        message = {"role": role, "content": content, **extra}
        with self._lock:
            if role == "system":
                self._system.append(message)
                return
            tokens = self._count(content)
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
                got = tokens if isinstance(tokens, int) else type(tokens).__name__
                raise UsageError(f"token_counter must return a non-negative int, got {got}")
            self._turns.append((message, tokens))
            self._tokens += tokens
            self._trim()

    def _over(self) -> bool:
        return (self.max_messages is not None and len(self._turns) > self.max_messages) or (
            self.max_tokens is not None and self._tokens > self.max_tokens
        )

    def _next_cut(self) -> int:
        """Index where the second-oldest unit starts (0 if nothing may be dropped)."""
        roles = [m["role"] for m, _ in self._turns]
        users = [i for i, r in enumerate(roles) if r == "user" and i > 0]
        if users and roles.count("user") > 1:
            return users[0]
        for i in range(1, len(roles)):
            if roles[i] != "tool":
                return i
        return 0

    def _trim(self) -> None:
        while self._over():
            cut = self._next_cut()
            if cut == 0:
                return
            self._tokens -= sum(t for _, t in self._turns[:cut])
            del self._turns[:cut]

    def get_messages(self) -> list[dict[str, Any]]:
        """System messages, then the kept turns, oldest first (copies)."""
        with self._lock:
            return [dict(m) for m in self._system] + [dict(m) for m, _ in self._turns]

    def clear(self) -> None:
        """Forget everything, system messages included."""
        with self._lock:
            self._system.clear()
            self._turns.clear()
            self._tokens = 0

    def __len__(self) -> int:
        return len(self._system) + len(self._turns)

    @property
    def token_count(self) -> int:
        """Tokens held by the non-system messages."""
        return self._tokens
