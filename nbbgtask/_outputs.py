"""What a task displays, kept with it: the task's side (``display()``, figures, a cell's last value)
and the file that keeps them, ``outputs/<id>.jsonl``, read back under the task's bar and by the CLI.

Printed output is not here: it goes to the task's log at the descriptor level (so C extensions and
subprocesses are captured), and the bar tails the log.  This file holds the rich outputs, one JSON
object a line, each appended with one write (a line without its newline is not read yet)::

    {"kind": "display" | "result" | "clear", "data": {mime type: value}, "metadata": {...},
     "offset": the log's size when it was produced, or null, "display_id": str | null,
     "update": bool, "time": seconds since the epoch}

``offset`` places it among the printed lines.  The file is data: it is parsed as JSON, never
unpickled, and a line that is not such an object is skipped.  It is bounded: a bundle bigger than
`MAX_RECORD` is kept as its text, and past `MAX_FILE` bytes further outputs are left out with a note.

In the task, `prepare` (before the job is unpickled, so that a function that refers to IPython's
``display`` gets this module's) routes ``display()`` here whether or not the process has an
IPython shell (a forked kernel has one; spawn, the fork server and Dask have none), and gives
matplotlib a backend whose ``plt.show()`` displays the figures as PNG; `install` names where the
outputs go.  A display object whose formatting fails is kept as its text with a note: a display
never breaks the task.
"""

from __future__ import annotations

import base64
import codecs
import contextlib
import importlib.abc
import json
import os
import stat
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._files import log_path, outputs_path
from ._wire import write_all

__all__ = [
    "MAX_FILE",
    "MAX_RECORD",
    "MPL_BACKEND",
    "Tail",
    "append_line",
    "display",
    "display_value",
    "file_writer",
    "install",
    "prepare",
    "publish",
    "read_records",
    "show_figures",
    "text_parts",
]

#: a task's outputs file grows to at most this many bytes; later outputs are left out with a note
MAX_FILE = 16 * 1024 * 1024
#: one output bigger than this (as JSON) is kept as its text, with a note
MAX_RECORD = 2 * 1024 * 1024
#: a text kept in place of a display is cut to this many characters
MAX_TEXT = 10_000
#: the matplotlib backend of a task: plt.show() displays the open figures
MPL_BACKEND = "module://nbbgtask._mpl_backend"
#: the log's first line, nbbgtask's note of how the task was started: not the task's output
STARTED_NOTE = b"nbbgtask: started by "

KINDS = ("display", "result", "clear")

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


def _encode(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, default=_json_default, allow_nan=False, separators=(",", ":")) + "\n").encode()


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):  # images, as the kernel sends them
        return base64.b64encode(bytes(value)).decode("ascii")
    raise TypeError(f"a {type(value).__name__} is not JSON")


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
        line = _encode(record)
    except (TypeError, ValueError) as exc:  # not JSON: its text, with a note
        text = data.get("text/plain") if isinstance(data, dict) else None
        line = _encode(_text_record(record, str(text) if text is not None else repr(data), f"its data is not JSON ({exc})"))
    if len(line) > MAX_RECORD:
        text = data.get("text/plain") if isinstance(data, dict) else ""
        note = f"this output ({len(line) / 1e6:.1f} MB) is bigger than the {MAX_RECORD / 1e6:.0f} MB kept for one; its text is kept"
        line = _encode(_text_record(record, str(text or ""), note))
    global _written, _full
    with _lock:
        if _full:
            return True
        if _written + len(line) > MAX_FILE:
            _full = True
            note = f"later outputs were left out: this task's outputs reached {MAX_FILE / 1e6:.0f} MB"
            line = _encode(_text_record({**record, "kind": "display", "display_id": None}, "", note))
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
        if copy is not None and hasattr(copy, "display"):
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


def file_writer(home: Path | str, task_id: str) -> Callable[[bytes], None]:
    """Appends to the task's outputs file, created (0600) with its first output."""
    fd: list[int] = []

    def write(line: bytes) -> None:
        if not fd:
            fd.append(_open_for_append(outputs_path(home, task_id)))
        write_all(fd[0], line)

    return write


def _open_for_append(path: Path) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    try:
        return os.open(path, flags, 0o600)
    except FileNotFoundError:  # a home made by an older nbbgtask: no outputs folder yet
        path.parent.mkdir(mode=0o700, exist_ok=True)
        return os.open(path, flags, 0o600)


