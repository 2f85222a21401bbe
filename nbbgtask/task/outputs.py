"""What a task displays, kept with it: the task's side of rich outputs (``display()``, figures, a
cell's last value), written to the file whose format `nbbgtask.store.outputs` defines.

In the task, `prepare` (before the job is unpickled, so that a function that refers to IPython's
``display`` gets this module's) routes ``display()`` here whether or not the process has an
IPython shell (a forked kernel has one; spawn, the fork server and Dask have none), and gives
matplotlib a backend whose ``plt.show()`` displays the figures as PNG; `install` names where the
outputs go.  A display object whose formatting fails is kept as its text with a note: a display
never breaks the task.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import os
import stat
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from typing import Any

from nbbgtask.core.forks import renew_in_child
from nbbgtask.store.outputs import MAX_FILE, MAX_RECORD, encode

__all__ = [
    "MPL_BACKEND",
    "display",
    "display_value",
    "install",
    "prepare",
    "publish",
    "show_figures",
]

#: a text kept in place of a display is cut to this many characters
MAX_TEXT = 10_000
#: the matplotlib backend of a task: plt.show() displays the open figures
MPL_BACKEND = "module://nbbgtask.task.mpl_backend"

# -- the task's side -----------------------------------------------------------------------------

_lock = threading.Lock()
#: where this process's outputs go (one line of bytes at a time); None: not a task (yet)
_writer: Callable[[bytes], None] | None = None
#: the log's size now (the place of an output among printed lines), or None where it is unknown
_offset: Callable[[], int | None] | None = None
_written = 0
_full = False
_prepared = False
_formatter: Any = None


def _cut(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + f"\n… ({len(text) - MAX_TEXT:,} more characters)"


def _text_record(record: dict[str, Any], text: str, note: str) -> dict[str, Any]:
    return {**record, "data": {"text/plain": f"{_cut(text)}\n[nbbgtask: {note}]"}, "metadata": {}}


def publish(
    data: dict[str, Any],
    metadata: dict[str, Any] | None = None,
    *,
    kind: str = "display",
    display_id: str | None = None,
    update: bool = False,
) -> bool:
    """Keep one output of this task (a mime bundle); ``False`` if this process is not a task."""
    writer = _writer
    if writer is None:
        return False
    offset = None
    if _offset is not None:
        with contextlib.suppress(Exception):
            offset = _offset()
    else:  # the log is read elsewhere (a pipe, on Dask): what came before goes first
        _flush()
    record: dict[str, Any] = {
        "kind": kind, "data": data, "metadata": metadata or {}, "offset": offset,
        "display_id": display_id, "update": bool(update), "time": time.time(),
    }
    try:
        line = encode(record)
    except (TypeError, ValueError) as exc:  # not JSON: its text, with a note
        text = data.get("text/plain") if isinstance(data, dict) else None
        line = encode(_text_record(record, str(text) if text is not None else repr(data), f"its data is not JSON ({exc})"))
    if len(line) > MAX_RECORD:
        text = data.get("text/plain") if isinstance(data, dict) else ""
        note = f"this output ({len(line) / 1e6:.1f} MB) is bigger than the {MAX_RECORD / 1e6:.0f} MB kept for one; its text is kept"
        line = encode(_text_record(record, str(text or ""), note))
    global _written, _full
    with _lock:
        if _full:
            return True
        if _written + len(line) > MAX_FILE:
            _full = True
            note = f"later outputs were left out: this task's outputs reached {MAX_FILE / 1e6:.0f} MB"
            line = encode(_text_record({**record, "kind": "display", "display_id": None}, "", note))
        try:
            writer(line)
        except Exception as exc:  # a full disk must not break the task
            print(f"nbbgtask: could not keep an output of this task: {exc}", file=sys.stderr)
            return True
        _written += len(line)
    return True


def clear_output(wait: bool = False) -> None:
    """``IPython.display.clear_output`` in a task: what was shown under its bar so far goes."""
    if not publish({}, kind="clear"):
        print("\033[2K\r", end="")


class _Publisher:
    """The shell's ``display_pub`` in a forked kernel: display() keeps its bundle here instead of
    sending it on the kernel's sockets, which belong to the kernel."""

    is_publishing = False

    def publish(self, data: Any, metadata: Any = None, source: Any = None, *, transient: Any = None, update: bool = False, **kwargs: Any) -> None:
        display_id = (transient or {}).get("display_id")
        publish(dict(data or {}), dict(metadata or {}), display_id=display_id, update=update)

    def clear_output(self, wait: bool = False) -> None:
        clear_output(wait)


def _shell() -> Any:
    """The IPython shell of this process (a forked kernel's), or None; IPython is not imported for it."""
    if "IPython.core.interactiveshell" not in sys.modules:
        return None
    from IPython.core.interactiveshell import InteractiveShell

    return InteractiveShell.instance() if InteractiveShell.initialized() else None


def _format(obj: Any, include: Any = None, exclude: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``obj``'s mime bundle, as IPython makes it; its text with a note if any part of it fails."""
    if _is_figure(obj):
        try:
            return _figure_bundle(obj)
        except Exception as exc:
            return _as_text(obj, f"the figure could not be drawn ({_one_line(exc)})")
    formatter = _display_formatter()
    try:
        data, metadata = formatter.format(obj, include=include, exclude=exclude)
    except Exception as exc:
        return _as_text(obj, f"it could not be displayed ({_one_line(exc)})")
    if not data and hasattr(type(obj), "_ipython_display_"):
        return {}, {}  # it displayed itself
    failed = _failed_formats(formatter, obj, data)
    if failed or "text/plain" not in data:
        return _as_text(obj, "it could not be displayed (" + ("; ".join(failed) or "no text") + ")")
    return dict(data), dict(metadata or {})


def _failed_formats(formatter: Any, obj: Any, data: dict[str, Any]) -> list[str]:
    """The formats ``obj`` offers that raised (IPython's formatters print the traceback and go on);
    called again only for the formats that came back empty, so a display costs no more."""
    failed = []
    for mime, fmt in getattr(formatter, "formatters", {}).items():
        method = getattr(fmt, "print_method", None)
        if mime in data or not method or method == "_repr_pretty_" or not fmt.enabled:
            continue
        func = getattr(obj, method, None) if isinstance(method, str) and hasattr(type(obj), method) else None
        if not callable(func):
            continue
        try:
            func()
        except NotImplementedError:
            pass
        except Exception as exc:
            failed.append(f"{method}: {_one_line(exc)}")
    bundle = getattr(type(obj), "_repr_mimebundle_", None)
    if bundle is not None and not data:
        try:
            obj._repr_mimebundle_()
        except Exception as exc:
            failed.append(f"_repr_mimebundle_: {_one_line(exc)}")
    return failed


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _as_text(obj: Any, note: str) -> tuple[dict[str, Any], dict[str, Any]]:
    for make in (repr, str, object.__repr__):
        try:
            text = make(obj)
            break
        except Exception:
            continue
    return {"text/plain": f"{_cut(text)}\n[nbbgtask: {note}; shown as text]"}, {}


def _display_formatter() -> Any:
    global _formatter
    shell = _shell()
    if shell is not None:
        return shell.display_formatter
    if _formatter is None:
        from IPython.core.formatters import DisplayFormatter

        _formatter = DisplayFormatter()
    return _formatter


def display(
    *objs: Any,
    include: Any = None,
    exclude: Any = None,
    metadata: dict[str, Any] | None = None,
    transient: dict[str, Any] | None = None,
    display_id: Any = None,
    raw: bool = False,
    clear: bool = False,
    **kwargs: Any,
) -> Any:
    """``IPython.display.display`` in a task: each object's mime bundle is kept with the task."""
    if _writer is None:  # not in a task: print, as IPython's does without a shell
        print(*objs)
        return None
    if display_id is True:
        display_id = uuid.uuid4().hex
    if transient and transient.get("display_id"):
        display_id = transient["display_id"]
    update = bool(kwargs.get("update"))
    if clear:
        clear_output(wait=True)
    if not objs and display_id:
        objs, raw = ({},), True
    for obj in objs:
        data: dict[str, Any]
        md: dict[str, Any]
        if raw:
            data, md = (dict(obj) if isinstance(obj, dict) else {"text/plain": repr(obj)}), {}
        else:
            data, md = _format(obj, include, exclude)
            if not data:
                continue
        if metadata:
            md = {**md, **metadata}
        publish(data, md, display_id=display_id, update=update)
    if display_id:
        from IPython.core.display_functions import DisplayHandle

        return DisplayHandle(display_id)
    return None


def display_value(value: Any) -> None:
    """The value of a cell's last expression, as a cell's result (nothing for ``None``)."""
    if value is None:
        return
    data, md = _format(value)
    if data:
        publish(data, md, kind="result")


def _publish_display_data(data: Any, metadata: Any = None, *, transient: Any = None, update: bool = False, **kwargs: Any) -> None:
    publish(dict(data or {}), dict(metadata or {}), display_id=(transient or {}).get("display_id"), update=update)


# -- matplotlib -----------------------------------------------------------------------------------


def _is_figure(obj: Any) -> bool:
    return type(obj).__module__ == "matplotlib.figure" and hasattr(obj, "savefig")


def _figure_bundle(fig: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return {"image/png": buffer.getvalue(), "text/plain": repr(fig)}, {}


def show_figures() -> None:
    """Display every open pyplot figure (as PNG) and close it: ``plt.show()``, and the task's end."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return
    for number in list(pyplot.get_fignums()):
        fig = pyplot.figure(number)
        data, md = _format(fig)
        publish(data, md)
        pyplot.close(fig)


# -- putting it in place -------------------------------------------------------------------------


def _patch_display_functions(module: Any) -> None:
    """IPython's display() is this module's from now on, also where it was bound before (a name
    imported in a notebook the task was forked from, or in a module of the task's): the function
    object itself is made to call this module's."""
    module.__nbbgtask_display__ = display
    original = module.display
    if original is not display:
        original.__code__ = _trampoline.__code__
        original.__defaults__ = original.__kwdefaults__ = None
    module.display = display
    module.clear_output = clear_output
    module.publish_display_data = _publish_display_data


def _trampoline(*objs: Any, **kwargs: Any) -> Any:
    """The code IPython's display function is given in a task: it looks this name up in IPython's
    module, where `_patch_display_functions` put this module's display."""
    return __nbbgtask_display__(*objs, **kwargs)  # type: ignore[name-defined]  # noqa: F821


def _patch_matplotlib(module: Any) -> None:
    try:
        module.rcParams["backend"] = MPL_BACKEND
    except Exception as exc:
        print(f"nbbgtask: figures of this task will not be shown: {exc}", file=sys.stderr)


#: modules patched as soon as they are imported in a task
_PATCHES: dict[str, Callable[[Any], None]] = {
    "IPython.core.display_functions": _patch_display_functions,
    "matplotlib": _patch_matplotlib,
}


class _ImportHook(importlib.abc.MetaPathFinder):
    """Patches a module of `_PATCHES` right after it is first imported: IPython and matplotlib
    cost a task nothing until it uses them."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        patch = _PATCHES.get(name)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def patched(module: Any) -> None:
            exec_module(module)
            patch(module)

        loader.exec_module = patched  # type: ignore[method-assign]
        return spec


def prepare() -> None:
    """Route display() and figures of this process (a task's, before its job is unpickled) here."""
    global _prepared
    if _prepared:
        return
    _prepared = True
    import builtins

    for name, patch in _PATCHES.items():
        module = sys.modules.get(name)
        if module is not None:
            patch(module)
    for name in ("IPython.display", "IPython.core.display"):  # copies made by `import *`
        copy: Any = sys.modules.get(name)
        # vars(), not hasattr(): IPython 8's IPython.core.display hands out a deprecated `display`
        # through a module __getattr__ that warns (and a task inherits its kernel's filters)
        if copy is not None and "display" in vars(copy):
            copy.display = display
            copy.clear_output = clear_output
    if "matplotlib.pyplot" in sys.modules:  # a forked kernel's: figures of its own go with the switch
        try:
            sys.modules["matplotlib.pyplot"].switch_backend(MPL_BACKEND)
        except Exception as exc:
            print(f"nbbgtask: figures of this task will not be shown: {exc}", file=sys.stderr)
    sys.meta_path.insert(0, _ImportHook())
    shell = _shell()
    if shell is not None:
        # A forked kernel: its shell's display() keeps bundles here, and a failing formatter's
        # traceback goes to the log rather than to the kernel's sockets.
        shell.display_pub = _Publisher()
        shell.showtraceback = _print_traceback
    builtins.display = display  # type: ignore[attr-defined]  # a notebook's bare display()


def _print_traceback(exc_tuple: Any = None, *args: Any, **kwargs: Any) -> None:
    kind, value, tb = exc_tuple or sys.exc_info()
    traceback.print_exception(kind, value, tb, file=sys.stderr)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _log_size() -> int | None:
    _flush()
    st = os.fstat(1)
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def install(writer: Callable[[bytes], None]) -> None:
    """This process is a task from now on: its outputs go to ``writer``, one line at a time."""
    global _writer, _offset, _written, _full
    prepare()
    _writer, _written, _full = writer, 0, False
    try:
        regular = stat.S_ISREG(os.fstat(1).st_mode)
    except OSError:
        regular = False
    _offset = _log_size if regular else None


def finish() -> None:
    """The task's end: figures left open are shown, as a cell's are."""
    try:
        show_figures()
    except Exception as exc:  # never breaks the task's end
        print(f"nbbgtask: the task's open figures could not be shown: {exc}", file=sys.stderr)


def _reset_after_fork() -> None:
    """A task forked from a task (or a kernel) starts with no writer: it installs its own."""
    global _lock, _writer, _offset
    _lock = threading.Lock()
    _writer = _offset = None


renew_in_child(_reset_after_fork)
