"""Where a task started in a fresh interpreter (spawn, the fork server) imports from, and its folder.

Python puts the folder it starts in (``-c``, ``-m``) first on ``sys.path``, so an interpreter
started in a folder others can write (``/tmp``, a shared project folder) would import a module
planted there (``json.py``) before the standard library's, as the kernel's user.  So:

- the interpreter starts in ``/`` with nothing of the caller's folder on its path (`interpreter`:
  ``-P`` from Python 3.11; before that, the same fix-up by hand as the first statement of ``-c``,
  before any import that searches the path), and imports nbbgtask and what it needs from there;
- then `restore` puts the caller's own ``sys.path`` in place (the job's pickle names the caller's
  modules by reference) and enters the caller's folder, so the task's code sees the paths and the
  relative files it saw in the kernel.  Entries that name the caller's folder (``''``, relative
  ones) are made absolute, and a folder someone else may write (group- or world-writable, or
  another user's) goes last: a module of its own there is still found, but it can never shadow
  one of the standard library or an installed package.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
import stat
import sys
from typing import Any

__all__ = ["interpreter", "restore", "sender", "preload", "preloads"]

#: the -c code's first statements: leave the caller's folder before anything searches the path
_FIXUP = "import os, sys; os.chdir('/'); sys.path[:] = [p for p in sys.path if p not in ('', '.')]"


def interpreter(entry: str) -> list[str]:
    """The command line of a fresh interpreter that runs ``entry`` (Python statements) with a
    ``sys.path`` free of the folder it was started in; start it with ``cwd="/"`` where one can."""
    # nbbgtask itself may be importable only through the caller's path (a checkout on PYTHONPATH
    # is kept by the environment; one reached through the kernel's folder is not): add its folder
    # last, where it cannot shadow anything.
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = f"{_FIXUP}; sys.path.append({here!r}) if {here!r} not in sys.path else None; {entry}"
    flags = ["-P"] if sys.version_info >= (3, 11) else []
    return [sys.executable, *flags, "-c", code]


def sender() -> bytes:
    """What `restore` needs from the caller: its ``sys.path`` and its folder, pickled."""
    try:
        cwd: str | None = os.getcwd()
    except OSError:  # the caller's folder is gone
        cwd = None
    return pickle.dumps({"path": list(sys.path), "cwd": cwd})


def _others_may_write(folder: str, me: int) -> bool:
    try:
        st = os.stat(folder)
    except OSError:
        return False  # not there: nothing can be imported from it
    return bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)) or st.st_uid not in (me, 0)


def restore(sent: bytes) -> None:
    """In the task: the caller's ``sys.path`` (folders others may write last), and its folder."""
    found: Any = pickle.loads(sent)
    if isinstance(found, list):  # an older sender: the path alone
        found = {"path": found, "cwd": None}
    cwd = found["cwd"]
    base = cwd or os.getcwd()
    me = os.geteuid()
    own: list[str] = []
    others: list[str] = []
    for entry in found["path"]:
        if not isinstance(entry, str):
            continue
        entry = os.path.normpath(os.path.join(base, entry)) if not os.path.isabs(entry) else entry
        (others if _others_may_write(entry, me) else own).append(entry)
    sys.path[:] = list(dict.fromkeys(own + others))
    if cwd is not None:
        try:
            os.chdir(cwd)
        except OSError:
            pass  # the folder is gone: the task runs in "/", as a fork would not notice


_MODULE = re.compile(r"nbbgtask(\.[a-z_][a-z0-9_]*)+\Z")


def preloads(make_status: Any) -> list[str]:
    """What a process that starts tasks for this caller (the fork server, a Dask worker) should
    import once, ahead of them: the module of the job's status factory (the API's `TaskStatus`),
    which each task's unpickling imports otherwise, after its fork, every time."""
    return [getattr(make_status, "__module__", "")]


def preload(names: Any) -> None:
    """Import each of ``names`` that is one of nbbgtask's modules (a caller's data: anything
    else is ignored), so that every process forked from this one has it."""
    for name in names if isinstance(names, (list, tuple)) else ():
        if isinstance(name, str) and _MODULE.match(name):
            importlib.import_module(name)
