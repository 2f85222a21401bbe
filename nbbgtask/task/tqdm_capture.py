"""tqdm inside a task: its bars report to the task's status, and its output stays readable in the log.

Nothing here runs per item.  In the task's process (`install`, called by the runner as the task
starts) tqdm's classes are patched once, as soon as tqdm is imported (now, if a forked task
inherited it, else through an import hook, so a task that never uses tqdm never imports it):

- every bar made in the task is registered; the reporter's writer thread reads the outermost live
  bar (lowest position, then oldest) at each write (`apply`): its ``n/total`` sets ``percent``,
  its description, ``n/total``, elapsed, remaining and rate make the ``message``.  A bar is read as
  it last drew itself (tqdm updates ``n`` when it redraws, every ``mininterval``, 0.1 s by default),
  and its final state is kept when it closes;
- the rule with the task's own reports (`bg.progress`, `status.update`, `bg.track`): field by
  field, the most recent change wins; a change the task made and a bar's change seen by the same
  write: the task's wins;
- a bar drawing to the task's log (stdout or stderr, the default) writes whole lines instead of
  ``\\r`` redraws: its first state, then at most one line every `LOG_EVERY` seconds, and its final
  state when it closes (cursor moves and clears, meaningless in a file, are dropped);
- ``tqdm.notebook`` (and so ``tqdm.auto`` in a task forked from a kernel) draws as ``tqdm.std``
  does in a terminal: the task's kernel connection is silenced, so a widget would show nowhere.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import itertools
import sys
import time
import weakref
from types import ModuleType
from typing import Any

__all__ = ["LOG_EVERY", "apply", "install"]

#: seconds between two log lines of one bar (its first and final states are always written)
LOG_EVERY = 10.0

#: the methods tqdm.notebook's bar overrides; removed in a task, they fall back to tqdm.std's
_NOTEBOOK_OVERRIDES = ("__init__", "__iter__", "update", "close", "clear", "reset", "display", "status_printer", "colour")

_seq = itertools.count()
#: the task's live bars, by the order they were made (a dict: the writer thread copies it in one step)
_live: dict[int, weakref.ref[Any]] = {}
#: what a bar reads as: what identifies its state (which bar, its n, total, description and postfix:
#: not its elapsed time, which moves on its own), its percent (``None`` without a total), its message
_Reading = tuple[tuple[Any, ...], float | None, str]
#: the last outermost bar to close, as it closed
_final: _Reading | None = None
#: the state of the bar last applied, and the reporter's fields as that write left them
_seen: tuple[Any, ...] | None = None
_basis: tuple[float, str] | None = None


def install() -> None:
    """In a task's process, as it starts: patch tqdm now if it is imported, else when it is."""
    global _final, _seen, _basis
    # A task forked from a task inherits its parent's bars: they are not this task's.
    _live.clear()
    _final = _seen = _basis = None
    std = sys.modules.get("tqdm.std")
    if std is not None:
        _patch_std(std)
        notebook = sys.modules.get("tqdm.notebook")
        if notebook is not None:
            _patch_notebook(notebook)
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def apply(reporter: Any) -> None:
    """At each write of the reporter (in its writer thread), and once as the task ends: bring the
    outermost bar's progress into ``reporter.percent``/``message``, unless the task's own report
    is newer (see the module's docstring)."""
    global _seen, _basis
    now = (reporter.percent, reporter.message)
    reading = _outermost()
    if reading is not None and reading[0] != _seen:
        _seen, percent, message = reading
        basis = _basis or (0.0, "")
        if percent is not None and now[0] == basis[0]:
            reporter.update(percent=percent)
        if now[1] == basis[1]:
            reporter.update(message=message)
    _basis = (reporter.percent, reporter.message)


# -- reading a bar ---------------------------------------------------------------------------------


def _outermost() -> _Reading | None:
    if not _live:
        return _final
    bars = [bar for ref in list(_live.values()) if (bar := ref()) is not None and not bar.disable]
    if not bars:
        return _final
    try:
        return _describe(min(bars, key=_rank))
    except Exception:  # a bar of a subclass we do not know, half made: read it next time
        return None


def _rank(bar: Any) -> tuple[int, int]:
    return abs(getattr(bar, "pos", 0) or 0), bar._nbbgtask_seq


