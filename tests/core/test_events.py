"""Progress events: frozen records, JSON-ready dicts, an emitter that never blocks."""

from __future__ import annotations

import gc
import json
import threading
import warnings

import anyio
import anyio.lowlevel
import pytest

from converge.core.decisions import SendMessage, UpdateTask
from converge.core.events import (
    CallFailed,
    CallFinished,
    CallStarted,
    DecisionsMade,
    EventEmitter,
    ProgressEvent,
    TextDelta,
    ToolInvoked,
    ToolResult,
    new_call_id,
)
from converge.core.message import Message
from converge.core.task import TaskState
from converge.errors import ProviderRateLimitError, UsageError
from nesting import deep_dict, deep_list


def test_events_are_frozen_and_serialise_to_json() -> None:
    call = new_call_id()
    message = Message(sender="a", recipient="b", payload={"text": "hi"})
    events: list[ProgressEvent] = [
        CallStarted(source="a", call_id=call, provider="OpenAIProvider", model="gpt"),
        TextDelta(source="a", call_id=call, text="hel"),
        ToolInvoked(source="a", tool_name="lookup", arguments={"q": 1}, tool_call_id="c1"),
        ToolResult(source="a", tool_name="lookup", tool_call_id="c1", result=object()),
        DecisionsMade(
            source="a",
            call_id=call,
            decisions=(SendMessage(message), UpdateTask("t1", TaskState.COMPLETED)),
        ),
        CallFinished(
            source="a",
            call_id=call,
            usage={"input_tokens": 3, "cache_read_tokens": None},
            stop_reason="stop",
        ),
        CallFailed.from_exception(
            ProviderRateLimitError("slow", provider="x"), source="a", call_id=call
        ),
    ]
    for event in events:
        with pytest.raises(AttributeError):
            event.source = "b"  # type: ignore[misc]
        data = event.to_dict()
        assert data["type"] == type(event).__name__
        assert data["source"] == "a"
        json.dumps(data, allow_nan=False)
    assert events[3].to_dict()["result"].startswith("<object")  # non-JSON is repr'd
    assert events[4].to_dict()["decisions"][0]["type"] == "SendMessage"
    assert events[6].to_dict()["error_type"] == "ProviderRateLimitError"
    assert len(new_call_id()) == 32
    assert new_call_id() != new_call_id()


@pytest.mark.parametrize(
    "build",
    [
        lambda: CallStarted(call_id=1, provider="p"),
        lambda: CallStarted(call_id="c", provider="p", attempt=0),
        lambda: TextDelta(call_id="c", text=None),
        lambda: ToolInvoked(tool_name="t", arguments=[1], tool_call_id="c"),
        lambda: DecisionsMade(decisions=["x"]),
        lambda: CallFinished(call_id="c", usage=5),
        lambda: CallFailed(error_type="E", error="m", final="yes"),
        lambda: ProgressEvent(at=float("nan")),
        lambda: ProgressEvent(source=3),
        lambda: CallFailed.from_exception("boom"),
        lambda: CallFailed.from_exception(deep_list()),  # str(): RecursionError
    ],
)
def test_invalid_event_fields_are_usage_errors(build: object) -> None:
    with pytest.raises(UsageError):
        build()  # type: ignore[operator]


def test_to_dict_survives_values_too_deep_to_repr() -> None:
    # json.dumps failed with RecursionError, and so did the repr fallback.
    result = ToolResult(tool_name="t", tool_call_id="c", result=deep_list()).to_dict()
    assert result["result"].startswith("[[[[")
    assert len(result["result"]) < 100  # depth bounded
    invoked = ToolInvoked(tool_name="t", arguments=deep_dict(), tool_call_id="c").to_dict()
    assert invoked["arguments"].startswith("{'")
    assert len(invoked["arguments"]) < 200
    json.dumps([result, invoked])


class BrokenStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str")


@pytest.mark.parametrize("exc", [BrokenStr(), ValueError(deep_list())])
def test_from_exception_survives_an_exception_str_cannot_show(exc: Exception) -> None:
    event = CallFailed.from_exception(exc, call_id="c")
    assert event.error_type == type(exc).__name__
    assert "str() failed" in event.error


@pytest.mark.parametrize("event_type", [None, "TextDelta", int, TextDelta(call_id="c", text="")])
def test_wants_and_accepts_refuse_what_is_not_an_event_class(event_type: object) -> None:
    emitter = EventEmitter()
    with pytest.raises(UsageError):  # checked even with no subscriber
        emitter.wants(event_type)  # type: ignore[arg-type]
    sub = emitter.subscribe(lambda e: None, types=TextDelta)  # issubclass raised TypeError
    with pytest.raises(UsageError):
        emitter.wants(event_type)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        sub.accepts(event_type)  # type: ignore[arg-type]


def test_emit_without_listeners_is_a_noop() -> None:
    emitter = EventEmitter()
    assert not emitter.wants(TextDelta)
    emitter.emit(TextDelta(call_id="c", text="x"))  # nothing to do, nothing raised
    assert len(emitter) == 0


