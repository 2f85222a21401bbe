"""Keeps tracebacks readable in another interpreter (spawn, Dask).

cloudpickle sends notebook-defined functions by value and renames their file to
``<dynamic-code>``, and the other interpreter has no copy of the notebook's cells: a failure
would show neither where it happened nor the line.  `collect` notes, in the caller, each
function's file and the lines of that file; `restore` puts both back before the task runs.
"""

from __future__ import annotations

import inspect
import linecache
import types
from collections.abc import Iterator
from typing import Any

__all__ = ["collect", "restore"]

_Key = tuple[str, int]


def _functions(target: Any) -> Iterator[types.FunctionType]:
    """The functions a task will run: the callable itself, or a task class's methods."""
    seen: set[int] = set()
    pending = [target]
    while pending:
        obj = pending.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, types.MethodType):
            pending.append(obj.__func__)
        elif isinstance(obj, types.FunctionType):
            yield obj
        elif isinstance(obj, type):
            for klass in obj.__mro__:
                if klass.__module__ != "builtins" and not klass.__module__.startswith("nbbgtask"):
                    pending.extend(v for v in vars(klass).values() if isinstance(v, (types.FunctionType, type)))
        elif not isinstance(obj, (types.ModuleType, types.BuiltinFunctionType)) and hasattr(obj, "__class__"):
            if inspect.isclass(type(obj)) and type(obj).__module__ != "builtins":
                pending.append(type(obj))


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def collect(target: Any) -> dict[str, Any]:
    """In the caller: the files of ``target``'s code and their lines."""
    files: dict[_Key, str] = {}
    lines: dict[str, list[str]] = {}
    for fn in _functions(target):
        for code in _codes(fn.__code__):
            files[(code.co_name, code.co_firstlineno)] = code.co_filename
            if code.co_filename not in lines:
                lines[code.co_filename] = linecache.getlines(code.co_filename)
    return {"files": files, "lines": {f: v for f, v in lines.items() if v}}


def _renamed(code: types.CodeType, files: dict[_Key, str]) -> types.CodeType:
    consts = tuple(_renamed(c, files) if isinstance(c, types.CodeType) else c for c in code.co_consts)
    name = files.get((code.co_name, code.co_firstlineno), code.co_filename)
    return code.replace(co_filename=name, co_consts=consts)


def restore(target: Any, sources: dict[str, Any] | None) -> None:
    """In the task's interpreter: give ``target``'s code back its files, and the files their lines."""
    if not sources:
        return
    for filename, lines in sources["lines"].items():
        # mtime None: linecache.checkcache keeps entries it cannot check against a file.
        linecache.cache[filename] = (sum(map(len, lines)), None, lines, filename)
    for fn in _functions(target):
        if fn.__code__.co_filename == "<dynamic-code>":
            fn.__code__ = _renamed(fn.__code__, sources["files"])
