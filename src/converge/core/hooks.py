"""Message hooks: middleware the runtime applies around sending and receiving."""

from __future__ import annotations

from typing import Any

from converge.core.message import Message

__all__ = ["MessageHook"]


class MessageHook:
    """Base class for message middleware; every method defaults to a pass-through.

    The runtime calls :meth:`apre_send` before delivering a message and
    :meth:`apost_receive` for each receiver; returning ``None`` drops the message. If a
    hook raises, the runtime calls :meth:`on_error` and drops the message. The async
    forms default to the sync ones; override them for hooks that do I/O.
    """

    def pre_send(self, message: Message) -> Message | None:
        """Inspect or replace an outgoing message; None drops it."""
        return message

    def post_receive(self, message: Message) -> Message | None:
        """Inspect or replace an incoming message; None drops it."""
        return message

    def on_error(self, stage: str, error: Exception, context: dict[str, Any]) -> None:
        """Called when this hook raised at ``stage`` (``"pre_send"``/``"post_receive"``)."""

    async def apre_send(self, message: Message) -> Message | None:
        """Async form of :meth:`pre_send`; the runtime calls this one."""
        return self.pre_send(message)

    async def apost_receive(self, message: Message) -> Message | None:
        """Async form of :meth:`post_receive`; the runtime calls this one."""
        return self.post_receive(message)
