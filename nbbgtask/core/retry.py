"""Retries as a value: `Retry` (how many, the first delay, which failures), checked where a user
gives them, and the delay before each retry (doubling, capped, with jitter).  Running the attempts
is `nbbgtask.task.attempts`'s."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from nbbgtask.core.validate import seconds, whole_number

__all__ = ["Retry", "MAX_DELAY", "checked_retries", "checked_delay", "checked_on", "policy", "delay_before"]

#: the longest wait before a retry, however many attempts failed before it
MAX_DELAY = 600.0
#: each delay is the doubled one times a factor drawn from this range, so that tasks that failed
#: together (a server that went down) do not all come back at the same moment
JITTER = (0.8, 1.2)
#: retry_delay when nothing sets it
DEFAULT_DELAY = 1.0


@dataclasses.dataclass(frozen=True)
class Retry:
    """``retries`` more attempts after a failure, the first ``delay`` seconds after it (doubling
    each time), for the failures that are instances of ``on`` (``None``: any failure)."""

    retries: int
    delay: float = DEFAULT_DELAY
    on: tuple[type[BaseException], ...] | None = None

    def wants(self, kind: type[BaseException] | None) -> bool:
        """A failure of type ``kind`` (``None``: a death of no known cause) is to be retried."""
        if self.on is None:
            return True
        return kind is not None and issubclass(kind, self.on)


def checked_retries(value: Any, what: str = "retries") -> int | None:
    return None if value is None else whole_number(value, what, "retries")


def checked_delay(value: Any, what: str = "retry_delay") -> float | None:
    if value is None:
        return None
    delay = seconds(value, what)
    if delay is None:  # infinity: never retry would be retries=0
        raise ValueError(f"{what} must be a finite number of seconds, 0 or more, got {value!r}")
    return delay


def checked_on(value: Any, what: str = "retry_on") -> tuple[type[BaseException], ...] | None:
    """``None`` (any failure), or exception types as a tuple (one type on its own is taken too)."""
    if value is None:
        return None
    kinds = (value,) if isinstance(value, type) else value
    try:
        kinds = tuple(kinds)
    except TypeError:
        kinds = None
    if not kinds or not all(isinstance(k, type) and issubclass(k, BaseException) for k in kinds):
        raise TypeError(
            f"{what} must be an exception type or a tuple of them, such as (ConnectionError, "
            f"bg.TimeLimitExceeded), got {value!r}"
        )
    return kinds


def policy(retries: int | None, delay: float | None, on: tuple[type[BaseException], ...] | None) -> Retry | None:
    """The `Retry` of checked values; ``None`` when there is no retry (nothing changes then)."""
    if not retries:
        return None
    return Retry(retries, DEFAULT_DELAY if delay is None else delay, on)


def delay_before(attempt: int, base: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before attempt ``attempt`` (2 for the first retry): ``base`` doubled for
    each failure before the last, with jitter, at most `MAX_DELAY`."""
    if base <= 0:
        return 0.0
    doubled = base * 2.0 ** min(max(attempt - 2, 0), 30)
    return min(MAX_DELAY, doubled * (rng or random).uniform(*JITTER))
