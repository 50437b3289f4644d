"""MessageHook defaults: pass-through, async forms delegate to sync ones."""

from __future__ import annotations

import pytest

from converge.core import Message, MessageHook

pytestmark = pytest.mark.anyio


class Redact(MessageHook):
    def pre_send(self, message: Message) -> Message | None:
        return None if message.payload.get("secret") else message


async def test_default_hook_passes_messages_through() -> None:
    msg = Message(sender="a")
    hook = MessageHook()
    assert await hook.apre_send(msg) is msg
    assert await hook.apost_receive(msg) is msg
    hook.on_error("pre_send", RuntimeError("x"), {})


async def test_async_form_uses_overridden_sync_method() -> None:
    hook = Redact()
    assert await hook.apre_send(Message(sender="a", payload={"secret": True})) is None
    kept = Message(sender="a")
    assert await hook.apre_send(kept) is kept
