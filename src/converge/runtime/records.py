"""Decision records: what an agent decided for a batch, written before it is executed.

A record holds the batch's messages and the steps of its decide/execute loop: each
step's decisions and, once its tools ran, their observations. It is stored under a key
derived by hashing the agent id and the batch's first message id; every other message
of the batch gets a pointer key (hash of agent id and its id) naming the record. The
record and its pointers are written in one atomic ``Store.aupdate`` and expire after the
retention. On redelivery of a message the runner finds its record and replays it instead
of calling the agent again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from converge.core.decisions import Decision, decisions_from_json, decisions_to_json
from converge.core.message import Message
from converge.core.store import Store, validate_ttl
from converge.errors import FormatError, RuntimeBusError, UsageError

__all__ = ["DecisionLog", "DecisionRecord", "Found", "RecordedElsewhere", "Step", "record_key"]

_VERSION = 1


def record_key(prefix: str, agent_id: str, message_id: str) -> str:
    """The store key for ``agent_id``'s record (or pointer) of message ``message_id``.

    Hashed, so client-chosen message ids never reach the store's key space raw.
    """
    digest = hashlib.sha256(f"{agent_id}\0{message_id}".encode("utf-8", "surrogatepass"))
    return f"{prefix}{digest.hexdigest()[:40]}"


def _checked(record: DecisionRecord) -> dict[str, Any]:
    data = record.to_json()
    try:
        json.dumps(data, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise UsageError(
            f"agent {record.agent_id}'s decisions cannot be recorded: they must be JSON "
            f"values (a task result, for example): {exc}"
        ) from exc
    return data


def _jsonable(value: Any) -> Any:
    # tool results may be any Python object: recorded in their JSON form (str() else)
    return json.loads(json.dumps(value, default=str, allow_nan=False))


@dataclass(frozen=True, slots=True)
class Step:
    """One ``adecide`` call of a batch.

    Attributes:
        decisions: What it decided.
        observations: The tool observations of its ``InvokeTool`` decisions, in order;
            None until they were recorded.
    """

    decisions: tuple[Decision, ...]
    observations: tuple[dict[str, Any], ...] | None = None


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """An agent's recorded decisions for one batch.

    Attributes:
        key: Its store key.
        agent_id: The deciding agent.
        messages: The batch, in the order ``adecide`` saw it.
        steps: The recorded steps, in order.
    """

    key: str
    agent_id: str
    messages: tuple[Message, ...]
    steps: tuple[Step, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The stored JSON form."""
        return {
            "v": _VERSION,
            "agent": self.agent_id,
            "messages": [m.to_dict() for m in self.messages],
            "steps": [
                {
                    "decisions": decisions_to_json(step.decisions),
                    "observations": (
                        None if step.observations is None else list(step.observations)
                    ),
                }
                for step in self.steps
            ],
        }

    @classmethod
    def from_json(cls, key: str, data: object) -> DecisionRecord:
        """Read a stored record.

        Raises:
            FormatError: If ``data`` is not a record this version wrote.
        """
        if not isinstance(data, Mapping) or data.get("v") != _VERSION or "steps" not in data:
            raise FormatError(f"the decision record {key!r} is damaged or of another version")
        try:
            steps = []
            for raw in data["steps"]:
                observations = raw["observations"]
                steps.append(
                    Step(
                        tuple(decisions_from_json(raw["decisions"])),
                        None if observations is None else tuple(dict(o) for o in observations),
                    )
                )
            messages = tuple(Message.from_dict(m) for m in data["messages"])
            agent_id = data["agent"]
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"the decision record {key!r} is damaged: {exc}") from exc
        return cls(key, str(agent_id), messages, tuple(steps))


@dataclass(frozen=True, slots=True)
class Found:
    """A record that covers some messages of a delivered batch.

    Attributes:
        record: The record.
        messages: The delivered messages it covers (to acknowledge once replayed).
    """

    record: DecisionRecord
    messages: tuple[Message, ...]


