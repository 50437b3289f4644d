"""ShortTermMemory: bounds, turn-boundary trimming, pinned system messages."""

from __future__ import annotations

import threading

import pytest

from converge.core import ShortTermMemory
from converge.core.memory import approximate_tokens
from converge.errors import UsageError
from nesting import deep_list


def roles(memory: ShortTermMemory) -> list[str]:
    return [m["role"] for m in memory.get_messages()]


def test_keeps_messages_in_order() -> None:
    mem = ShortTermMemory()
    mem.append("system", "be brief")
    mem.append("user", "hi")
    mem.append("assistant", "hello")
    assert mem.get_messages() == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]


def test_message_bound_drops_whole_oldest_turns() -> None:
    mem = ShortTermMemory(max_messages=4)
    for i in range(5):
        mem.append("user", f"q{i}")
        mem.append("assistant", f"a{i}")
    contents = [m["content"] for m in mem.get_messages()]
    assert contents == ["q3", "a3", "q4", "a4"]


def test_tool_result_never_outlives_its_call() -> None:
    mem = ShortTermMemory(max_messages=5)
    mem.append("user", "q0")
    mem.append("assistant", "call tool", tool_calls=[{"id": "c1"}])
    mem.append("tool", "result", tool_call_id="c1")
    mem.append("assistant", "a0")
    mem.append("user", "q1")
    mem.append("assistant", "a1")  # 6 messages: the whole first turn must go
    assert roles(mem) == ["user", "assistant"]
    for i, m in enumerate(mem.get_messages()):
        if m["role"] == "tool":
            assert mem.get_messages()[i - 1]["role"] in {"assistant", "tool"}


def test_agent_loop_without_user_turns_is_still_bounded() -> None:
    mem = ShortTermMemory(max_messages=4)
    mem.append("user", "goal")
    for i in range(10):
        mem.append("assistant", f"call {i}")
        mem.append("tool", f"result {i}")
    got = mem.get_messages()
    assert len(got) <= 4
    assert got[0]["role"] == "assistant"
    assert [m["content"] for m in got] == ["call 8", "result 8", "call 9", "result 9"]


def test_token_budget_trims_and_tracks_tokens() -> None:
    mem = ShortTermMemory(max_messages=None, max_tokens=10, token_counter=len)
    mem.append("user", "aaaa")
    mem.append("assistant", "bbbb")
    mem.append("user", "cc")
    mem.append("assistant", "dd")
    assert [m["content"] for m in mem.get_messages()] == ["cc", "dd"]
    assert mem.token_count == 4


def test_newest_turn_is_kept_whole_even_if_over_budget() -> None:
    mem = ShortTermMemory(max_tokens=3, token_counter=len)
    mem.append("user", "a very long question")
    assert [m["content"] for m in mem.get_messages()] == ["a very long question"]


def test_system_messages_are_pinned() -> None:
    mem = ShortTermMemory(max_messages=2)
    mem.append("system", "rules")
    for i in range(4):
        mem.append("user", f"q{i}")
        mem.append("assistant", f"a{i}")
    assert roles(mem) == ["system", "user", "assistant"]


def test_get_messages_returns_copies() -> None:
    mem = ShortTermMemory()
    mem.append("user", "x")
    mem.get_messages()[0]["content"] = "changed"
    assert mem.get_messages()[0]["content"] == "x"


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((0,), {}),
        ((None, -1), {}),
        (("5",), {}),
        ((True,), {}),
        ((), {"token_counter": None}),  # was accepted; append then raised TypeError
        ((), {"token_counter": 5}),
    ],
)
def test_invalid_bounds_are_refused(args: tuple[object, ...], kwargs: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        ShortTermMemory(*args, **kwargs)  # type: ignore[arg-type]


def test_invalid_role_or_content_is_refused() -> None:
    mem = ShortTermMemory()
    with pytest.raises(UsageError):
        mem.append("robot", "x")
    with pytest.raises(UsageError):
        mem.append(["user"], "x")  # type: ignore[arg-type]  # raised TypeError
    with pytest.raises(UsageError):
        mem.append("user", 5)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        mem.append(deep_list(), "x")  # type: ignore[arg-type]  # repr: RecursionError


@pytest.mark.parametrize("text", [None, b"bytes", 5, ["x"]])
def test_approximate_tokens_refuses_non_strings(text: object) -> None:
    with pytest.raises(UsageError):
        approximate_tokens(text)  # type: ignore[arg-type]


@pytest.mark.parametrize("result", ["3", None, 1.5, True, -1])
def test_token_counter_must_return_a_non_negative_int(result: object) -> None:
    mem = ShortTermMemory(token_counter=lambda text: result)  # type: ignore[arg-type,return-value]
    with pytest.raises(UsageError, match="token_counter"):
        mem.append("user", "x")
    assert len(mem) == 0
    assert mem.token_count == 0


def test_concurrent_appends_respect_the_bound() -> None:
    mem = ShortTermMemory(max_messages=10)

    def work() -> None:
        for i in range(200):
            mem.append("user", str(i))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(mem) == 10
