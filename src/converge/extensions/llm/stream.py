""":class:`ChatStream`: the async iterator of text deltas a provider's ``chat_stream`` returns."""

from __future__ import annotations

import inspect
from collections.abc import AsyncGenerator, Callable
from types import TracebackType

from converge.errors import UsageError
from converge.extensions.llm.protocol import ChatResult, Usage

__all__ = ["ChatStream"]


class ChatStream:
    """Text deltas of one streaming call, as they arrive.

    Iterate with ``async for``; after the last delta, :attr:`usage` holds the call's token
    usage, :attr:`result` the whole :class:`~converge.extensions.llm.ChatResult` (stop
    reason, model, response id) and :attr:`text` the whole reply. A truncated, filtered
    or refused answer raises its typed error after the last delta (unless the stream
    was opened with ``allow_partial=True``); :attr:`result` is set before that. Use it as an
    async context manager (or call :meth:`aclose`) to release the connection when
    stopping early::

        async with provider.chat_stream(messages) as stream:
            async for delta in stream:
                print(delta, end="")
        print(stream.usage)

    Args:
        source: Builds the delta generator; it receives this stream so it can report usage
            through :meth:`finish`.
    """

    def __init__(self, source: Callable[[ChatStream], AsyncGenerator[str, None]]) -> None:
        if not callable(source):
            raise UsageError("source must be a callable returning an async generator")
        try:
            inspect.signature(source).bind(self)
        except TypeError:
            raise UsageError("source must take one argument: the ChatStream") from None
        except ValueError:  # a callable with no signature to read: the call will tell
            pass
        self.usage: Usage | None = None
        self.result: ChatResult | None = None
        self._parts: list[str] = []
        self._done = False
        self._on_finish: list[Callable[[Usage], None]] = []
        gen = source(self)
        if not isinstance(gen, AsyncGenerator):
            if inspect.iscoroutine(gen):
                gen.close()  # an ``async def`` without ``yield``: never awaited, no warning
            raise UsageError(f"source must return an async generator, not {type(gen).__name__}")
        self._gen = gen

    @property
    def text(self) -> str:
        """Every delta received so far, joined."""
        return "".join(self._parts)

    @property
    def done(self) -> bool:
        """True once the stream has ended (fully read or closed)."""
        return self._done

    @property
    def stop_reason(self) -> str | None:
        """The normalised stop reason once the stream ended (None before, or when the
        provider that made this stream reports no result)."""
        return None if self.result is None else self.result.stop_reason

    def finish(self, usage: Usage, result: ChatResult | None = None) -> None:
        """Record the call's usage (and result); called by the provider when the stream
        ends."""
        if not isinstance(usage, Usage):
            raise UsageError("usage must be a Usage")
        if result is not None and not isinstance(result, ChatResult):
            raise UsageError("result must be a ChatResult or None")
        self.usage = usage
        self.result = result
        for callback in self._on_finish:
            callback(usage)

    def on_finish(self, callback: Callable[[Usage], None]) -> None:
        """Call ``callback(usage)`` when the provider reports the usage."""
        if not callable(callback):
            raise UsageError("callback must be callable")
        self._on_finish.append(callback)

    def __aiter__(self) -> ChatStream:
        return self

    async def __anext__(self) -> str:
        if self._done:
            raise StopAsyncIteration
        try:
            delta = await self._gen.__anext__()
        except BaseException:
            self._done = True
            raise
        if not isinstance(delta, str):
            await self.aclose()
            raise UsageError(f"a stream's source must yield str deltas, not {type(delta).__name__}")
        self._parts.append(delta)
        return delta

    async def acollect(self) -> str:
        """Read the rest of the stream and return the whole reply text."""
        async for _ in self:
            pass
        return self.text

    async def aclose(self) -> None:
        """Stop the stream early and release its connection (idempotent)."""
        self._done = True
        await self._gen.aclose()

    async def __aenter__(self) -> ChatStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
