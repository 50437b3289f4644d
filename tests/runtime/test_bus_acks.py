"""MessageBus contract C: acking subscriptions, ack listeners, dead letters, sinks."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from converge.core import Message, MessageHook
from converge.errors import BusFullError, UsageError
from converge.runtime import AckListener, MessageBus

pytestmark = pytest.mark.anyio


def msg(recipient: str | None = None, *topics: str, **payload: Any) -> Message:
    return Message(sender="s", recipient=recipient, topics=topics, payload=payload)


class Recorder:
    """An ack listener that records what it hears."""

    def __init__(self) -> None:
        self.settled: list[str] = []
        self.dead: list[tuple[str, str, str]] = []

    async def on_settled(self, message: Message) -> None:
        self.settled.append(message.id)

    async def on_dead(self, message: Message, consumer: str, reason: str) -> None:
        self.dead.append((message.id, consumer, reason))


def listening_bus(**kwargs: Any) -> tuple[MessageBus, Recorder]:
    bus = MessageBus(**kwargs)
    rec = Recorder()
    bus.add_ack_listener(rec)
    return bus, rec


async def test_message_settles_once_every_acking_receiver_acked() -> None:
    bus, rec = listening_bus()
    a = bus.subscribe("a", topics=["news"], ack=True)
    b = bus.subscribe(topics=["news"], ack=True, consumer="b")
    plain = bus.subscribe(topics=["news"])  # does not ack: not waited for
    m = msg("a", "news")
    assert await bus.publish(m) == 3
    assert rec.settled == []
    got = await a.receive()
    await a.aack(got)
    assert rec.settled == []
    await bus.aack(await b.receive(), "b")
    assert rec.settled == [m.id]
    assert bus.unacknowledged == 0
    assert (await plain.receive()).id == m.id


async def test_message_reaching_only_non_acking_receivers_settles_at_publish() -> None:
    bus, rec = listening_bus()
    bus.subscribe("a")
    m = msg("a")
    assert await bus.publish(m) == 1
    assert rec.settled == [m.id]


async def test_message_delivered_to_nobody_is_not_settled() -> None:
    class DropAll(MessageHook):
        async def apre_send(self, message: Message) -> Message | None:
            return None

    bus, rec = listening_bus()
    nobody = msg("nobody")
    assert await bus.publish(nobody) == 0
    hooked, _ = listening_bus(hooks=[DropAll()])
    hooked.add_ack_listener(rec)
    hooked.subscribe("a", ack=True)
    assert await hooked.publish(msg("a")) == 0
    assert rec.settled == []  # the publisher saw 0: an inbox publishes it again later
    assert bus.unacknowledged == 0
    assert hooked.unacknowledged == 0


async def test_ack_twice_or_by_a_stranger_does_nothing() -> None:
    bus, rec = listening_bus()
    sub = bus.subscribe("a", ack=True)
    bus.subscribe("b", topics=["t"], ack=True)
    m = msg("a", "t")
    await bus.publish(m)
    await bus.aack(m, "zed")
    await sub.aack(m)
    await sub.aack(m)
    assert rec.settled == []
    await bus.aack(m, "b")
    assert rec.settled == [m.id]


async def test_fast_ack_does_not_settle_before_the_slow_inbox_has_the_message() -> None:
    bus, rec = listening_bus()
    fast = bus.subscribe(topics=["t"], ack=True, consumer="fast")
    slow = bus.subscribe(topics=["t"], ack=True, consumer="slow", inbox_size=1)
    await bus.publish(msg(None, "t"))  # fills slow
    m = msg(None, "t")
    async with anyio.create_task_group() as tg:
        tg.start_soon(bus.publish, m)  # waits for slow's space after reaching fast
        await anyio.wait_all_tasks_blocked()
        first = await fast.receive()
        await fast.aack(first)
        await fast.aack(await fast.receive())
        assert m.id not in rec.settled
        await slow.aack(await slow.receive())
    await slow.aack(await slow.receive())
    assert rec.settled[-1] == m.id
    assert bus.unacknowledged == 0


async def test_receiver_may_ack_before_the_waiting_publisher_resumes() -> None:
    bus, rec = listening_bus()
    sub = bus.subscribe("a", ack=True, inbox_size=1)
    m0, m = msg("a"), msg("a")
    await bus.publish(m0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(bus.publish, m)
        await anyio.wait_all_tasks_blocked()
        await sub.aack(sub.receive_nowait())  # hands m into the inbox
        await sub.aack(sub.receive_nowait())  # acked before publish() resumes
    assert rec.settled == [m0.id, m.id]


async def test_dead_letter_tells_listeners_and_the_message_never_settles() -> None:
    bus, rec = listening_bus()
    a = bus.subscribe("a", topics=["t"], ack=True)
    b = bus.subscribe(topics=["t"], ack=True, consumer="b")
    m = msg("a", "t")
    await bus.publish(m)
    await a.adead_letter(await a.receive(), "gave up after 3 attempts")
    await b.aack(await b.receive())
    assert rec.dead == [(m.id, "a", "gave up after 3 attempts")]
    assert rec.settled == []
    assert bus.unacknowledged == 0
    assert bus.metrics.get("bus_dead_letters_total", labels={"consumer": "a"}) == 1


async def test_closed_subscription_is_not_waited_for() -> None:
    bus, rec = listening_bus()
    sub = bus.subscribe("a", topics=["t"], ack=True)
    bus.subscribe(topics=["t"])
    sub.close()
    m = msg("a", "t")
    assert await bus.publish(m) == 1
    assert rec.settled == [m.id]


async def test_all_or_none_publish_refused_settles_nothing() -> None:
    bus, rec = listening_bus()
    sub = bus.subscribe("a", ack=True, inbox_size=1)
    await bus.publish(msg("a"), wait=False)
    with pytest.raises(BusFullError):
        await bus.publish(msg("a"), wait=False)
    await sub.aack(sub.receive_nowait())
    assert len(rec.settled) == 1
    assert bus.unacknowledged == 0


async def test_failing_listener_is_logged_and_counted_and_others_still_hear() -> None:
    class Broken:
        async def on_settled(self, message: Message) -> None:
            raise RuntimeError("store down")

        async def on_dead(self, message: Message, consumer: str, reason: str) -> None:
            raise RuntimeError("store down")

    bus = MessageBus()
    bus.add_ack_listener(Broken())
    rec = Recorder()
    bus.add_ack_listener(rec)
    sub = bus.subscribe("a", ack=True)
    m = msg("a")
    await bus.publish(m)
    await sub.aack(m)
    await bus.adead_letter(msg("a"), "a", "x")
    assert rec.settled == [m.id]
    assert len(rec.dead) == 1
    assert bus.metrics.get("bus_ack_listener_errors_total") == 2
    bus.remove_ack_listener(rec)
    await bus.publish(msg("nobody"))
    assert rec.settled == [m.id]


async def test_sink_is_awaited_before_publish_returns_and_counts_as_a_receiver() -> None:
    bus = MessageBus()
    written: list[str] = []

    async def sink(message: Message) -> None:
        await anyio.sleep(0.01)  # a real write takes time
        written.append(message.id)

    bus.add_sink("bridge.webhook.outbound", sink)
    sub = bus.subscribe(topics=["bridge.#"])
    m = msg(None, "bridge.webhook.outbound")
    assert bus.has_subscribers(m)
    assert await bus.publish(m) == 2
    assert written == [m.id]
    assert (await sub.receive()).id == m.id
    assert await bus.publish(msg(None, "bridge.webhook.inbound")) == 1
    assert written == [m.id]
    bus.remove_sink(sink)
    assert await bus.publish(msg(None, "bridge.webhook.outbound")) == 1


async def test_a_sink_added_as_a_bound_method_is_removed_by_the_same_method() -> None:
    # obj.write is a new object on every access: removing by identity removed nothing,
    # so a RedisStreamsBridge kept exporting through its closed client after its exit.
    class Writer:
        def __init__(self) -> None:
            self.written: list[str] = []

        async def write(self, message: Message) -> None:
            self.written.append(message.id)

    bus = MessageBus()
    writer, other = Writer(), Writer()
    bus.add_sink("out", writer.write)
    bus.add_sink("out", other.write)
    bus.remove_sink(writer.write)
    m = msg(None, "out")
    assert await bus.publish(m) == 1
    assert (writer.written, other.written) == ([], [m.id])


async def test_failing_sink_raises_from_publish_and_delivers_nowhere() -> None:
    bus, rec = listening_bus()

    async def sink(message: Message) -> None:
        raise OSError("disk full")

    bus.add_sink(["out.#"], sink)
    sub = bus.subscribe(topics=["out"], ack=True)
    with pytest.raises(OSError, match="disk full"):
        await bus.publish(msg(None, "out"))
    assert len(sub) == 0
    assert rec.settled == []
    assert bus.unacknowledged == 0


async def test_recorder_is_an_ack_listener() -> None:
    assert isinstance(Recorder(), AckListener)


@pytest.mark.parametrize(
    ("call", "args"),
    [
        ("subscribe", {"recipient": "a", "ack": 1}),
        ("subscribe", {"recipient": "a", "consumer": ""}),
        ("add_sink", {"topics": [], "handler": print}),
        ("add_sink", {"topics": ["bad pattern"], "handler": print}),
        ("add_sink", {"topics": ["ok"], "handler": None}),
        ("add_ack_listener", {"listener": object()}),
    ],
)
def test_invalid_ack_and_sink_arguments_are_usage_errors(call: str, args: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        getattr(MessageBus(), call)(**args)
