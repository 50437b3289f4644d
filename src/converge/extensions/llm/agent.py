""":class:`LLMAgent`: an agent whose ``decide`` asks a model for its decisions."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from converge import _sync
from converge.core.agent import Agent
from converge.core.decisions import Decision
from converge.core.identity import Identity
from converge.core.message import Message
from converge.core.task import Task
from converge.core.tools import ToolRegistry
from converge.errors import DecisionParseError, UsageError
from converge.extensions.llm.decisions_json import (
    MAX_OUTPUT_CHARS as _MAX_OUTPUT_CHARS,
)
from converge.extensions.llm.decisions_json import (
    decisions_tool,
    parse_decisions,
    render_turn,
    system_prompt,
)
from converge.extensions.llm.protocol import Usage

__all__ = ["LLMAgent"]

_logger = logging.getLogger("converge.llm")
T = TypeVar("T")


def _canonical(decisions: Sequence[Decision]) -> str:
    return json.dumps([d.to_dict() for d in decisions], ensure_ascii=False, default=repr)


class LLMAgent(Agent):
    """Agent that uses an LLM to produce decisions in decide().

    Each call sends: the system prompt (role description plus the decision-format
    instructions; tool schemas in it on the fallback path), the few-shot pairs, the memory
    turns, then this batch's messages, tasks and tool observations as JSON. The reply is
    parsed as the decision JSON of :mod:`converge.core.decisions` (see
    :mod:`converge.extensions.llm.decisions_json`).

    Model output is untrusted: when it is not a valid decision list (fences and prose are
    tolerated; wrong types, unknown tools, invalid tool arguments, oversized output are
    not), ``on_decide_error`` is called with the
    :class:`~converge.errors.DecisionParseError` and ``adecide`` returns ``[]``. Provider
    failures (:class:`~converge.errors.ProviderError` and anything a custom provider
    raises) are reported to ``on_decide_error`` too, then re-raised.

    Args:
        identity: Cryptographic identity (converge.core.identity.Identity).
        provider: LLM provider implementing chat(messages, **kwargs) -> str; ``achat``
            (and ``achat_with_usage``) are used when present, otherwise ``chat`` runs in
            a worker thread.
        system_prompt: Optional override for the role description at the top of the
            system prompt; the decision-format instructions are always appended.
        tool_registry: Optional ToolRegistry; when set, tool schemas are injected into the
            system prompt (fallback path) or into the structured-output tool, and
            ``InvokeTool`` decisions are checked against it.
        use_structured_output: When True, request provider-native structured output
            (tool calling with the ``emit_decisions`` tool) when supported.
        on_decide_error: Optional callable (exception_or_message: Exception | str) -> None
            for observability when decide fails.
        memory: Optional ShortTermMemory (or object with append(role, content),
            get_messages()) for conversation history.
        few_shot_examples: Optional list of (user_content, assistant_json) example pairs to
            inject into the prompt.
        name: A readable name (defaults to the fingerprint's first 12 hex digits).
        max_output_chars: Longest model output parsed; longer output is rejected.
    """

    def __init__(
        self,
        identity: Identity,
        provider: Any,
        system_prompt: str | None = None,
        tool_registry: ToolRegistry | None = None,
        *,
        use_structured_output: bool = False,
        on_decide_error: Callable[[Exception | str], None] | None = None,
        memory: Any = None,
        few_shot_examples: list[tuple[str, str]] | None = None,
        name: str | None = None,
        max_output_chars: int = _MAX_OUTPUT_CHARS,
    ) -> None:
        if tool_registry is not None and not isinstance(tool_registry, ToolRegistry):
            raise UsageError("tool_registry must be a converge.core.ToolRegistry")
        super().__init__(identity, tool_registry, name=name)
        if not callable(getattr(provider, "achat", None)) and not callable(
            getattr(provider, "chat", None)
        ):
            raise UsageError("provider must have an achat() or chat() method")
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise UsageError("system_prompt must be a string or None")
        if not isinstance(use_structured_output, bool):
            raise UsageError("use_structured_output must be a bool")
        if on_decide_error is not None and not callable(on_decide_error):
            raise UsageError("on_decide_error must be callable")
        if memory is not None and not (
            callable(getattr(memory, "append", None))
            and callable(getattr(memory, "get_messages", None))
        ):
            raise UsageError("memory must have append(role, content) and get_messages()")
        examples = list(few_shot_examples or ())
        for pair in examples:
            if (
                not isinstance(pair, tuple | list)
                or len(pair) != 2
                or not all(isinstance(s, str) for s in pair)
            ):
                raise UsageError("few_shot_examples must be (user_content, assistant_json) pairs")
        if (
            isinstance(max_output_chars, bool)
            or not isinstance(max_output_chars, int)
            or max_output_chars < 1
        ):
            raise UsageError("max_output_chars must be a positive integer")
        self.provider = provider
        self.system_prompt = system_prompt
        self.use_structured_output = use_structured_output
        self.on_decide_error = on_decide_error
        self.memory = memory
        self.few_shot_examples: list[tuple[str, str]] = [(u, a) for u, a in examples]
        self.max_output_chars = max_output_chars
        self.last_usage: Usage | None = None
        self.total_usage = Usage()
        self._portal: _sync.Portal | None = None
        self._portal_lock = threading.Lock()

    # -- prompt ------------------------------------------------------------------------

    def build_prompt(
        self,
        messages: Sequence[Message],
        tasks: Sequence[Task],
        tool_observations: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[dict[str, str]]:
        """The chat messages one ``adecide`` call sends (pure; no I/O).

        Args:
            messages: Incoming messages.
            tasks: Task updates or assignments.
            tool_observations: Results of earlier ``InvokeTool`` decisions.

        Raises:
            UsageError: For arguments of the wrong type.
        """
        prompt = [
            {
                "role": "system",
                "content": system_prompt(
                    self.id,
                    base=self.system_prompt,
                    tool_registry=self.tool_registry,
                    structured=self.use_structured_output,
                ),
            }
        ]
        for user, assistant in self.few_shot_examples:
            prompt.append({"role": "user", "content": user})
            prompt.append({"role": "assistant", "content": assistant})
        if self.memory is not None:
            for turn in self.memory.get_messages():
                role, content = turn.get("role"), turn.get("content")
                if not isinstance(content, str):
                    continue
                if role == "tool":  # providers take tool results as user text
                    role, content = "user", f"Tool result: {content}"
                if role in ("system", "user", "assistant"):
                    prompt.append({"role": role, "content": content})
        prompt.append({"role": "user", "content": render_turn(messages, tasks, tool_observations)})
        return prompt

    # -- deciding ----------------------------------------------------------------------

    def _report(self, problem: Exception | str) -> None:
        if self.on_decide_error is None:
            return
        try:
            self.on_decide_error(problem)
        except Exception:
            _logger.exception("on_decide_error raised; ignored")

    async def _ask(self, prompt: list[dict[str, str]]) -> tuple[Any, Usage | None]:
        kwargs: dict[str, Any] = {}
        if self.use_structured_output:
            kwargs = {
                "use_structured_output": True,
                "emit_decisions_tool": decisions_tool(self.tool_registry),
            }
        provider = self.provider
        with_usage = getattr(provider, "achat_with_usage", None)
        if callable(with_usage):
            result = await with_usage(prompt, **kwargs)
            if isinstance(result, tuple) and len(result) == 2:
                text, usage = result
                return text, usage if isinstance(usage, Usage) else None
            return result, None
        achat = getattr(provider, "achat", None)
        if callable(achat):
            text = achat(prompt, **kwargs)
            if inspect.isawaitable(text):
                text = await text
        else:
            text = await anyio.to_thread.run_sync(
                functools.partial(provider.chat, prompt, **kwargs)
            )
        usage = getattr(provider, "last_usage", None)
        return text, usage if isinstance(usage, Usage) else None

    async def adecide(
        self,
        messages: list[Message],
        tasks: list[Task],
        tool_observations: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> list[Decision]:
        """Use the LLM to produce decisions from messages and tasks.

        Args:
            messages: Incoming messages from the inbox.
            tasks: Task updates or assignments.
            tool_observations: Optional list of {tool_name, params, result} from previous
                InvokeTool (ReAct loop).
            **kwargs: Ignored; for compatibility with base decide().

        Returns:
            List of Decision objects (e.g. SendMessage); ``[]`` when the model output is
            not a valid decision list.

        Raises:
            UsageError: For arguments of the wrong type.
            ProviderError: When the provider call fails (after ``on_decide_error``).
        """
        prompt = self.build_prompt(messages, tasks, tool_observations)
        try:
            text, usage = await self._ask(prompt)
        except Exception as exc:
            self._report(exc)
            raise
        self.last_usage = usage
        if usage is not None:
            self.total_usage = self.total_usage + usage
        try:
            decisions = parse_decisions(
                text,
                sender=self.id,
                tool_registry=self.tool_registry,
                max_chars=self.max_output_chars,
            )
        except DecisionParseError as exc:
            self._report(exc)
            decisions = []
        if self.memory is not None:
            self.memory.append("user", prompt[-1]["content"])
            self.memory.append("assistant", _canonical(decisions))
        return decisions

    def decide(
        self,
        messages: list[Message],
        tasks: list[Task],
        tool_observations: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> list[Decision]:
        """Synchronous wrapper for compatibility outside async runtimes.

        In async runtimes, use await adecide(...). Runs on a background event loop owned
        by this agent, so an async provider's connections are reused across calls.

        Args:
            messages: Incoming messages from the inbox.
            tasks: Task updates or assignments.
            tool_observations: Optional list of {tool_name, params, result} from previous
                InvokeTool (ReAct loop).
            **kwargs: Ignored; for compatibility with base decide().

        Returns:
            List of Decision objects.

        Raises:
            SyncInEventLoopError: When called on an event-loop thread.
        """
        return self.run_sync(
            self.adecide, messages, tasks, tool_observations, async_name="LLMAgent.adecide"
        )

    def run_sync(
        self, func: Callable[..., Awaitable[T]], *args: Any, async_name: str, **kwargs: Any
    ) -> T:
        """Run ``func(*args, **kwargs)`` on this agent's background event loop.

        The loop behind :meth:`decide`, for other sync entry points driving this agent
        (such as :func:`~converge.extensions.llm.run_react`).

        Args:
            func: A coroutine function.
            *args: Its positional arguments.
            async_name: Named in the error when called on an event-loop thread.
            **kwargs: Its keyword arguments.

        Raises:
            SyncInEventLoopError: When called on an event-loop thread.
        """
        _sync.check_sync_allowed(async_name)
        with self._portal_lock:
            if self._portal is None:
                self._portal = _sync.Portal()
            portal = self._portal
        return portal.call(func, *args, async_name=async_name, **kwargs)

    def close(self) -> None:
        """Stop the background loop :meth:`decide` uses (it restarts on the next call).

        The provider's connections on that loop are closed first (when the provider
        offers ``arelease_loop``, as converge's providers do); the provider itself stays
        usable.
        """
        with self._portal_lock:
            portal, self._portal = self._portal, None
        if portal is None:
            return
        try:
            release = getattr(self.provider, "arelease_loop", None)
            if callable(release):
                portal.call(release, async_name="LLMAgent.close")
        finally:
            portal.close()
