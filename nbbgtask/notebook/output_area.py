"""`OutputArea`: what a task prints and displays, shown under its bar as a cell shows its output.

A stock ipywidgets ``Output`` whose outputs the refresher thread sets: every round it looks at the
task's log and outputs file (`_output_tail.Tail`: a stat of each, and a read of what was appended),
so it costs next to nothing while the task is quiet.  A task that prints without pause has its
area updated at most every `OUTPUT_EVERY`: each update sends the area's whole tail, and at the
refresher's pace (a round every 0.1 s) a flood of prints doubled what the bar cost the kernel.
It shows a bounded tail, with a note of what was left out; once the task has ended it takes in
the rest and is never changed again.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import ipywidgets as widgets

from nbbgtask.api.status import TaskStatus
from nbbgtask.core import format as _format
from nbbgtask.core.states import State
from nbbgtask.notebook import refresher as _refresher
from nbbgtask.store import tail as _output_tail

__all__ = ["OutputArea", "OUTPUT_EVERY"]

#: seconds between two updates of an output area while its task prints (the first print after a
#: quiet spell shows at the next round)
OUTPUT_EVERY = 0.25


class OutputArea(widgets.Output):
    def __init__(self, status: TaskStatus) -> None:
        super().__init__()
        self.home: Path = status.home
        self.task_id = status.id
        self._tail = _output_tail.Tail(status.home, status.id, _format.short_id(status.id))
        self._sent = -OUTPUT_EVERY  # time.monotonic() of the last update
        self._nbbg_poll()
        if not status.state.is_final:
            _refresher.register(self)

    def _nbbg_poll(self, final: bool = False) -> None:
        """Show what the task printed or displayed since the last look (every refresher round, or
        every `OUTPUT_EVERY` while it prints; at its end, all that is left)."""
        now = time.monotonic()
        if not final and now - self._sent < OUTPUT_EVERY:
            return
        if self._tail.read():
            self.outputs = tuple(self._tail.outputs())
            self._sent = now

    def _nbbg_refresh(self, snapshot: _refresher.Snapshot, changed: bool) -> bool:
        record = snapshot.get(self.task_id) if changed else None
        if record is not None and State(record["state"]).is_final:
            self._nbbg_poll(final=True)  # what came before the end
            return False
        return True

    def close(self) -> None:
        self._nbbg_closed = True
        super().close()


def task_view(status: TaskStatus, bar: Any) -> widgets.VBox:
    """A task's bar with its output area under it."""
    return widgets.VBox([bar, OutputArea(status)])
