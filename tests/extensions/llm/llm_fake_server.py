"""A loopback HTTP server speaking the OpenAI, Anthropic and Mistral wire formats.

The real SDK clients are pointed at it (``base_url``/``server_url``); nothing is mocked
inside the SDKs. Tests queue exact replies (status, headers, JSON or SSE bodies) and read
back every request the SDK sent. Each API lives under its own prefix on one server:

* OpenAI:    ``{url}/openai/v1``  -> ``POST /openai/v1/chat/completions``
* Anthropic: ``{url}/anthropic``  -> ``POST /anthropic/v1/messages``
* Mistral:   ``{url}/mistral``    -> ``POST /mistral/v1/chat/completions``

The server is a plain ASGI app run by uvicorn on its own thread and event loop, so it
serves tests on asyncio and trio alike. The benchmark reuses it (loaded by file path).
"""

from __future__ import annotations

import collections
import json
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from loopback import UvicornThread, read_request, serve_lifespan

__all__ = [
    "FakeLLMServer",
    "Recorded",
    "Reply",
    "anthropic_error",
    "anthropic_message",
    "anthropic_stream",
    "anthropic_tool_use",
    "closed_port_url",
    "error",
    "mistral_chat",
    "mistral_stream",
    "mistral_tool_call",
    "openai_chat",
    "openai_error",
    "openai_stream",
    "openai_tool_call",
    "raw",
]


@dataclass
class Reply:
    """One scripted HTTP answer.

    Attributes:
        status: HTTP status.
        body: Raw body (ignored when ``events`` is set).
        headers: Extra response headers.
        events: SSE frames, already encoded (``b"data: ...\\n\\n"``), sent one by one; a
            number in the list is a pause of that many seconds before the next frame.
        content_type: The ``content-type`` header.
        delay: Seconds to wait before answering (for timeout tests).
    """

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    events: list[bytes | float] | None = None
    content_type: str = "application/json"
    delay: float = 0.0


@dataclass
class Recorded:
    """A request the server received."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    client: tuple[str, int] | None = None

    @property
    def json(self) -> Any:
        """The request body decoded as JSON."""
        return json.loads(self.body)


class FakeLLMServer:
    """Scripted loopback server; see the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._script: collections.deque[Reply] = collections.deque()
        self.requests: list[Recorded] = []
        self.default: Reply | None = None
        self._uvicorn: UvicornThread | None = None
        self.url = ""

    # -- scripting -------------------------------------------------------------------

    def push(self, *replies: Reply) -> None:
        """Queue replies, answered in order (then ``default``, then a 599 error)."""
        with self._lock:
            self._script.extend(replies)

    def reset(self) -> None:
        """Forget queued replies, the default reply and recorded requests."""
        with self._lock:
            self._script.clear()
            self.requests.clear()
            self.default = None

    def _next(self) -> Reply:
        with self._lock:
            if self._script:
                return self._script.popleft()
            if self.default is not None:
                return self.default
        return error(599, {"error": {"message": "fake server: no scripted reply"}})

    # -- ASGI ------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        headers, body = await read_request(scope, receive)
        client = tuple(scope["client"]) if scope.get("client") else None
        recorded = Recorded(scope["method"], scope["path"], headers, body, time.time(), client)
        with self._lock:
            self.requests.append(recorded)
        reply = self._next()
        if reply.delay:
            import asyncio  # the server's own loop is asyncio (uvicorn)

            await asyncio.sleep(reply.delay)
        out_headers = [(b"content-type", reply.content_type.encode())]
        out_headers += [(k.encode(), v.encode()) for k, v in reply.headers.items()]
        if reply.events is None:
            out_headers.append((b"content-length", str(len(reply.body)).encode()))
            await send(
                {"type": "http.response.start", "status": reply.status, "headers": out_headers}
            )
            await send({"type": "http.response.body", "body": reply.body})
            return
        await send({"type": "http.response.start", "status": reply.status, "headers": out_headers})
        for frame in reply.events:
            if isinstance(frame, float | int):
                import asyncio

                await asyncio.sleep(frame)
                continue
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> FakeLLMServer:
        """Serve on 127.0.0.1 at a free port, on a daemon thread (``TCP_NODELAY``: see
        :func:`loopback.loopback_socket`)."""
        self._uvicorn = UvicornThread(
            self, nodelay=True, name="fake LLM server", timeout_keep_alive=30
        ).start()
        self.url = self._uvicorn.url
        return self

    def stop(self) -> None:
        """Stop serving and join the thread."""
        if self._uvicorn is not None:
            self._uvicorn.stop()

    @property
    def openai_url(self) -> str:
        """``base_url`` for the OpenAI SDK."""
        return f"{self.url}/openai/v1"

    @property
    def anthropic_url(self) -> str:
        """``base_url`` for the Anthropic SDK."""
        return f"{self.url}/anthropic"

    @property
    def mistral_url(self) -> str:
        """``server_url`` for the Mistral SDK."""
        return f"{self.url}/mistral"


