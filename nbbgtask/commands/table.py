"""The one table of commands: each command's options, help and behaviour, from which both the
``nbbgtask`` command line (`cli`) and the ``%bgtask`` magic (`magic`) build their parsers, their
help and their usage text."""

from __future__ import annotations

import argparse
import math
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nbbgtask.commands import actions
from nbbgtask.core.record import PUBLIC_FIELDS
from nbbgtask.core.states import State

__all__ = ["Option", "Command", "COMMANDS", "CELL", "Usage", "Help", "add_arguments", "find", "parse", "synopsis", "usage"]

#: the two front ends a command or an option can be offered in
CLI, MAGIC = "cli", "magic"
BOTH = (CLI, MAGIC)
#: the bounds of the numeric options (a float option takes "inf" and "nan": both refused)
MIN_INTERVAL, MAX_INTERVAL, MAX_FINISHED, MAX_SECONDS = 0.05, 3600.0, 10_000, 1e9
#: a duration for ``--since``: a number and a unit
DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([smhd])", re.ASCII)
UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


# -- the kinds of value an option takes: each refusal says what it takes and what it got ----------


def whole(maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes a whole number, got {text!r}") from None
        if value < 0 or (maximum is not None and value > maximum):
            upper = "or more" if maximum is None else f"to {maximum:,}"
            raise argparse.ArgumentTypeError(f"takes a whole number, 0 {upper}, got {text!r}")
        return value

    return parse


def seconds(low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not low <= value <= high:  # NaN and the infinities too
            raise argparse.ArgumentTypeError(f"takes a number of seconds from {low:g} to {high:g}, got {text!r}")
        return value

    return parse


def duration(text: str) -> float:
    """``90s``, ``30m``, ``2h``, ``1d``: in seconds."""
    found = DURATION.fullmatch(text.strip())
    value = float(found[1]) * UNITS[found[2]] if found else math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"takes a duration such as 90s, 30m, 2h or 1d, got {text!r}")
    return value


# -- the table --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    flags: tuple[str, ...]  #: the spellings, the one shown in a usage line first
    help: str
    type: Callable[[str], Any] | None = None
    default: Any = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    flag: bool = False  #: takes no value: true when given
    group: str | None = None  #: options of one group exclude each other
    forms: tuple[str, ...] = BOTH

    @property
    def dest(self) -> str:
        long = [f for f in self.flags if f.startswith("--")]
        return (long or self.flags)[0].lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    run: Callable[[argparse.Namespace, actions.Out], int] | None
    takes_id: bool = False
    options: tuple[Option, ...] = ()
    forms: tuple[str, ...] = BOTH
    cli_note: str = ""  #: what the command line adds to the help (its exit codes)

    def offered(self, form: str) -> list[Option]:
        return [o for o in self.options if form in o.forms]


COMMANDS: tuple[Command, ...] = (
    Command("list", "the tasks, newest first", actions.list_tasks, options=(
        Option(("--state",), "only tasks in this state: " + ", ".join(s.value for s in State), str, metavar="S",
               choices=tuple(s.value for s in State)),
        Option(("--name",), "only tasks with this name", str, metavar="N"),
        Option(("--limit",), f"at most this many (default {actions.DEFAULT_LIMIT})", whole(), metavar="N",
               group="how many"),
        Option(("--all",), "every task", flag=True, group="how many"),
        Option(("--since",), "only tasks created within this while: 90s, 30m, 2h, 1d", duration, metavar="DURATION"),
        Option(("--json",), "one JSON object a line: " + ", ".join(PUBLIC_FIELDS), flag=True),
    )),
    Command("show", "everything about one task", actions.show, takes_id=True),
    Command("logs", "what a task printed", actions.logs, takes_id=True, options=(
        Option(("-n", "--lines"), "only the last N lines", whole(), metavar="N"),
        Option(("--follow", "-f"), "keep printing new output until the task ends", flag=True),
    )),
    Command("result", "its return value", actions.result, takes_id=True, forms=(MAGIC,)),
    Command("wait", "wait for a task to end", actions.wait, takes_id=True,
            cli_note="exit 0 complete, 1 failed or cancelled, 3 timed out", options=(
        Option(("--timeout",), "give up after this many seconds", seconds(0, MAX_SECONDS), metavar="SECONDS"),
    )),
    Command("cancel", "stop a task", actions.cancel, takes_id=True),
    Command("stack", "a running task's Python stack, every thread (what a stuck task is doing)", actions.stack,
            takes_id=True, cli_note="exit 1 if it has none to show"),
    Command("monitor", "a live view of the tasks", actions.monitor, cli_note="it runs until Ctrl-C", options=(
        Option(("--interval",), "seconds between refreshes", seconds(MIN_INTERVAL, MAX_INTERVAL), default=0.5,
               metavar="SECONDS", forms=(CLI,)),
        Option(("--finished",), "how many recent finished tasks to show", whole(MAX_FINISHED), default=10,
               metavar="N", forms=(CLI,)),
    )),
    Command("prune", "forget finished tasks, with their logs and results", actions.prune_tasks, options=(
        Option(("--keep",), "keep the newest N finished tasks", whole(), default=0, metavar="N"),
    )),
)

#: ``%%bgtask``: its behaviour is the magic's own (it needs the notebook's namespace)
CELL = Command(
    "%%bgtask",
    "run the cell in the background (by fork: it sees every name); the names it assigns come back when it completes",
    None,
    forms=(MAGIC,),
    options=(
        Option(("--name",), "the task's name (default: cell [N])", str, metavar="NAME"),
        Option(("--focus",), "block as bg.full_focus does, with a Cancel button", flag=True),
    ),
)


def find(name: str, form: str) -> Command | None:
    return next((c for c in COMMANDS if c.name == name and form in c.forms), None)


# -- parsers and usage built from the table ---------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, command: Command, form: str) -> None:
    """``command``'s ID and its options offered in ``form``; every option has its default, so that
    a behaviour can read an option its front end does not offer."""
    parser.set_defaults(**{o.dest: o.default for o in command.options})
    if command.takes_id:
        parser.add_argument("id", metavar="ID", help="a task id, or the first characters of one")
    groups: dict[str, Any] = {}
    for option in command.offered(form):
        target: Any = parser
        if option.group is not None:
            target = groups.get(option.group) or groups.setdefault(option.group, parser.add_mutually_exclusive_group())
        if option.flag:
            target.add_argument(*option.flags, dest=option.dest, action="store_true", help=option.help)
        else:
            target.add_argument(
                *option.flags, dest=option.dest, type=option.type, default=option.default, metavar=option.metavar,
                choices=option.choices, help=option.help,
            )


def synopsis(command: Command, form: str) -> str:
    """``list [--state S] [--limit N | --all]``: the command with what it takes in ``form``."""
    parts: list[list[str]] = []
    seen: dict[str, list[str]] = {}
    for option in command.offered(form):
        spelled = option.flags[0] if option.flag else f"{option.flags[0]} {option.metavar}"
        if option.group is not None and option.group in seen:
            seen[option.group].append(spelled)
            continue
        parts.append([spelled])
        if option.group is not None:
            seen[option.group] = parts[-1]
    words = [command.name, *(["ID"] if command.takes_id else []), *(f"[{' | '.join(p)}]" for p in parts)]
    return " ".join(words)


def usage(width: int = 35) -> str:
    """What ``%bgtask`` alone prints: every form the magic has, and what it does."""
    lines = []
    for command, prefix in ((CELL, ""), *((c, "%bgtask ") for c in COMMANDS if MAGIC in c.forms)):
        left = prefix + synopsis(command, MAGIC)
        helps = textwrap.wrap(command.help, 100 - width)
        if len(left) >= width:
            lines.append(left)
        else:
            lines.append(left.ljust(width) + helps.pop(0))
        lines += [" " * width + line for line in helps]
    lines.append("An ID is a full id or a unique prefix of one.")
    return "\n".join(lines)


class Usage(Exception):
    """A line the table does not accept; the message says what was wrong."""


class Help(Exception):
    """``--help`` was given: the help text."""


class _Parser(argparse.ArgumentParser):
    """An argparse parser that raises (`Usage`, `Help`) where it would exit: it runs in a kernel."""

    def error(self, message: str) -> Any:
        raise Usage(f"{message} (see {self.prog} --help)")

    def print_help(self, file: Any = None) -> None:
        raise Help(self.format_help())

    def exit(self, status: int = 0, message: str | None = None) -> Any:
        raise Usage(message or "")


def _said(exc: argparse.ArgumentError, prog: str) -> str:
    """``-n takes a whole number, got 'many'``: the option's first spelling and what was wrong."""
    name = (exc.argument_name or "").split("/")[0]
    if not name:  # what newer Pythons raise, not hand to `error`, with exit_on_error=False
        return f"{exc.message} (see {prog} --help)"
    return f"{name} {exc.message}" if exc.message.startswith("takes ") else f"{name}: {exc.message}"


def parse(command: Command, words: list[str], prog: str) -> argparse.Namespace:
    """``words`` as ``command``'s options in the magic; `Usage` or `Help` where the CLI would exit."""
    parser = _Parser(prog=prog, description=command.help, exit_on_error=False)
    add_arguments(parser, command, MAGIC)
    try:
        return parser.parse_args(words)
    except argparse.ArgumentError as exc:
        raise Usage(_said(exc, prog)) from None
