"""AgentRunner reliability: rate-limit waits, bounded retries, dead letters, recorded decisions.

Issue 12 points 2 and 3, issue 13 point 21: nothing accepted is dropped silently, a rate
limit never stops an agent, and a redelivered message reuses its recorded decisions
instead of calling the model again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from converge.core import (
    Agent,
    Identity,
    InvokeTool,
    Message,
    SendMessage,
    Task,
    ToolRegistry,
    UpdateTask,
)
from converge.core.events import DecisionsMade, EventEmitter, ProgressEvent, ToolInvoked, ToolResult
from converge.core.store import Store
from converge.errors import (
    AgentFailedError,
    ClosedError,
    ProviderRateLimitError,
    RateLimitTimeoutError,
    UsageError,
)
from converge.extensions.llm import LLMAgent
from converge.extensions.llm.testing import FunctionProvider
from converge.extensions.storage import MemoryStore, SQLiteStore
from converge.runtime import AgentRetry, AgentRunner, MessageBus

pytestmark = pytest.mark.anyio

OUT = "bridge.webhook.outbound"


class FakeSleep:
    """Records the waits asked for; returns at once (or when ``gate`` is set)."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self.gate: anyio.Event | None = None
        self.called = anyio.Event()

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.called.set()
        if self.gate is not None:
            await self.gate.wait()
        await anyio.lowlevel.checkpoint()


class Listener:
    def __init__(self, log: list[str] | None = None) -> None:
        self.log = log if log is not None else []
        self.settled: list[str] = []
        self.dead: list[tuple[str, str]] = []

    async def on_settled(self, message: Message) -> None:
        self.log.append(f"settled:{message.id}")
        self.settled.append(message.id)

    async def on_dead(self, message: Message, consumer: str, reason: str) -> None:
        self.dead.append((message.id, reason))


def to(agent: Agent, **payload: Any) -> Message:
    return Message(sender="user", recipient=agent.id, payload=payload)


def reply_out(text: str = "done") -> str:
    """An LLMAgent answer: one outbound message."""
    return json.dumps(
        [{"type": "SendMessage", "message": {"topics": [OUT], "payload": {"t": text}}}]
    )


class Script(Agent):
    """A plain agent whose answers come from ``respond(call_number, messages, obs)``."""

    def __init__(
        self,
        respond: Any,
        registry: ToolRegistry | None = None,
        name: str = "s",
        identity: Identity | None = None,
    ):
        super().__init__(identity or Identity(), registry, name=name)
        self.respond = respond
        self.calls: list[list[str]] = []

    async def adecide(self, messages: list[Message], tasks: list[Task], **kw: Any) -> Any:
        self.calls.append([m.id for m in messages])
        return self.respond(len(self.calls), messages, kw.get("tool_observations"))


async def idle(runner: AgentRunner) -> None:
    with anyio.fail_after(5):
        await runner.wait_until(lambda r: r.idle)


# -- rate limits: wait, then call the model again; never stop the agent ---------------


async def test_rate_limit_beyond_the_provider_cap_waits_and_calls_the_model_again() -> None:
    limited = ProviderRateLimitError("429", provider="test", status_code=429, retry_after=300.0)
    replies: list[str | BaseException] = [limited, reply_out("a"), reply_out("b")]

    def answer(messages: list[dict[str, Any]], **kw: Any) -> str:
        item = replies.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    provider = FunctionProvider(answer)
    agent = LLMAgent(Identity(), provider, name="llm")
    bus = MessageBus()
    out = bus.subscribe(topics=[OUT])
    sleep = FakeSleep()
    sleep.gate = anyio.Event()
    async with AgentRunner(bus, [agent], sleep=sleep, max_batch=1) as runner:
        first = to(agent, n=1)
        await bus.publish(first)
        with anyio.fail_after(5):
            await sleep.called.wait()
        # the agent is waiting out the rate limit: it still accepts messages
        assert bus.has_subscribers(to(agent))
        assert await bus.publish(to(agent, n=2)) == 1
        sleep.gate.set()
        await idle(runner)
    assert sleep.waits == [300.0]
    assert len(provider.calls) == 3  # the limited call, its repeat, the second message
    assert [m.payload["t"] for m in (out.receive_nowait(), out.receive_nowait())] == ["a", "b"]
    assert runner.errors == []
    assert runner.dead_letters == []
    assert bus.metrics.get("runtime_rate_limit_waits_total", labels={"agent": "llm"}) == 1


