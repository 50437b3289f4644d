"""RedisStreamsBridge against a real redis-server: buses in several processes as one."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import coredis
import pytest

from converge.core import Message, MessageHook
from converge.errors import (
    BusFullError,
    StoreOutcomeUnknownError,
    StoreUnavailableError,
    UsageError,
)
from converge.runtime import MessageBus, Subscription, redis_streams
from converge.runtime.redis_streams import RedisStreamsBridge
from redis_server import RedisServer, free_port, shared_redis_url

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    yield from shared_redis_url()


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


async def pending(url: str, stream: str, group: str) -> int:
    async with coredis.Redis.from_url(url, decode_responses=True) as client:
        summary = await client.xpending(stream, group)
        return int(summary.pending)


async def settles(url: str, stream: str, group: str, *, left: int = 0) -> None:
    """Wait (5 s at most) until ``group`` has ``left`` entries pending on ``stream``."""
    for _ in range(500):
        if await pending(url, stream, group) == left:
            return
        await anyio.sleep(0.01)
    raise AssertionError(f"{group} has not {left} entries pending on {stream}")


@asynccontextmanager
async def bridged(
    url: str, prefix: str, **options: float
) -> AsyncIterator[tuple[MessageBus, Subscription]]:
    """A bus exporting ``work`` and another importing it in group ``w``: the first, and
    the second's acking subscription."""
    here, there = MessageBus(), MessageBus()
    inbox = there.subscribe("worker", topics=["work"], ack=True)
    async with (
        RedisStreamsBridge(here, url, export_topics=["work"], prefix=prefix, **options),
        RedisStreamsBridge(there, url, import_topics=["work"], group="w", prefix=prefix, **options),
    ):
        yield here, inbox


def work(n: int) -> Message:
    return Message(sender="producer", topics=["work"], payload={"n": n})


async def test_a_message_crosses_to_another_bus_with_its_id_and_is_acked_after_its_consumer(
    redis_url: str, prefix: str
) -> None:
    here, there = MessageBus(), MessageBus()
    inbox = there.subscribe("worker", topics=["work"], ack=True)
    async with (
        RedisStreamsBridge(here, redis_url, export_topics=["work"], prefix=prefix),
        RedisStreamsBridge(
            there, redis_url, import_topics=["work"], group="workers", prefix=prefix
        ) as importer,
    ):
        sent = work(1)
        assert await here.publish(sent) == 1  # the stream counts as the one receiver
        with anyio.fail_after(5):
            got = await inbox.receive()
        assert got.id == sent.id
        assert got.payload == {"n": 1}
        assert await pending(redis_url, importer.stream("work"), "workers") == 1
        await inbox.aack(got)
        await settles(redis_url, importer.stream("work"), "workers")
    # a bridge that has exited exports nothing (it used to, through its closed client)
    assert await here.publish(work(2)) == 0


async def taken_over(
    url: str, prefix: str, group: str, bus: MessageBus, sub: Subscription
) -> Message:
    """What a consumer of ``group`` that claims idle entries at once hands ``sub`` first
    (acknowledged: the group has nothing pending after)."""
    async with RedisStreamsBridge(
        bus, url, import_topics=["work"], group=group, prefix=prefix, claim_idle_sec=0.2
    ):
        with anyio.fail_after(5):
            message = await sub.receive()
        await sub.aack(message)
        await settles(url, f"{prefix}:work", group)
    return message


async def test_entries_a_dead_consumer_held_are_claimed_and_delivered_again(
    redis_url: str, prefix: str
) -> None:
    producer = MessageBus()
    first_bus, second_bus = MessageBus(), MessageBus()
    first = first_bus.subscribe("worker", topics=["work"], ack=True)
    second = second_bus.subscribe("worker", topics=["work"], ack=True)
    options = {"import_topics": ["work"], "group": "workers", "prefix": prefix}
    async with RedisStreamsBridge(producer, redis_url, export_topics=["work"], prefix=prefix):
        async with RedisStreamsBridge(first_bus, redis_url, consumer="one", **options):
            sent = work(2)
            await producer.publish(sent)
            with anyio.fail_after(5):
                taken = await first.receive()
            assert taken.id == sent.id
        # consumer "one" is gone without acknowledging: another takes its entry over
        again = await taken_over(redis_url, prefix, "workers", second_bus, second)
        assert again.id == sent.id