class DecisionLog:
    """Reads and writes decision records in a :class:`~converge.core.store.Store`.

    Args:
        store: Where records live (the connector's store, to survive what it survives).
        prefix: Key prefix of the records.
        retention: Seconds a record is kept; it must outlast every redelivery of its
            messages (the inbox's lease and retry horizon).

    Raises:
        UsageError: For a store that is not a Store or an invalid retention.
    """

    def __init__(
        self, store: Store, *, prefix: str = "converge:runtime:decisions:", retention: float
    ) -> None:
        if not isinstance(store, Store):
            raise UsageError("store must be a converge Store")
        if not isinstance(prefix, str):
            raise UsageError("prefix must be a string")
        ttl = validate_ttl(retention)
        if ttl is None:
            raise UsageError("decision records need a retention")
        self.store = store
        self.prefix = prefix
        self.retention = ttl

    def key(self, agent_id: str, message: Message) -> str:
        """The key of ``agent_id``'s record or pointer for ``message``.

        Raises:
            UsageError: If ``agent_id`` is not a str or ``message`` not a Message.
        """
        if not isinstance(agent_id, str) or not isinstance(message, Message):
            raise UsageError("key takes an agent id (str) and a Message")
        return record_key(self.prefix, agent_id, message.id)

    async def afind(
        self, agent_id: str, messages: Sequence[Message]
    ) -> tuple[list[Found], list[Message]]:
        """Split a delivered batch into recorded parts and fresh messages.

        Returns:
            ``(found, fresh)``: the records covering some of ``messages`` (with the
            messages they cover), and the messages no record covers, in order.

        Raises:
            UsageError: If ``agent_id`` is not a str or ``messages`` not a sequence of
                Message.
            StoreError: The store failed.
        """
        if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
            raise UsageError("messages must be a sequence of Message")
        keys: dict[str, str] = {}
        for message in messages:
            keys[message.id] = self.key(agent_id, message)  # validates both
        values = await self._aread(list(dict.fromkeys(keys.values())))
        by_record: dict[str, list[Message]] = {}
        fresh: list[Message] = []
        for message in messages:
            value = values.get(keys[message.id])
            if value is None:
                fresh.append(message)
                continue
            target = value.get("ref") if isinstance(value, Mapping) else None
            by_record.setdefault(target if isinstance(target, str) else keys[message.id], [])
            by_record[target if isinstance(target, str) else keys[message.id]].append(message)
        missing = [k for k in by_record if k not in values]
        if missing:
            values.update(await self._aread(missing))
        found: list[Found] = []
        for key, covered in by_record.items():
            data = values.get(key)
            if data is None:  # the record expired before its pointer: start afresh
                fresh.extend(covered)
                continue
            found.append(Found(DecisionRecord.from_json(key, data), tuple(covered)))
        return found, fresh

    async def _aread(self, keys: list[str]) -> dict[str, Any]:
        if len(keys) == 1:
            value = await self.store.aget(keys[0])
            return {} if value is None else {keys[0]: value}

        def read(current: dict[str, Any | None]) -> tuple[dict[str, Any], dict[str, Any]]:
            return {}, {k: v for k, v in current.items() if v is not None}

        # one atomic read of every key: one round trip, not one per message
        return await self.store.aupdate(keys, read)

    async def acreate(
        self, agent_id: str, messages: Sequence[Message], decisions: Sequence[Decision]
    ) -> DecisionRecord:
        """Record the first step of a fresh batch, with a pointer per further message.

        First writer wins: if another consumer recorded decisions for any of these
        messages meanwhile (they were handed to two consumers at once: claimed from a
        slow one), nothing is written and :class:`RecordedElsewhere` is raised; the
        caller plans the batch again (:meth:`afind`) and executes what was recorded,
        so every message has one set of effects. A pointer whose record expired does
        not count.

        Raises:
            RecordedElsewhere: Some message has decisions recorded already.
        """
        if not messages:
            raise UsageError("a decision record covers at least one message")
        key = self.key(agent_id, messages[0])
        record = DecisionRecord(key, agent_id, tuple(messages), (Step(tuple(decisions)),))
        data = _checked(record)
        changes: dict[str, Any] = {key: data}
        for message in messages[1:]:
            changes.setdefault(self.key(agent_id, message), {"v": _VERSION, "ref": key})
        stale: dict[str, Any] = {}  # pointers seen whose record had expired

        def write(current: dict[str, Any | None]) -> tuple[dict[str, Any], dict[str, Any]]:
            taken = {}
            for k in changes:
                value = current.get(k)
                if value is None or (stale.get(k) == value and current.get(value["ref"]) is None):
                    continue
                taken[k] = value
            return ({}, taken) if taken else (changes, {})

        while True:
            targets = [v["ref"] for v in stale.values()]
            taken = await self.store.aupdate(
                list(dict.fromkeys([*changes, *targets])), write, ttl=self.retention
            )
            if not taken:
                return record
            pointers = {k: v for k, v in taken.items() if isinstance(_ref(v), str)}
            live = len(pointers) < len(taken)  # a record, not a pointer
            if live or await self._aread([_ref(v) for v in pointers.values()]):
                raise RecordedElsewhere(f"decisions for part of batch {key!r} exist")
            stale.update(pointers)  # their records expired: ours may take their place

    async def aappend(
        self, record: DecisionRecord, decisions: Sequence[Decision]
    ) -> DecisionRecord:
        """Record a further step (decisions after tool observations).

        First writer wins, as in :meth:`acreate`: if the stored record has that step
        already, it is returned and nothing is written.
        """
        return await self._write_first(
            record, replace(record, steps=(*record.steps, Step(tuple(decisions))))
        )

    async def aobserve(
        self, record: DecisionRecord, observations: Sequence[dict[str, Any]]
    ) -> DecisionRecord:
        """Record the tool observations of the last step.

        First writer wins here too: if the stored record has observations for that step
        already, or a later step (another consumer ran the same tools and went on), it
        is returned and nothing is written.
        """
        last = record.steps[-1]
        steps = (*record.steps[:-1], Step(last.decisions, tuple(_jsonable(list(observations)))))
        return await self._write_first(record, replace(record, steps=steps))

    async def _write_first(self, record: DecisionRecord, updated: DecisionRecord) -> DecisionRecord:
        """Store ``updated`` (``record`` one write further) unless the stored record of
        the batch has got as far already (another consumer wrote first): return that."""
        data = _checked(updated)
        ids = [m.id for m in record.messages]

        def write(current: dict[str, Any | None]) -> tuple[dict[str, Any], DecisionRecord | None]:
            earlier = _same_batch(record.key, current.get(record.key), ids)
            if earlier is not None and _progress(earlier) >= _progress(updated):
                return {}, earlier
            return {record.key: data}, None

        earlier = await self.store.aupdate([record.key], write, ttl=self.retention)
        return updated if earlier is None else earlier


def _progress(record: DecisionRecord) -> tuple[int, bool]:
    """How far a record has got: its steps, and whether the last has its observations."""
    last = record.steps[-1] if record.steps else None
    return len(record.steps), last is not None and last.observations is not None


def _same_batch(key: str, data: object, ids: list[str]) -> DecisionRecord | None:
    """The record stored as ``data`` if it covers exactly the batch ``ids``, else None."""
    if data is None or (isinstance(data, Mapping) and "ref" in data):
        return None
    try:
        record = DecisionRecord.from_json(key, data)
    except FormatError:
        return None  # damaged: overwritten, as before
    return record if [m.id for m in record.messages] == ids else None


def _ref(value: object) -> Any:
    return value.get("ref") if isinstance(value, Mapping) else None


class RecordedElsewhere(RuntimeBusError):
    """Another consumer recorded decisions for some message of the batch first (the
    runner plans the batch again; it never reaches users)."""
