"""The dispatch schedule: due times, global and per-target limits, fairness."""

from __future__ import annotations

import time

import pytest

from converge.extensions.connectors.outbound import schedule as schedule_module
from converge.extensions.connectors.outbound.schedule import DispatchSchedule
from loop_stall import CountedHeaps


def schedule(global_max: int = 10, per_target: int = 10) -> DispatchSchedule:
    return DispatchSchedule(max_in_flight=global_max, target_limit=lambda _: per_target)


def test_nothing_starts_before_it_is_due() -> None:
    s = schedule()
    s.add("a", "t", 5.0)
    assert s.take(4.9) == []
    assert s.next_due() == 5.0
    assert s.take(5.0) == [("a", "t")]
    assert s.next_due() is None
    assert s.running == 1


def test_the_global_limit_holds_and_a_finish_frees_a_slot() -> None:
    s = schedule(global_max=2)
    for name in "abc":
        s.add(name, "t", 0)
    assert [i for i, _ in s.take(0)] == ["a", "b"]
    assert s.take(1) == []
    s.finish("a")
    assert s.take(1) == [("c", "t")]
    assert len(s) == 2


def test_a_busy_target_does_not_starve_others() -> None:
    s = DispatchSchedule(max_in_flight=10, target_limit=lambda t: 1 if t == "slow" else 5)
    for i in range(5):
        s.add(f"s{i}", "slow", 0)
    s.add("f0", "fast", 0)
    s.add("f1", "fast", 0)
    started = s.take(0)
    assert sorted(started) == [("f0", "fast"), ("f1", "fast"), ("s0", "slow")]


def test_targets_take_turns_under_the_global_limit() -> None:
    s = schedule(global_max=4)
    for i in range(4):
        s.add(f"a{i}", "a", 0)
        s.add(f"b{i}", "b", 0)
    started = s.take(0)
    assert sorted(t for _, t in started) == ["a", "a", "b", "b"]


def test_re_adding_moves_a_waiting_action_and_ignores_running_ones() -> None:
    s = schedule()
    s.add("a", "t", 10)
    s.add("a", "t", 3)
    assert s.next_due() == 3
    assert len(s) == 1
    assert s.take(3) == [("a", "t")]
    s.add("a", "t", 100)  # running: left alone
    assert s.next_due() is None
    s.finish("a")
    s.add("a", "t", 7)
    assert s.take(7) == [("a", "t")]


def test_hurry_makes_a_targets_waiting_actions_due_now() -> None:
    s = schedule()
    s.add("a", "t", 100)
    s.add("b", "u", 100)
    s.hurry("t", 1)
    assert s.take(1) == [("a", "t")]


def test_hurry_touches_only_its_targets_waiting_actions() -> None:
    # A circuit closing must not walk every other target's retries: with 400,000 of
    # them waiting, hurry held the event loop for 60-80 ms (the bound is 20 ms).
    s = schedule()
    for i in range(400_000):
        s.add(f"b{i}", "busy", 1000)
    s.add("a", "t", 100)
    s.add("gone", "t", 100)
    s.discard("gone")
    s.add("moved", "elsewhere", 100)
    s.add("moved", "t", 100)  # re-added for another target: it waits for that one
    s.add("ran", "t", 0)
    assert s.take(0) == [("ran", "t")]
    took = []
    for _ in range(3):  # the best of three: a busy machine may pause any one of them
        started = time.perf_counter()
        s.hurry("t", 1)
        took.append(time.perf_counter() - started)
    assert min(took) < 0.02
    assert sorted(s.take(1)) == [("a", "t"), ("moved", "t")]
    s.hurry("elsewhere", 1)
    assert s.take(1) == []
    assert s.next_due() == 1000


def test_hurry_sets_a_long_wait_aside_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    # A circuit closing after an outage re-added its target's waiting actions one by
    # one: 60,000 of them held the event loop for 100 ms. The hurry now moves no entry.
    s = schedule(global_max=10**6, per_target=10**6)
    for i in range(3_000):
        s.add(f"a{i:04d}", "t", 1000)
    s.add("gone", "t", 1000)
    s.discard("gone")
    heaps = CountedHeaps()
    monkeypatch.setattr(schedule_module, "heapq", heaps)
    s.hurry("t", 1)
    assert heaps.moves <= 1  # the target's own entry among those due next
    s.add("later", "t", 2000)  # added after the hurry: due when it says
    s.add("soon", "t", 0.5)
    assert s.next_due() == 0.5
    started = s.take(1)
    assert sorted(a for a, _ in started) == sorted([f"a{i:04d}" for i in range(3_000)] + ["soon"])
    assert s.next_due() == 2000


