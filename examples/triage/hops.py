"""Each hop an issue takes, as progress events, and the console display of them.

Hops are :class:`Hop` progress events (a :class:`~converge.core.events.ProgressEvent`)
on the same :class:`~converge.core.events.EventEmitter` as the agent's own events:

* ``received``: a request reached ``POST /webhook/github`` (:class:`HopTracker`, an
  ASGI wrapper); ``rejected`` / ``duplicate`` when it was answered 4xx / 200;
* ``verified``: its signature checked out and it is in the durable inbox (the
  connector's inbound listener, before the 202);
* ``decided``: the agent's decisions (:class:`~converge.core.events.DecisionsMade`, and
  :class:`~converge.core.events.ToolInvoked` for each tool call);
* ``delivered`` / ``retrying``: an outbound attempt's answer (:class:`TrackingSender`,
  the connector's ``outbound_sender``).

The connector and its dispatcher log the same moments as event log lines
(``converge.events`` logger: ``inbound.accepted``, ``inbound.rejected``,
``outbound.delivered``, ...), shown with ``--log-level info``. :class:`HopDisplay`
prints one line per hop and keeps a status line with the counts (redrawn in place on a
terminal; a plain line every few seconds when the output is not a terminal).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import IO, Any

import anyio
import httpx2

from converge.core.decisions import InvokeTool, SendMessage
from converge.core.events import DecisionsMade, EventEmitter, ProgressEvent, ToolInvoked
from converge.durable import Record
from converge.extensions.connectors import OutboundRequest, OutboundResponse

__all__ = ["HOPS", "Hop", "HopDisplay", "HopTracker", "TrackingSender", "verified_listener"]

#: Every hop name, in the order an issue takes them.
HOPS = ("received", "verified", "decided", "delivered")

_Scope = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
_Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Hop(ProgressEvent):
    """One step of one issue.

    Attributes:
        hop: ``received``, ``verified``, ``rejected``, ``duplicate``, ``tool``,
            ``decided``, ``delivered`` or ``retrying``.
        issue: The issue number, when known at that hop.
        ref: The GitHub delivery id (inbound) or outbox action id (outbound).
        detail: A short human-readable detail.
        latency_ms: How long the step took, when measured.
    """

    hop: str
    issue: int | None = None
    ref: str = ""
    detail: str = ""
    latency_ms: float | None = None


class HopTracker:
    """ASGI wrapper around the gateway: ``received`` and ``rejected``/``duplicate`` hops.

    Args:
        app: The gateway's ASGI app.
        events: Where the hops go.
        provider: The provider name (``/webhook/{provider}``) to watch.
    """

    def __init__(self, app: Any, events: EventEmitter, provider: str = "github") -> None:
        self.app = app
        self.events = events
        self.path = f"/webhook/{provider}"
        self.provider = provider

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        """The ASGI 3 entry point."""
        if scope.get("type") != "http" or scope.get("path") != self.path:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        ref = headers.get("x-github-delivery", "")[:36]
        self.events.emit(Hop(hop="received", ref=ref, detail=headers.get("x-github-event", "")))
        status = 0
        chunks: list[bytes] = []

        async def watch(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body" and status != 202:
                chunks.append(message.get("body", b""))
            await send(message)

        await self.app(scope, receive, watch)
        if status == 202:
            return
        try:
            answer = json.loads(b"".join(chunks) or b"{}")
        except ValueError:
            answer = {}
        reason = str(answer.get("reason") or answer.get("status") or status)
        if status == 200:
            self.events.emit(Hop(hop="duplicate", ref=ref, detail="already accepted"))
            return
        self.events.emit(Hop(hop="rejected", ref=ref, detail=f"{status} {reason}"))


def _issue_of(github: Any) -> int | None:
    issue = github.get("issue") if isinstance(github, dict) else None
    number = issue.get("number") if isinstance(issue, dict) else None
    return number if isinstance(number, int) else None


def verified_listener(events: EventEmitter) -> Callable[[Record], None]:
    """A connector inbound listener emitting ``verified`` for each stored event."""

    def listener(record: Record) -> None:
        item = record.data.get("item")
        event = item.get("payload") if isinstance(item, dict) else None
        event = event if isinstance(event, dict) else {}
        github = event.get("payload")
        action = github.get("action", "") if isinstance(github, dict) else ""
        events.emit(
            Hop(
                hop="verified",
                issue=_issue_of(github),
                ref=str(event.get("event_id", ""))[:36],
                detail=f"{event.get('subject', '')} {action}".strip(),
            )
        )

    return listener


class TrackingSender:
    """The connector's ``outbound_sender``: sends over HTTP and emits the answer as a hop.

    Args:
        events: Where the hops go.
        client: The HTTP client (closed by the caller).
    """

    def __init__(self, events: EventEmitter, client: httpx2.AsyncClient) -> None:
        self.events = events
        self.client = client

    async def __call__(self, request: OutboundRequest) -> OutboundResponse:
        """Send one attempt; a failure to connect raises (the dispatcher retries)."""
        try:
            number = json.loads(request.content).get("issue")
        except (ValueError, AttributeError):
            number = None
        issue = number if isinstance(number, int) else None
        started = time.perf_counter()
        try:
            answer = await self.client.request(
                request.method,
                request.url,
                headers=request.headers,
                content=request.content,
                timeout=request.timeout,
            )
        except httpx2.HTTPError as exc:
            detail = f"attempt {request.attempt}: {type(exc).__name__}"
            self.events.emit(Hop(hop="retrying", issue=issue, ref=request.action_id, detail=detail))
            raise
        latency = (time.perf_counter() - started) * 1000
        code = answer.status_code
        hop = "delivered" if 200 <= code < 300 else "retrying"
        detail = f"{code} {answer.text[:60]}, attempt {request.attempt}"
        self.events.emit(
            Hop(hop=hop, issue=issue, ref=request.action_id, detail=detail, latency_ms=latency)
        )
        return OutboundResponse(code, dict(answer.headers))


class HopDisplay:
    """Prints hops as they happen, and a status line with the counts.

    Subscribe it to the emitter (``events.subscribe(display)``) and run
    :meth:`run` beside the app for the periodic status line.

    Args:
        stream: Where to print (stdout by default).
        quiet: Print only the status line, not every hop.
        tty: Redraw the status line in place; by default when ``stream`` is a terminal.
    """

    def __init__(
        self, stream: IO[str] | None = None, *, quiet: bool = False, tty: bool | None = None
    ) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.quiet = quiet
        self.tty = self.stream.isatty() if tty is None else tty
        self.counts: dict[str, int] = dict.fromkeys(
            ("received", "verified", "rejected", "duplicate", "decided", "delivered", "retrying"),
            0,
        )
        self.started = time.monotonic()
        self._verified_at: dict[int, float] = {}
        self.latencies_ms: list[float] = []
        self._shown = ""
        self._waiters: list[tuple[str, int, anyio.Event]] = []

    def __call__(self, event: ProgressEvent) -> None:
        """Take one event (a :class:`Hop`, or one of the agent's events)."""
        line = self._line(event)
        if line is None:
            return
        if not self.quiet:
            self._print(line)
        if self.tty:
            self._draw()
        for waiter in [w for w in self._waiters if self.counts.get(w[0], 0) >= w[1]]:
            self._waiters.remove(waiter)
            waiter[2].set()

    async def wait_for(self, hop: str, count: int) -> None:
        """Return once ``count`` hops named ``hop`` were seen (on the emitting loop)."""
        if self.counts.get(hop, 0) >= count:
            return
        event = anyio.Event()
        self._waiters.append((hop, count, event))
        await event.wait()

    def _line(self, event: ProgressEvent) -> str | None:
        if isinstance(event, Hop):
            self.counts[event.hop] = self.counts.get(event.hop, 0) + 1
            if event.hop == "verified" and event.issue is not None:
                self._verified_at[event.issue] = time.monotonic()
            if event.hop == "delivered" and event.issue is not None:
                began = self._verified_at.pop(event.issue, None)
                if began is not None:
                    self.latencies_ms.append((time.monotonic() - began) * 1000)
            who = f"#{event.issue}" if event.issue is not None else event.ref[:8]
            return f"{event.hop:<9} {who:<8} {event.detail}"
        if isinstance(event, ToolInvoked):
            args = json.dumps(event.arguments, ensure_ascii=False)
            return f"{'tool':<9} {'':<8} {event.tool_name} {args[:90]}"
        if isinstance(event, DecisionsMade):
            sends = [d for d in event.decisions if isinstance(d, SendMessage)]
            calls = [d.tool_name for d in event.decisions if isinstance(d, InvokeTool)]
            if not sends:
                return None if calls else f"{'decided':<9} {'':<8} nothing to do"
            self.counts["decided"] += 1
            body = sends[0].message.to_dict()["payload"].get("body", {})
            issue = body.get("issue") if isinstance(body, dict) else None
            labels = ",".join(body.get("labels", ())) if isinstance(body, dict) else ""
            return f"{'decided':<9} #{issue!s:<7} reply labelled {labels}"
        return None

    def status(self) -> str:
        """The status line: counts, rate and the median time from verified to delivered."""
        c = self.counts
        elapsed = max(time.monotonic() - self.started, 1e-9)
        median = f"{statistics.median(self.latencies_ms):.0f} ms" if self.latencies_ms else "-"
        return (
            f"[{elapsed:6.1f}s] received {c['received']}  verified {c['verified']}  "
            f"decided {c['decided']}  delivered {c['delivered']}  rejected {c['rejected']}  "
            f"retries {c['retrying']}  median verified->delivered {median}"
        )

    def _print(self, line: str) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
        self.stream.write(line + "\n")
        self.stream.flush()

    def _draw(self) -> None:
        self.stream.write("\r\x1b[K" + self.status())
        self.stream.flush()

    def tick(self) -> None:
        """Refresh the status line (on a terminal), or print it if it changed."""
        if self.tty:
            self._draw()
            return
        text = self.status()
        counts = text.split("]", 1)[1]
        if counts != self._shown:
            self._shown = counts
            self.stream.write(text + "\n")
            self.stream.flush()

    async def run(self, interval_sec: float = 1.0) -> None:
        """Refresh the status line every ``interval_sec`` (plain lines: every 5 s)."""
        every = interval_sec if self.tty else max(interval_sec, 5.0)
        while True:
            await anyio.sleep(every)
            self.tick()

    def close(self) -> None:
        """End the status line (print a final plain one)."""
        if self.tty:
            self.stream.write("\r\x1b[K")
        self.stream.write(self.status() + "\n")
        self.stream.flush()
