"""Keeps tracebacks readable in another interpreter (spawn, Dask).

cloudpickle sends notebook-defined functions by value and renames their file to
``<dynamic-code>``, and the other interpreter has no copy of the notebook's cells: a failure
would show neither where it happened nor the line.  `collect` notes, in the caller, each
function's file and the lines of it that its code spans; `restore` puts both back before the task
runs.
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
    """The functions a task will run: the callable itself, or a task class's methods, and the
    functions of their module that they name."""
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
            # The functions and classes of its own module it calls by name (a notebook's helpers,
            # sent by value with it): their frames are in its tracebacks too.
            module = obj.__module__
            for code in _codes(obj.__code__):
                for name in code.co_names:
                    found = obj.__globals__.get(name)
                    if isinstance(found, (types.FunctionType, type)) and getattr(found, "__module__", None) == module:
                        pending.append(found)
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
    """In the caller: the files of ``target``'s code, and the lines of them that code spans.

    Only those lines: a task defined in a long script (or a module of a thousand lines) would
    otherwise carry the whole file with every start, through Dask's scheduler too."""
    files: dict[_Key, str] = {}
    spans: dict[str, set[int]] = {}
    for fn in _functions(target):
        for code in _codes(fn.__code__):
            files[(code.co_name, code.co_firstlineno)] = code.co_filename
            last = max((line for _, _, line in code.co_lines() if line is not None), default=code.co_firstlineno)
            spans.setdefault(code.co_filename, set()).update(range(code.co_firstlineno, last + 1))
    lines: dict[str, dict[int, str]] = {}
    for filename, numbers in spans.items():
        whole = linecache.getlines(filename)
        if whole:
            lines[filename] = {n: whole[n - 1] for n in sorted(numbers) if 0 < n <= len(whole)}
    return {"files": files, "lines": lines}


def _renamed(code: types.CodeType, files: dict[_Key, str]) -> types.CodeType:
    consts = tuple(_renamed(c, files) if isinstance(c, types.CodeType) else c for c in code.co_consts)
    name = files.get((code.co_name, code.co_firstlineno), code.co_filename)
    return code.replace(co_filename=name, co_consts=consts)


def restore(target: Any, sources: dict[str, Any] | None) -> None:
    """In the task's interpreter: give ``target``'s code back its files, and the files their lines."""
    if not sources:
        return
    for filename, known in sources["lines"].items():
        if not known:
            continue
        # The lines the code spans, in their places; the others blank.
        lines = ["\n"] * max(known)
        for number, text in known.items():
            lines[number - 1] = text
        # mtime None: linecache.checkcache keeps entries it cannot check against a file.
        linecache.cache[filename] = (sum(map(len, lines)), None, lines, filename)
    for fn in _functions(target):
        if fn.__code__.co_filename == "<dynamic-code>":
            fn.__code__ = _renamed(fn.__code__, sources["files"])
