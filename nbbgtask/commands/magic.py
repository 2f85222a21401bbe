"""The ``%bgtask`` line magic and ``%%bgtask`` cell magic (``%load_ext nbbgtask``)."""

from __future__ import annotations

import ast
import shlex
import sys
import warnings
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class

from nbbgtask import backends as _backends
from nbbgtask.api.functions import run
from nbbgtask.api.status import TaskStatus
from nbbgtask.commands import table as _commands
from nbbgtask.core import format as _format
from nbbgtask.core.errors import TaskNotFound

__all__ = ["BgTaskMagics", "assigned_names", "split_last_expression", "load_ipython_extension", "unload_ipython_extension"]

USAGE = _commands.usage()

#: seconds between looks for finished cell tasks while the kernel is idle
POLL = 0.2


class _Names(ast.NodeVisitor):
    """Names a cell binds at its top level (not inside the functions or classes it defines)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def _add(self, name: str) -> None:
        if name not in self.names:
            self.names.append(name)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Store):
            self._add(node.id)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self._add(node.name)  # the body is another scope
        for item in (*node.decorator_list, *node.args.defaults, *node.args.kw_defaults):
            if item is not None:
                self.visit(item)

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._add(node.name)
        for item in (*node.decorator_list, *node.bases):
            self.visit(item)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        pass

    def _skip_scope(self, node: ast.AST) -> None:
        pass  # comprehension variables do not leak

    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _skip_scope  # type: ignore[assignment]

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self._add(node.target.id)
        self.visit(node.value)

    def visit_Import(self, node: ast.Import | ast.ImportFrom) -> None:
        for alias in node.names:
            if alias.name != "*":
                self._add(alias.asname or alias.name.split(".")[0])

    visit_ImportFrom = visit_Import  # type: ignore[assignment]

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.name:
            self._add(node.name)
        self.generic_visit(node)

    def visit_Global(self, node: ast.Global) -> None:
        for name in node.names:
            self._add(name)


def assigned_names(source: str) -> list[str]:
    """The names a cell assigns, found from its code, in order of first assignment."""
    visitor = _Names()
    visitor.visit(ast.parse(source))
    return visitor.names


#: names IPython keeps in the namespace for itself; a cell on a cluster is not sent them
_IPYTHON_NAMES = frozenset({"In", "Out", "get_ipython", "exit", "quit", "_", "__", "___", "_ih", "_oh", "_dh"})


def used_names(source: str) -> list[str]:
    """Every name a cell reads, anywhere in it (what it needs from the notebook)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in found:
            found.append(node.id)
    return found


def split_last_expression(source: str) -> tuple[ast.Module, ast.Expression | None]:
    """The cell without its last statement if that is an expression whose value a cell would show
    (not when the cell ends with ``;``), and that expression."""
    tree = ast.parse(source)
    end = tree.body[-1] if tree.body else None
    if not isinstance(end, ast.Expr) or _ends_with_semicolon(source):
        return tree, None
    tree.body.pop()
    return tree, ast.Expression(end.value)


def _ends_with_semicolon(source: str) -> bool:
    """As IPython decides it: the cell's last token, comments aside, is ``;``."""
    import io
    import tokenize

    skip = {tokenize.COMMENT, tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER, tokenize.INDENT, tokenize.DEDENT}
    last = None
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type not in skip:
                last = token
    except (tokenize.TokenError, SyntaxError):
        return False
    return last is not None and last.type == tokenize.OP and last.string == ";"


def _run_cell_body(source: str, filename: str, names: list[str], namespace: dict[str, Any]) -> dict[str, Any]:
    """In the task process: run the cell in (a copy of) the notebook's namespace; what to send back."""
    import linecache

    import cloudpickle

    from nbbgtask.task.outputs import display_value

    if filename not in linecache.cache:  # on a Dask worker: so the traceback shows the cell's lines
        lines = source.splitlines(keepends=True)
        linecache.cache[filename] = (len(source), None, lines, filename)
    body, last = split_last_expression(source)
    exec(compile(body, filename, "exec"), namespace)
    if last is not None:  # shown under the bar, as a cell shows its value
        display_value(eval(compile(last, filename, "eval"), namespace))
    values: dict[str, bytes] = {}
    skipped: list[str] = []
    for name in names:
        if name not in namespace:
            continue
        try:
            values[name] = cloudpickle.dumps(namespace[name])
        except Exception:
            skipped.append(name)
    return {"values": values, "skipped": skipped}


