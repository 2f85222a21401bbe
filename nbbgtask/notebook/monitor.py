"""`monitor()`: every running task and the recent finished ones, live, with Cancel and the log."""

from __future__ import annotations

import html
import threading
import time
from pathlib import Path
from typing import Any

import ipywidgets as widgets

from nbbgtask.api.status import TaskStatus
from nbbgtask.core import config as _config
from nbbgtask.core import format as _format
from nbbgtask.core import limits as _limits
from nbbgtask.core.states import State
from nbbgtask.core.validate import whole_number
from nbbgtask.notebook import refresher as _refresher
from nbbgtask.notebook.bar import bar_style
from nbbgtask.store.files import log_path
from nbbgtask.store.tail import last_lines

__all__ = ["Monitor", "monitor"]

#: CPU seconds a refresh round may spend making new rows, so hundreds of tasks never freeze the
#: kernel (the refresher holds the GIL while it works): the next rounds make the rest
ROW_BUDGET = 0.02
LOG_LINES = 15
#: ... and at most this many bytes of them (a note says what was left out)
LOG_BYTES = 16 * 1024


class _Row:
    """One task's line in the monitor; built once, then only its traits change."""

    def __init__(self, record: dict[str, Any], home: Path) -> None:
        self.status = TaskStatus(record, home)
        self.task_id = record["id"]
        self.name = widgets.HTML(layout=widgets.Layout(width="18em"))
        self.state = widgets.HTML(layout=widgets.Layout(width="6em"))
        self.bar = widgets.FloatProgress(min=0, max=100, layout=widgets.Layout(width="20%"))
        self.text = widgets.HTML(layout=widgets.Layout(flex="1"))
        #: CPU % and memory (RSS) of the task's process tree while it runs; its peak once ended
        self.costs = widgets.HTML(layout=widgets.Layout(width="11em"))
        self.cancel = widgets.Button(description="Cancel", button_style="danger", layout=widgets.Layout(width="6em"))
        self.show_log = widgets.ToggleButton(description="Log", layout=widgets.Layout(width="5em"))
        self.log = widgets.HTML(layout=widgets.Layout(display="none"))
        self.cancel.on_click(self._on_cancel)
        self.show_log.observe(self._on_toggle, names="value")
        self.line = widgets.HBox([self.name, self.state, self.bar, self.costs, self.text, self.cancel, self.show_log])
        self.box = widgets.VBox([self.line, self.log])
        self.final = False
        self.update(record)

    def _on_cancel(self, _: Any) -> None:
        self.cancel.disabled = True
        threading.Thread(target=self.status.cancel, name="nbbgtask-cancel", daemon=True).start()

    def _on_toggle(self, change: dict[str, Any]) -> None:
        self.log.layout.display = "" if change["new"] else "none"
        if change["new"]:
            self.refresh_log()

    def refresh_log(self) -> None:
        # Bytes as well as lines: one line of a \r progress meter can be megabytes, and this is
        # sent to the browser every round while the Log is open.
        try:
            text = last_lines(log_path(self.status.home, self.status.id), LOG_LINES, LOG_BYTES)
        except FileNotFoundError:
            text = ""
        text = text or "(nothing printed yet)"
        value = f'<pre style="margin:0 0 0 18em;max-height:15em;overflow:auto">{html.escape(text)}</pre>'
        if self.log.value != value:
            self.log.value = value

    def update(self, record: dict[str, Any], now: float | None = None, costs: dict[str, Any] | None = None) -> None:
        if self.final:
            return
        if costs:
            cost = _limits.compact(costs)
        elif record.get("peak_memory") is not None:
            cost = f"peak {_limits.format_bytes(record['peak_memory'])}"
        else:
            cost = ""
        cost = f'<span class="nbbgtask-costs" style="white-space:nowrap">{html.escape(cost)}</span>'
        if self.costs.value != cost:
            self.costs.value = cost
        state = record["state"]
        name = (
            f'<span style="white-space:nowrap"><b>{html.escape(str(record["name"]))}</b> '
            f"<small>{_format.short_id(record['id'])}</small></span>"
        )
        for widget, value in (
            (self.name, name),
            (self.state, state),
            (self.text, f'<span style="white-space:nowrap">{html.escape(_format.summary(record, now))}</span>'),
        ):
            if widget.value != value:
                widget.value = value
        with self.bar.hold_sync():
            self.bar.value = float(record.get("percent") or 0)
            self.bar.bar_style = bar_style(state)
        if State(state).is_final:
            self.final = True
            self.cancel.disabled = True
            self.cancel.layout.visibility = "hidden"  # nothing left to cancel
        if self.show_log.value:
            self.refresh_log()

    def close(self) -> None:
        for w in (self.name, self.state, self.bar, self.costs, self.text, self.cancel, self.show_log, self.log, self.line, self.box):
            w.close()


