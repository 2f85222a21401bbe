"""nbbgtask: run long notebook-defined work out of the kernel, and watch and steer it."""

from __future__ import annotations

from ._api import BackgroundTask, current, find_last, get, progress, prune, run, tasks, track
from ._config import configure
from ._errors import NbbgtaskError, StoreDamagedWarning, StoreError, TaskCancelled, TaskFailed, TaskNotFound
from ._states import State
from ._status import TaskStatus

__version__ = "0.1.0"

__all__ = [
    "BackgroundTask",
    "NbbgtaskError",
    "State",
    "StoreDamagedWarning",
    "StoreError",
    "TaskCancelled",
    "TaskFailed",
    "TaskNotFound",
    "TaskStatus",
    "configure",
    "current",
    "find_last",
    "get",
    "progress",
    "prune",
    "run",
    "tasks",
    "track",
]
