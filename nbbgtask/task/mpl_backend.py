"""The matplotlib backend of a task (`nbbgtask.task.outputs.MPL_BACKEND`): draws as Agg does, and ``plt.show()``
keeps each open figure as a PNG under the task's bar, then closes it, as the inline backend of a
notebook does.  Set by `nbbgtask.task.outputs` in the task's process only."""

from __future__ import annotations

from typing import Any

from matplotlib.backend_bases import FigureManagerBase
from matplotlib.backends.backend_agg import FigureCanvasAgg

from nbbgtask.task import outputs as _outputs

__all__ = ["FigureCanvas", "FigureManager", "show"]

FigureCanvas = FigureCanvasAgg
FigureManager = FigureManagerBase


def show(*args: Any, **kwargs: Any) -> None:
    _outputs.show_figures()
