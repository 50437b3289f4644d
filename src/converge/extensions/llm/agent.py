""":class:`LLMAgent`: an agent whose ``decide`` asks a model for its decisions."""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from converge import _sync
from converge._repr import json_text, safe_repr
from converge.core.agent import Agent
from converge.core.decisions import Decision, InvokeTool
from converge.core.events import (
    CallFailed,
    CallFinished,
    CallStarted,
    DecisionsMade,
    EventEmitter,
    TextDelta,
    new_call_id,
)
from converge.core.identity import Identity
from converge.core.message import Message
from converge.core.task import Task
from converge.core.tools import ToolRegistry
from converge.errors import (
    ContentFilteredError,
    DecisionParseError,
    ProviderResponseError,
    ResponseRefusedError,
    ResponseTruncatedError,
    UsageError,
)
from converge.extensions.llm._conversation import (
    assistant_turn,
    check_observations,
    observation_turns,
    reask_turns,
    user_turn,
)
from converge.extensions.llm._errors import incomplete
from converge.extensions.llm.decisions_json import (
    EMIT_DECISIONS_TOOL as _EMIT_DECISIONS_TOOL,
)
from converge.extensions.llm.decisions_json import (
    MAX_OUTPUT_CHARS as _MAX_OUTPUT_CHARS,
)
from converge.extensions.llm.decisions_json import (
    decisions_tool,
    parse_decisions,
    system_prompt,
)
from converge.extensions.llm.protocol import ChatResult, ToolCall, Usage
from converge.extensions.llm.telemetry import Telemetry, tool_span

__all__ = ["DEFAULT_MAX_REASKS", "LLMAgent"]

_logger = logging.getLogger("converge.llm")
T = TypeVar("T")

DEFAULT_MAX_REASKS = 1
"""Times ``LLMAgent`` sends invalid output back to the model before giving up."""

_OUTPUT_ERRORS = (ResponseTruncatedError, ContentFilteredError, ResponseRefusedError)
# The error a call's stop reason makes it, built with ``provider=`` and ``result=``.
_STOP_ERRORS: dict[str, Callable[..., ProviderResponseError]] = {
    "length": functools.partial(
        ResponseTruncatedError,
        "the model's answer was cut off at the output token limit (stop reason 'length') "
        "before the decisions were complete; raise max_tokens or ask for fewer decisions",
    ),
    "content_filter": functools.partial(
        ContentFilteredError, "the provider's content filter cut the answer"
    ),
    "refusal": functools.partial(ResponseRefusedError, "the model refused to answer"),
    "incomplete": incomplete,  # a stream cut short
}


@dataclass(frozen=True, slots=True)
class _Reply:
    """One answer: the text to parse, its usage, and how it ended."""

    text: Any
    usage: Usage | None
    stop_reason: str | None = None
    tool_call_id: str | None = None
    model: str | None = None
    #: Why the answer is unreadable before parsing (its tool call's arguments).
    error: DecisionParseError | None = None


def _usage_dict(usage: Usage | None) -> dict[str, int | None]:
    if usage is None:
        return {}
    return {f.name: getattr(usage, f.name) for f in fields(usage)}


def _well_formed_call(call: Any) -> bool:
    """Whether a remembered tool call is one a provider can be sent."""
    if isinstance(call, ToolCall):
        return all(isinstance(v, str) and v for v in (call.id, call.name))
    return (
        isinstance(call, Mapping)
        and isinstance(call.get("id"), str)
        and bool(call["id"])
        and isinstance(call.get("name"), str)
        and bool(call["name"])
        and isinstance(call.get("arguments", {}), Mapping)
    )


def _id_of(call: Any) -> str:
    """The id of a tool call :func:`_well_formed_call` accepted."""
    return call.id if isinstance(call, ToolCall) else call["id"]


def _add(total: Usage | None, usage: Usage | None) -> Usage | None:
    if usage is None:
        return total
    return usage if total is None else total + usage


