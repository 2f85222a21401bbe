"""Limits on a task as values (`Limits`: a timeout and a memory cap, parsed and checked), and the
words for a task that went past one, for whoever records its end.  Enforcing them inside the task
is `nbbgtask.task.limits`; what a task costs is `nbbgtask.task.resources`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import signal
import time
from typing import Any

from nbbgtask.core.validate import positive_seconds, shown

__all__ = [
    "Limits",
    "LimitExceeded",
    "TimeLimitExceeded",
    "MemoryLimitExceeded",
    "OutOfMemory",
    "death_kind",
    "checked",
    "explain",
    "overdue",
    "oom_kills",
    "format_bytes",
    "compact",
]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*")


def _timeout(value: Any) -> float | None:
    return None if value is None else positive_seconds(value, "timeout")


def _memory(value: Any) -> int | None:
    if value is None:
        return None
    problem = ValueError(
        f"memory must be a number of bytes above 0 or a size such as '512 MiB' or '4 GB' (or None), got {shown(value)}"
    )
    if isinstance(value, str):
        match = _SIZE.fullmatch(value)
        if match is None or match.group(2).lower() not in _UNITS:
            raise problem
        number = float(match.group(1)) * _UNITS[match.group(2).lower()]
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise problem
    else:
        try:
            number = float(value)
        except OverflowError:
            raise problem from None
    if not (number >= 1 and math.isfinite(number)):
        raise problem
    return int(number)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a task may spend: ``timeout`` seconds of wall time, ``memory`` bytes (or ``"4 GiB"``).

    ``None`` is no limit.  Bad values raise `ValueError` here, naming the value.
    """

    timeout: float | None = None
    memory: int | None = None

    def __init__(self, timeout: float | None = None, memory: int | str | None = None) -> None:
        object.__setattr__(self, "timeout", _timeout(timeout))
        object.__setattr__(self, "memory", _memory(memory))

    def __repr__(self) -> str:
        memory = None if self.memory is None else format_bytes(self.memory)
        return f"Limits(timeout={self.timeout!r}, memory={memory!r})"

    def to_record(self) -> dict[str, Any] | None:
        """As the task's record keeps them (``None`` when there is no limit)."""
        if self.timeout is None and self.memory is None:
            return None
        return {"timeout": self.timeout, "memory": self.memory}


def checked(value: Any, what: str = "limits") -> Limits | None:
    if value is None or isinstance(value, Limits):
        return value
    raise TypeError(f"{what} must be a bg.Limits(timeout=..., memory=...), got {type(value).__name__}")


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}".replace(".0 ", " ")
        n /= 1024
    raise AssertionError("unreachable")


def _seconds(value: float) -> str:
    return f"{value:g} s"


class LimitExceeded(BaseException):
    """Raised in a task that went past one of its limits; a BaseException, like a cancel's, so
    ``except Exception`` in the task lets it by."""


class TimeLimitExceeded(LimitExceeded):
    pass


class MemoryLimitExceeded(LimitExceeded):
    pass


class OutOfMemory(LimitExceeded):
    """The machine's OOM killer ended the task (never raised in it: the process is killed); a
    name for ``retry_on``."""


def timeout_text(timeout: float) -> str:
    return f"TimeLimitExceeded: the task timed out after {_seconds(timeout)} (its limit) and was stopped"


def memory_text(limit: int, peak: int) -> str:
    return (
        f"MemoryLimitExceeded: the task went past its memory limit of {format_bytes(limit)} "
        f"(peak {format_bytes(peak)}) and was stopped"
    )


OOM_TEXT = "killed by the OOM killer (out of memory)"


def death_kind(error: str) -> type[BaseException] | None:
    """Which limit an `explain`ed error of a killed task names (what ``retry_on`` matches), or
    ``None`` for a death of no known cause."""
    if error.startswith("TimeLimitExceeded"):
        return TimeLimitExceeded
    if error.startswith("MemoryLimitExceeded"):
        return MemoryLimitExceeded
    if error.startswith(OOM_TEXT):
        return OutOfMemory
    return None


def compact(resources: dict[str, Any] | None) -> str:
    """``CPU 98% · 212 MiB`` (RSS), or ``""``."""
    if not resources:
        return ""
    cpu = resources.get("cpu_percent")
    memory = format_bytes(resources["rss"])
    return f"CPU {cpu:.0f}% · {memory}" if cpu is not None else memory


# -- for whoever records a task's end ---------------------------------------------------------


def oom_kills() -> int | None:
    """How many processes the OOM killer has killed on this machine since boot (Linux 4.13+)."""
    # Asked before every local task: one read and a search, not a loop over its 180 lines.
    try:
        with open("/proc/vmstat", "rb", buffering=0) as f:
            text = f.read(65536)
        at = text.find(b"\noom_kill ")
        if at >= 0:
            return int(text[at + 10 : text.index(b"\n", at + 10)])
    except (OSError, ValueError):
        pass
    return None


def overdue(record: dict[str, Any], grace: float, now: float | None = None) -> bool:
    """A live task past its timeout by more than the grace and a second: its own process should
    have ended it; whoever reads this kills it."""
    limits = record.get("limits") or {}
    timeout, started = limits.get("timeout"), record.get("started")
    if timeout is None or started is None:
        return False
    return (time.time() if now is None else now) > started + timeout + grace + 1.0


def explain(record: dict[str, Any], error: str, code: int | None = None, now: float | None = None) -> str:
    """The error of a task whose process ended without saying how (``error`` says what is known):
    a limit it went past, or the OOM killer, where that is what ended it."""
    if record.get("limit_error"):
        return f"{record['limit_error']} ({error})"
    memory = (record.get("limits") or {}).get("memory")
    limits = record.get("limits") or {}
    timeout, started = limits.get("timeout"), record.get("started")
    if timeout is not None and started is not None and (time.time() if now is None else now) >= started + timeout:
        return f"{timeout_text(timeout)} ({error})"
    if code == -signal.SIGKILL and memory is not None:
        return f"MemoryLimitExceeded: the task went past its memory limit of {format_bytes(memory)} and was killed ({error})"
    if code == -signal.SIGKILL and record.get("oom_kills") is not None:
        count = oom_kills()
        if count is not None and count > record["oom_kills"]:
            return f"{OOM_TEXT}: the task process {record.get('pid') or ''} was killed (SIGKILL)".replace("  ", " ")
    return error
