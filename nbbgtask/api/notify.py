"""Word of a task's end for a callable: it is called in this process (the kernel) with the task's
`TaskStatus` once the task has ended, from one thread that watches every such task.  A URL is
sent by whoever records the end (`nbbgtask.task.notify`); a callable can only be called here, so
if this process exits first it is not called (a URL still is)."""

from __future__ import annotations

import sys
import threading
import traceback

from nbbgtask.api.status import TaskStatus
from nbbgtask.core.forks import renew_in_child
from nbbgtask.core.notify import Notify

__all__ = ["call_when_done"]

#: seconds between two looks at the watched tasks
POLL = 0.5

_lock = threading.Lock()
_watched: list[tuple[TaskStatus, Notify]] = []
_thread: threading.Thread | None = None


def call_when_done(status: TaskStatus, notify: Notify) -> None:
    global _thread
    with _lock:
        _watched.append((status, notify))
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_watch, name="nbbgtask-notify-callables", daemon=True)
            _thread.start()


def _watch() -> None:
    while True:
        with _lock:
            watched = list(_watched)
        if not watched:
            return
        for status, notify in watched:
            try:
                done = status.done()
            except Exception:  # noqa: BLE001 - a task gone from the store: nothing to say
                done = True
            if not done:
                continue
            with _lock:
                _watched.remove((status, notify))
            if notify.wants(status.to_dict()):
                try:
                    notify.target(status)  # type: ignore[operator,misc]
                except Exception:  # noqa: BLE001 - the user's callable: say what it raised, go on
                    print(f"nbbgtask: the notify callable for task {status.id[:8]} raised:", file=sys.stderr)
                    traceback.print_exc()
        threading.Event().wait(POLL)


def _reset_after_fork() -> None:
    """A forked task calls nothing of the kernel's."""
    global _lock, _thread
    _lock = threading.Lock()
    _thread = None
    _watched.clear()


renew_in_child(_reset_after_fork)
