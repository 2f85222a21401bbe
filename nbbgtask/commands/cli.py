"""The ``nbbgtask`` command: watch and steer tasks from a terminal, over the same home folder."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nbbgtask.api.functions import prune, resolve, tasks
from nbbgtask.core import config as _config
from nbbgtask.core import format as _format
from nbbgtask.core.errors import NbbgtaskError, StoreError, TaskNotFound
from nbbgtask.core.states import State
from nbbgtask.core.trust import open_owned, visible, visible_lines
from nbbgtask.store import outputs as _stored_outputs
from nbbgtask.store.files import log_path

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT = 0, 1, 2, 3
#: the bounds of the numeric options (a float option takes "inf" and "nan": both refused)
MIN_INTERVAL, MAX_INTERVAL, MAX_FINISHED, MAX_SECONDS = 0.05, 3600.0, 10_000, 1e9


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbbgtask",
        description="Watch and steer nbbgtask background tasks. An ID is a full id or a unique prefix of one.",
    )
    parser.add_argument("--home", help="the nbbgtask home folder (default: $NBBGTASK_HOME, else the Jupyter data dir)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list tasks, newest first")
    p.add_argument("--state", choices=[s.value for s in State], help="only tasks in this state")
    p.add_argument("--name", help="only tasks with this name")
    p.add_argument("--limit", type=int, default=None, help="at most this many")

    p = sub.add_parser("show", help="everything about one task")
    p.add_argument("id")

    p = sub.add_parser("logs", help="what a task printed")
    p.add_argument("id")
    p.add_argument("-n", "--lines", type=int, default=None, help="only the last N lines")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new output until the task ends")

    p = sub.add_parser("wait", help="wait for a task to end: exit 0 complete, 1 failed or cancelled, 3 timed out")
    p.add_argument("id")
    p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")

    p = sub.add_parser("cancel", help="stop a task")
    p.add_argument("id")

    p = sub.add_parser("stack", help="a running task's Python stack, every thread: exit 1 if it has none to show")
    p.add_argument("id")

    p = sub.add_parser("prune", help="forget finished tasks, with their logs and results")
    p.add_argument("--keep", type=int, default=0, help="keep the newest N finished tasks")

    p = sub.add_parser("monitor", help="a live view of the tasks, until Ctrl-C")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between refreshes")
    p.add_argument("--finished", type=int, default=10, help="how many recent finished tasks to show")
    return parser


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=False)


def _table(records: list[dict[str, Any]]) -> Any:
    from rich.table import Table
    from rich.text import Text

    from nbbgtask.core.limits import compact
    from nbbgtask.task.resources import costs

    figures = costs(records)
    table = Table(box=None, pad_edge=False, header_style="bold")
    # A column for the costs only when a task runs here: a list of finished tasks stays as it was.
    for column in (*_format.COLUMNS, *(("cpu · memory",) if figures else ())):
        if column == "message":
            table.add_column(column, ratio=1, no_wrap=True, overflow="ellipsis")
        else:
            table.add_column(column, justify="right" if column in ("percent", "elapsed") else "left", no_wrap=True)
    for record in records:
        style = "yellow" if _format.stalled_for(record) is not None else _STATE_STYLES.get(record["state"])
        cells = (*_format.row(record), *((compact(figures.get(record["id"])),) if figures else ()))
        table.add_row(*(Text(cell) for cell in cells), style=style)  # data, not markup
    return table


_STATE_STYLES = {"failed": "red", "cancelled": "dim", "complete": "green"}


def _list(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 0:
        raise NbbgtaskError("--limit takes a number of tasks, 0 or more")
    found = tasks(state=args.state, name=args.name, limit=args.limit)
    if not found:
        print("no tasks")
        return EXIT_OK
    _console().print(_table([s.to_dict() for s in found]))
    return EXIT_OK


def _show(args: argparse.Namespace) -> int:
    from nbbgtask.core.limits import compact, format_bytes

    status = resolve(args.id)
    print(_format.details(status.to_dict()))  # every field one line, made visible
    figures = status.resources()
    if figures is not None:
        print(f"resources: {compact(figures)} RSS, {format_bytes(figures['uss'])} USS, {figures['processes']} processes")
    parts = _stored_outputs.text_parts(_stored_outputs.read_records(status.home, status.id))
    if parts:  # what it displayed, as text (the bar shows the rest)
        print("outputs:")
        for part in parts:
            print(textwrap.indent(_as_text(part), "  ", lambda line: True))
    return EXIT_OK


def _as_text(text: str) -> str:
    """A task's text for a terminal: control characters (escape sequences) shown, not obeyed."""
    return "".join(c if c in "\n\t" or unicodedata.category(c) != "Cc" else repr(c)[1:-1] for c in text)


def _logs(args: argparse.Namespace) -> int:
    status = resolve(args.id)
    if args.lines is not None and args.lines < 0:
        raise NbbgtaskError("-n takes a number of lines, 0 or more")
    text = status.log(tail=args.lines)
    sys.stdout.write(visible_lines(text))  # the task's text as text: no terminal escape codes
    sys.stdout.flush()
    if not args.follow:
        return EXIT_OK
    seen = len(status.log().encode("utf-8", errors="replace"))
    path = log_path(status.home, status.id)
    while True:
        finished = status.done()
        try:
            with os.fdopen(open_owned(path), "rb") as f:
                f.seek(seen)
                new = f.read()
        except FileNotFoundError:
            new = b""
        if new:
            seen += len(new)
            sys.stdout.write(visible_lines(new.decode("utf-8", errors="replace")))
            sys.stdout.flush()
        elif finished:
            return EXIT_OK
        time.sleep(0.2)


