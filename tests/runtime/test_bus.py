"""MessageBus: matching, the hook pipeline, bounded inboxes, closing."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from converge.core import Message, MessageHook, MetricsCollector
from converge.errors import BusFullError, ClosedError, UsageError
from converge.runtime import MessageBus, Subscription

pytestmark = pytest.mark.anyio


def msg(recipient: str | None = None, *topics: str, sender: str = "s", **payload: Any) -> Message:
    return Message(sender=sender, recipient=recipient, topics=topics, payload=payload)


def drain(sub: Any) -> list[Message]:
    out = []
    while True:
        try:
            out.append(sub.receive_nowait())
        except (anyio.WouldBlock, anyio.EndOfStream):
            return out


# -- matching --------------------------------------------------------------------------


async def test_message_reaches_its_recipient_only() -> None:
    bus = MessageBus()
    a, b = bus.subscribe("a"), bus.subscribe("b")
    assert await bus.publish(msg("a", n=1)) == 1
    assert [m.payload["n"] for m in drain(a)] == [1]
    assert drain(b) == []


@pytest.mark.parametrize(
    ("pattern", "topic", "matches"),
    [
        ("orders", "orders", True),
        ("orders", "orders.new", False),
        ("orders.*", "orders.new", True),
        ("orders.*", "orders.new.eu", False),
        ("orders.*", "orders", False),
        ("orders.#", "orders", True),
        ("orders.#", "orders.new.eu", True),
        ("orders.#", "ordersx", False),
    ],
)
async def test_topic_patterns_match_like_topic_matches(
    pattern: str, topic: str, matches: bool
) -> None:
    bus = MessageBus()
    sub = bus.subscribe(topics=[pattern])
    assert await bus.publish(msg(None, topic)) == int(matches)
    assert bus.has_subscribers(msg(None, topic)) is matches
    assert len(drain(sub)) == int(matches)


async def test_subscription_matching_recipient_and_topic_gets_one_copy() -> None:
    bus = MessageBus()
    sub = bus.subscribe("a", topics=["news", "news.#"])
    other = bus.subscribe(topics=["news"])
    assert await bus.publish(msg("a", "news", "news")) == 2
    assert len(drain(sub)) == 1
    assert len(drain(other)) == 1


async def test_publish_without_subscribers_returns_zero() -> None:
    bus = MessageBus()
    assert not bus.has_subscribers(msg("nobody"))
    assert await bus.publish(msg("nobody")) == 0


async def test_messages_arrive_in_publish_order() -> None:
    bus = MessageBus()
    sub = bus.subscribe("a")
    for i in range(20):
        await bus.publish(msg("a", n=i))
    assert [m.payload["n"] for m in drain(sub)] == list(range(20))


# -- hooks -----------------------------------------------------------------------------


class Recorder(MessageHook):
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    async def apre_send(self, message: Message) -> Message | None:
        self.log.append(f"{self.name}.pre")
        return message

    async def apost_receive(self, message: Message) -> Message | None:
        self.log.append(f"{self.name}.post:{message.recipient or message.topics[0]}")
        return message


async def test_hooks_run_pre_send_in_order_then_post_receive_per_receiver() -> None:
    log: list[str] = []
    bus = MessageBus(hooks=[Recorder("h1", log), Recorder("h2", log)])
    bus.subscribe(topics=["t"])
    bus.subscribe(topics=["t.#"])
    assert await bus.publish(msg(None, "t")) == 2
    assert log == ["h1.pre", "h2.pre", "h1.post:t", "h2.post:t", "h1.post:t", "h2.post:t"]


class Stamp(MessageHook):
    def pre_send(self, message: Message) -> Message | None:
        return Message(sender=message.sender, recipient=message.recipient, payload={"stamped": 1})


async def test_a_hook_may_replace_the_message() -> None:
    bus = MessageBus(hooks=[Stamp()])
    sub = bus.subscribe("a")
    await bus.publish(msg("a"))
    assert drain(sub)[0].payload == {"stamped": 1}


class DropPre(MessageHook):
    def pre_send(self, message: Message) -> Message | None:
        return None


class DropFor(MessageHook):
    def __init__(self, recipient: str) -> None:
        self.recipient = recipient
        self.seen: list[Message] = []

    def post_receive(self, message: Message) -> Message | None:
        self.seen.append(message)
        return None if message.payload.get("to") == self.recipient else message


async def test_pre_send_returning_none_drops_for_everyone_and_skips_later_hooks() -> None:
    later = DropFor("x")
    metrics = MetricsCollector()
    bus = MessageBus(hooks=[DropPre(), later], metrics=metrics)
    sub = bus.subscribe("a")
    assert await bus.publish(msg("a")) == 0
    assert drain(sub) == []
    assert later.seen == []
    assert metrics.get("bus_messages_dropped_total", labels={"stage": "pre_send"}) == 1


async def test_post_receive_returning_none_drops_for_that_receiver_only() -> None:
    bus = MessageBus(hooks=[DropFor("b")])
    subs = {name: bus.subscribe(topics=["t"]) for name in "ab"}
    # DropFor drops messages whose payload names the receiver; both receivers see "b"
    assert await bus.publish(msg(None, "t", to="b")) == 0
    assert await bus.publish(msg(None, "t", to="c")) == 2
    assert all(len(drain(s)) == 1 for s in subs.values())


class Exploding(MessageHook):
    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.errors: list[tuple[str, Exception, dict[str, Any]]] = []

    def pre_send(self, message: Message) -> Message | None:
        if self.stage == "pre_send":
            raise RuntimeError("boom")
        return message

    def post_receive(self, message: Message) -> Message | None:
        if self.stage == "post_receive":
            raise RuntimeError("boom")
        return message

    def on_error(self, stage: str, error: Exception, context: dict[str, Any]) -> None:
        self.errors.append((stage, error, context))


@pytest.mark.parametrize("stage", ["pre_send", "post_receive"])
async def test_raising_hook_gets_on_error_and_the_message_is_dropped(stage: str) -> None:
    hook = Exploding(stage)
    metrics = MetricsCollector()
    bus = MessageBus(hooks=[hook], metrics=metrics)
    sub = bus.subscribe("a")
    message = msg("a")
    assert await bus.publish(message) == 0
    assert drain(sub) == []
    [(seen_stage, error, context)] = hook.errors
    assert seen_stage == stage
    assert str(error) == "boom"
    assert context["message"] is message
    assert metrics.get("bus_hook_errors_total", labels={"stage": stage}) == 1


async def test_bus_keeps_working_after_a_hook_and_its_on_error_raise() -> None:
    class Flaky(MessageHook):
        calls = 0

        def pre_send(self, message: Message) -> Message | None:
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise ValueError("first call fails")
            return message

        def on_error(self, stage: str, error: Exception, context: dict[str, Any]) -> None:
            raise RuntimeError("on_error fails too")

    bus = MessageBus(hooks=[Flaky()])
    sub = bus.subscribe("a")
    assert await bus.publish(msg("a")) == 0
    assert await bus.publish(msg("a")) == 1
    assert len(drain(sub)) == 1


async def test_hook_returning_a_non_message_is_treated_as_a_hook_error() -> None:
    class Bad(MessageHook):
        def __init__(self) -> None:
            self.errors: list[Exception] = []

        def pre_send(self, message: Message) -> Any:
            return {"not": "a message"}

        def on_error(self, stage: str, error: Exception, context: dict[str, Any]) -> None:
            self.errors.append(error)

    hook = Bad()
    bus = MessageBus(hooks=[hook])
    bus.subscribe("a")
    assert await bus.publish(msg("a")) == 0
    assert isinstance(hook.errors[0], UsageError)


# -- bounded inboxes -------------------------------------------------------------------


async def test_full_inbox_makes_the_publisher_wait_until_space_frees() -> None:
    bus = MessageBus(inbox_size=2)
    sub = bus.subscribe("a")
    await bus.publish(msg("a", n=0))
    await bus.publish(msg("a", n=1))
    done = anyio.Event()

    async def third() -> None:
        await bus.publish(msg("a", n=2))
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(third)
        await anyio.wait_all_tasks_blocked()
        assert not done.is_set()
        assert len(sub) == 2  # memory did not grow past the bound
        assert (await sub.receive()).payload["n"] == 0
        await done.wait()
    assert [m.payload["n"] for m in drain(sub)] == [1, 2]


async def test_waiting_publishers_are_served_in_arrival_order() -> None:
    bus = MessageBus(inbox_size=1)
    sub = bus.subscribe("a")
    await bus.publish(msg("a", n=0))
    async with anyio.create_task_group() as tg:
        for i in range(1, 6):
            tg.start_soon(bus.publish, msg("a", n=i))
            await anyio.wait_all_tasks_blocked()
        got = [(await sub.receive()).payload["n"] for _ in range(6)]
    assert got == [0, 1, 2, 3, 4, 5]


async def test_no_wait_publish_to_a_full_inbox_raises_and_delivers_to_none() -> None:
    bus = MessageBus(inbox_size=1)
    roomy = bus.subscribe(topics=["t"], inbox_size=10)
    tight = bus.subscribe(topics=["t"])
    assert await bus.publish(msg(None, "t"), wait=False) == 2
    with pytest.raises(BusFullError):
        await bus.publish(msg(None, "t"), wait=False)
    assert len(roomy) == 1  # the roomy inbox did not get the refused message either
    assert len(tight) == 1
    assert bus.metrics.get("bus_full_total") == 1


async def test_no_wait_publish_checks_again_after_the_post_receive_hooks() -> None:
    # A post_receive hook awaits; the inbox fills meanwhile; still all or none.
    bus_ref: list[MessageBus] = []

    class FillWhileWaiting(MessageHook):
        async def apost_receive(self, message: Message) -> Message | None:
            if message.payload.get("probe") and not tight.closed and len(tight) == 0:
                await bus_ref[0].publish(msg(None, "x"))  # lands in `tight`
            return message

    bus = MessageBus(hooks=[FillWhileWaiting()], inbox_size=1)
    bus_ref.append(bus)
    roomy = bus.subscribe(topics=["t"], inbox_size=10)
    tight = bus.subscribe(topics=["t", "x"])
    with pytest.raises(BusFullError):
        await bus.publish(msg(None, "t", probe=True), wait=False)
    assert len(roomy) == 0
    assert [m.topics[0].name for m in drain(tight)] == ["x"]


async def test_receiver_waits_for_a_message() -> None:
    bus = MessageBus()
    sub = bus.subscribe("a")
    got: list[Message] = []

    async def consume() -> None:
        got.append(await sub.receive())

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await anyio.wait_all_tasks_blocked()
        assert got == []
        await bus.publish(msg("a", n=7))
    assert got[0].payload["n"] == 7


async def test_cancelled_receiver_does_not_swallow_a_message() -> None:
    bus = MessageBus()
    sub = bus.subscribe("a")
    with anyio.move_on_after(0.01):
        await sub.receive()
    await bus.publish(msg("a", n=1))
    assert (await sub.receive()).payload["n"] == 1


async def test_cancelled_publisher_leaves_the_inbox_consistent() -> None:
    bus = MessageBus(inbox_size=1)
    sub = bus.subscribe("a")
    await bus.publish(msg("a", n=0))
    with anyio.move_on_after(0.01):
        await bus.publish(msg("a", n=1))
    assert [m.payload["n"] for m in drain(sub)] == [0]
    assert await bus.publish(msg("a", n=2), wait=False) == 1


async def test_receive_nowait_on_an_empty_inbox_raises_would_block() -> None:
    sub = MessageBus().subscribe("a")
    with pytest.raises(anyio.WouldBlock):
        sub.receive_nowait()


# -- closing ---------------------------------------------------------------------------


async def test_closed_subscription_drains_then_iteration_ends() -> None:
    bus = MessageBus()
    sub = bus.subscribe("a")
    for i in range(3):
        await bus.publish(msg("a", n=i))
    sub.close()
    assert await bus.publish(msg("a", n=99)) == 0
    assert [m.payload["n"] async for m in sub] == [0, 1, 2]
    with pytest.raises(anyio.EndOfStream):
        await sub.receive()


async def test_closing_wakes_a_waiting_receiver_with_end_of_stream() -> None:
    bus = MessageBus()
    sub = bus.subscribe("a")
    ended = anyio.Event()

    async def consume() -> None:
        async for _ in sub:
            pass
        ended.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await anyio.wait_all_tasks_blocked()
        sub.close()
    assert ended.is_set()


async def test_closing_a_full_subscription_releases_waiting_publishers() -> None:
    bus = MessageBus(inbox_size=1)
    sub = bus.subscribe("a")
    await bus.publish(msg("a"))
    results: list[int] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: _append(results, bus.publish(msg("a"))))
        await anyio.wait_all_tasks_blocked()
        sub.close()
    assert results == [0]


async def _append(results: list[int], coro: Any) -> None:
    results.append(await coro)


async def test_subscription_context_manager_unsubscribes() -> None:
    bus = MessageBus()
    async with bus.subscribe("a") as sub:
        assert bus.has_subscribers(msg("a"))
    assert sub.closed
    assert not bus.has_subscribers(msg("a"))


async def test_closed_bus_refuses_publish_and_subscribe() -> None:
    async with MessageBus() as bus:
        sub = bus.subscribe("a")
    assert bus.closed
    assert sub.closed
    with pytest.raises(ClosedError):
        await bus.publish(msg("a"))
    with pytest.raises(ClosedError):
        bus.subscribe("a")


# -- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((), {}),
        (("",), {}),
        ((3,), {}),
        ((None,), {"topics": "orders"}),
        ((None,), {"topics": ["bad topic"]}),
        ((None,), {"topics": ["a..b"]}),
        ((None,), {"topics": [5]}),
        (("a",), {"inbox_size": 0}),
        (("a",), {"inbox_size": 1.5}),
        (("a",), {"inbox_size": True}),
    ],
)
def test_invalid_subscribe_arguments_are_usage_errors(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    with pytest.raises(UsageError):
        MessageBus().subscribe(*args, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"hooks": MessageHook()},
        {"hooks": [object()]},
        {"inbox_size": 0},
        {"metrics": {}},
    ],
)
def test_invalid_bus_arguments_are_usage_errors(kwargs: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        MessageBus(**kwargs)


def test_a_subscription_is_made_by_the_bus_only() -> None:
    with pytest.raises(UsageError, match=r"MessageBus\.subscribe"):
        Subscription("bus", None, 5, 1)  # type: ignore[arg-type]  # raised TypeError


async def test_publishing_a_non_message_is_a_usage_error() -> None:
    bus = MessageBus()
    with pytest.raises(UsageError):
        await bus.publish({"sender": "a"})  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        await bus.publish(msg("a"), wait="no")  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        bus.has_subscribers("a")  # type: ignore[arg-type]


async def test_metrics_count_published_and_delivered() -> None:
    metrics = MetricsCollector()
    bus = MessageBus(metrics=metrics)
    bus.subscribe(topics=["t"])
    bus.subscribe(topics=["t"])
    await bus.publish(msg(None, "t"))
    await bus.publish(msg("nobody"))
    assert metrics.get("bus_messages_published_total") == 2
    assert metrics.get("bus_messages_delivered_total") == 2