@magics_class
class BgTaskMagics(Magics):
    """``%bgtask`` and ``%%bgtask``; finished cell tasks hand their names back at a safe point."""

    shell: Any  # set by Magics.__init__; never None once the extension is loaded

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self._pending: dict[str, TaskStatus] = {}
        self._timer: Any = None
        shell.events.register("pre_run_cell", self._collect)

    def unregister(self) -> None:
        try:
            self.shell.events.unregister("pre_run_cell", self._collect)
        except ValueError:
            pass
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- %%bgtask -------------------------------------------------------------------------------

    @line_cell_magic
    def bgtask(self, line: str, cell: str | None = None) -> Any:
        try:
            if cell is None:
                return self._line(line)
            return self._cell(line, cell)
        except _commands.Help as shown:
            print(shown)
            return None
        except (TaskNotFound, _commands.Usage) as exc:  # an unknown or ambiguous id, a bad option: one line
            raise UsageError(str(exc).strip()) from None

    def _cell(self, line: str, cell: str) -> Any:
        args = _commands.parse(_commands.CELL, _words(line), "%%bgtask")
        source = self.shell.transform_cell(cell)
        try:
            names = assigned_names(source)
        except SyntaxError as exc:
            raise UsageError(f"the cell has a syntax error: {exc}") from None
        number = self.shell.execution_count
        filename = self.shell.compile.cache(source, number, raw_code=cell)
        name = args.name or f"cell [{number}]"
        status = run(_run_cell_body, source, filename, names, self._namespace_for(source), name=name)
        if args.focus:
            from nbbgtask.notebook.focus import full_focus

            self._copy_back(status, full_focus(status, acceptable_wait=0.5))
            return None
        self._pending[status.id] = status
        self._schedule()
        return status

    def _namespace_for(self, source: str) -> dict[str, Any]:
        """The notebook's namespace itself where the task inherits it (fork), else the names the
        cell reads that can be pickled (spawn, a cluster); the rest are named in one warning."""
        user_ns = self.shell.user_ns
        backend = _backends.current()
        if backend.inherits_memory():
            return user_ns
        import builtins

        import cloudpickle

        sent: dict[str, Any] = {"__builtins__": builtins}
        left_out = []
        for name in used_names(source):
            if name in user_ns and name not in _IPYTHON_NAMES:
                try:
                    cloudpickle.dumps(user_ns[name])
                    sent[name] = user_ns[name]
                except Exception:
                    left_out.append(name)
        if left_out:
            warnings.warn(
                f"%%bgtask: these names cannot be sent to {backend.destination} (not picklable), so "
                f"the cell will not see them there: " + ", ".join(left_out),
                RuntimeWarning,
                stacklevel=1,
            )
        return sent

    def _schedule(self) -> None:
        """Look for finished cell tasks on the kernel's event loop, which runs only between cells."""
        if self._timer is not None or not self._pending:
            return
        import asyncio

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a terminal IPython): the next cell's pre_run_cell collects

        def tick() -> None:
            self._timer = None
            self._collect()
            self._schedule()

        self._timer = loop.call_later(POLL, tick)

    def _collect(self, *_: Any) -> None:
        """Copy the names of every finished cell task into the notebook's namespace."""
        for task_id, status in list(self._pending.items()):
            if not status.done():
                continue
            del self._pending[task_id]
            if status.state == "failed":
                print(f"%%bgtask {status.name} failed:\n{status.traceback or status.error}", file=sys.stderr)
                continue
            if status.state == "complete":
                self._copy_back(status, status.result())

    def _copy_back(self, status: TaskStatus, outcome: dict[str, Any]) -> None:
        import cloudpickle

        skipped = list(outcome["skipped"])
        for key, data in outcome["values"].items():
            try:
                self.shell.user_ns[key] = cloudpickle.loads(data)
            except Exception:
                skipped.append(key)
        if skipped:
            warnings.warn(
                f"%%bgtask {status.name}: these names could not be copied back (not picklable): "
                + ", ".join(sorted(skipped)),
                RuntimeWarning,
                stacklevel=1,
            )

    # -- %bgtask ... ----------------------------------------------------------------------------

    def _line(self, line: str) -> Any:
        """A line form: parsed with the table's options, done by the table's behaviour, shown here."""
        words = _words(line)
        if not words:
            print(USAGE)
            return None
        command = _commands.find(words[0], _commands.MAGIC)
        if command is None or command.run is None:
            raise UsageError(f"%bgtask {line.strip()!r}: not a command this magic knows.\n{USAGE}")
        args = _commands.parse(command, words[1:], f"%bgtask {command.name}")
        out = _Notebook()
        command.run(args, out)
        return out.shown


class _Notebook:
    """The magic's `actions.Out`: the cell's output, where a value or a widget is shown by returning it."""

    def __init__(self) -> None:
        self.shown: Any = None

    def text(self, text: str) -> None:
        print(text)

    def task_text(self, text: str) -> None:
        print(text, end="")  # the output area renders a task's text itself, as it did under its bar

    def table(self, records: list[dict[str, Any]]) -> None:
        print(_format.plain_table(records))

    def note(self, text: str) -> None:
        print(text)

    def problem(self, text: str, code: int) -> int:
        raise UsageError(text)

    def value(self, value: Any) -> int:
        self.shown = value
        return 0

    def monitor(self, args: Any) -> int:
        from nbbgtask.notebook.monitor import monitor

        self.shown = monitor()
        return 0


def _words(line: str) -> list[str]:
    try:
        return shlex.split(line)
    except ValueError as exc:  # an unclosed quote
        raise UsageError(f"%bgtask: {exc}") from None


_magics: BgTaskMagics | None = None


def load_ipython_extension(ipython: Any) -> None:
    global _magics
    if _magics is not None:
        _magics.unregister()
    _magics = BgTaskMagics(ipython)
    ipython.register_magics(_magics)


def unload_ipython_extension(ipython: Any) -> None:
    global _magics
    if _magics is not None:
        _magics.unregister()
        _magics = None