def _wait(args: argparse.Namespace) -> int:
    status = resolve(args.id)
    if args.timeout is not None and not (0 <= args.timeout <= MAX_SECONDS):
        raise NbbgtaskError(f"--timeout takes a number of seconds, 0 to {MAX_SECONDS:g}")
    if not status.wait(args.timeout):
        print(f"{_format.short_id(status.id)} still {status.state} after {args.timeout} s", file=sys.stderr)
        return EXIT_TIMEOUT
    line = f"{_format.short_id(status.id)} {status.state}"
    if status.error:
        line += f": {visible(status.error)}"
    print(line)
    return EXIT_OK if status.state is State.COMPLETE else EXIT_FAILED


def _cancel(args: argparse.Namespace) -> int:
    status = resolve(args.id)
    if status.cancel():
        print(f"{_format.short_id(status.id)} cancelled")
        return EXIT_OK
    print(f"{_format.short_id(status.id)} had already ended: {status.state}")
    return EXIT_FAILED


def _stack(args: argparse.Namespace) -> int:
    status = resolve(args.id)
    try:
        text = status.stack()
    except NbbgtaskError as exc:  # ended, not started, elsewhere: the id was fine, there is no stack
        print(f"nbbgtask: {exc}", file=sys.stderr)
        return EXIT_FAILED
    sys.stdout.write(visible_lines(text))  # the task's text as text: never markup, no escape codes
    sys.stdout.flush()
    return EXIT_OK


def _prune(args: argparse.Namespace) -> int:
    print(f"forgot {prune(keep=args.keep)} finished tasks")
    return EXIT_OK


def _monitor_view(finished: int) -> Any:
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    records = [s.to_dict() for s in tasks()]
    live = [r for r in records if not State(r["state"]).is_final]
    done = [r for r in records if State(r["state"]).is_final][:finished]
    table = Table(box=None, pad_edge=False, header_style="bold", expand=True)
    for column, kw in (
        ("id", {}),
        ("name", {"max_width": 24}),
        ("state", {}),
        ("progress", {"width": 24}),
        ("", {"justify": "right"}),
        ("message", {"ratio": 1, "overflow": "ellipsis", "no_wrap": True}),
        ("elapsed", {"justify": "right"}),
        ("ETA", {"justify": "right"}),
    ):
        table.add_column(column, **kw)
    now = time.time()
    for r in live + done:
        percent = float(r.get("percent") or 0)
        eta = _format.eta_seconds(r, now)
        table.add_row(
            Text(_format.short_id(r["id"])),
            Text(visible(r["name"])),  # a task's text is data, never markup
            Text(str(r["state"])),
            ProgressBar(total=100, completed=percent, width=24),
            f"{percent:.0f}%",
            Text(visible(_format.message_cell(r, now))),
            Text(_format.duration(_format.elapsed(r, now))),
            Text(_format.duration(eta) if eta is not None else ""),
            style=_STATE_STYLES.get(r["state"]),
        )
    title = Text.assemble(
        ("nbbgtask", "bold"), f" · {len(live)} running or queued · {visible(_config.home())} · Ctrl-C to quit"
    )
    return Group(title, table)


def _monitor(args: argparse.Namespace) -> int:
    from rich.live import Live

    if not (MIN_INTERVAL <= args.interval <= MAX_INTERVAL):
        raise NbbgtaskError(f"--interval takes a number of seconds from {MIN_INTERVAL:g} to {MAX_INTERVAL:g}")
    if not 0 <= args.finished <= MAX_FINISHED:
        raise NbbgtaskError(f"--finished takes a number of tasks from 0 to {MAX_FINISHED}")
    with Live(_monitor_view(args.finished), console=_console(), auto_refresh=False, screen=False) as live:
        try:
            while True:
                time.sleep(args.interval)
                live.update(_monitor_view(args.finished), refresh=True)
        except KeyboardInterrupt:
            pass
    return EXIT_OK


_COMMANDS = {
    "list": _list,
    "show": _show,
    "logs": _logs,
    "wait": _wait,
    "cancel": _cancel,
    "stack": _stack,
    "prune": _prune,
    "monitor": _monitor,
}


def _use_home(given: str | None) -> None:
    """The home the command works on, checked (`_trust.check_home`) and never created or
    changed here: a command line call that only reads must leave the folder as it found it."""
    path = _config.default_home() if not given else Path(os.path.expanduser(given))
    _config.settings().home = _config.ensure_home(path, create=False)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _use_home(args.home)
        return _COMMANDS[args.command](args)
    except (TaskNotFound, StoreError, NbbgtaskError, ValueError) as exc:
        print(f"nbbgtask: {visible(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except PermissionError as exc:
        print(
            f"nbbgtask: permission denied: {visible(exc.filename or exc)}: this needs to run as the "
            f"user who owns the home folder and its tasks",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. piped into head
        return EXIT_OK