@pytest.mark.parametrize("loss", ["stream deleted", "group destroyed"])
async def test_a_bridge_whose_stream_or_group_is_lost_makes_the_group_again_and_carries_on(
    redis_url: str, prefix: str, loss: str
) -> None:
    # What a Redis restarted without persistence (or flushed) does to a bridge reading
    # in a group. Before, its import task died (UnblockedError, then NOGROUP), and the
    # error ended the bridge's ``async with`` block.
    async with bridged(redis_url, prefix) as (here, inbox):
        await here.publish(work(1))
        with anyio.fail_after(5):
            held = await inbox.receive()
        await anyio.sleep(0.1)  # the bridge is blocked reading again
        async with coredis.Redis.from_url(redis_url, decode_responses=True) as client:
            if loss == "stream deleted":
                await client.delete([f"{prefix}:work"])
            else:
                await client.xgroup_destroy(f"{prefix}:work", "w")
        await anyio.sleep(0.2)
        await inbox.aack(held)  # acknowledging what the lost group held is harmless
        await here.publish(work(2))
        with anyio.fail_after(5):
            got = await inbox.receive()
        assert got.payload == {"n": 2}
        await inbox.aack(got)
        await settles(redis_url, f"{prefix}:work", "w")


async def test_an_export_redis_cannot_take_raises_a_store_error(prefix: str) -> None:
    # Before: coredis's own ConnectionError reached the publisher, and a stalled Redis
    # held publish (and the acknowledgements) forever.
    bus = MessageBus()
    nobody = f"redis://127.0.0.1:{free_port()}/0"
    async with RedisStreamsBridge(bus, nobody, export_topics=["work"], prefix=prefix):
        with pytest.raises(StoreUnavailableError, match="unreachable"):
            await bus.publish(work(1))

    with RedisServer() as server:
        async with bridged(server.url, prefix, timeout_sec=0.5) as (here, inbox):
            await here.publish(work(1))
            with anyio.fail_after(5):
                held = await inbox.receive()
            server.pause()
            try:
                with anyio.fail_after(3):
                    with pytest.raises(StoreOutcomeUnknownError):
                        await here.publish(work(2))
                    await inbox.aack(held)  # its XACK timed out: logged, not raised
            finally:
                server.resume()
            await here.publish(work(3))
            got: list[int] = []
            with anyio.fail_after(5):
                while len(got) < 2:
                    message = await inbox.receive()
                    got.append(message.payload["n"])
                    await inbox.aack(message)
            # The export that timed out had reached Redis: an unknown outcome indeed.
            assert sorted(got) == [2, 3]


async def test_export_refuses_when_a_group_backlog_reaches_maxlen(
    redis_url: str, prefix: str
) -> None:
    bus = MessageBus()
    async with coredis.Redis.from_url(redis_url, decode_responses=True) as client:
        await client.xgroup_create(f"{prefix}:work", "slow", identifier="0", mkstream=True)
    async with RedisStreamsBridge(bus, redis_url, export_topics=["work"], prefix=prefix, maxlen=3):
        for n in range(3):
            await bus.publish(work(n))
        with pytest.raises(BusFullError):
            await bus.publish(work(3))


async def publish_through(bus: MessageBus, numbers: range) -> None:
    """Publish ``work(n)`` for each n, waiting out the bridge's backpressure."""
    for n in numbers:
        while True:
            try:
                await bus.publish(work(n))
                break
            except BusFullError:
                await anyio.sleep(0.005)


async def stream_length(url: str, stream: str) -> int:
    async with coredis.Redis.from_url(url, decode_responses=True) as client:
        return int(await client.xlen(stream))


async def acknowledge_all(sub: Subscription) -> None:
    async for message in sub:
        await sub.aack(message)