def test_callbacks_get_matching_events_and_errors_are_contained() -> None:
    emitter = EventEmitter()
    seen: list[ProgressEvent] = []
    deltas: list[ProgressEvent] = []
    sub = emitter.subscribe(seen.append)
    emitter.subscribe(deltas.append, types=TextDelta)

    def broken(event: ProgressEvent) -> None:
        raise RuntimeError("ui bug")

    emitter.subscribe(broken)
    assert emitter.wants(TextDelta)
    assert emitter.wants(CallStarted)
    emitter.emit(CallStarted(call_id="c", provider="p"))
    emitter.emit(TextDelta(call_id="c", text="x"))
    assert [type(e) for e in seen] == [CallStarted, TextDelta]
    assert [type(e) for e in deltas] == [TextDelta]
    assert emitter.errors == 2
    sub.close()
    sub.close()  # idempotent
    emitter.emit(TextDelta(call_id="c", text="y"))
    assert len(seen) == 2
    assert len(emitter) == 2


def test_type_filter_selects_wants() -> None:
    emitter = EventEmitter()
    with emitter.subscribe(lambda e: None, types=(CallStarted, CallFinished)):
        assert emitter.wants(CallStarted)
        assert not emitter.wants(TextDelta)
    assert not emitter.wants(CallStarted)
    with pytest.raises(UsageError):
        emitter.subscribe(lambda e: None, types=(int,))  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        emitter.subscribe("nope")  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_stream_subscriber_receives_in_order_and_ends_on_close() -> None:
    emitter = EventEmitter()
    got: list[str] = []
    with emitter.open_stream(max_buffer=8) as stream:

        async def read() -> None:
            async for event in stream:
                assert isinstance(event, TextDelta)
                got.append(event.text)

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            for piece in ("a", "b", "c"):
                emitter.emit(TextDelta(call_id="c", text=piece))
                await anyio.lowlevel.checkpoint()
            stream.close()
    assert got == ["a", "b", "c"]
    assert len(emitter) == 0


@pytest.mark.anyio
async def test_full_stream_drops_instead_of_blocking() -> None:
    emitter = EventEmitter()
    with emitter.open_stream(max_buffer=2) as stream:
        for i in range(5):  # emit is synchronous: it cannot wait for the reader
            emitter.emit(TextDelta(call_id="c", text=str(i)))
        assert stream.dropped == 3
        assert emitter.dropped == 3
        assert (await stream.areceive()).text == "0"  # type: ignore[attr-defined]
        assert (await stream.areceive()).text == "1"  # type: ignore[attr-defined]
    with pytest.raises(UsageError):
        emitter.open_stream(max_buffer=0)


@pytest.mark.anyio
async def test_closed_receiver_unsubscribes_itself() -> None:
    emitter = EventEmitter()
    stream = emitter.open_stream()
    stream.receive.close()
    emitter.emit(TextDelta(call_id="c", text="x"))
    assert len(emitter) == 0


@pytest.mark.anyio
async def test_a_stream_used_as_documented_leaves_no_end_open() -> None:
    # anyio warns (ResourceWarning) about a memory stream end dropped unclosed: leaving
    # the with block, reading to the end and a reader that closed its end each left one.
    emitter = EventEmitter()
    gc.collect()  # earlier tests' garbage warns now, not among this test's warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with emitter.open_stream() as kept:
            emitter.emit(TextDelta(call_id="c", text="unread"))
        with pytest.raises(anyio.EndOfStream):  # left unread by the with block
            await kept.areceive()
        drained = emitter.open_stream()
        emitter.emit(TextDelta(call_id="c", text="x"))
        drained.close()
        assert [event.text async for event in drained] == ["x"]  # type: ignore[attr-defined]
        with pytest.raises(anyio.EndOfStream):
            await drained.areceive()
        abandoned = emitter.open_stream()
        abandoned.receive.close()
        emitter.emit(TextDelta(call_id="c", text="y"))
        assert len(emitter) == 0
        del kept, drained, abandoned
        gc.collect()
    assert [str(w.message) for w in caught if w.category is ResourceWarning] == []


def test_subscribers_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import converge.core.events as events

    monkeypatch.setattr(events, "MAX_SUBSCRIBERS", 2)
    emitter = EventEmitter()
    emitter.subscribe(lambda e: None)
    emitter.subscribe(lambda e: None)
    with pytest.raises(UsageError, match="subscribers"):
        emitter.subscribe(lambda e: None)


def test_emit_from_threads_reaches_a_callback() -> None:
    emitter = EventEmitter()
    seen: list[ProgressEvent] = []
    lock = threading.Lock()

    def record(event: ProgressEvent) -> None:
        with lock:
            seen.append(event)

    emitter.subscribe(record)
    threads = [
        threading.Thread(
            target=lambda: [emitter.emit(TextDelta(call_id="c", text="x")) for _ in range(100)]
        )
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 400
