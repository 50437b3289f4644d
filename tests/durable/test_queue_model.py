"""DurableQueue against a model of its states, under random sequences of operations.

Each example runs a list of adds (some reusing an id), leases by two holders, acks,
retries, releases and burials with the current or a stale token, replays, purges,
trims, recounts and clock ticks on a fresh queue, and after every step compares what
the queue says (each record's status, the listing, the open count) with the model: no
record lost or duplicated, the count exact, a lease only of what is due, a stale token
always refused, ``max_pending`` kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from converge.core.store import Store
from converge.durable import DurableQueue
from converge.errors import DuplicateRecordError, QueueFullError

pytestmark = pytest.mark.anyio

MAX_PENDING = 4
OPEN = ("pending", "leased")
_SLOT = st.integers(0, 7)  # which record an operation names: ids[slot % len(ids)]

_ADD = st.tuples(st.just("add"), st.integers(0, 5), st.integers(0, 3))
_LEASE = st.tuples(st.just("lease"), st.sampled_from("AB"), st.integers(1, 3), st.integers(1, 5))
_FINISH = st.tuples(st.sampled_from(["ack", "bury", "release"]), _SLOT, st.booleans())
OPS = st.lists(
    st.one_of(  # leases and their ends twice as often as the rest
        _ADD,
        _LEASE,
        _LEASE,
        _FINISH,
        _FINISH,
        st.tuples(st.just("retry"), _SLOT, st.integers(0, 4)),
        st.tuples(st.sampled_from(["replay", "purge"]), _SLOT),
        st.tuples(st.just("tick"), st.integers(1, 6)),
        st.tuples(st.just("trim"), st.integers(0, 3)),
        st.tuples(st.just("recount")),
    ),
    max_size=30,
)


@dataclass
class Expected:
    """What the model says of one record."""

    status: str = "pending"
    token: int = 0
    until: float = 0.0
    due: float = 0.0

    def leasable(self, now: float) -> bool:
        if self.status == "pending":
            return self.due <= now
        return self.status == "leased" and self.until <= now


class Model:
    def __init__(self, queue: DurableQueue, now: list[float]) -> None:
        self.queue = queue
        self.now = now
        self.records: dict[str, Expected] = {}
        self.ids: list[str] = []  # every id ever added, purged or not

    def open_count(self) -> int:
        return sum(1 for r in self.records.values() if r.status in OPEN)

    def pick(self, slot: int) -> str | None:
        return self.ids[slot % len(self.ids)] if self.ids else None

    async def step(self, op: tuple[Any, ...]) -> None:
        name, t, q = op[0], self.now[0], self.queue
        if name == "add":
            await self.add(due=t + op[1], reuse=self.pick(op[2]) if op[2] else None)
        elif name == "lease":
            _, owner, limit, lease_sec = op
            leasable = {i for i, r in self.records.items() if r.leasable(t)}
            got = await q.alease(owner, lease_sec=lease_sec, limit=limit)
            ids = [r.id for r in got]
            assert len(ids) == len(set(ids)) == min(limit, len(leasable))
            assert set(ids) <= leasable
            for record in got:
                expected = self.records[record.id]
                assert record.lease_token > expected.token  # a new fencing token
                expected.status, expected.token = "leased", record.lease_token
                expected.until = t + lease_sec
        elif name in ("ack", "bury", "release", "retry"):
            await self.finish(name, op, t)
        elif name == "replay":
            record_id = self.pick(op[1])
            if record_id is not None:
                expected = self.records.get(record_id)
                replayed = await q.areplay(record_id)
                finished = expected is not None and expected.status not in OPEN
                assert (replayed is not None) == finished
                if expected is not None and replayed is not None:
                    expected.status, expected.due = "pending", t
        elif name == "purge":
            record_id = self.pick(op[1])
            if record_id is not None:
                assert (await q.apurge(record_id) is not None) == (record_id in self.records)
                self.records.pop(record_id, None)
        elif name == "tick":
            self.now[0] += op[1]
        elif name == "trim":
            finished = [i for i, r in self.records.items() if r.status not in OPEN]
            assert await q.atrim_finished(op[1]) == max(0, len(finished) - op[1])
            for record_id in finished:
                if await q.aget(record_id) is None:
                    del self.records[record_id]
            kept = [i for i in finished if i in self.records]
            assert len(kept) == min(op[1], len(finished))
        else:
            assert await q.arecount() == self.open_count()

    async def add(self, *, due: float, reuse: str | None) -> None:
        was_open = self.open_count()
        try:
            record = await self.queue.aadd({"n": len(self.ids)}, id=reuse, due=due)
        except DuplicateRecordError:
            assert reuse in self.records
            return
        except QueueFullError:
            assert was_open >= MAX_PENDING
            return
        assert was_open < MAX_PENDING
        assert record.id not in self.records
        if reuse is None:
            self.ids.append(record.id)
        self.records[record.id] = Expected(due=due)

    async def finish(self, name: str, op: tuple[Any, ...], t: float) -> None:
        record_id = self.pick(op[1])
        if record_id is None:
            return
        expected = self.records.get(record_id)
        token = expected.token if expected is not None and expected.token else 1
        if name != "retry" and op[2]:  # a stale token: the one before, or one never given
            token = token - 1 or 99
        # A lease that ran out still holds until another holder takes the record over.
        holds = expected is not None and expected.status == "leased" and expected.token == token
        q = self.queue
        if name == "ack":
            done = await q.aack(record_id, token)
        elif name == "bury":
            done = await q.abury(record_id, token, "given up")
        elif name == "release":
            done = await q.arelease(record_id, token)
        else:
            done = await q.aretry(record_id, token, t + op[2], None)
        assert (done is not None) == holds
        if expected is None or done is None:
            return
        expected.status = {"ack": "acknowledged", "bury": "dead"}.get(name, "pending")
        expected.due = t + op[2] if name == "retry" else t

    async def check(self) -> None:
        q = self.queue
        assert await q.apending_count() == self.open_count()
        for record_id in self.ids:
            found = await q.aget(record_id)
            expected = self.records.get(record_id)
            assert (found and found.status) == (expected and expected.status), record_id
        listed = await q.alist(limit=1000)
        assert sorted(r.id for r in listed) == sorted(self.records)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(adds=st.integers(1, MAX_PENDING), ops=OPS)
async def test_the_queue_agrees_with_its_model_after_every_step(
    backend: Store, adds: int, ops: list[tuple[Any, ...]]
) -> None:
    # The store is shared by the examples: each starts on an empty queue, and purges
    # what it added (a fresh prefix each time made Redis index a new prefix each time).
    now = [1_700_000_000.0]
    queue = DurableQueue(
        backend, prefix="q", kind="inbound", clock=lambda: now[0], max_pending=MAX_PENDING
    )
    assert await queue.alist(limit=1) == []
    model = Model(queue, now)
    try:
        for op in [("add", 0, 0)] * adds + ops:
            await model.step(op)
            await model.check()
    finally:
        for record_id in model.ids:
            await queue.apurge(record_id)
