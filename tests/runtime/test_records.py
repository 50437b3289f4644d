"""Decision records: exact JSON round trip, hashed keys, damaged records, batch pointers."""

from __future__ import annotations

from typing import Any

import pytest

from converge.core import InvokeTool, Message, SendMessage, UpdateTask
from converge.core.decisions import decisions_from_json, decisions_to_json
from converge.errors import FormatError, UsageError
from converge.extensions.storage import MemoryStore
from converge.runtime.records import (
    DecisionLog,
    DecisionRecord,
    Found,
    RecordedElsewhere,
    Step,
    record_key,
)

pytestmark = pytest.mark.anyio


def sample() -> list[Any]:
    return [
        SendMessage(Message(sender="a", topics=["x.y"], payload={"k": [1, 2.5, None]})),
        InvokeTool("search", {"q": "z"}, call_id="call-7"),
        UpdateTask("t1", "completed", result={"ok": True}),
    ]


def test_decisions_round_trip_keeps_message_ids_timestamps_and_call_ids() -> None:
    decisions = sample()
    back = decisions_from_json(decisions_to_json(decisions))
    assert back == decisions
    assert back[0].message.id == decisions[0].message.id
    assert back[0].message.timestamp == decisions[0].message.timestamp


@pytest.mark.parametrize(
    "data",
    [{"type": "SendMessage"}, [{"type": "SendMessage", "message": 1}], [{"type": "Nope"}], [5]],
)
def test_damaged_recorded_decisions_are_format_errors(data: Any) -> None:
    with pytest.raises(FormatError):
        decisions_from_json(data)


def test_decisions_to_json_refuses_non_decisions() -> None:
    with pytest.raises(UsageError):
        decisions_to_json([{"type": "SendMessage"}])  # type: ignore[list-item]
    with pytest.raises(UsageError):
        decisions_to_json(5)  # type: ignore[arg-type]  # raised TypeError

    class Unshowable:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    with pytest.raises(UsageError):  # the message's own repr raised RuntimeError
        decisions_to_json(Unshowable())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("agent_id", "messages"),
    [("a", "m"), ("a", [5]), ("a", [None]), (7, [Message(sender="s", recipient="a")])],
)
async def test_finding_records_for_what_is_not_an_agent_id_and_messages_is_a_usage_error(
    agent_id: Any, messages: Any
) -> None:
    log = DecisionLog(MemoryStore(), retention=60)
    with pytest.raises(UsageError):  # raised AttributeError
        await log.afind(agent_id, messages)
    with pytest.raises(UsageError):
        log.key(agent_id, messages[0])


def test_a_record_key_takes_any_str_ids_even_lone_surrogates() -> None:
    assert record_key("p:", "agent\udcff", "m") != record_key("p:", "agent", "m")


def test_record_keys_are_hashes_of_agent_and_message_ids() -> None:
    long_id = "x" * 5000 + "\n"
    key = record_key("p:", "agent", long_id)
    assert key.startswith("p:")
    assert len(key) == 42
    assert key != record_key("p:", "agent2", long_id)
    assert key == record_key("p:", "agent", long_id)


def test_record_json_round_trip_and_damage() -> None:
    messages = (Message(sender="u", recipient="a"),)
    record = DecisionRecord("k", "a", messages, (Step(tuple(sample()), ({"result": 1},)),))
    assert DecisionRecord.from_json("k", record.to_json()) == record
    for damaged in (None, {"v": 99, "steps": []}, {"v": 1, "steps": [{}], "messages": []}):
        with pytest.raises(FormatError):
            DecisionRecord.from_json("k", damaged)


async def test_log_finds_records_through_pointers_and_leaves_fresh_messages() -> None:
    store = MemoryStore()
    log = DecisionLog(store, retention=60)
    batch = [Message(sender="u", recipient="a", id=f"m{n}") for n in range(3)]
    record = await log.acreate("a", batch, sample())
    assert len(await store.alist(log.prefix)) == 3  # the record and two pointers
    new = Message(sender="u", recipient="a")
    found, fresh = await log.afind("a", [batch[2], new, batch[0]])
    assert fresh == [new]
    [part] = found
    assert part.record == record
    assert part.messages == (batch[2], batch[0])
    found, fresh = await log.afind("other-agent", batch)
    assert found == []
    assert fresh == batch
    record = await log.aobserve(record, [{"result": object()}])  # stored as JSON values
    assert isinstance(record.steps[-1].observations[0]["result"], str)  # type: ignore[index]
    record = await log.aappend(record, [])
    [part], _ = await log.afind("a", batch[1:2])
    assert len(part.record.steps) == 2
    # a pointer whose record expired: the message is fresh again
    await store.adelete(record.key)
    assert await log.afind("a", batch[1:2]) == ([], batch[1:2])


async def test_the_first_consumer_to_record_a_message_or_a_step_wins() -> None:
    # Two consumers handed one message at once (one claimed it from the other, still
    # busy) each decide; the second to record writes nothing and is told, so that it
    # replays the first's decisions: every message has one set of effects.
    store = MemoryStore()
    log = DecisionLog(store, retention=60)
    m = [Message(sender="u", recipient="a", id=f"m{n}") for n in range(4)]
    first = await log.acreate("a", m[:2], sample())
    for batch in (m[:2], m[1:3], [m[3], m[0]]):  # the same batch, or any overlap
        with pytest.raises(RecordedElsewhere):
            await log.acreate("a", batch, [])
    assert await log.afind("a", m) == ([Found(first, tuple(m[:2]))], m[2:])
    # a pointer whose record expired does not count
    await store.adelete(first.key)
    again = await log.acreate("a", m[1:3], [])
    assert await log.afind("a", m[1:3]) == ([Found(again, tuple(m[1:3]))], [])
    # steps after tool observations: the first to append step 1 wins
    mine = await log.aappend(again, [UpdateTask("t1", "completed")])
    theirs = await log.aappend(again, [UpdateTask("t1", "failed")])
    assert theirs == mine
    assert theirs.steps[1].decisions == (UpdateTask("t1", "completed"),)
    # and observations: a late consumer's never replace a step's, nor drop later steps
    assert await log.aobserve(again, [{"result": "late"}]) == mine
    fresh = await log.acreate("a", [m[3]], [InvokeTool("look", {})])
    observed = await log.aobserve(fresh, [{"result": "first"}])
    assert await log.aobserve(fresh, [{"result": "second"}]) == observed
    assert await log.afind("a", m[3:]) == ([Found(observed, (m[3],))], [])


def test_log_needs_a_store_and_a_retention() -> None:
    with pytest.raises(UsageError):
        DecisionLog({}, retention=1)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        DecisionLog(MemoryStore(), retention=None)  # type: ignore[arg-type]
