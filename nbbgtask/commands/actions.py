"""What each command does, once for both front ends: the ``nbbgtask`` command line and the
``%bgtask`` magic hand it their parsed options and an `Out` that renders for their screen."""

from __future__ import annotations

import argparse
import json
import os
import textwrap
import time
from typing import Any, Protocol

from nbbgtask.api.functions import count_tasks, prune, resolve, tasks
from nbbgtask.core import format as _format
from nbbgtask.core.errors import NbbgtaskError
from nbbgtask.core.record import public
from nbbgtask.core.states import State
from nbbgtask.core.trust import open_owned, visible, visible_lines
from nbbgtask.store import outputs as _stored_outputs
from nbbgtask.store.files import log_path

__all__ = [
    "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_TIMEOUT", "DEFAULT_LIMIT", "Out",
    "list_tasks", "show", "logs", "result", "wait", "cancel", "stack", "prune_tasks", "monitor",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT = 0, 1, 2, 3
#: how many tasks ``list`` shows without ``--limit`` or ``--all``
DEFAULT_LIMIT = 20
#: seconds between looks at a followed log
FOLLOW_EVERY = 0.2


class Out(Protocol):
    """Where a command's output goes: a terminal (`cli`) or a notebook (`magic`)."""

    def text(self, text: str) -> None:
        """A line of nbbgtask's own text, its task fields already made `visible`."""

    def task_text(self, text: str) -> None:
        """Text a task printed (a log, a stack), as it is: each front end shows it its own way."""

    def table(self, records: list[dict[str, Any]]) -> None:
        """A list of tasks, newest first."""

    def note(self, text: str) -> None:
        """A remark beside the result (a wait that timed out)."""

    def problem(self, text: str, code: int) -> int:
        """The command cannot do what was asked, for a reason that is not an error of nbbgtask's."""

    def value(self, value: Any) -> int:
        """A Python value to hand back (only the magic has such commands)."""

    def monitor(self, args: argparse.Namespace) -> int:
        """The live view of the tasks."""


def list_tasks(args: argparse.Namespace, out: Out) -> int:
    limit = None if args.all else DEFAULT_LIMIT if args.limit is None else args.limit
    if args.since is not None:  # a filter the summaries cannot answer: every matching task is read
        cutoff = time.time() - args.since
        found = [s.to_dict() for s in tasks(state=args.state, name=args.name)]
        found = [r for r in found if (_format.finite(r, "created") or -1.0) >= cutoff]
        total, records = len(found), found[:limit]
    else:
        records = [s.to_dict() for s in tasks(state=args.state, name=args.name, limit=limit)]
        total = len(records) if limit is None else count_tasks(args.state, args.name)
    if args.json:  # one object a line, as each is ready; ASCII, so every odd character is escaped
        for record in records:
            out.text(json.dumps(public(record), allow_nan=False, default=str))
        return EXIT_OK
    more = max(0, total - len(records))
    if not records and not more:
        out.text("no tasks")
        return EXIT_OK
    if records:
        out.table(records)
    if more:
        out.text(f"… {more:,} more: --limit N or --all")
    return EXIT_OK


def show(args: argparse.Namespace, out: Out) -> int:
    from nbbgtask.core.limits import compact, format_bytes

    status = resolve(args.id)
    out.text(_format.details(status.to_dict()))  # every field one line, made visible
    figures = status.resources()
    if figures is not None:
        out.text(f"resources: {compact(figures)} RSS, {format_bytes(figures['uss'])} USS, {figures['processes']} processes")
    parts = _stored_outputs.text_parts(_stored_outputs.read_records(status.home, status.id))
    if parts:  # what it displayed, as text (the bar shows the rest)
        out.text("outputs:")
        for part in parts:
            out.text(textwrap.indent(visible_lines(part), "  ", lambda line: True))
    return EXIT_OK


def logs(args: argparse.Namespace, out: Out) -> int:
    status = resolve(args.id)
    out.task_text(status.log(tail=args.lines))
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
            out.task_text(new.decode("utf-8", errors="replace"))
        elif finished:
            return EXIT_OK
        time.sleep(FOLLOW_EVERY)


def result(args: argparse.Namespace, out: Out) -> int:
    status = resolve(args.id)
    if not status.done():
        return out.problem(f"task {_format.short_id(status.id)} is still {status.state}: %bgtask wait {args.id}", EXIT_FAILED)
    return out.value(status.result())


def wait(args: argparse.Namespace, out: Out) -> int:
    status = resolve(args.id)
    if not status.wait(args.timeout):
        out.note(f"{_format.short_id(status.id)} still {status.state}")
        return EXIT_TIMEOUT
    line = f"{_format.short_id(status.id)} {status.state}"
    if status.error:
        line += f": {visible(status.error)}"
    out.text(line)
    return EXIT_OK if status.state is State.COMPLETE else EXIT_FAILED


def cancel(args: argparse.Namespace, out: Out) -> int:
    status = resolve(args.id)
    if status.cancel():
        out.text(f"{_format.short_id(status.id)} cancelled")
        return EXIT_OK
    out.text(f"{_format.short_id(status.id)} had already ended: {status.state}")
    return EXIT_FAILED


def stack(args: argparse.Namespace, out: Out) -> int:
    status = resolve(args.id)
    try:
        text = status.stack()
    except NbbgtaskError as exc:  # ended, not started, elsewhere: the id was fine, there is no stack
        return out.problem(visible(exc), EXIT_FAILED)
    out.task_text(text)
    return EXIT_OK


def prune_tasks(args: argparse.Namespace, out: Out) -> int:
    out.text(f"forgot {prune(keep=args.keep)} finished tasks")
    return EXIT_OK


def monitor(args: argparse.Namespace, out: Out) -> int:
    return out.monitor(args)
