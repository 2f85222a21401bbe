"""Word when work ends, as a value: `Notify` (a webhook URL or a callable, which ends, and the
least run time), checked where a user gives it, and the message a task's end makes.

The URL is a secret (a Slack or ntfy webhook is a credential): it is held in memory only, by the
processes that may record the task's end, and never reaches the store, a log, a command line or
an environment (`nbbgtask.task.notify` sends it; the callable is the kernel's,
`nbbgtask.api.notify`).
"""

from __future__ import annotations

import math
import numbers
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any

from nbbgtask.core.states import State

__all__ = ["Notify", "checked", "message", "payload"]

ENDS = ("complete", "failed", "cancelled")
#: the least run time of a task that notifies, when a plain URL or callable is given
MIN_SECONDS = 30.0


class Notify:
    """Where to send word when a task ends: ``target`` a webhook URL (``http://`` or
    ``https://``: one POST of JSON) or a callable (called in the kernel with the `TaskStatus`);
    ``on`` which ends; ``min_seconds`` the least run time (a task that ended sooner is silent)."""

    __slots__ = ("target", "on", "min_seconds")
    target: str | Callable[[Any], Any]
    on: tuple[str, ...]
    min_seconds: float

    def __init__(
        self,
        target: str | Callable[[Any], Any],
        on: Iterable[str] = ENDS,
        min_seconds: float = MIN_SECONDS,
    ) -> None:
        if isinstance(target, str):
            parts = urllib.parse.urlsplit(target)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("notify must be an http:// or https:// URL, a callable or bg.Notify(...); got a string that is not one")
        elif not callable(target):
            raise TypeError(f"notify must be a webhook URL, a callable or bg.Notify(...), got {type(target).__name__}")
        if isinstance(on, str):
            on = (on,)
        ends = tuple(str(s) for s in on)
        unknown = [s for s in ends if s not in ENDS]
        if unknown or not ends:
            raise ValueError(f"Notify(on=...) takes some of {', '.join(map(repr, ENDS))}, got {tuple(on)!r}")
        if isinstance(min_seconds, bool) or not isinstance(min_seconds, numbers.Real) or not min_seconds >= 0:  # type: ignore[operator]
            raise ValueError(f"Notify(min_seconds=...) must be a number of seconds, 0 or more, got {min_seconds!r}")
        self.target = target
        self.on = ends
        self.min_seconds = float(min_seconds) if math.isfinite(float(min_seconds)) else math.inf

    @property
    def url(self) -> str | None:
        return self.target if isinstance(self.target, str) else None

    def __repr__(self) -> str:
        # The URL is a secret: never shown whole, not even in a repr.
        if isinstance(self.target, str):
            what = f"{urllib.parse.urlsplit(self.target).scheme}://{urllib.parse.urlsplit(self.target).hostname}/…"
        else:
            what = getattr(self.target, "__qualname__", type(self.target).__name__)
        return f"Notify({what!r}, on={self.on!r}, min_seconds={self.min_seconds:g})"

    def __reduce__(self) -> Any:  # slots: pickled through the constructor
        return (Notify, (self.target, self.on, self.min_seconds))

    def wants(self, record: dict[str, Any]) -> bool:
        """Whether the end in ``record`` is one to notify about."""
        return record.get("state") in self.on and _elapsed(record) >= self.min_seconds


def checked(value: Any) -> Notify | None:
    """``None``, a `Notify`, or what a user wrote (a URL, a callable) as a `Notify`."""
    if value is None or isinstance(value, Notify):
        return value
    return Notify(value)


def _elapsed(record: dict[str, Any]) -> float:
    start = record.get("started") or record.get("created") or 0.0
    end = record.get("finished") or start
    return max(0.0, float(end) - float(start))


def message(record: dict[str, Any]) -> str:
    """One line for a person: ``nbbgtask: load (3f2a1b2c) failed after 2 min 3 s: ValueError: …``."""
    seconds = _elapsed(record)
    minutes, secs = divmod(int(seconds), 60)
    took = f"{minutes} min {secs} s" if minutes else f"{seconds:.0f} s" if seconds >= 1 else f"{seconds:.1f} s"
    state = record.get("state")
    how = {State.COMPLETE.value: f"completed in {took}", State.FAILED.value: f"failed after {took}"}.get(
        state or "", f"was cancelled after {took}"
    )
    error = first_line(record.get("error"))
    return f"nbbgtask: {record.get('name')} ({str(record.get('id'))[:8]}) {how}" + (f": {error}" if error and state == State.FAILED.value else "")


def first_line(text: Any) -> str | None:
    if not text:
        return None
    return str(text).strip().splitlines()[0][:500] if str(text).strip() else None


def payload(record: dict[str, Any]) -> dict[str, Any]:
    """What a webhook gets: a ``text`` line (Slack, Mattermost and ntfy show it) and the facts."""
    return {
        "text": message(record),
        "id": record.get("id"),
        "name": record.get("name"),
        "state": record.get("state"),
        "elapsed": round(_elapsed(record), 3),
        "error": first_line(record.get("error")),
    }