async def test_rate_limit_wait_is_real_time_by_default_and_capped() -> None:
    calls: list[float] = []

    def respond(n: int, *_: Any) -> list[Any]:
        calls.append(anyio.current_time())
        if n == 1:
            raise RuntimeError("wrapped") from RateLimitTimeoutError("slow down", retry_after=60)
        return []

    agent = Script(respond)
    bus = MessageBus()
    async with AgentRunner(bus, [agent], retry=AgentRetry(max_retry_after=0.2)) as runner:
        await bus.publish(to(agent))
        await idle(runner)
    assert len(calls) == 2
    assert 0.2 <= calls[1] - calls[0] < 2
    assert runner.errors == []


def test_retry_schedule_math() -> None:
    retry = AgentRetry(backoff=0.5, multiplier=3, max_backoff=5)
    assert [retry.delay(n) for n in (1, 2, 3, 4, 10_000)] == [0.5, 1.5, 4.5, 5, 5]
    for attempt in ("2", None, 2.0, True):
        with pytest.raises(UsageError):  # raised TypeError (or read True as 1)
            retry.delay(attempt)  # type: ignore[arg-type]
    err = ProviderRateLimitError("x", retry_after=None)
    assert retry.retry_after(err) is None
    assert retry.retry_after(ProviderRateLimitError("x", retry_after=7200)) == 3600
    assert retry.retry_after(ProviderRateLimitError("x", retry_after=0)) == 0.5  # no spin
    for bad in ({"max_attempts": 0}, {"backoff": -1}, {"multiplier": 0.5}, {"backoff": "1"}):
        with pytest.raises(UsageError):
            AgentRetry(**bad)


# -- other failures: bounded retries with backoff, then a dead letter -------------------


async def test_failures_are_retried_with_backoff_then_dead_lettered_and_replayable() -> None:
    broken = {"on": True}

    def respond(n: int, messages: list[Message], _: Any) -> list[Any]:
        if broken["on"] and messages[0].payload.get("poison"):
            raise RuntimeError("model answered nonsense")
        return []

    agent = Script(respond)
    bus = MessageBus()
    listener = Listener()
    bus.add_ack_listener(listener)
    sleep = FakeSleep()
    errors: list[AgentFailedError] = []
    retry = AgentRetry(max_attempts=3, backoff=1, multiplier=2)
    async with AgentRunner(
        bus, [agent], retry=retry, sleep=sleep, on_agent_error=errors.append, max_batch=1
    ) as runner:
        poison, fine = to(agent, poison=True), to(agent)
        await bus.publish(poison)
        await bus.publish(fine)
        await idle(runner)
        assert sleep.waits == [1, 2]
        assert len(agent.calls) == 4  # three attempts, then the next message
        [letter] = runner.dead_letters
        assert letter.message.id == poison.id
        assert letter.attempts == 3
        assert "nonsense" in letter.reason
        assert listener.dead == [(poison.id, letter.reason)]
        assert listener.settled == [fine.id]
        assert [e.agent_id for e in errors] == [agent.id]
        # fixed, then replayed: processed and acknowledged like a new delivery
        broken["on"] = False
        assert (await runner.areplay(poison.id)) == letter
        await idle(runner)
        assert runner.dead_letters == []
        with pytest.raises(UsageError):
            await runner.areplay(poison.id)
    assert len(agent.calls) == 5
    assert bus.metrics.get("runtime_agent_retries_total", labels={"agent": "s"}) == 2
    assert bus.metrics.get("runtime_dead_letters_total", labels={"agent": "s"}) == 1


