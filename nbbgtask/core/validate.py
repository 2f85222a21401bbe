"""Checks of values users hand to nbbgtask, each with a message that names the value and what to do."""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["shown", "text", "whole_number", "seconds", "positive_seconds", "percent"]


def shown(value: Any) -> str:
    """``repr(value)`` for a message; a value that cannot be written out (an int past Python's
    4,300 digits, an object whose repr raises) is named by its type, so that the message about
    it is never replaced by an error from writing it."""
    try:
        return repr(value)
    except Exception:
        return f"a {type(value).__name__} that cannot be written out"


def text(value: Any, what: str) -> str:
    """``value`` as text (``str(value)``); a `ValueError` naming ``what`` if it cannot be written."""
    if type(value) is str:
        return value
    try:
        return str(value)
    except Exception:
        raise ValueError(f"{what} must be text or something str() can write, got {shown(value)}") from None


def whole_number(value: Any, what: str, unit: str | None = None, minimum: int = 0) -> int:
    """``value`` if it is an int (not a bool) of at least ``minimum``; else a `ValueError` naming
    ``what`` (and what it counts, ``unit``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        of = f" of {unit}" if unit else ""
        raise ValueError(f"{what} must be a whole number{of}, {minimum} or more, got {shown(value)}")
    return value


def seconds(value: Any, what: str) -> float | None:
    """``None`` (no limit) or a number of seconds, 0 or more (infinity is no limit)."""
    if value is None:
        return None
    problem = ValueError(f"{what} must be a number of seconds, 0 or more (or None), got {shown(value)}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise problem
    try:
        result = float(value)
    except OverflowError:
        result = math.inf if value > 0 else -math.inf  # type: ignore[operator]
    if not result >= 0:
        raise problem
    return None if math.isinf(result) else result


def positive_seconds(value: Any, what: str) -> float:
    """A finite number of seconds above 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:  # type: ignore[operator]
        raise ValueError(f"{what} must be a positive number of seconds, got {shown(value)}")
    try:
        result = float(value)
    except OverflowError:
        result = math.inf
    if math.isinf(result):
        raise ValueError(f"{what} must be a finite number of seconds, got {shown(value)}")
    return result


def percent(value: Any) -> float:
    """``value`` as a float clamped to 0–100; NaN and non-numbers are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"percent must be a number from 0 to 100, got {shown(value)}")
    try:
        value = float(value)
    except OverflowError:  # an int or Fraction too large for a float: far out of range either way
        value = math.inf if value > 0 else -math.inf
    if value != value:
        raise ValueError("percent must be a number from 0 to 100, got NaN")
    return 0.0 if value < 0 else 100.0 if value > 100 else value
