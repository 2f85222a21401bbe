"""The ``nbbgtask`` command: watch and steer tasks from a terminal, over the same home folder."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nbbgtask.api.functions import tasks
from nbbgtask.commands import table as _table_of_commands
from nbbgtask.commands.actions import EXIT_OK, EXIT_USAGE
from nbbgtask.core import config as _config
from nbbgtask.core import format as _format
from nbbgtask.core.errors import NbbgtaskError, StoreError, TaskNotFound
from nbbgtask.core.states import State
from nbbgtask.core.trust import visible, visible_lines

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    """The command line's parser: one sub-parser for each command of the table the CLI offers."""
    parser = argparse.ArgumentParser(
        prog="nbbgtask",
        description="Watch and steer nbbgtask background tasks. An ID is a full id or a unique prefix of one.",
    )
    parser.add_argument("--home", help="the nbbgtask home folder (default: $NBBGTASK_HOME, else the Jupyter data dir)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in _table_of_commands.COMMANDS:
        if _table_of_commands.CLI in command.forms:
            said = f"{command.help}; {command.cli_note}" if command.cli_note else command.help
            p = sub.add_parser(command.name, help=said, description=said)
            _table_of_commands.add_arguments(p, command, _table_of_commands.CLI)
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


def _monitor_view(finished: int) -> Any:
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    # The live ones, and the newest finished from the history's summaries: never the whole history.
    live = [s.to_dict() for s in tasks(state=[s for s in State if not s.is_final])]
    done = [s.to_dict() for s in tasks(state=[s for s in State if s.is_final], limit=finished)]
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
        percent = _format.percent_of(r)
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


class _Terminal:
    """The command line's `actions.Out`: a terminal, where every task's text is shown as text."""

    def text(self, text: str) -> None:
        print(text)

    def task_text(self, text: str) -> None:
        sys.stdout.write(visible_lines(text))  # the task's text as text: no terminal escape codes
        sys.stdout.flush()

    def table(self, records: list[dict[str, Any]]) -> None:
        _console().print(_table(records))

    def note(self, text: str) -> None:
        print(text, file=sys.stderr)

    def problem(self, text: str, code: int) -> int:
        print(f"nbbgtask: {text}", file=sys.stderr)
        return code

    def value(self, value: Any) -> int:
        raise NbbgtaskError("the command line has no command that hands back a value")

    def monitor(self, args: argparse.Namespace) -> int:
        from rich.live import Live

        with Live(_monitor_view(args.finished), console=_console(), auto_refresh=False, screen=False) as live:
            try:
                while True:
                    time.sleep(args.interval)
                    live.update(_monitor_view(args.finished), refresh=True)
            except KeyboardInterrupt:
                pass
        return EXIT_OK


def _use_home(given: str | None) -> None:
    """The home the command works on, checked (`nbbgtask.core.trust.check_home`) and never created or
    changed here: a command line call that only reads must leave the folder as it found it."""
    path = _config.default_home() if not given else Path(os.path.expanduser(given))
    _config.settings().home = _config.ensure_home(path, create=False)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = _table_of_commands.find(args.command, _table_of_commands.CLI)
    assert command is not None and command.run is not None  # the parser offers only these
    try:
        _use_home(args.home)
        return command.run(args, _Terminal())
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
    except BrokenPipeError:  # e.g. piped into head: the rest is not wanted, nor a flush at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