async def test_replay_after_the_runner_stopped_is_refused() -> None:
    agent = Script(lambda *a: (_ for _ in ()).throw(RuntimeError("no")))
    bus = MessageBus()
    async with AgentRunner(bus, [agent], retry=AgentRetry(max_attempts=1)) as runner:
        m = to(agent)
        await bus.publish(m)
        await idle(runner)
    with pytest.raises(ClosedError):
        await runner.areplay(m.id)
    assert [d.message.id for d in runner.dead_letters] == [m.id]


async def test_poison_message_in_a_batch_is_found_one_by_one() -> None:
    def respond(n: int, messages: list[Message], _: Any) -> list[Any]:
        if any(m.payload.get("poison") for m in messages):
            raise RuntimeError("boom")
        return []

    agent = Script(respond)
    bus = MessageBus()
    listener = Listener()
    bus.add_ack_listener(listener)
    runner = AgentRunner(bus, [agent], retry=AgentRetry(max_attempts=2), sleep=FakeSleep())
    msgs = [to(agent, n=0), to(agent, poison=True), to(agent, n=2)]
    for m in msgs:  # queued before the runner starts: one batch of three
        await bus.publish(m)
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)
        await idle(runner)
        runner.stop()
    assert len(agent.calls[0]) == 3
    assert [d.message.id for d in runner.dead_letters] == [msgs[1].id]
    assert sorted(listener.settled) == sorted([msgs[0].id, msgs[2].id])
    assert len(runner.errors) == 1


# -- drops are counted and logged -----------------------------------------------------


async def test_failing_kickoff_is_reported_and_the_agent_still_serves_messages(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def respond(n: int, messages: list[Message], _: Any) -> list[Any]:
        if not messages:
            raise RuntimeError("kickoff failed")
        return []

    agent = Script(respond)
    bus = MessageBus()
    async with AgentRunner(
        bus, [agent], tasks=[Task(objective="x")], retry=AgentRetry(max_attempts=1)
    ) as runner:
        await bus.publish(to(agent))
        await idle(runner)
    assert len(agent.calls) == 2
    assert len(runner.errors) == 1
    assert "kickoff failed" in caplog.text
    assert bus.metrics.get("bus_messages_dropped_total", labels={"stage": "runner_cancelled"}) == 0


async def test_messages_left_by_a_cancelled_runner_are_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    started = anyio.Event()

    class Stuck(Agent):
        async def adecide(self, messages: list[Message], tasks: list[Task], **kw: Any) -> Any:
            started.set()
            await anyio.sleep_forever()

    agent = Stuck(Identity(), name="stuck")
    bus = MessageBus()
    runner = AgentRunner(bus, [agent], max_batch=1)
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)
        for _ in range(3):
            await bus.publish(to(agent))
        await started.wait()
        tg.cancel_scope.cancel()
    dropped = bus.metrics.get("bus_messages_dropped_total", labels={"stage": "runner_cancelled"})
    assert dropped == 3
    assert "3 unprocessed messages" in caplog.text


async def test_message_reaching_no_receiver_is_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent = Script(lambda n, m, o: [SendMessage(Message(sender="s", recipient="nobody"))])
    bus = MessageBus()
    async with AgentRunner(bus, [agent]) as runner:
        await bus.publish(to(agent))
        await idle(runner)
    assert bus.metrics.get("bus_messages_dropped_total", labels={"stage": "no_receiver"}) == 1
    assert "reached no receiver" in caplog.text


# -- decisions recorded before execution, reused on redelivery -------------------------


