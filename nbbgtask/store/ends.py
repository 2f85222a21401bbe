"""Who hears that a task ended: functions this process registers, called once by the process whose
`Store.finalize` recorded the end (never by one that found it already recorded), after the write.

Word of a task's end (`nbbgtask.task.notify`) listens here, so it is sent exactly once, by
whoever records the end: the task itself, the kernel's supervisor, the fork server, or the
kernel that follows a task on Dask.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nbbgtask.core.forks import renew_in_child

__all__ = ["listen", "ended", "watch", "seen"]

_LISTENERS: list[Callable[[Path, dict[str, Any]], None]] = []
#: told of every end this process sees, whoever recorded it (`seen`)
_WATCHERS: list[Callable[[Path, str], None]] = []


def watch(watcher: Callable[[Path, str], None]) -> None:
    """Call ``watcher(home, task_id)`` when this process sees a task's process end after the task
    recorded its own end (tasks that wait for it start at once, `nbbgtask.api.after`)."""
    if watcher not in _WATCHERS:
        _WATCHERS.append(watcher)


def seen(home: Path, task_id: str) -> None:
    """The process of ``task_id`` has ended, its end already recorded: tell every watcher."""
    for watcher in list(_WATCHERS):
        try:
            watcher(home, task_id)
        except Exception as exc:  # noqa: BLE001
            print(f"nbbgtask: after task {task_id[:8]} ended: {type(exc).__name__}: {exc}", file=sys.stderr)


def listen(listener: Callable[[Path, dict[str, Any]], None]) -> None:
    if listener not in _LISTENERS:
        _LISTENERS.append(listener)


def ended(home: Path, record: dict[str, Any]) -> None:
    """``record``'s task has just ended, recorded by this process: tell every listener.  A
    listener's failure never breaks the end, which is already written."""
    for listener in list(_LISTENERS):
        try:
            listener(home, record)
        except Exception as exc:  # noqa: BLE001 - the end is recorded; say why the word was not sent
            print(f"nbbgtask: after task {str(record.get('id'))[:8]} ended: {type(exc).__name__}: {exc}", file=sys.stderr)


def _reset_after_fork() -> None:
    """A process forked from this one hears nothing it did not ask for itself."""
    _LISTENERS.clear()
    _WATCHERS.clear()


renew_in_child(_reset_after_fork)