def _describe(bar: Any) -> _Reading:
    """The bar's state, its percent (``None`` without a total) and a one-line message, as tqdm formats them."""
    d = dict(bar.format_dict)
    n, total = d["n"], d["total"]
    desc = d.get("prefix") or ""
    state = (bar._nbbgtask_seq, n, total, desc, d.get("postfix"))
    desc = desc[:-2] if desc.endswith(": ") else desc
    d.update(prefix="", ncols=None, bar_format=(
        "{n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]" if total
        else "{n_fmt} [{elapsed}, {rate_fmt}{postfix}]"
    ))
    text = bar.format_meter(**d)
    message = f"{desc}: {text}" if desc else text
    return state, (100.0 * n / total if total else None), message


# -- patching tqdm ---------------------------------------------------------------------------------


def _log_stream(file: Any) -> Any:
    """The stream a bar given ``file`` draws to, if that is the task's log (stdout or stderr)."""
    stream = sys.stderr if file is None else file
    if any(stream is s for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)):
        return stream
    return None


class _LogBar:
    """The file a bar drawing to the task's log gets: tqdm's own writes to it (``\\r``, cursor moves,
    clears) are dropped; its redraws come through `line` (tqdm's status printer), as whole lines."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._bar: weakref.ref[Any] | None = None
        self._last = -LOG_EVERY
        self.encoding = getattr(stream, "encoding", None) or "utf-8"

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def _nbbgtask_line(self, text: str) -> None:
        text = text.rstrip()
        if not text:  # a clear: nothing to take back in a file
            return
        bar = self._bar() if self._bar is not None else None
        now = time.monotonic()
        closing = bar is None or bar.disable  # tqdm's close() sets disable, then draws a last time
        if closing or now - self._last >= LOG_EVERY:
            self._last = now
            self._stream.write(text + "\n")
            self._stream.flush()


def _patch_std(std: ModuleType) -> None:
    cls = std.tqdm
    if cls.__dict__.get("_nbbgtask_patched"):
        return
    original_init, original_close, original_printer = cls.__init__, cls.close, cls.status_printer

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        # tqdm's signature: (iterable, desc, total, leave, file, ...), file also by keyword
        positional = len(args) > 4
        stream = _log_stream(args[4] if positional else kwargs.get("file"))
        log = None
        if stream is not None:
            log = _LogBar(stream)
            log._bar = weakref.ref(self)
            if positional:
                args = (*args[:4], log, *args[5:])
            else:
                kwargs["file"] = log
        self._nbbgtask_seq = seq = next(_seq)
        original_init(self, *args, **kwargs)
        if not self.disable:
            _live[seq] = weakref.ref(self)

    def close(self: Any) -> None:
        global _final
        seq = self.__dict__.get("_nbbgtask_seq")
        if seq is not None and _live.pop(seq, None) is not None and not self.disable:
            others = [bar for ref in list(_live.values()) if (bar := ref()) is not None]
            if not others or _rank(self) < min(_rank(bar) for bar in others):
                try:
                    _final = _describe(self)
                except Exception:
                    pass
        original_close(self)

    def patched_status_printer(file: Any) -> Any:
        line = getattr(file, "_nbbgtask_line", None)  # through tqdm's wrapper of the file
        return line if line is not None else original_printer(file)

    cls.__init__ = __init__
    cls.close = close
    cls.status_printer = staticmethod(patched_status_printer)
    cls._nbbgtask_patched = True


def _patch_notebook(notebook: ModuleType) -> None:
    """tqdm.notebook's bar, in a task, draws text as tqdm.std's does."""
    cls = notebook.tqdm_notebook
    if cls.__dict__.get("_nbbgtask_patched"):
        return
    for name in _NOTEBOOK_OVERRIDES:
        if name in cls.__dict__:
            delattr(cls, name)

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.pop("display", None)  # tqdm.notebook's own argument: whether to show the widget at once
        super(cls, self).__init__(*args, **kwargs)

    cls.__init__ = __init__
    cls._nbbgtask_patched = True


_PATCHES = {"tqdm.std": _patch_std, "tqdm.notebook": _patch_notebook}


class _Loader(importlib.abc.Loader):
    def __init__(self, loader: Any, name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _PATCHES[self._name](module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, is_package, ...
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Patches tqdm's modules as they are imported in the task; every other import passes by."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in _PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, name)
        return spec
