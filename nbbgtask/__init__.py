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

import importlib
from typing import TYPE_CHECKING

from nbbgtask.core import display as _display

if TYPE_CHECKING:  # what the names below are, for type checkers and editors (imported on first use)
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
    from nbbgtask.notebook.bar import ProgressBar
    from nbbgtask.notebook.focus import full_focus
    from nbbgtask.notebook.monitor import monitor

__version__ = "0.1.0"

# How a TaskStatus that ends a cell displays: the notebook layer's live bar, imported only then.
_display.RENDERER = "nbbgtask.notebook.bar:status_mimebundle"

# Every public name, and the module that defines it.  Each is imported on first use, so that
# ``import nbbgtask`` alone (``%load_ext nbbgtask``, ``nbbgtask --help``, a task's process, the
# Jupyter server loading its extension) loads neither the store nor the backends, and the notebook
# parts, which import ipywidgets, only when a widget is asked for.
_HOMES = {
    **dict.fromkeys(
        ("BackgroundTask", "Limits", "configure", "current", "find_last", "get", "progress", "prune", "run",
         "tasks", "track"),
        "nbbgtask.api.functions",
    ),
    "TaskStatus": "nbbgtask.api.status",
    **dict.fromkeys(
        ("HomeError", "NbbgtaskError", "StoreDamagedWarning", "StoreError", "TaskCancelled", "TaskFailed",
         "TaskNotFound"),
        "nbbgtask.core.errors",
    ),
    **dict.fromkeys(("MemoryLimitExceeded", "OutOfMemory", "TimeLimitExceeded"), "nbbgtask.core.limits"),
    "Notify": "nbbgtask.core.notify",
    "State": "nbbgtask.core.states",
    "ProgressBar": "nbbgtask.notebook.bar",
    "full_focus": "nbbgtask.notebook.focus",
    "monitor": "nbbgtask.notebook.monitor",
}


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'nbbgtask' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # the next look-up is a plain attribute
    return value


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
