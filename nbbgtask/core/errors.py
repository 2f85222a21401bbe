"""The exceptions nbbgtask raises, one hierarchy under ``NbbgtaskError``."""

from __future__ import annotations

__all__ = [
    "NbbgtaskError",
    "TaskNotFound",
    "AmbiguousTaskId",
    "TaskFailed",
    "TaskCancelled",
    "StoreError",
    "HomeError",
    "StoreDamagedWarning",
]


class NbbgtaskError(Exception):
    """Base class of every error nbbgtask raises on purpose."""


class TaskNotFound(NbbgtaskError, KeyError):
    """No task with that id is in the store (never started here, or pruned)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "task not found"


class AmbiguousTaskId(TaskNotFound):
    """An id prefix that matches more than one task."""


class TaskFailed(NbbgtaskError):
    """The task raised, or its process died; ``traceback`` holds the task's own traceback."""

    def __init__(self, message: str, *, task_id: str, error: str | None, traceback: str | None):
        super().__init__(message)
        self.task_id = task_id
        self.error = error
        self.traceback = traceback

    def __str__(self) -> str:
        text = str(self.args[0])
        if self.traceback:
            text += "\n\nThe task's traceback:\n" + self.traceback.rstrip()
        return text


class TaskCancelled(NbbgtaskError):
    """The task was cancelled before it completed."""

    def __init__(self, message: str, *, task_id: str):
        super().__init__(message)
        self.task_id = task_id


class StoreError(NbbgtaskError, OSError):
    """The status store could not be read or written (disk full, lock held, newer schema)."""


class HomeError(StoreError):
    """The home folder cannot be created or used."""


class StoreDamagedWarning(UserWarning):
    """A damaged store file was set aside and a fresh one started."""
