"""nbbgtask: run long notebook-defined work out of the kernel, and watch and steer it.

The public surface is the names of this module (``import nbbgtask as bg``); the sub-packages are
the library's layers, top to bottom (``docs/architecture.md``; enforced by ``lint-imports``):

- ``commands`` (the ``nbbgtask`` command and the ``%bgtask`` magic), ``server`` (JupyterLab's
  REST API); ``notebook`` (widgets); ``api`` (the functions here and `TaskStatus`);
- ``backends`` (the seam) over ``local`` and ``dask`` (the ways a task runs, independent);
- ``task`` (what runs in a task's process); ``store`` (records and files in the home);
  ``core`` (values, errors, checks).
"""

from __future__ import annotations

from nbbgtask.api import status as _status_module
from nbbgtask.api.functions import (
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
from nbbgtask.api.status import TaskStatus
from nbbgtask.core.errors import (
    HomeError,
    NbbgtaskError,
    StoreDamagedWarning,
    StoreError,
    TaskCancelled,
    TaskFailed,
    TaskNotFound,
)
from nbbgtask.core.limits import MemoryLimitExceeded, OutOfMemory, TimeLimitExceeded
from nbbgtask.core.notify import Notify
from nbbgtask.core.states import State

__version__ = "0.1.0"

# How a TaskStatus that ends a cell displays: the notebook layer's live bar, imported only then.
_status_module.DISPLAY = "nbbgtask.notebook.bar:status_mimebundle"

# The notebook parts import ipywidgets; a spawned task or the command line never needs them.
_LAZY = {"ProgressBar": "nbbgtask.notebook.bar", "full_focus": "nbbgtask.notebook.focus", "monitor": "nbbgtask.notebook.monitor"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nbbgtask' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


def _jupyter_server_extension_points() -> list[dict[str, object]]:
    """The Jupyter server extension, `nbbgtask.server` (imported here, when jupyter_server asks)."""
    from .server import Nbbgtask

    return [{"module": "nbbgtask.server", "app": Nbbgtask}]


def load_ipython_extension(ipython: object) -> None:
    """``%load_ext nbbgtask``: the ``%bgtask`` and ``%%bgtask`` magics."""
    from nbbgtask.commands.magic import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: object) -> None:
    from nbbgtask.commands.magic import unload_ipython_extension as unload

    unload(ipython)


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    """The prebuilt JupyterLab extension (the Tasks panel), for ``jupyter labextension develop``.

    An installed wheel (``pip install .`` or ``-e .``) puts it in share/jupyter/labextensions/.
    """
    return [{"src": "labextension", "dest": "nbbgtask"}]

__all__ = [
    "BackgroundTask",
    "HomeError",
    "Limits",
    "MemoryLimitExceeded",
    "NbbgtaskError",
    "Notify",
    "OutOfMemory",
    "ProgressBar",
    "State",
    "StoreDamagedWarning",
    "StoreError",
    "TaskCancelled",
    "TaskFailed",
    "TaskNotFound",
    "TaskStatus",
    "TimeLimitExceeded",
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