@pytest.fixture(params=["memory", "sqlite-json"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "memory":
        return MemoryStore()
    return SQLiteStore(tmp_path / "records.db", serializer="json")


async def test_redelivered_message_reuses_recorded_decisions_without_calling_the_model(
    store: Store,
) -> None:
    provider = FunctionProvider(lambda messages, **kw: reply_out("once"))
    inbound = Message(sender="github", topics=["bridge.webhook.inbound"], payload={"n": 1})
    sent: list[Message] = []

    async def outbox(message: Message) -> None:
        sent.append(message)

    identity = Identity()  # a restarted agent keeps its id
    for _ in range(2):  # the second run is the restart that redelivers the same message
        agent = LLMAgent(identity, provider, name="llm")
        bus = MessageBus()
        bus.add_sink(OUT, outbox)
        async with AgentRunner(
            bus, [agent], topics={"llm": ["bridge.webhook.inbound"]}, store=store
        ) as runner:
            await bus.publish(inbound)
            await idle(runner)
    assert len(provider.calls) == 1
    assert len(sent) == 2
    assert sent[0] == sent[1]  # same id, timestamp, payload: the outbox deduplicates
    assert bus.metrics.get("runtime_decisions_reused_total", labels={"agent": "llm"}) == 1
    await store.aclose()


async def test_messages_two_consumers_handle_at_once_have_the_first_recorded_effects(
    store: Store,
) -> None:
    # A Redis Streams consumer still deciding (a long model call) has its entries
    # claimed by another, which decides too, maybe in another batch. Before, both
    # recorded (the last write won) and both executed their own decisions: two
    # different replies to one message.
    identity = Identity()  # both processes run the same agent
    a, b = (Message(sender="github", topics=["in"], payload={"n": n}) for n in "ab")
    sent: list[Message] = []
    second_done = anyio.Event()

    async def outbox(message: Message) -> None:
        sent.append(message)
        second_done.set()

    def answer(by: str, messages: list[Message]) -> Any:
        return [
            SendMessage(Message(sender="llm", topics=[OUT], payload={"by": by, "of": m.id}))
            for m in messages
        ]

    class First(Script):
        async def adecide(self, messages: list[Message], tasks: list[Task], **kw: Any) -> Any:
            self.calls.append([m.id for m in messages])
            if len(self.calls) == 1:
                await second_done.wait()  # still deciding when the other has replied
            return answer("first", messages)

    first = First(None, name="llm", identity=identity)
    second = Script(
        lambda _n, messages, _o: answer("second", messages), name="llm", identity=identity
    )
    buses = [MessageBus(), MessageBus()]
    for bus in buses:
        bus.add_sink(OUT, outbox)
    one = AgentRunner(buses[0], [first], topics={"llm": ["in"]}, store=store)
    two = AgentRunner(buses[1], [second], topics={"llm": ["in"]}, store=store)
    await buses[0].publish(a)
    await buses[0].publish(b)  # queued before the runner starts: one batch, [a, b]
    await buses[1].publish(b)  # b alone there, recorded first
    async with one, two:
        await idle(one)
        await idle(two)
    replies = {(m.payload["of"], m.payload["by"], m.id) for m in sent}
    assert {(of, by) for of, by, _ in replies} == {(b.id, "second"), (a.id, "first")}
    assert len(replies) == 2  # b's one reply sent twice, under one id
    assert first.calls == [[a.id, b.id], [a.id]]  # a decided again, b replayed
    await store.aclose()


async def test_a_consumer_replaying_a_tool_step_keeps_the_steps_recorded_after_it(
    store: Store,
) -> None:
    # The second consumer replays the first's recorded tool call and runs the tool
    # itself while the first observes, decides its reply and records it. Before, the
    # second's observations overwrote the whole record, dropping the first's reply step,
    # so the second decided and sent a reply of its own: two replies to one message.
    identity = Identity()
    m = Message(sender="github", topics=["in"], payload={"n": 1})
    sent: list[Message] = []
    first_calling, second_calling, replied = anyio.Event(), anyio.Event(), anyio.Event()

    async def outbox(message: Message) -> None:
        sent.append(message)
        replied.set()

    def steps(by: str) -> Any:
        def respond(_n: int, messages: list[Message], observations: Any) -> Any:
            if observations is None:
                return [InvokeTool("look", {}, call_id="c1")]
            seen = observations[0]["result"]
            return [SendMessage(Message(sender="llm", topics=[OUT], payload={by: seen}))]

        return respond

    async def first_look() -> str:
        first_calling.set()
        await second_calling.wait()
        return "first"

    async def second_look() -> str:
        second_calling.set()
        await replied.wait()  # the first has recorded and sent its reply meanwhile
        return "second"

    agents = []
    for look, by in ((first_look, "first"), (second_look, "second")):
        registry = ToolRegistry()
        registry.register(look, name="look")
        agents.append(Script(steps(by), registry, name="llm", identity=identity))
    buses = [MessageBus(), MessageBus()]
    for bus in buses:
        bus.add_sink(OUT, outbox)
    one = AgentRunner(buses[0], [agents[0]], topics={"llm": ["in"]}, store=store)
    two = AgentRunner(buses[1], [agents[1]], topics={"llm": ["in"]}, store=store)
    async with one, two:
        await buses[0].publish(m)
        with anyio.fail_after(5):
            await first_calling.wait()  # step 0 recorded: the second replays it
        await buses[1].publish(m)
        await idle(one)
        await idle(two)
    assert {x.id for x in sent} == {sent[0].id}  # one reply, maybe sent twice
    assert sent[0].payload == {"first": "first"}
    assert agents[1].calls == []  # the second decided nothing: both steps replayed
    await store.aclose()


async def test_failure_after_recording_retries_without_calling_the_model_again(
    store: Store,
) -> None:
    provider = FunctionProvider(lambda messages, **kw: reply_out())
    agent = LLMAgent(Identity(), provider, name="llm")
    bus = MessageBus()
    log: list[str] = []
    listener = Listener(log)
    bus.add_ack_listener(listener)
    failures = [OSError("outbox store unavailable")]

    async def outbox(message: Message) -> None:
        if failures:
            raise failures.pop()
        log.append(f"outbox:{message.id}")

    bus.add_sink(OUT, outbox)
    m = to(agent)
    async with AgentRunner(bus, [agent], store=store, sleep=FakeSleep()) as runner:
        await bus.publish(m)
        await idle(runner)
    assert len(provider.calls) == 1
    # acknowledged only once its outbound message was in the outbox
    assert log[0].startswith("outbox:")
    assert log[-1] == f"settled:{m.id}"
    assert listener.settled.count(m.id) == 1
    await store.aclose()


async def test_batch_records_point_every_message_at_one_record(store: Store) -> None:
    calls: list[int] = []

    def respond(n: int, messages: list[Message], _: Any) -> list[Any]:
        calls.append(len(messages))
        return [
            SendMessage(Message(sender="s", topics=[OUT], payload={"for": m.id})) for m in messages
        ]

    sent: list[str] = []

    async def outbox(message: Message) -> None:
        sent.append(message.id)

    identity = Identity()
    msgs = [to_id(agent_id=identity.fingerprint, n=n) for n in range(3)]
    for redeliver in (msgs, msgs[1:2], [msgs[2], to_id(identity.fingerprint, 9)]):
        agent = Script(respond, name="a", identity=identity)
        bus = MessageBus()
        bus.add_sink(OUT, outbox)
        runner = AgentRunner(bus, [agent], store=store)
        for m in redeliver:
            await bus.publish(m)
        async with anyio.create_task_group() as tg:
            await tg.start(runner.run)
            await idle(runner)
            runner.stop()
    # one model call for the batch of three, one for the new message only
    assert calls == [3, 1]
    assert len(set(sent)) == 4
    assert len(sent) == 3 + 3 + 3 + 1  # each redelivery replays the whole recorded batch
    await store.aclose()


def to_id(agent_id: str, n: int) -> Message:
    return Message(sender="user", recipient=agent_id, payload={"n": n}, id=f"m{n}")


async def test_tool_steps_resume_from_the_recorded_step(store: Store) -> None:
    registry = ToolRegistry()
    invoked: list[int] = []

    @registry.tool
    def lookup(x: int) -> int:
        """Double x."""
        invoked.append(x)
        return 2 * x

    def respond(n: int, messages: list[Message], obs: Any) -> list[Any]:
        if not obs:
            return [InvokeTool("lookup", {"x": 21}, call_id="c1")]
        if n == 2:
            raise RuntimeError("transient")
        return [SendMessage(Message(sender="s", topics=[OUT], payload={"r": obs[0]["result"]}))]

    agent = Script(respond, registry)
    bus = MessageBus()
    out = bus.subscribe(topics=[OUT])
    async with AgentRunner(bus, [agent], store=store, sleep=FakeSleep()) as runner:
        await bus.publish(to(agent))
        await idle(runner)
    assert invoked == [21]  # not again on the retry
    assert len(agent.calls) == 3  # the tool step once, the failed follow-up, its retry
    assert out.receive_nowait().payload == {"r": 42}
    await store.aclose()


async def test_undeliverable_decisions_for_a_json_store_are_reported(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "r.db", serializer="json")
    task = Task(objective="x")

    agent = Script(lambda n, m, o: [UpdateTask(task.id, "completed", result=object())])
    bus = MessageBus()
    async with AgentRunner(bus, [agent], store=store, retry=AgentRetry(max_attempts=1)) as runner:
        runner.add_task(task)
        await bus.publish(to(agent))
        await idle(runner)
    assert "JSON" in str(runner.errors[-1].__cause__)
    await store.aclose()


# -- progress events (issue 16 point 9, the runner's side) -----------------------------


async def test_runner_emits_tool_and_decision_events() -> None:
    registry = ToolRegistry()

    @registry.tool
    def add(a: int, b: int) -> int:
        """Add."""
        return a + b

    def respond(n: int, messages: list[Message], obs: Any) -> list[Any]:
        if not obs:
            return [InvokeTool("add", {"a": 1, "b": 2}, call_id="c1"), InvokeTool("nope")]
        return []

    events = EventEmitter()
    seen: list[ProgressEvent] = []
    events.subscribe(seen.append)
    agent = Script(respond, registry)
    bus = MessageBus()
    async with AgentRunner(bus, [agent], events=events) as runner:
        await bus.publish(to(agent))
        await idle(runner)
    kinds = [type(e).__name__ for e in seen]
    assert kinds == [
        "DecisionsMade",
        "ToolInvoked",
        "ToolResult",
        "ToolInvoked",
        "ToolResult",
        "DecisionsMade",
    ]
    assert all(e.source == agent.id for e in seen)
    invoked, result, _, failed = seen[1:5]
    assert isinstance(invoked, ToolInvoked)
    assert invoked.arguments == {"a": 1, "b": 2}
    assert invoked.tool_call_id == "c1"
    assert isinstance(result, ToolResult)
    assert result.result == 3
    assert result.error is None
    assert isinstance(failed, ToolResult)
    assert failed.error
    assert isinstance(seen[-1], DecisionsMade)
    assert seen[-1].decisions == ()


async def test_llm_agent_decisions_are_reported_once_on_its_own_emitter() -> None:
    provider = FunctionProvider(lambda messages, **kw: reply_out())
    agent = LLMAgent(Identity(), provider, name="llm")
    seen: list[ProgressEvent] = []
    agent.events.subscribe(seen.append, types=DecisionsMade)
    bus = MessageBus()
    async with AgentRunner(bus, [agent]) as runner:
        await bus.publish(to(agent))
        await idle(runner)
    assert len(seen) == 1
