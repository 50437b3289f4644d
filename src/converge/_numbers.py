"""One test for "a finite number" (and for "an integer of at least N"), shared by every
validator that takes one."""

from __future__ import annotations

import math

from converge._repr import safe_repr
from converge.errors import UsageError

__all__ = ["check_int", "check_positive", "finite_float", "positive_float", "wait_seconds"]


def finite_float(value: object) -> float | None:
    """``value`` as a float when it is a finite int or float (never a bool), else None.

    An int too large for a float (``10**400``) is None too: ``math.isfinite`` and
    ``float`` raise ``OverflowError`` for it, which no validator should let out.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def positive_float(value: object) -> float | None:
    """``value`` as a float when it is a finite number above zero (see :func:`finite_float`)."""
    number = finite_float(value)
    return number if number is not None and number > 0 else None


def check_positive(name: str, value: object, *, integer: bool = False) -> float:
    """:func:`positive_float` of ``value`` (an int when ``integer``), else a UsageError
    naming the argument ``name``."""
    number = positive_float(value)
    if number is None or (integer and not isinstance(value, int)):
        raise UsageError(f"{name} must be a positive {'integer' if integer else 'number'}")
    return number


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` when it is an int (never a bool) of at least ``minimum``, else a
    UsageError naming the argument ``name`` and showing the value."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"{name} must be an integer >= {minimum}, got {safe_repr(value)}")
    return value


def wait_seconds(value: object) -> float | None:
    """``value`` as seconds to wait, ``>= 0``, when it is a number (never a bool), else None.

    ``inf`` means no limit, and so does an int too large for a float; NaN is None.
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf
