"""`full_focus`: the blocking "please wait" cell, with a live bar and a Cancel button that works."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from nbbgtask.api.status import TaskStatus
from nbbgtask.notebook.bar import ProgressBar
from nbbgtask.notebook.kernel_compat import ShellPump

__all__ = ["full_focus"]

#: seconds between looks at the task and at incoming clicks while blocked
POLL = 0.02


def _holding_widget(holding: Any) -> Any:
    import ipywidgets as widgets

    if holding is None:
        return widgets.HTML("<b>Please wait…</b>")
    if isinstance(holding, widgets.DOMWidget):
        return holding
    if isinstance(holding, str):
        return widgets.HTML(holding)  # text is valid HTML; HTML is shown as HTML
    if hasattr(holding, "_repr_html_"):
        return widgets.HTML(holding._repr_html_())
    raise TypeError(f"holding must be text, HTML or a widget, got {type(holding).__name__}")


def full_focus(
    status: TaskStatus,
    acceptable_wait: float = 0.5,
    holding: Any = None,
    on_complete: Callable[[TaskStatus], Any] | None = None,
) -> Any:
    """Block this cell until the task ends, then return its result so the code below runs on.

    If the task ends within ``acceptable_wait`` seconds nothing is shown.  Otherwise ``holding``
    (text, HTML or a widget) is shown with a live bar and a Cancel button that works while the
    cell is blocked; when the task completes, ``on_complete(status)`` is called and the holding
    content is replaced by the finished bar.  A failed task raises `TaskFailed`, a cancelled one
    `TaskCancelled`.  Interrupting the kernel stops the waiting, not the task.
    """
    if not isinstance(status, TaskStatus):
        raise TypeError(f"full_focus needs a TaskStatus, got {type(status).__name__}")
    if isinstance(acceptable_wait, bool) or not isinstance(acceptable_wait, (int, float)) or not acceptable_wait >= 0:
        raise ValueError(f"acceptable_wait must be a number of seconds, 0 or more, got {acceptable_wait!r}")
    if on_complete is not None and not callable(on_complete):
        raise TypeError(f"on_complete must be callable, got {type(on_complete).__name__}")
    holding_view = _holding_widget(holding) if holding is not None else None

    if not status.wait(acceptable_wait):
        _block_with_view(status, holding_view if holding_view is not None else _holding_widget(None))
    if status.state == "complete" and on_complete is not None:
        on_complete(status)
    return status.result(timeout=0)  # it has ended: its result, or its error raised


def _block_with_view(status: TaskStatus, holding_view: Any) -> None:
    import ipywidgets as widgets
    from IPython.display import display


    bar = ProgressBar(status)
    cancel = widgets.Button(description="Cancel", icon="stop", button_style="danger")
    note = widgets.HTML()
    view = widgets.VBox([holding_view, bar, widgets.HBox([cancel, note])])
    cancelling = threading.Event()

    def on_cancel(_: Any) -> None:
        if cancelling.is_set():
            return
        cancelling.set()
        cancel.disabled = True
        note.value = "cancelling…"
        # Off the main thread: the grace period must not freeze the kernel.
        threading.Thread(target=status.cancel, name="nbbgtask-cancel", daemon=True).start()

    cancel.on_click(on_cancel)
    display(view)
    pump = ShellPump()
    if not pump.works:
        note.value = "Cancel is not available while this kernel is blocked: interrupt it, then call status.cancel()"
    interrupted = False
    try:
        with pump:
            while not status.done():
                pump.pump()
                time.sleep(POLL)
    except KeyboardInterrupt:
        interrupted = True
        note.value = "stopped waiting; the task goes on"
        cancel.disabled = True
        raise
    finally:
        if not interrupted:
            bar._nbbg_refresh_now(status)
            # The finished bar takes the holding content's place in the same view: replacing the
            # output instead (display handle update) left JupyterLab showing nothing at all.
            view.children = (bar,)
            for w in (cancel, note):
                w.close()
