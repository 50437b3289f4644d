"""The sans-I/O token-bucket math: configs, integer parameters, all-or-nothing reserve."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from converge.errors import ConfigurationError, UsageError
from converge.extensions.rate_limit import TokenBucketConfig
from converge.extensions.rate_limit.bucket import (
    NEVER,
    NEVER_REFILL_NS,
    BucketParams,
    reserve,
    wait_ns,
)

SECOND = 1_000_000_000


@pytest.mark.parametrize(
    ("capacity", "rate"),
    [
        (0, 1),
        (-1, 1),
        (math.nan, 1),
        (math.inf, 1),
        (1, -0.5),
        (1, math.nan),
        (1, math.inf),
        ("10", 1),
        (1, None),
        (True, 1),
    ],
)
def test_invalid_config_is_rejected_with_configuration_error(
    capacity: object, rate: object
) -> None:
    with pytest.raises(ConfigurationError):
        TokenBucketConfig(capacity, rate)  # type: ignore[arg-type]


def test_configuration_error_is_a_value_error_for_callers_catching_builtins() -> None:
    with pytest.raises(ValueError, match="capacity"):
        TokenBucketConfig(0, 1)
    assert issubclass(ConfigurationError, UsageError)


def test_config_is_frozen() -> None:
    config = TokenBucketConfig(5, 1)
    with pytest.raises(AttributeError):
        config.capacity = 6  # type: ignore[misc]


def test_zero_rate_is_allowed_and_never_refills() -> None:
    params = TokenBucketConfig(2, 0).params()
    assert params == BucketParams(NEVER_REFILL_NS, 2 * NEVER_REFILL_NS, refills=False)
    now = 5 * SECOND
    _, tats = reserve([0], now, [params], 0)
    assert tats is not None
    _, tats = reserve(tats, now, [params], 0)
    assert tats is not None
    assert reserve(tats, now + 10**6 * SECOND, [params], 0) == (NEVER, None)


def test_interval_rounds_up_and_tolerance_down_so_rounding_never_admits_extra() -> None:
    params = TokenBucketConfig(3, 3).params()
    assert params.interval == 333_333_334  # ceil(1e9 / 3)
    assert params.tolerance == 1_000_000_002  # 3 * interval
    params = TokenBucketConfig(2.5, 1).params()
    assert params.tolerance == 2_500_000_000


def test_capacity_below_one_token_never_admits() -> None:
    params = TokenBucketConfig(0.5, 100).params()
    assert wait_ns(0, SECOND, params) == NEVER
    assert reserve([0], SECOND, [params], None) == (NEVER, None)


def test_full_bucket_admits_capacity_then_waits_one_interval() -> None:
    params = TokenBucketConfig(3, 2).params()
    now = 100 * SECOND
    tats = [0]
    for _ in range(3):
        wait, new = reserve(tats, now, [params], 0)
        assert (wait, new is not None) == (0, True)
        assert new is not None
        tats = new
    assert reserve(tats, now, [params], 0) == (SECOND // 2, None)
    assert reserve(tats, now + SECOND // 2, [params], 0)[1] is not None


def test_denied_message_takes_nothing_from_buckets_it_passed() -> None:
    roomy = TokenBucketConfig(10, 1).params()
    empty = TokenBucketConfig(1, 1).params()
    now = 50 * SECOND
    tats = [now + 2 * SECOND, now + SECOND]  # roomy has tokens, empty has none
    wait, new = reserve(tats, now, [roomy, empty], 0)
    assert new is None
    assert wait == SECOND
    assert tats == [now + 2 * SECOND, now + SECOND]


def test_reservation_charges_every_bucket_at_the_admission_instant() -> None:
    # A token reserved for later must not count as spent now, or the bucket that had
    # room would let a burst through around the admission time.
    roomy = TokenBucketConfig(1, 1).params()
    slow = TokenBucketConfig(1, 0.2).params()
    now = 10 * SECOND
    wait, new = reserve([0, now + 5 * SECOND], now, [roomy, slow], None)
    assert wait == 5 * SECOND
    assert new == [now + 6 * SECOND, now + 10 * SECOND]


def test_negative_max_wait_only_reports_the_wait() -> None:
    params = TokenBucketConfig(1, 1).params()
    assert reserve([0], SECOND, [params], -1) == (0, None)


@settings(max_examples=200, deadline=None)
@given(
    capacity=st.floats(min_value=1, max_value=20),
    rate=st.floats(min_value=0.01, max_value=1000),
    gaps=st.lists(st.integers(min_value=0, max_value=2 * SECOND), min_size=1, max_size=300),
)
def test_admissions_in_any_window_never_exceed_capacity_plus_rate_times_window(
    capacity: float, rate: float, gaps: list[int]
) -> None:
    params = TokenBucketConfig(capacity, rate).params()
    now, tats, admitted = SECOND, [0], []
    for gap in gaps:
        now += gap
        _, new = reserve(tats, now, [params], 0)
        if new is not None:
            tats = new
            admitted.append(now)
    for i, start in enumerate(admitted):
        for j in range(i, len(admitted)):
            window = (admitted[j] - start) / SECOND
            assert j - i + 1 <= capacity + rate * window + 1e-9


@settings(max_examples=100, deadline=None)
@given(
    capacity=st.integers(min_value=1, max_value=10),
    rate=st.floats(min_value=0.1, max_value=100),
    idle=st.integers(min_value=0, max_value=100 * SECOND),
)
def test_a_bucket_left_alone_until_full_admits_a_whole_burst(
    capacity: int, rate: float, idle: int
) -> None:
    params = TokenBucketConfig(capacity, rate).params()
    start = 7 * SECOND
    tats = [0]
    for _ in range(capacity):
        _, new = reserve(tats, start, [params], 0)
        assert new is not None
        tats = new
    later = max(tats[0], start + idle)  # full again: same as forgotten
    for _ in range(capacity):
        _, new = reserve(tats, later, [params], 0)
        assert new is not None
        tats = new
    assert reserve(tats, later, [params], 0)[1] is None