class LLMAgent(Agent):
    """Agent that uses an LLM to produce decisions in decide().

    Each call sends: the system prompt (role description plus the decision-format
    instructions; tool schemas in it on the fallback path), the few-shot pairs, the memory
    turns, then this batch's messages and tasks as JSON, then (in a ReAct loop) the tool
    calls made so far and their results as native ``tool_calls``/``tool`` messages. The
    reply is parsed as the decision JSON of :mod:`converge.core.decisions` (see
    :mod:`converge.extensions.llm.decisions_json`).

    Model output is untrusted: when it is not a valid decision list (fences and prose are
    tolerated; wrong types, unknown tools, invalid tool arguments, oversized output are
    not), ``on_decide_error`` is called with the
    :class:`~converge.errors.DecisionParseError` and the output goes back to the model
    with the reason, up to ``max_reasks`` times; when it is still invalid, ``adecide``
    returns ``[]``. An answer cut off at the token limit, filtered or refused
    (:class:`~converge.errors.ResponseTruncatedError`, ...) is reported the same way and
    not re-asked. Provider failures (:class:`~converge.errors.ProviderError` and anything
    a custom provider raises) are reported to ``on_decide_error`` too, then re-raised.

    Args:
        identity: Cryptographic identity (converge.core.identity.Identity).
        provider: LLM provider implementing chat(messages, **kwargs) -> str; ``acomplete``
            (then ``achat_with_usage``, then ``achat``) is used when present, otherwise
            ``chat`` runs in a worker thread; ``chat_stream`` when a subscriber of
            ``events`` wants text deltas (not on the structured path).
        system_prompt: Optional override for the role description at the top of the
            system prompt; the decision-format instructions are always appended.
        tool_registry: Optional ToolRegistry; when set, tool schemas are injected into the
            system prompt (fallback path) or into the structured-output tool, and
            ``InvokeTool`` decisions are checked against it.
        use_structured_output: When True, request provider-native structured output
            (tool calling with the ``emit_decisions`` tool) when supported.
        on_decide_error: Optional callable (exception_or_message: Exception | str) -> None
            for observability when decide fails; called once per failure (each rejected
            answer, re-asked or not).
        memory: Optional ShortTermMemory (or object with append(role, content),
            get_messages()) for conversation history.
        few_shot_examples: Optional list of (user_content, assistant_json) example pairs to
            inject into the prompt.
        name: A readable name (defaults to the fingerprint's first 12 hex digits).
        max_output_chars: Longest model output parsed; longer output is rejected.
        max_reasks: How many times invalid output is sent back to the model with the
            reason (0: never), per ``adecide``.
        events: Where progress events go (:mod:`converge.core.events`); a new
            :class:`~converge.core.events.EventEmitter` by default, as ``self.events``.
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
        max_reasks: int = DEFAULT_MAX_REASKS,
        events: EventEmitter | None = None,
    ) -> None:
        if tool_registry is not None and not isinstance(tool_registry, ToolRegistry):
            raise UsageError("tool_registry must be a converge.core.ToolRegistry")
        super().__init__(identity, tool_registry, name=name)
        if not any(callable(getattr(provider, m, None)) for m in ("acomplete", "achat", "chat")):
            raise UsageError("provider must have an acomplete(), achat() or chat() method")
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
        if few_shot_examples is not None and not isinstance(few_shot_examples, Iterable):
            raise UsageError("few_shot_examples must be a list of (user, assistant) pairs")
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
        if isinstance(max_reasks, bool) or not isinstance(max_reasks, int) or max_reasks < 0:
            raise UsageError("max_reasks must be an integer >= 0")
        if events is not None and not isinstance(events, EventEmitter):
            raise UsageError("events must be a converge.core.events.EventEmitter")
        self.provider = provider
        self.system_prompt = system_prompt
        self.use_structured_output = use_structured_output
        self.on_decide_error = on_decide_error
        self.memory = memory
        self.few_shot_examples: list[tuple[str, str]] = [(u, a) for u, a in examples]
        self.max_output_chars = max_output_chars
        self.max_reasks = max_reasks
        self.events = events if events is not None else EventEmitter()
        self.last_usage: Usage | None = None
        self.total_usage = Usage(None, None)
        self._portal: _sync.Portal | None = None
        self._portal_lock = threading.Lock()

    # -- prompt ------------------------------------------------------------------------

    def _history(self) -> list[dict[str, Any]]:
        """Memory turns as chat messages; a tool result whose call is not in the history
        goes as user text (providers reject orphan tool messages).

        Memory is the caller's: what no provider could take is left out rather than
        refused (a turn that is not a dict or whose content is not text, a tool call
        without a string id and name or with arguments that are not a dict, a tool
        result's id that is not a string; a ``name`` that is not a string is dropped).
        """
        out: list[dict[str, Any]] = []
        if self.memory is None:
            return out
        called: set[str] = set()
        for turn in self.memory.get_messages():
            if not isinstance(turn, Mapping):
                continue
            role, content = turn.get("role"), turn.get("content")
            if not isinstance(content, str) or not isinstance(role, str):
                continue
            calls = turn.get("tool_calls")
            if role == "assistant" and isinstance(calls, list) and calls:
                calls = [c for c in calls if _well_formed_call(c)]
                if calls:
                    called.update(_id_of(c) for c in calls)
                    out.append(
                        {"role": "assistant", "content": content or None, "tool_calls": calls}
                    )
                else:
                    out.append({"role": "assistant", "content": content})
            elif role == "tool":
                call_id, name = turn.get("tool_call_id"), turn.get("name")
                if isinstance(call_id, str) and call_id in called:
                    out.append(
                        {
                            "role": "tool",
                            "tool_call_id": call_id,
                            "name": name if isinstance(name, str) and name else None,
                            "content": content,
                        }
                    )
                else:
                    out.append({"role": "user", "content": f"Tool result: {content}"})
            elif role in ("system", "user", "assistant"):
                out.append({"role": role, "content": content})
        return out

    def _compose(
        self,
        messages: Sequence[Message],
        tasks: Sequence[Task],
        tool_observations: Sequence[Mapping[str, Any]] | None,
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The prompt, and the new turns to remember (text-only, memory's form)."""
        observations = check_observations(tool_observations)
        turn, turn_text = user_turn(messages, tasks)
        prompt: list[dict[str, Any]] = [
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
        history = self._history()
        prompt.extend(history)
        ids = [o.get("call_id") for o in observations]
        called = {_id_of(c) for m in history for c in (m.get("tool_calls") or ())}
        answered = {m.get("tool_call_id") for m in history if m.get("role") == "tool"}
        if observations and all(i in called for i in ids):
            # A ReAct step whose calls memory already holds: only the new results.
            new = observation_turns(
                observations, only_results=frozenset(str(i) for i in ids if i not in answered)
            )
            prompt.extend(new)
            return prompt, new
        prompt.append(turn)
        tools = observation_turns(observations)
        prompt.extend(tools)
        return prompt, [{"role": "user", "content": turn_text}, *tools]

    def build_prompt(
        self,
        messages: Sequence[Message],
        tasks: Sequence[Task],
        tool_observations: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[dict[str, Any]]:
        """The chat messages one ``adecide`` call sends first (pure; no I/O).

        Args:
            messages: Incoming messages; a payload's ``"parts"`` list of content parts
                (images, documents) is sent as native content parts.
            tasks: Task updates or assignments.
            tool_observations: Results of earlier ``InvokeTool`` decisions, sent as native
                assistant ``tool_calls`` and ``tool`` messages. A ``result`` or ``error``
                may be any data (what neither JSON nor ``repr`` can show, e.g. nesting
                thousands deep, is sent as a bounded rendering).

        Raises:
            UsageError: For arguments of the wrong type, or an observation whose
                ``tool_name`` is not a non-empty string, ``params`` not a dict,
                ``call_id`` not a string or ``step`` not an integer.
        """
        return self._compose(messages, tasks, tool_observations)[0]

    # -- deciding ----------------------------------------------------------------------

    def _report(self, problem: Exception | str) -> None:
        if self.on_decide_error is None:
            return
        try:
            self.on_decide_error(problem)
        except Exception:
            _logger.exception("on_decide_error raised; ignored")

    def _kwargs(self) -> dict[str, Any]:
        if not self.use_structured_output:
            return {}
        return {
            "use_structured_output": True,
            "emit_decisions_tool": decisions_tool(self.tool_registry),
        }

    def _from_result(self, result: ChatResult) -> _Reply:
        error = _STOP_ERRORS.get(result.stop_reason)
        if error is not None:  # a custom provider returned it instead of raising, a cut stream
            raise error(provider=type(self.provider).__name__, result=result)
        if self.use_structured_output:
            for call in result.tool_calls:
                if call.name == _EMIT_DECISIONS_TOOL:
                    call_id = call.id if isinstance(call.id, str) and call.id else None
                    text = call.raw_arguments
                    unreadable = None
                    if text is None:
                        text = json_text(call.arguments)
                    if text is None:
                        text = "{}"
                        unreadable = DecisionParseError(
                            f"the {_EMIT_DECISIONS_TOOL} call's arguments are not JSON data"
                        )
                    return _Reply(
                        text, result.usage, result.stop_reason, call_id, result.model, unreadable
                    )
        return _Reply(result.text, result.usage, result.stop_reason, None, result.model)

    async def _stream(self, prompt: list[dict[str, Any]], call_id: str) -> _Reply:
        stream = self.provider.chat_stream(prompt)
        parts: list[str] = []
        try:
            async for delta in stream:
                if not isinstance(delta, str):
                    continue
                parts.append(delta)
                self.events.emit(TextDelta(source=self.id, call_id=call_id, text=delta))
        finally:
            close = getattr(stream, "aclose", None)
            if callable(close):
                with anyio.CancelScope(shield=True):
                    await close()
        result = getattr(stream, "result", None)
        if isinstance(result, ChatResult):
            return self._from_result(result)
        usage = getattr(stream, "usage", None)
        usage = usage if isinstance(usage, Usage) else None
        stop = getattr(stream, "stop_reason", None)
        text = "".join(parts)
        if isinstance(stop, str) and stop in _STOP_ERRORS:
            return self._from_result(ChatResult(text, usage or Usage(None, None), stop))
        return _Reply(text, usage, stop if isinstance(stop, str) else None)

    async def _ask(self, prompt: list[dict[str, Any]], call_id: str) -> _Reply:
        provider = self.provider
        kwargs = self._kwargs()
        if (
            not self.use_structured_output
            and self.events.wants(TextDelta)
            and callable(getattr(provider, "chat_stream", None))
        ):
            return await self._stream(prompt, call_id)
        acomplete = getattr(provider, "acomplete", None)
        if callable(acomplete):
            try:
                result = await acomplete(prompt, **kwargs)
            except NotImplementedError:  # a stub: use the older surface
                pass
            else:
                if isinstance(result, ChatResult):
                    return self._from_result(result)
                return _Reply(result, None)
        with_usage = getattr(provider, "achat_with_usage", None)
        if callable(with_usage):
            result = await with_usage(prompt, **kwargs)
            if isinstance(result, tuple) and len(result) == 2:
                text, usage = result
                return _Reply(text, usage if isinstance(usage, Usage) else None)
            return _Reply(result, None)
        achat = getattr(provider, "achat", None)
        if callable(achat):
            text = achat(prompt, **kwargs)
            if inspect.isawaitable(text):
                text = await text
        else:
            text = await anyio.to_thread.run_sync(
                functools.partial(provider.chat, prompt, **kwargs), abandon_on_cancel=True
            )
        usage = getattr(provider, "last_usage", None)
        return _Reply(text, usage if isinstance(usage, Usage) else None)

    def _started(self, call_id: str, attempt: int) -> None:
        if not self.events.wants(CallStarted):
            return
        model = getattr(self.provider, "model", None)
        self.events.emit(
            CallStarted(
                source=self.id,
                call_id=call_id,
                provider=type(self.provider).__name__,
                model=model if isinstance(model, str) else None,
                attempt=attempt,
            )
        )

    def _failed(self, exc: Exception, call_id: str, *, final: bool) -> None:
        if self.events.wants(CallFailed):
            self.events.emit(
                CallFailed.from_exception(exc, source=self.id, call_id=call_id, final=final)
            )
        self._report(exc)

    async def ainvoke_tool(self, decision: InvokeTool) -> Any:
        """Run one tool this agent decided to invoke, in an ``execute_tool`` span (on
        the provider's telemetry when it has one), as the ReAct loop does."""
        if not isinstance(decision, InvokeTool):
            return await super().ainvoke_tool(decision)  # which refuses it
        telemetry = getattr(self.provider, "telemetry", None)
        with tool_span(
            decision.tool_name,
            call_id=decision.call_id,
            arguments=decision.params,
            telemetry=telemetry if isinstance(telemetry, Telemetry) else None,
        ):
            return await super().ainvoke_tool(decision)

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
            tool_observations: Optional list of {tool_name, params, call_id, result} from
                previous InvokeTool (ReAct loop).
            **kwargs: Ignored; for compatibility with base decide().

        Returns:
            List of Decision objects (e.g. SendMessage); ``[]`` when the model output is
            not a valid decision list (after the re-asks).

        Raises:
            UsageError: For arguments of the wrong type.
            ProviderError: When the provider call fails (after ``on_decide_error``).
        """
        prompt, new_turns = self._compose(messages, tasks, tool_observations)
        usage: Usage | None = None
        decisions: list[Decision] = []
        call_id = ""
        try:
            for attempt in range(1, self.max_reasks + 2):
                call_id = new_call_id()
                self._started(call_id, attempt)
                started = anyio.current_time()
                try:
                    reply = await self._ask(prompt, call_id)
                except _OUTPUT_ERRORS as exc:
                    result = getattr(exc, "result", None)
                    if isinstance(result, ChatResult):
                        usage = _add(usage, result.usage)
                    self._failed(exc, call_id, final=True)
                    break
                except Exception as exc:
                    self._failed(exc, call_id, final=True)
                    raise
                usage = _add(usage, reply.usage)
                if self.events.wants(CallFinished):
                    self.events.emit(
                        CallFinished(
                            source=self.id,
                            call_id=call_id,
                            usage=_usage_dict(reply.usage),
                            stop_reason=reply.stop_reason,
                            latency_s=anyio.current_time() - started,
                            model=reply.model,
                        )
                    )
                try:
                    if reply.error is not None:
                        raise reply.error
                    decisions = parse_decisions(
                        reply.text,
                        sender=self.id,
                        tool_registry=self.tool_registry,
                        max_chars=self.max_output_chars,
                    )
                    break
                except DecisionParseError as exc:
                    final = attempt > self.max_reasks
                    self._failed(exc, call_id, final=final)
                    if final:
                        break
                    prompt = prompt + reask_turns(
                        reply.text if isinstance(reply.text, str) else safe_repr(reply.text),
                        exc,
                        tool_call_id=reply.tool_call_id,
                        structured=self.use_structured_output,
                    )
        finally:
            self.last_usage = usage
            if usage is not None:
                self.total_usage = self.total_usage + usage
        if self.events.wants(DecisionsMade):
            self.events.emit(
                DecisionsMade(source=self.id, call_id=call_id, decisions=tuple(decisions))
            )
        if self.memory is not None:
            for turn in [*new_turns, assistant_turn(decisions)]:
                self._remember(turn)
        return decisions

    def _remember(self, turn: dict[str, Any]) -> None:
        role, content = turn["role"], turn["content"] or ""
        extra = {k: v for k, v in turn.items() if k not in ("role", "content")}
        if not extra:
            self.memory.append(role, content)
            return
        try:
            self.memory.append(role, content, **extra)
        except TypeError:  # a memory taking only (role, content): keep the text
            if role == "tool":
                self.memory.append("user", f"Tool result: {content}")
            else:
                self.memory.append(role, content or json_text(extra) or "")

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
