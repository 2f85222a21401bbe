"""The task states, as a ``str`` enum so they round-trip through JSON untouched."""

from __future__ import annotations

import enum

__all__ = ["State", "FINAL_STATES", "LIVE_STATES"]


class State(str, enum.Enum):
    """Where a task is in its life: (waiting →) queued → running → complete, failed or cancelled.

    ``waiting``: live, but neither queued nor running: it waits for other tasks to complete
    (``after=``) and counts against no ``max_running`` and no limit until it starts."""

    WAITING = "waiting"
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES

    @classmethod
    def parse(cls, value: object) -> State:
        """Return the state named by ``value``, or raise a ``ValueError`` listing the names."""
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(repr(s.value) for s in cls)
            raise ValueError(f"unknown task state {value!r}: use one of {names}") from None


FINAL_STATES = frozenset({State.COMPLETE, State.FAILED, State.CANCELLED})
LIVE_STATES = frozenset({State.WAITING, State.QUEUED, State.RUNNING})
