"""`ProgressBar`: a live ipywidgets bar that follows one task, or the newest running one."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import ipywidgets as widgets

from nbbgtask.api.status import TaskStatus
from nbbgtask.core import config as _config
from nbbgtask.core import format as _format
from nbbgtask.core import limits as _limits
from nbbgtask.core.states import State
from nbbgtask.notebook import refresher as _refresher

__all__ = ["ProgressBar", "bar_style"]

_STYLES = {"complete": "success", "failed": "danger", "cancelled": "warning"}


def bar_style(state: str) -> str:
    return _STYLES.get(state, "info" if state == "running" else "")


class ProgressBar(widgets.HBox):
    """Name, bar, percent, message, elapsed time and ETA of one task, kept up to date.

    It keeps moving while the kernel is idle and while other cells run (the refresher is a
    thread).  Once the task ends it settles — green at 100 %, red with the error, or
    "cancelled" — and is never changed again.
    """

    def __init__(self, status: TaskStatus | str | None = None, *, _follow_last: bool = False, _name: str | None = None) -> None:
        if status is None and not _follow_last:
            raise TypeError("ProgressBar needs the TaskStatus (or id) of the task to follow")
        if isinstance(status, str):
            from nbbgtask.api.functions import get

            status = get(status)
        if status is not None and not isinstance(status, TaskStatus):
            raise TypeError(f"ProgressBar follows a TaskStatus, got {type(status).__name__}")
        self.home: Path = status.home if status is not None else _config.home()
        self._follow_last = _follow_last
        self._name_filter = _name
        self._record: dict[str, Any] | None = status.to_dict() if status is not None else None
        self._settled = False
        self._label = widgets.HTML(layout=widgets.Layout(min_width="8em"))
        self._bar = widgets.FloatProgress(min=0, max=100, layout=widgets.Layout(width="40%"))
        self._text = widgets.HTML()
        super().__init__([self._label, self._bar, self._text], layout=widgets.Layout(align_items="center"))
        self._show(self._record)
        _refresher.register(self)

    @classmethod
    def last_running(cls, name: str | None = None) -> ProgressBar:
        """A bar that follows the newest running task (with ``name``, if given), and when that
        ends, picks up the next running one: the original "global progress bar"."""
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a string, got {name!r}")
        from nbbgtask.api.functions import find_last

        bar = cls(find_last(state="running", name=name), _follow_last=True, _name=name)
        return bar

    @property
    def task_id(self) -> str | None:
        return self._record["id"] if self._record else None

    # -- rendering ---------------------------------------------------------------------------

    def _show(
        self, record: dict[str, Any] | None, now: float | None = None, costs: dict[str, Any] | None = None
    ) -> None:
        if record is None:
            waiting = f" named {self._name_filter!r}" if self._name_filter else ""
            self._label.value = "<b>no task running</b>"
            self._bar.value, self._bar.bar_style = 0, ""
            self._text.value = f"waiting for a task{waiting} to start"
            return
        state = record["state"]
        name = html.escape(str(record["name"]))
        label = f"<b>{name}</b>"
        if self._label.value != label:
            self._label.value = label
        with self._bar.hold_sync():
            self._bar.value = float(record.get("percent") or 0)
            self._bar.bar_style = bar_style(state)
            self._bar.description = ""
        text = html.escape(_format.summary(record, now))
        if costs:
            text += f' <small style="color:#757575">· {html.escape(_limits.compact(costs))}</small>'
        if state == State.FAILED.value:
            text = f'<span style="color:#c62828">{text}</span>'
        if self._text.value != text:
            self._text.value = text

    def _nbbg_refresh(self, snapshot: _refresher.Snapshot, changed: bool) -> bool:
        if self._settled:
            return self._follow_last
        record = self._record
        if record is not None and changed:
            record = snapshot.get(record["id"]) or record
        if self._follow_last and (record is None or State(record["state"]).is_final):
            newest = self._newest_running(snapshot)
            if newest is not None:
                record = newest
        self._record = record
        self._show(record, snapshot.now, snapshot.resources(record) if record is not None else None)
        if record is not None and State(record["state"]).is_final and not self._follow_last:
            self._settled = True
            return False
        return True

    def _newest_running(self, snapshot: _refresher.Snapshot) -> dict[str, Any] | None:
        running = [
            r
            for r in snapshot.live.values()
            if r["state"] == State.RUNNING.value and (self._name_filter is None or r["name"] == self._name_filter)
        ]
        return max(running, key=lambda r: r["created"]) if running else None

    def _nbbg_refresh_now(self, status: TaskStatus) -> None:
        """Show ``status`` as it is now (the caller has just refreshed it)."""
        self._record = status.to_dict()
        self._show(self._record)
        self._settled = State(self._record["state"]).is_final and not self._follow_last

    def close(self) -> None:
        self._nbbg_closed = True
        self._settled, self._follow_last = True, False
        # getattr: ipywidgets calls close() from __del__, also on one whose __init__ refused its input
        for name in ("_label", "_bar", "_text"):
            child = getattr(self, name, None)
            if child is not None:
                child.close()
        super().close()


def status_mimebundle(status: TaskStatus, include: Any = None, exclude: Any = None) -> dict[str, Any]:
    """What a `TaskStatus` that ends a cell displays: a live bar with the task's output under it,
    with static fallbacks."""
    record = dict(status.refresh().to_dict())
    bundle: dict[str, Any] = {
        "text/plain": _format.text_snapshot(record),
        "text/html": _format.html_snapshot(record),
    }
    if _has_kernel():
        from nbbgtask.notebook.output_area import task_view

        view = task_view(status, ProgressBar(status))  # what it prints and displays, under its bar
        widget_bundle = view._repr_mimebundle_(include=include, exclude=exclude) or {}
        for key, value in widget_bundle.items():
            if key != "text/plain":
                bundle[key] = value
    return bundle


def _has_kernel() -> bool:
    """A kernel with comms (where a widget front end may be listening), not a terminal IPython."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None