def append_line(home: Path | str, task_id: str, line: str) -> None:
    """Keep an output that came from elsewhere (a task on Dask): checked, placed after the printed
    output received so far, and held to `MAX_FILE`."""
    try:
        record = json.loads(line)
    except ValueError:
        return
    if not _valid(record):
        return
    path = outputs_path(home, task_id)
    try:
        size = os.stat(path, follow_symlinks=False).st_size
    except FileNotFoundError:
        size = 0
    if size + len(line) > MAX_FILE:
        return
    try:
        record["offset"] = os.stat(log_path(home, task_id)).st_size
    except OSError:
        record["offset"] = None
    fd = _open_for_append(path)
    try:
        write_all(fd, _encode(record))
    finally:
        os.close(fd)


# -- reading them back ---------------------------------------------------------------------------


def _valid(record: Any) -> bool:
    return (
        isinstance(record, dict)
        and record.get("kind") in KINDS
        and isinstance(record.get("data", {}), dict)
        and all(isinstance(k, str) for k in record.get("data", {}))
        and isinstance(record.get("metadata", {}), dict)
        and (record.get("offset") is None or (isinstance(record["offset"], int) and not isinstance(record["offset"], bool)))
        and (record.get("display_id") is None or isinstance(record["display_id"], str))
    )


def _parse_lines(raw: bytes) -> list[dict[str, Any]]:
    found = []
    for line in raw.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if _valid(record):
            found.append(record)
    return found


def read_records(home: Path | str, task_id: str) -> list[dict[str, Any]]:
    """Every output kept for a task, in order (none if it has no file)."""
    try:
        with open(outputs_path(home, task_id), "rb") as f:
            raw = f.read(MAX_FILE + MAX_RECORD)
    except FileNotFoundError:
        return []
    end = raw.rfind(b"\n") + 1  # a last line still being written is not read
    return _parse_lines(raw[:end])


def text_parts(records: list[dict[str, Any]]) -> list[str]:
    """The text of each output still shown (after the last clear, updates applied), for a terminal."""
    shown: list[dict[str, Any]] = []
    for record in records:
        if record["kind"] == "clear":
            shown = []
        elif record.get("update") and record.get("display_id"):
            shown = [record if r.get("display_id") == record["display_id"] else r for r in shown]
        else:
            shown.append(record)
    parts = []
    for record in shown:
        text = record.get("data", {}).get("text/plain")
        if isinstance(text, list):  # nbformat allows a list of lines
            text = "".join(str(t) for t in text)
        if isinstance(text, str) and text:
            parts.append(text)
    return parts


#: the printed output shown under a bar: at most this many lines ...
TAIL_LINES = 100
#: ... and this many bytes (the whole log is one call away: status.log())
TAIL_BYTES = 16 * 1024
#: displays kept under a bar; older ones go, with a note
TAIL_DISPLAYS = 50
#: more new log than this in one read is skipped unread (only the tail is shown anyway)
SKIP_AFTER = 4 * TAIL_BYTES


