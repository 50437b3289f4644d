"""The dispatch schedule: due times, global and per-target limits, fairness."""

from __future__ import annotations

from converge.extensions.connectors.schedule import DispatchSchedule


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
