"""nbbgtask: run long notebook-defined work out of the kernel, and watch and steer it."""

from __future__ import annotations

from ._api import (
    BackgroundTask,
    Limits,
    configure,
    current,
    find_last,
    get,
    progress,
    prune,
    run,
    tasks,
    track,
)
from ._errors import (
    HomeError,
    NbbgtaskError,
    StoreDamagedWarning,
    StoreError,
    TaskCancelled,
    TaskFailed,
    TaskNotFound,
)
from ._states import State
from ._status import TaskStatus

__version__ = "0.1.0"

# The notebook parts import ipywidgets; a spawned task or the command line never needs them.
_LAZY = {"ProgressBar": "._widgets", "full_focus": "._focus", "monitor": "._monitor"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'nbbgtask' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


def _jupyter_server_extension_points() -> list[dict[str, object]]:
    """The Jupyter server extension, `nbbgtask.server` (imported here, when jupyter_server asks)."""
    from .server import Nbbgtask

    return [{"module": "nbbgtask.server", "app": Nbbgtask}]


def load_ipython_extension(ipython: object) -> None:
    """``%load_ext nbbgtask``: the ``%bgtask`` and ``%%bgtask`` magics."""
    from ._magic import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: object) -> None:
    from ._magic import unload_ipython_extension as unload

    unload(ipython)

__all__ = [
    "BackgroundTask",
    "HomeError",
    "Limits",
    "NbbgtaskError",
    "ProgressBar",
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
    "full_focus",
    "get",
    "monitor",
    "progress",
    "prune",
    "run",
    "tasks",
    "track",
]
