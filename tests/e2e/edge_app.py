"""The whole edge in one process, for the crash tests (run as a script, killed with -9).

``python edge_app.py <backend> <db> <receiver_url> <calls_file> <pause>``

A connector on SQLite (durable inbox and outbox), a :class:`MessageBus`, an
:class:`AgentRunner` recording decisions in the same store, one scripted agent that sends
one outbound message per inbound event to ``bridge.webhook.outbound`` (the connector's
outbox sink), and the dispatcher delivering to ``receiver_url``; served over HTTP by
hypercorn on ``backend`` (asyncio or trio). Prints its URL once it listens.

The agent appends ``{"call": event_id, "pid": ...}`` to ``calls_file`` for every
``adecide`` of an event (the model call a real agent would make). ``pause`` is ``-``, or
``decide:<event_id>`` to stop inside that event's ``adecide``, or ``ack:<event_id>`` to
stop after its outbound message is in the outbox and before the inbound event is
acknowledged; either way it writes ``{"paused": ...}`` first, so the test knows when to
kill it.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Any

import anyio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from webhook_helpers import HMAC_SECRET

from converge.core import Agent, Identity, Message, SendMessage, Task
from converge.extensions.connectors import (
    INBOUND_TOPIC,
    OutboundTarget,
    ProviderProfile,
    WebhookConnector,
    WebhookGateway,
)
from converge.extensions.connectors.connector import OUTBOUND_TOPIC
from converge.extensions.connectors.outbound.retry import RetrySchedule
from converge.extensions.storage import SQLiteStore
from converge.runtime import AgentRetry, AgentRunner, MessageBus
from loopback import loopback_socket

LEASE_SEC = 1.0
# The agent's id must survive the restart: decision records are keyed on it.
IDENTITY = Identity(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))


class Notes:
    """Appends JSON lines the test reads (one write per line: a kill never tears one)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, **fields: Any) -> None:
        os.write(self.fd, (json.dumps({**fields, "pid": os.getpid()}) + "\n").encode())


class ScriptedAgent(Agent):
    """One outbound message per inbound event; notes every call."""

    def __init__(self, notes: Notes, pause: str) -> None:
        super().__init__(IDENTITY, name="scripted")
        self.notes = notes
        self.pause = pause

    async def adecide(self, messages: list[Message], tasks: list[Task], **kw: Any) -> Any:
        decisions = []
        for message in messages:
            event_id = message.payload["event_id"]
            self.notes.write(call=event_id)
            if self.pause == f"decide:{event_id}":
                self.notes.write(paused="decide", event=event_id)
                await anyio.sleep_forever()
            body = {"event_id": event_id}
            reply = Message(
                sender=self.id,
                topics=[OUTBOUND_TOPIC],
                payload={"target": "receiver", "body": body},
            )
            decisions.append(SendMessage(reply))
        return decisions


async def serve(backend: str, app: Any, sock: Any) -> None:
    import hypercorn.config

    config = hypercorn.config.Config()
    config.bind = [f"fd://{sock.fileno()}"]
    config.loglevel = "WARNING"
    config.accesslog = None
    if backend == "trio":
        import hypercorn.trio

        await hypercorn.trio.serve(app, config)
    else:
        import hypercorn.asyncio

        await hypercorn.asyncio.serve(app, config)


async def main(backend: str, db: str, receiver_url: str, calls: str, pause: str) -> None:
    notes = Notes(calls)
    store = SQLiteStore(db)
    connector = WebhookConnector(
        provider_profiles={"shop": ProviderProfile("shop", "shop")},
        secrets={"shop": HMAC_SECRET},
        store=store,
        targets=[OutboundTarget("receiver", f"{receiver_url}/events")],
        retry_policy=RetrySchedule(
            delays_sec=(0.1, 0.2, 0.5), request_timeout_sec=1.0, lease_margin_sec=0.5
        ),
        inbox_lease_sec=LEASE_SEC,
    )
    bus = MessageBus()
    agent = ScriptedAgent(notes, pause)
    runner = AgentRunner(
        bus,
        [agent],
        topics={"scripted": [INBOUND_TOPIC]},
        store=store,
        max_batch=1,  # one event per adecide: the calls file then maps calls to events
        retry=AgentRetry(backoff=0.1),
    )
    connector.attach_bus(bus)  # inbox acknowledgements + the outbox sink

    async def pause_after_outbox(message: Message) -> None:
        # registered after the connector's sink: the action is in the outbox already
        event_id = message.payload["body"]["event_id"]
        if pause == f"ack:{event_id}":
            notes.write(paused="ack", event=event_id)
            await anyio.sleep_forever()

    bus.add_sink(OUTBOUND_TOPIC, pause_after_outbox)
    app = WebhookGateway(connector).asgi_app(run_dispatcher=False)
    sock = loopback_socket()
    sock.listen(128)
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)
        tg.start_soon(functools.partial(connector.run_outbound_dispatcher, poll_interval_sec=0.1))
        tg.start_soon(serve, backend, app, sock)
        print(f"http://127.0.0.1:{sock.getsockname()[1]}", flush=True)


if __name__ == "__main__":
    backend_name, db_path, receiver, calls_path, pause_at = sys.argv[1:6]
    anyio.run(main, backend_name, db_path, receiver, calls_path, pause_at, backend=backend_name)