def closed_port_url() -> str:
    """A loopback URL where nothing listens (connection refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# -- generic replies -----------------------------------------------------------------


def raw(status: int, body: bytes, *, content_type: str = "application/json", **kw: Any) -> Reply:
    """A reply with an exact body (for malformed-body tests)."""
    return Reply(status=status, body=body, content_type=content_type, **kw)


def error(status: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> Reply:
    """A JSON error reply."""
    return Reply(status=status, body=json.dumps(body).encode(), headers=dict(headers or {}))


def _json(body: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> Reply:
    return Reply(status=200, body=json.dumps(body).encode(), headers=dict(headers or {}))


def _sse(frames: Iterable[tuple[str | None, Any]]) -> Reply:
    encoded: list[bytes | float] = []
    for event, data in frames:
        payload = data if isinstance(data, str) else json.dumps(data)
        head = f"event: {event}\n" if event else ""
        encoded.append(f"{head}data: {payload}\n\n".encode())
    return Reply(status=200, events=encoded, content_type="text/event-stream")


# -- OpenAI (and the OpenAI-style shapes Mistral shares) ----------------------------


def _openai_usage(
    prompt: int, completion: int, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        **(extra or {}),
    }


def _completion(
    id_: str,
    model: str,
    choice: dict[str, Any],
    prompt: int,
    completion: int,
    usage: Mapping[str, Any] | bool = True,
) -> dict[str, Any]:
    """A ``chat.completion`` body with one choice and its usage (``usage=False``: none;
    a mapping: extra usage fields such as ``prompt_tokens_details``)."""
    body: dict[str, Any] = {
        "id": id_,
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [choice],
    }
    if usage is not False:
        extra = usage if isinstance(usage, Mapping) else None
        body["usage"] = _openai_usage(prompt, completion, extra)
    return body


def _chunk_base(id_: str, model: str) -> dict[str, Any]:
    """The fields every ``chat.completion.chunk`` of one stream repeats."""
    return {"id": id_, "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model}


def _text_chunks(base: dict[str, Any], deltas: Iterable[str]) -> list[tuple[str | None, Any]]:
    """A chunk stream's opening: the assistant role, then one chunk per text delta."""
    frames: list[tuple[str | None, Any]] = [
        (
            None,
            {
                **base,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "finish_reason": None,
                    }
                ],
            },
        )
    ]
    frames += [
        (None, {**base, "choices": [{"index": 0, "delta": {"content": d}, "finish_reason": None}]})
        for d in deltas
    ]
    return frames