async def test_an_entry_a_dead_consumer_held_is_not_trimmed_by_the_traffic_after_it(
    redis_url: str, prefix: str
) -> None:
    # Before, an export trimmed the stream to about maxlen entries whatever they were:
    # the entry a dead consumer held went once maxlen more had passed, and the claim
    # that should have delivered it again found nothing (the message was lost).
    producer, dead_bus, live_bus = MessageBus(), MessageBus(), MessageBus()
    dead = dead_bus.subscribe("worker", topics=["work"], ack=True)
    live = live_bus.subscribe("worker", topics=["work"], ack=True)
    options = {"import_topics": ["work"], "group": "g", "prefix": prefix}
    stream = f"{prefix}:work"

    async def traffic(numbers: range, *, left: int) -> None:
        """Publish ``numbers`` through maxlen=5, a live consumer acknowledging them."""
        async with (
            RedisStreamsBridge(live_bus, redis_url, consumer="live", **options),
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(acknowledge_all, live)
            await publish_through(producer, numbers)
            await settles(redis_url, stream, "g", left=left)
            tg.cancel_scope.cancel()

    async with RedisStreamsBridge(
        producer, redis_url, export_topics=["work"], prefix=prefix, maxlen=5
    ):
        async with RedisStreamsBridge(dead_bus, redis_url, consumer="dead", **options):
            held = work(0)
            await producer.publish(held)
            with anyio.fail_after(5):
                assert (await dead.receive()).id == held.id
        # "dead" is gone holding it; 400 more pass (Redis trims whole nodes of 100)
        await traffic(range(1, 401), left=1)  # the dead consumer's
        assert await stream_length(redis_url, stream) > 400
        taker_bus = MessageBus()
        taker = taker_bus.subscribe("worker", topics=["work"], ack=True)
        assert (await taken_over(redis_url, prefix, "g", taker_bus, taker)).id == held.id
        # acknowledged at last: the next exports trim the stream back down
        await traffic(range(401, 501), left=0)
        assert await stream_length(redis_url, stream) < 250


async def test_an_entry_deleted_before_it_was_acknowledged_is_logged_when_claimed(
    redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    producer, dead_bus, taker_bus = MessageBus(), MessageBus(), MessageBus()
    dead = dead_bus.subscribe("worker", topics=["work"], ack=True)
    taker_bus.subscribe("worker", topics=["work"], ack=True)
    options = {"import_topics": ["work"], "group": "g", "prefix": prefix}
    stream = f"{prefix}:work"
    async with RedisStreamsBridge(producer, redis_url, export_topics=["work"], prefix=prefix):
        async with RedisStreamsBridge(dead_bus, redis_url, consumer="dead", **options):
            await producer.publish(work(0))
            with anyio.fail_after(5):
                await dead.receive()
        async with coredis.Redis.from_url(redis_url, decode_responses=True) as client:
            (entry,) = await client.xrange(stream)
            await client.xdel(stream, [entry.identifier])
        with caplog.at_level("ERROR", logger="converge.runtime"):
            async with RedisStreamsBridge(
                taker_bus, redis_url, consumer="taker", claim_idle_sec=0.1, **options
            ):
                await settles(redis_url, stream, "g")
                await anyio.sleep(0.2)
    (record,) = [r for r in caplog.records if "were deleted" in r.getMessage()]
    assert entry.identifier in record.getMessage()
    assert "lost" in record.getMessage()


async def test_nothing_is_read_until_something_on_the_bus_receives_the_topic(
    redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before, an entry read while nothing received its topic (the runner not started
    # yet, its agent still being set up) was acknowledged: the message was lost.
    monkeypatch.setattr(redis_streams, "_NOBODY_WARN_SEC", 0.2)
    producer, there = MessageBus(), MessageBus()
    stream = f"{prefix}:work"
    async with (
        RedisStreamsBridge(producer, redis_url, export_topics=["work"], prefix=prefix),
        RedisStreamsBridge(there, redis_url, import_topics=["work"], group="g", prefix=prefix),
    ):
        sent = work(1)
        with caplog.at_level("WARNING", logger="converge.runtime"):
            await producer.publish(sent)
            for _ in range(100):  # the warning comes after 0.2 s (5 s at most, loaded)
                if any("nothing on the local bus" in r.message for r in caplog.records):
                    break
                await anyio.sleep(0.05)
            else:
                raise AssertionError("no warning that nothing receives the topic")
        assert await pending(redis_url, stream, "g") == 0  # not taken: others may read it
        inbox = there.subscribe("worker", topics=["work"], ack=True)
        with anyio.fail_after(5):
            got = await inbox.receive()
        assert got.id == sent.id
        await inbox.aack(got)
        await settles(redis_url, stream, "g")


class Leaving(MessageHook):
    """Closes the subscription as a message is published: its receiver stopping."""

    def __init__(self) -> None:
        self.sub: Subscription | None = None
        self.left = anyio.Event()

    async def apre_send(self, message: Message) -> Message | None:
        assert self.sub is not None
        self.sub.close()
        self.left.set()
        return message


async def test_a_message_whose_receiver_went_away_stays_pending_for_another_consumer(
    redis_url: str, prefix: str
) -> None:
    hook = Leaving()
    producer, leaving_bus, other_bus = MessageBus(), MessageBus(hooks=[hook]), MessageBus()
    hook.sub = leaving_bus.subscribe("worker", topics=["work"], ack=True)
    other = other_bus.subscribe("worker", topics=["work"], ack=True)
    options = {"import_topics": ["work"], "group": "g", "prefix": prefix}
    async with RedisStreamsBridge(producer, redis_url, export_topics=["work"], prefix=prefix):
        async with RedisStreamsBridge(leaving_bus, redis_url, consumer="leaving", **options):
            sent = work(1)
            await producer.publish(sent)
            with anyio.fail_after(5):
                await hook.left.wait()
            await anyio.sleep(0.1)  # the bridge would acknowledge it now
            assert await pending(redis_url, f"{prefix}:work", "g") == 1  # not acknowledged
        assert (await taken_over(redis_url, prefix, "g", other_bus, other)).id == sent.id


async def test_a_dead_lettered_message_is_kept_and_acknowledged(
    redis_url: str, prefix: str
) -> None:
    async with bridged(redis_url, prefix) as (here, inbox):
        sent = work(9)
        await here.publish(sent)
        with anyio.fail_after(5):
            got = await inbox.receive()
        await inbox.adead_letter(got, "cannot parse")
        await settles(redis_url, f"{prefix}:work", "w")
        async with coredis.Redis.from_url(redis_url, decode_responses=True) as client:
            dead = await client.xrange(f"{prefix}:dead")
        assert sent.id in dead[0].field_values["m"]
        assert "cannot parse" in dead[0].field_values["m"]


async def test_invalid_arguments_are_usage_errors(redis_url: str) -> None:
    bus = MessageBus()
    with pytest.raises(UsageError):
        RedisStreamsBridge(bus, "http://x")
    with pytest.raises(UsageError, match="no host"):
        RedisStreamsBridge(bus, "redis://:6379/0")
    with pytest.raises(UsageError):
        RedisStreamsBridge(bus, redis_url, import_topics=["work"])  # no group
    with pytest.raises(UsageError):
        RedisStreamsBridge(bus, redis_url, export_topics="work")  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        RedisStreamsBridge(bus, redis_url, export_topics=["a.*"])  # a pattern, not a stream
    with pytest.raises(UsageError):
        RedisStreamsBridge(bus, redis_url, maxlen=0)
    for bad in (0, -1.0, float("nan"), "1", True):
        with pytest.raises(UsageError, match="timeout_sec"):
            RedisStreamsBridge(bus, redis_url, timeout_sec=bad)  # type: ignore[arg-type]
    bridge = RedisStreamsBridge(bus, redis_url)
    with pytest.raises(UsageError, match="Message"):
        await bridge.on_settled("m1")  # type: ignore[arg-type]  # raised AttributeError
    with pytest.raises(UsageError, match="Message"):
        await bridge.on_dead({"id": "m1"}, "c", "gave up")  # type: ignore[arg-type]


WORKER = textwrap.dedent(
    """
    import sys, anyio
    from converge.core import Agent, Identity, Message, SendMessage
    from converge.runtime import AgentRunner, MessageBus
    from converge.runtime.redis_streams import RedisStreamsBridge

    class Doubler(Agent):
        async def adecide(self, messages, tasks, **kwargs):
            return [SendMessage(Message(sender=self.id, topics=["done"],
                                        payload={"n": m.payload["n"] * 2, "of": m.id}))
                    for m in messages]

    async def main(url, prefix):
        bus = MessageBus()
        async with RedisStreamsBridge(bus, url, import_topics=["work"], export_topics=["done"],
                                      group="doublers", prefix=prefix):
            agent = Doubler(Identity.generate(), name="doubler")
            async with AgentRunner(bus, [agent], topics={"doubler": ["work"]}):
                print("ready", flush=True)
                await anyio.sleep(60)

    anyio.run(main, sys.argv[1], sys.argv[2], backend=sys.argv[3])
    """
)


@pytest.fixture
def worker(redis_url: str, prefix: str, anyio_backend: str) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *sys.path])}
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, redis_url, prefix, anyio_backend],
        stdout=subprocess.PIPE,
        env=env,
    )
    yield proc
    proc.kill()
    proc.wait()


async def test_an_agent_in_another_process_answers_over_redis(
    redis_url: str, prefix: str, worker: subprocess.Popen[bytes]
) -> None:
    proc = worker
    bus = MessageBus()
    answers = bus.subscribe("me", topics=["done"], ack=True)
    async with RedisStreamsBridge(
        bus,
        redis_url,
        export_topics=["work"],
        import_topics=["done"],
        group="requesters",
        prefix=prefix,
    ):
        sent = [work(n) for n in range(5)]
        for message in sent:  # sent before the worker listens: Redis keeps them
            await bus.publish(message)
        assert proc.stdout is not None
        with anyio.fail_after(15):
            line = await anyio.to_thread.run_sync(proc.stdout.readline, abandon_on_cancel=True)
        assert line.strip() == b"ready"
        got = {}
        with anyio.fail_after(15):
            while len(got) < 5:
                answer = await answers.receive()
                got[answer.payload["of"]] = answer.payload["n"]
                await answers.aack(answer)
    assert got == {m.id: m.payload["n"] * 2 for m in sent}