class Tail:
    """What the bar of one task shows under it: the tail of its log and its outputs, in order.

    `read` takes what was appended to the two files since the last call (a stat each, then a read
    from the last offset) and says whether anything changed; `outputs` is the list of nbformat
    outputs to show.  Bounded: `TAIL_LINES` / `TAIL_BYTES` of printed output, `TAIL_DISPLAYS`
    displays, with a note of what was left out and where to find it all.
    """

    def __init__(self, home: Path | str, task_id: str, short_id: str) -> None:
        self.log = str(log_path(home, task_id))
        self.path = str(outputs_path(home, task_id))
        self.short_id = short_id
        self._log_pos = 0
        self._out_pos = 0
        self._log_stat: tuple[int, int] | None = None
        self._out_stat: tuple[int, int] | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        #: ["text", str] and ["display", nbformat output, display_id]
        self._items: list[list[Any]] = []
        self._dropped_lines = 0
        self._dropped_bytes = 0
        self._dropped_displays = 0
        self._first = True

    @staticmethod
    def _stat(path: str) -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns

    def read(self) -> bool:
        """Take in what was appended since the last call; ``True`` if the outputs changed."""
        # The outputs first, then the log: every output read then has its offset within the log read.
        out_stat = self._stat(self.path)
        records: list[dict[str, Any]] = []
        if out_stat is not None and out_stat != self._out_stat:
            records = self._read_outputs(out_stat[0])
            self._out_stat = out_stat
        log_stat = self._stat(self.log)
        chunk = b""
        start = self._log_pos
        if log_stat is not None and log_stat != self._log_stat:
            chunk, start = self._read_log(log_stat[0])
            self._log_stat = log_stat
        if not chunk and not records:
            return False
        self._merge(start, chunk, records)
        self._bound()
        return True

    def _read_outputs(self, size: int) -> list[dict[str, Any]]:
        if size <= self._out_pos:
            return []
        try:
            with open(self.path, "rb") as f:
                f.seek(self._out_pos)
                raw = f.read(min(size - self._out_pos, MAX_FILE))
        except OSError:
            return []
        end = raw.rfind(b"\n") + 1
        self._out_pos += end
        return _parse_lines(raw[:end])

    def _read_log(self, size: int) -> tuple[bytes, int]:
        if size <= self._log_pos:
            return b"", self._log_pos
        start = self._log_pos
        if size - start > SKIP_AFTER:  # only the tail is shown: skip the rest unread
            skipped = size - TAIL_BYTES - start
            self._dropped_bytes += skipped
            start += skipped
            self._decoder.reset()
        try:
            with open(self.log, "rb") as f:
                f.seek(start)
                chunk = f.read(size - start)
        except OSError:
            return b"", self._log_pos
        self._log_pos = start + len(chunk)
        if self._first:
            self._first = False
            if start == 0 and chunk.startswith(STARTED_NOTE):  # nbbgtask's note, not the task's
                cut = chunk.find(b"\n") + 1 or len(chunk)
                chunk, start = chunk[cut:], cut
        return chunk, start

    def _add_text(self, raw: bytes) -> None:
        text = self._decoder.decode(raw)
        if not text:
            return
        if self._items and self._items[-1][0] == "text":
            self._items[-1][1] += text
        else:
            self._items.append(["text", text])

    def _merge(self, start: int, chunk: bytes, records: list[dict[str, Any]]) -> None:
        pos = start
        for record in records:
            offset = record.get("offset")
            if offset is not None and offset > pos:
                cut = min(offset, start + len(chunk)) - start
                self._add_text(chunk[pos - start : cut])
                pos = start + cut
            self._add_record(record)
        self._add_text(chunk[pos - start :])

    def _add_record(self, record: dict[str, Any]) -> None:
        kind = record["kind"]
        if kind == "clear":
            self._items = []
            self._dropped_lines = self._dropped_bytes = self._dropped_displays = 0
            return
        output: dict[str, Any] = {
            "output_type": "execute_result" if kind == "result" else "display_data",
            "data": record.get("data") or {},
            "metadata": record.get("metadata") or {},
        }
        if kind == "result":
            output["execution_count"] = None
        display_id = record.get("display_id")
        if record.get("update") and display_id:
            for item in self._items:
                if item[0] == "display" and item[2] == display_id:
                    item[1] = output
            return
        self._items.append(["display", output, display_id])

    def _bound(self) -> None:
        texts = [item for item in self._items if item[0] == "text"]
        lines = sum(item[1].count("\n") for item in texts)
        size = sum(len(item[1]) for item in texts)
        for item in texts:
            if lines <= TAIL_LINES and size <= TAIL_BYTES:
                break
            text = item[1]
            # drop whole lines from the front of this text until the tail fits
            cut = 0
            while cut < len(text) and (lines > TAIL_LINES or size > TAIL_BYTES):
                end = text.find("\n", cut)
                end = len(text) if end < 0 else end + 1
                lines -= text.count("\n", cut, end)
                size -= end - cut
                self._dropped_lines += text.count("\n", cut, end)
                cut = end
            item[1] = text[cut:]
        self._items = [item for item in self._items if item[0] != "text" or item[1]]
        displays = [item for item in self._items if item[0] == "display"]
        extra = len(displays) - TAIL_DISPLAYS
        if extra > 0:
            gone = {id(item) for item in displays[:extra]}
            self._items = [item for item in self._items if id(item) not in gone]
            self._dropped_displays += extra

    def outputs(self) -> list[dict[str, Any]]:
        """What to show, as nbformat outputs: a note of what was left out, then the tail."""
        shown: list[dict[str, Any]] = []
        left_out = []
        if self._dropped_lines:
            left_out.append(f"{self._dropped_lines:,} earlier lines")
        if self._dropped_bytes:
            left_out.append(f"{self._dropped_bytes / 1024:,.0f} KiB more of printed output")
        if self._dropped_displays:
            left_out.append(f"{self._dropped_displays} earlier displays")
        if left_out:
            note = (
                f"… {' and '.join(left_out)} not shown here; the whole log: status.log(), "
                f"or nbbgtask logs {self.short_id}\n"
            )
            shown.append({"output_type": "stream", "name": "stderr", "text": note})
        for item in self._items:
            if item[0] == "text":
                shown.append({"output_type": "stream", "name": "stdout", "text": item[1]})
            else:
                shown.append(item[1])
        return shown


def _reset_after_fork() -> None:
    """A task forked from a task (or a kernel) starts with no writer: it installs its own."""
    global _lock, _writer, _offset
    _lock = threading.Lock()
    _writer = _offset = None


os.register_at_fork(after_in_child=_reset_after_fork)
