"""Agents in three processes on Redis Streams, killed -9 at random: every message answered.

Three worker processes share consumer group ``doublers`` (a bridge importing ``work``,
an :class:`AgentRunner` keeping its decision records in a :class:`RedisStore`, an agent
answering each message on ``done``); this process publishes work as fast as the
bridge's backpressure lets it (``maxlen=100``) and collects the answers. Every 0.3-0.8 s
a random worker is killed with SIGKILL and started again under a new consumer name, so
what it held stays pending until a live worker claims it (``claim_idle_sec=0.5``) while
the traffic goes past. Every message published must be answered, with its own result.
(Before the bridge stopped trimming unacknowledged entries, about 4 messages per kill
were lost: the claims found them trimmed.)
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from converge.core import Message
from converge.errors import BusFullError
from converge.runtime import MessageBus
from converge.runtime.redis_streams import RedisStreamsBridge
from redis_server import shared_redis_url

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
MESSAGES = 1500
KILLS = 3
MAXLEN = 100

WORKER = textwrap.dedent(
    """
    import sys, anyio
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from converge.core import Agent, Identity, Message, SendMessage
    from converge.extensions.storage import RedisStore
    from converge.runtime import AgentRunner, MessageBus
    from converge.runtime.redis_streams import RedisStreamsBridge

    # the agent's id must survive restarts: its decision records are keyed on it
    IDENTITY = Identity(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))

    class Doubler(Agent):
        async def adecide(self, messages, tasks, **kwargs):
            await anyio.sleep(0.002)  # a model call, briefly
            return [SendMessage(Message(sender=self.id, topics=["done"],
                                        payload={"n": m.payload["n"] * 2, "of": m.id}))
                    for m in messages]

    async def main(url, prefix, name, maxlen):
        bus = MessageBus()
        async with (
            RedisStore(url, namespace=prefix + "-decisions") as store,
            RedisStreamsBridge(bus, url, import_topics=["work"], export_topics=["done"],
                               group="doublers", prefix=prefix, consumer=name,
                               claim_idle_sec=0.5, maxlen=int(maxlen)),
            AgentRunner(bus, [Doubler(IDENTITY, name="doubler")],
                        topics={"doubler": ["work"]}, store=store),
        ):
            print("ready", flush=True)
            await anyio.sleep_forever()

    anyio.run(main, *sys.argv[1:5], backend=sys.argv[5])
    """
)


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    yield from shared_redis_url()


class Worker:
    def __init__(self, url: str, prefix: str, name: str, backend: str) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *sys.path])}
        args = [sys.executable, "-c", WORKER, url, prefix, name, str(MAXLEN), backend]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, env=env)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == b"ready", f"worker {name} did not start: {line!r}"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


async def test_workers_killed_at_random_lose_no_message(redis_url: str) -> None:
    prefix = f"t{uuid.uuid4().hex[:12]}"
    backends = ["asyncio", "trio"]

    async def start(n: int, generation: int) -> Worker:
        name, backend = f"w{n}-{generation}", backends[(n + generation) % 2]
        return await anyio.to_thread.run_sync(Worker, redis_url, prefix, name, backend)

    workers = [await start(n, 0) for n in range(3)]
    bus = MessageBus()
    answers = bus.subscribe("me", topics=["done"], ack=True, inbox_size=MESSAGES * 2)
    sent: dict[str, int] = {}
    got: dict[str, int] = {}
    waiting: set[str] = set()  # published (or being published), not answered yet
    answered = anyio.Event()
    publishing = True
    try:
        async with (
            RedisStreamsBridge(
                bus,
                redis_url,
                export_topics=["work"],
                import_topics=["done"],
                group="requesters",
                prefix=prefix,
                maxlen=MAXLEN,
            ),
            anyio.create_task_group() as tg,
        ):

            async def collect() -> None:
                async for answer in answers:
                    got[answer.payload["of"]] = answer.payload["n"]
                    waiting.discard(answer.payload["of"])
                    await answers.aack(answer)
                    if not publishing and not waiting:
                        answered.set()

            async def kill_at_random() -> None:
                for generation in range(1, KILLS + 1):
                    await anyio.sleep(random.uniform(0.3, 0.8))
                    n = random.randrange(3)
                    workers[n].kill()
                    workers[n] = await start(n, generation)

            tg.start_soon(collect)
            async with anyio.create_task_group() as chaos:
                chaos.start_soon(kill_at_random)
                n = 0
                while n < MESSAGES:
                    message = Message(sender="producer", topics=["work"], payload={"n": n})
                    waiting.add(message.id)  # before: its answer may come before publish returns
                    try:
                        await bus.publish(message)
                    except BusFullError:  # the workers' group has MAXLEN outstanding
                        waiting.discard(message.id)
                        await anyio.sleep(0.01)
                        continue
                    sent[message.id] = n
                    n += 1
                    if n % 50 == 0:
                        await anyio.sleep(0.01)  # a steady stream, not one burst
            publishing = False
            if not waiting:
                answered.set()
            with anyio.move_on_after(60):
                await answered.wait()
            tg.cancel_scope.cancel()
    finally:
        for worker in workers:
            worker.kill()
    missing = set(sent) - set(got)
    assert not missing, f"{len(missing)} of {len(sent)} messages were never answered"
    assert got == {message_id: n * 2 for message_id, n in sent.items()}