def openai_chat(
    text: str | None,
    *,
    prompt_tokens: int = 11,
    completion_tokens: int = 7,
    headers: Mapping[str, str] | None = None,
    finish_reason: str = "stop",
    refusal: str | None = None,
    usage: Mapping[str, Any] | bool = True,
) -> Reply:
    """A ``chat.completion`` with one text choice (``usage``: see :func:`_completion`)."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if refusal is not None:
        message["refusal"] = refusal
    choice = {"index": 0, "finish_reason": finish_reason, "logprobs": None, "message": message}
    return _json(
        _completion("chatcmpl-1", "gpt-4o-mini", choice, prompt_tokens, completion_tokens, usage),
        headers,
    )


def openai_tool_call(
    name: str,
    arguments: str,
    *,
    prompt_tokens: int = 11,
    completion_tokens: int = 7,
    finish_reason: str = "tool_calls",
) -> Reply:
    """A ``chat.completion`` whose choice is one function tool call."""
    choice = {
        "index": 0,
        "finish_reason": finish_reason,
        "logprobs": None,
        "message": {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": name, "arguments": arguments},
                }
            ],
        },
    }
    return _json(_completion("chatcmpl-2", "gpt-4o-mini", choice, prompt_tokens, completion_tokens))


def openai_stream(
    deltas: Iterable[str],
    *,
    prompt_tokens: int = 11,
    completion_tokens: int = 7,
    usage: bool = True,
    finish_reason: str = "stop",
) -> Reply:
    """An SSE stream of ``chat.completion.chunk`` deltas, a usage chunk, then ``[DONE]``."""
    base = _chunk_base("chatcmpl-3", "gpt-4o-mini")
    frames = _text_chunks(base, deltas)
    finish = {"index": 0, "delta": {}, "finish_reason": finish_reason}
    frames.append((None, {**base, "choices": [finish]}))
    if usage:
        frames.append(
            (
                None,
                {**base, "choices": [], "usage": _openai_usage(prompt_tokens, completion_tokens)},
            )
        )
    frames.append((None, "[DONE]"))
    return _sse(frames)


def openai_error(
    status: int,
    message: str = "error",
    *,
    type_: str = "invalid_request_error",
    headers: Mapping[str, str] | None = None,
) -> Reply:
    """An OpenAI-style error body."""
    return error(status, {"error": {"message": message, "type": type_, "code": None}}, headers)


# -- Anthropic -----------------------------------------------------------------------


def _anthropic_msg(
    content: list[dict[str, Any]],
    stop: str,
    inp: int,
    out: int,
    usage: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-20250514",
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {"input_tokens": inp, "output_tokens": out, **(usage or {})},
    }


def anthropic_message(
    text: str,
    *,
    input_tokens: int = 13,
    output_tokens: int = 5,
    headers: Mapping[str, str] | None = None,
    stop_reason: str = "end_turn",
    usage: Mapping[str, Any] | None = None,
) -> Reply:
    """A ``message`` with one text block (``usage``: extra usage fields)."""
    blocks = [{"type": "text", "text": text}] if text else []
    return _json(_anthropic_msg(blocks, stop_reason, input_tokens, output_tokens, usage), headers)


def anthropic_tool_use(
    name: str,
    tool_input: Any,
    *,
    input_tokens: int = 13,
    output_tokens: int = 5,
    preamble: str | None = None,
) -> Reply:
    """A ``message`` whose content is a ``tool_use`` block (after optional text)."""
    blocks: list[dict[str, Any]] = []
    if preamble is not None:
        blocks.append({"type": "text", "text": preamble})
    blocks.append({"type": "tool_use", "id": "toolu_1", "name": name, "input": tool_input})
    return _json(_anthropic_msg(blocks, "tool_use", input_tokens, output_tokens))


def anthropic_stream(
    deltas: Iterable[str],
    *,
    input_tokens: int = 13,
    output_tokens: int = 5,
    stop_reason: str = "end_turn",
    usage: Mapping[str, Any] | None = None,
) -> Reply:
    """The Messages API event stream for one text block (``usage``: extra fields of the
    ``message_start`` usage, e.g. cache counts)."""
    start = _anthropic_msg([], "", input_tokens, 1, usage)
    start["stop_reason"] = None
    frames: list[tuple[str | None, Any]] = [
        ("message_start", {"type": "message_start", "message": start}),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        ("ping", {"type": "ping"}),
    ]
    frames += [
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": d}},
        )
        for d in deltas
    ]
    frames += [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": output_tokens},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    return _sse(frames)


def anthropic_error(
    status: int,
    message: str = "error",
    *,
    type_: str = "api_error",
    headers: Mapping[str, str] | None = None,
) -> Reply:
    """An Anthropic-style error body."""
    return error(status, {"type": "error", "error": {"type": type_, "message": message}}, headers)


# -- Mistral -------------------------------------------------------------------------


def mistral_chat(
    text: str,
    *,
    prompt_tokens: int = 17,
    completion_tokens: int = 3,
    headers: Mapping[str, str] | None = None,
    finish_reason: str = "stop",
    usage: Mapping[str, Any] | bool = True,
) -> Reply:
    """A Mistral ``chat.completion`` with one text choice."""
    choice = {
        "index": 0,
        "finish_reason": finish_reason,
        "message": {"role": "assistant", "content": text, "tool_calls": None},
    }
    body = _completion(
        "cmpl-1", "mistral-small-latest", choice, prompt_tokens, completion_tokens, usage
    )
    return _json(body, headers)


def mistral_tool_call(
    name: str, arguments: str, *, prompt_tokens: int = 17, completion_tokens: int = 3
) -> Reply:
    """A Mistral ``chat.completion`` whose choice is one function tool call."""
    choice = {
        "index": 0,
        "finish_reason": "tool_calls",
        "message": {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "abc123def",
                    "type": "function",
                    "function": {"name": name, "arguments": arguments},
                }
            ],
        },
    }
    return _json(
        _completion("cmpl-2", "mistral-small-latest", choice, prompt_tokens, completion_tokens)
    )


def mistral_stream(
    deltas: Iterable[str],
    *,
    prompt_tokens: int = 17,
    completion_tokens: int = 3,
    finish_reason: str = "stop",
) -> Reply:
    """A Mistral SSE stream; the last chunk carries ``finish_reason`` and usage."""
    base = _chunk_base("cmpl-3", "mistral-small-latest")
    frames = _text_chunks(base, deltas)
    frames.append(
        (
            None,
            {
                **base,
                "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": finish_reason}],
                "usage": _openai_usage(prompt_tokens, completion_tokens),
            },
        )
    )
    frames.append((None, "[DONE]"))
    return _sse(frames)