class Monitor(widgets.VBox):
    """The global task monitor: tasks of every process that shares the home folder.

    At most ``max_rows`` rows (newest first, running and queued before finished); a footer counts
    the rest.  The rows shown at first are made at once, in the cell that displays the monitor;
    rows for tasks that start later are made by the refresher, a few per round.
    """

    def __init__(self, finished: int = 20, name: str | None = None, max_rows: int = 50) -> None:
        whole_number(finished, "finished", "tasks")
        whole_number(max_rows, "max_rows", "tasks")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a string, got {name!r}")
        self.home: Path = _config.home()
        self._finished = finished
        self._name = name
        self._max_rows = max_rows
        self._rows: dict[str, _Row] = {}
        self._header = widgets.HTML()
        self._footer = widgets.HTML()
        super().__init__([self._header])
        self._apply(_refresher.Snapshot(self.home, time.time()), row_budget=None)
        _refresher.register(self)

    def _wanted(self, snapshot: _refresher.Snapshot) -> list[dict[str, Any]]:
        def keep(r: dict[str, Any]) -> bool:
            return self._name is None or r["name"] == self._name

        live = sorted((r for r in snapshot.live.values() if keep(r)), key=lambda r: r["created"], reverse=True)
        return live + snapshot.recent_finished(self._finished, self._name)

    def _nbbg_refresh(self, snapshot: _refresher.Snapshot, changed: bool) -> bool:
        self._apply(snapshot, row_budget=ROW_BUDGET)
        return True

    def _apply(self, snapshot: _refresher.Snapshot, row_budget: float | None) -> None:
        wanted = self._wanted(snapshot)
        shown = wanted[: self._max_rows]
        deadline = None if row_budget is None else time.thread_time() + row_budget
        rows = []
        for record in shown:
            row = self._rows.get(record["id"])
            if row is None:
                if deadline is not None and time.thread_time() > deadline:
                    continue  # the next round makes the rest
                row = self._rows[record["id"]] = _Row(record, self.home)
            else:
                row.update(record, snapshot.now, snapshot.resources(record))
            rows.append(row)
        keep = {r.task_id for r in rows}
        for task_id in [t for t in self._rows if t not in keep]:
            self._rows.pop(task_id).close()
        running = sum(1 for r in wanted if r["state"] == State.RUNNING.value)
        queued = sum(1 for r in wanted if r["state"] == State.QUEUED.value)
        header = f"<b>nbbgtask</b> · {running} running · {queued} queued · {len(wanted) - running - queued} recent finished"
        if self._header.value != header:
            self._header.value = header
        hidden = len(wanted) - len(rows)
        footer = f"<i>+{hidden} more not shown</i> (bg.monitor(name=..., max_rows=...) changes what is shown)" if hidden else ""
        if self._footer.value != footer:
            self._footer.value = footer
        children: tuple[Any, ...] = (self._header, *(r.box for r in rows), *((self._footer,) if hidden else ()))
        current: tuple[Any, ...] = tuple(self.children)  # type: ignore[has-type]
        if current != children:
            self.children = children

    def close(self) -> None:
        self._nbbg_closed = True
        # getattr: ipywidgets calls close() from __del__, also on one whose __init__ refused its input
        for row in getattr(self, "_rows", {}).values():
            row.close()
        for name in ("_header", "_footer"):
            widget = getattr(self, name, None)
            if widget is not None:
                widget.close()
        super().close()


def monitor(finished: int = 20, name: str | None = None, max_rows: int = 50) -> Monitor:
    """The global task monitor widget: running tasks and the ``finished`` most recent others,
    ``max_rows`` rows at most (``name``: only tasks with that name)."""
    return Monitor(finished=finished, name=name, max_rows=max_rows)