def test_discard_forgets_waiting_and_ready_actions() -> None:
    s = schedule(global_max=1)
    s.add("a", "t", 0)
    s.add("b", "t", 0)
    s.add("c", "t", 50)
    assert s.take(0) == [("a", "t")]  # b is ready, held by the limit
    s.discard("b")
    s.discard("c")
    s.finish("a")
    assert s.take(100) == []
    assert len(s) == 0
    assert "b" not in s


def test_a_paused_target_starts_nothing_until_its_pause_ends() -> None:
    s = schedule()
    for name in "abc":
        s.add(name, "t", 0)
    s.add("x", "u", 0)
    s.pause("t", 10)
    assert s.take(1) == [("x", "u")]
    assert s.next_due() == 10  # the pause's end: its ready actions wait for it
    assert s.take(9.9) == []
    assert sorted(s.take(10)) == [("a", "t"), ("b", "t"), ("c", "t")]
    assert s.next_due() is None


def test_resume_and_hurry_end_a_pause() -> None:
    s = schedule()
    s.add("a", "t", 0)
    s.add("b", "t", 0)
    s.add("c", "t", 40)
    s.pause("t", 50)
    assert s.take(1) == []
    s.resume("t")
    assert s.take(1) == [("a", "t"), ("b", "t")]
    s.pause("t", 50)
    s.hurry("t", 2)  # c was due at 40: now
    assert s.take(2) == [("c", "t")]


def test_a_take_lets_a_bounded_number_of_targets_join_the_turn() -> None:
    # 100,000 actions due at once, each for a target of its own, would take 0.3 s of
    # the event loop in one take.
    s = schedule(global_max=10**6, per_target=10**6)
    for i in range(3000):
        s.add(f"a{i:04d}", f"t{i:04d}", 0)
    assert len(s.take(0)) == 1024
    assert s.next_due() == 0  # more are due: the dispatcher comes back at once
    assert len(s.take(0)) == 1024
    assert len(s.take(0)) == 952
    assert s.next_due() is None


def test_a_backlog_costs_a_take_only_what_it_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    # 16 workers finishing in one turn of the loop each call take(): when each take
    # moved up to 1,024 due actions of a 60,000 backlog to a ready queue, the turn held
    # the event loop for 46-68 ms. A take now pops what it starts, and stale entries.
    s = DispatchSchedule(max_in_flight=16, target_limit=lambda _: 8)
    for i in range(20_000):
        s.add(f"a{i:05d}", "t", i / 1000)
    s.add("b", "u", 0)
    heaps = CountedHeaps()
    monkeypatch.setattr(schedule_module, "heapq", heaps)
    started = s.take(30)
    assert ("b", "u") in started  # the backlog does not delay another target
    assert len(started) == 9
    assert heaps.moves <= 16
    for action_id in [a for a, target in started if target == "t"][:4]:
        s.finish(action_id)
        before = heaps.moves
        assert len(s.take(30)) == 1
        assert heaps.moves - before <= 2


def test_a_due_action_moved_later_waits_for_its_new_time() -> None:
    s = schedule(per_target=1)
    s.add("a", "t", 0)
    s.add("b", "t", 0)
    assert s.take(0) == [("a", "t")]  # b is due, held back by the limit
    s.add("b", "t", 50)
    s.finish("a")
    assert s.take(1) == []
    assert s.next_due() == 50
    assert s.take(50) == [("b", "t")]


def test_an_ended_pause_is_not_reported_as_due_again() -> None:
    # b waits for a's slot (limit 1), not for the pause: next_due must not say 5 again,
    # or the dispatcher would wake every millisecond until a finishes.
    s = DispatchSchedule(max_in_flight=10, target_limit=lambda _: 1)
    s.add("a", "t", 0)
    s.add("b", "t", 0)
    assert s.take(0) == [("a", "t")]
    s.pause("t", 5)
    assert s.next_due() == 5
    assert s.take(6) == []
    assert s.next_due() is None
    s.finish("a")
    assert s.take(6) == [("b", "t")]
