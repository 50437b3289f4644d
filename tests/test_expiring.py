"""Ids noted until a time: ended notes read as gone at once, and go a batch a call."""

from __future__ import annotations

import pytest

from converge import _expiring
from converge._expiring import ExpiringIds
from loop_stall import CountedHeaps


def test_a_note_holds_until_its_end_is_passed() -> None:
    notes = ExpiringIds()
    notes.note("a", 10.0)
    notes.note("b", 20.0)
    notes.expire(10.0)
    assert "a" not in notes
    assert "b" in notes
    notes.note("a", 30.0)  # noted again
    notes.forget("b")
    notes.expire(25.0)
    assert "a" in notes
    assert "b" not in notes
    assert notes.first_end() == 30.0  # b's old item was popped, and skipped
    notes.expire(30.0)
    assert "a" not in notes
    assert notes.first_end() is None
    assert 1 not in notes  # not an id


def test_many_notes_ending_together_go_a_batch_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # 100,000 notes ending at once (records leased together, their leases over) were
    # all dropped in one call: 218 ms of the event loop.
    notes = ExpiringIds()
    for n in range(2_500):
        notes.note(f"r{n}", 100.0 + n % 3)
    notes.note("later", 500.0)
    heaps = CountedHeaps()
    monkeypatch.setattr(_expiring, "heapq", heaps)
    notes.expire(200.0)
    assert heaps.pops == 1_000
    # Every ended note reads as gone at once, the others do not.
    assert not any(f"r{n}" in notes for n in range(2_500))
    assert "later" in notes
    notes.expire(200.0)
    notes.expire(200.0)
    assert heaps.pops == 2_500
    assert notes.first_end() == 500.0  # every ended note dropped
