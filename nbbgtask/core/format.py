"""Plain-text and HTML renderings of a task's progress, shared by the widgets, the magic and the CLI."""

from __future__ import annotations

import math
import time
from typing import Any

from nbbgtask.core.trust import visible, visible_lines

__all__ = [
    "COLUMNS",
    "attempt_text",
    "earlier_failures",
    "waiting_text",
    "details",
    "duration",
    "eta_seconds",
    "finite",
    "html_snapshot",
    "message_cell",
    "number",
    "percent_of",
    "plain_table",
    "row",
    "short_id",
    "stall_note",
    "stalled_for",
    "summary",
    "text_bar",
]

#: the columns of a task list, in the magic and on the command line
COLUMNS = ("id", "name", "state", "percent", "message", "elapsed")
#: seconds without a change of percent or message after which a running task is shown as
#: stalled, with a pointer to its stack (``status.stack()``, ``nbbgtask stack ID``)
STALLED_AFTER = 300.0
#: a number of seconds (or percent) beyond which a record's figure is shown as a plain number
HUGE = 1e15


def short_id(task_id: str) -> str:
    return task_id[:8]


def number(value: Any, spec: str = "g") -> str:
    """A number from a record as text, formatted by ``spec``; NaN, an infinity, a huge number or
    not a number at all as it is (``nan``, ``1e+300``), never an exception."""
    try:
        as_float = float(value)
    except (TypeError, ValueError, OverflowError):
        return visible(repr(value))[:40]
    if not math.isfinite(as_float) or abs(as_float) >= HUGE:
        return f"{as_float:g}"
    return format(as_float, spec)


def finite(record: dict[str, Any], field: str) -> float | None:
    """A number of ``record`` (a time, the percent) as a finite float, or ``None`` (missing, NaN,
    an infinity, not a number): what a figure is computed from."""
    value = record.get(field)
    try:
        as_float = float(value) if value is not None and not isinstance(value, bool) else None
    except (TypeError, ValueError, OverflowError):
        return None
    return as_float if as_float is not None and math.isfinite(as_float) else None


def percent_of(record: dict[str, Any]) -> float:
    """The record's percent, 0 to 100 (0 where it is missing or not a number)."""
    value = finite(record, "percent")
    return 0.0 if value is None else max(0.0, min(100.0, value))


def duration(seconds: float | None) -> str:
    """``0:07``, ``12:34``, ``1:02:03``; ``-`` for none (or NaN), and a duration too long to be
    one (an infinity, ``1e+300``) as its number of seconds."""
    if seconds is None or seconds != seconds:
        return "-"
    if not abs(seconds) < HUGE:
        return f"{seconds:g} s"
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def elapsed(record: dict[str, Any], now: float | None = None) -> float | None:
    started = finite(record, "started")
    if started is None:
        return None
    end = finite(record, "finished") or (now if now is not None else time.time())
    return max(0.0, end - started)


def eta_seconds(record: dict[str, Any], now: float | None = None) -> float | None:
    """Time left at the average rate so far; ``None`` until there is a rate to go by."""
    if record.get("finished") or record.get("state") != "running":
        return None
    spent = elapsed(record, now)
    percent = percent_of(record)
    if not spent or percent <= 0 or percent >= 100:
        return None
    return spent * (100 - percent) / percent


def stalled_for(record: dict[str, Any], now: float | None = None) -> float | None:
    """Seconds since a running task's progress last changed, if that is `STALLED_AFTER` or more;
    else (or for a task that has not reported yet) ``None``."""
    reported = finite(record, "reported")
    if record.get("state") != "running" or reported is None:
        return None
    quiet = (now if now is not None else time.time()) - reported
    return quiet if quiet >= STALLED_AFTER else None


def stall_note(record: dict[str, Any], now: float | None = None) -> str | None:
    """``no progress for 12:03 — see stack`` for a stalled task, else ``None``."""
    quiet = stalled_for(record, now)
    return None if quiet is None else f"no progress for {duration(quiet)} — see stack"


def attempt_text(record: dict[str, Any], now: float | None = None) -> str | None:
    """``attempt 2 of 4`` for a task that may retry (``attempt 1 of 4 failed · retrying in 0:05``
    while it waits to), else ``None``."""
    retries = record.get("retries") or 0
    if not retries:
        return None
    attempt = int(record.get("attempt") or 1)
    text = f"attempt {attempt} of {retries + 1}"
    retry_at = record.get("retry_at")
    if retry_at is not None and record.get("state") == "running":
        left = retry_at - (now if now is not None else time.time())
        text = f"attempt {attempt - 1} of {retries + 1} failed · retrying in {duration(max(0.0, left))}"
    return text


def earlier_failures(record: dict[str, Any]) -> str:
    """`` on attempt 3 of 3, after 2 failed attempts`` for a task that retried, else ``""`` (for
    `TaskFailed`'s message and the like)."""
    attempt = int(record.get("attempt") or 1)
    # the attempts before the last: the last is the one the error describes
    failed = sum(1 for a in (record.get("attempts") or [])[: attempt - 1] if a.get("state") == "failed")
    if attempt <= 1:
        return ""
    before = f"{failed} failed attempt{'s' if failed != 1 else ''}"
    return f" on attempt {attempt} of {(record.get('retries') or 0) + 1}, after {before}"


def waiting_text(prerequisites: list[tuple[str, str]]) -> str:
    """``waiting for load (3f2a…)``, or ``waiting for load (3f2a…) and 2 more``: ``prerequisites``
    are (name, id) pairs of the tasks still to complete."""
    if not prerequisites:
        return "waiting to start"
    name, task_id = prerequisites[0]
    text = f"waiting for {visible(name)} ({task_id[:4]}…)"
    if len(prerequisites) > 1:
        text += f" and {len(prerequisites) - 1} more"
    return text


def summary(record: dict[str, Any], now: float | None = None) -> str:
    """``attempt 2 of 4 · 42% · spline 17 of 40 · 0:12 elapsed · ETA 0:17`` (or how it ended)."""
    state = record["state"]
    if state == "waiting":  # its message says what it waits for
        return str(record.get("message") or "waiting")
    parts = [f"{percent_of(record):.0f}%"]
    attempt = attempt_text(record, now)
    if attempt is not None:
        parts.insert(0, attempt)
    if record.get("message"):
        parts.append(str(record["message"]))
    if state == "failed" and record.get("error"):
        parts.append(str(record["error"]))
    spent = elapsed(record, now)
    if state == "queued":
        parts.append("queued")
    elif state == "running":
        parts.append(f"{duration(spent)} elapsed")
        note = stall_note(record, now)
        if note is not None:  # an ETA from a rate that no longer holds would mislead
            parts.append(note)
        else:
            eta = eta_seconds(record, now)
            if eta is not None:
                parts.append(f"ETA {duration(eta)}")
    else:
        parts.append(f"{state} after {duration(spent)}")
    return " · ".join(parts)


def text_bar(percent: float, width: int = 20) -> str:
    filled = int(round(width * max(0.0, min(100.0, percent)) / 100))
    return "█" * filled + "░" * (width - filled)


def text_snapshot(record: dict[str, Any]) -> str:
    """One line for a terminal or a notebook without widgets."""
    return f"{record['name']} [{short_id(record['id'])}] {text_bar(percent_of(record))} {summary(record)}"


_COLOURS = {"complete": "#2e7d32", "failed": "#c62828", "cancelled": "#757575"}


def html_snapshot(record: dict[str, Any]) -> str:
    """A static picture of the bar, for nbconvert output and front ends without widgets."""
    import html  # only for a notebook's HTML view

    percent = percent_of(record)
    colour = _COLOURS.get(record["state"], "#1976d2")
    return (
        '<div style="display:flex;align-items:center;gap:0.6em;font-family:sans-serif">'
        f"<b>{html.escape(str(record['name']))}</b>"
        f'<div style="width:40%;background:#eee;height:1em;border-radius:3px">'
        f'<div style="width:{percent:.1f}%;background:{colour};height:100%;border-radius:3px"></div></div>'
        f"<span>{html.escape(summary(record))}</span></div>"
    )


def message_cell(record: dict[str, Any], now: float | None = None) -> str:
    """The error, else the message; a stalled task's starts with the stall note."""
    message = str(record.get("error") or record.get("message") or "")
    note = stall_note(record, now)
    if note is not None:
        message = f"{note} · {message}" if message else note
    return message


def row(record: dict[str, Any], now: float | None = None) -> tuple[str, ...]:
    """One task as the cells of `COLUMNS`; a stalled task's message starts with the stall note."""
    message = visible(message_cell(record, now))  # one line, no terminal escape codes
    return (
        short_id(record["id"]),
        visible(record["name"]),
        str(record["state"]),
        f"{number(record.get('percent') or 0, '.0f')}%",
        message if len(message) <= 60 else message[:59] + "…",
        duration(elapsed(record, now)),
    )


def plain_table(records: list[dict[str, Any]]) -> str:
    """A list of tasks as aligned plain text (for the magic's output)."""
    rows = [COLUMNS, *(row(r) for r in records)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def details(record: dict[str, Any]) -> str:
    """Everything about one task, as ``key: value`` lines: each value on its own line, its control
    characters (a newline too) shown as escapes, so that no value can fake another field."""
    import datetime as dt

    def when(ts: Any) -> str:
        if ts is None:
            return "-"
        try:
            return dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc).isoformat(timespec="seconds")
        except (TypeError, ValueError, OverflowError, OSError):  # NaN, 1e300: not a time, shown as it is
            return f"{number(ts)} (not a time)"

    lines = [
        f"id:        {record['id']}",
        f"name:      {visible(record['name'])}",
        f"state:     {record['state']}",
        f"progress:  {number(record.get('percent') or 0, '.1f')}%  {visible(record.get('message') or '')}".rstrip(),
        f"created:   {when(record.get('created'))}",
        f"started:   {when(record.get('started'))}",
        f"finished:  {when(record.get('finished'))}",
        f"elapsed:   {duration(elapsed(record))}",
        f"pid:       {visible(record.get('pid') or '-')}",
        f"settings:  {visible(record.get('settings')) if record.get('settings') is not None else '-'}",
    ]
    attempt = attempt_text(record)
    if attempt is not None:
        lines.append(f"attempt:   {attempt}")
    if record.get("after"):
        lines.append(f"after:     {', '.join(str(i)[:8] for i in record['after'])}")
    note = stall_note(record)
    if note is not None:
        lines.append(f"stalled:   {note}")
    if record.get("cancel_requested"):
        lines.append("cancel:    requested")
    if record.get("peak_memory") is not None:
        from nbbgtask.core.limits import format_bytes

        lines.append(f"peak memory: {visible(format_bytes(record['peak_memory']))} (USS, children included)")
    if record.get("limits"):
        limits = record["limits"]
        lines.append(visible(f"limits:    timeout={limits.get('timeout')} memory={limits.get('memory')}"))
    if record.get("error"):
        lines.append(f"error:     {visible(record['error'])}")
    if record.get("traceback"):  # a block of its own, each of its lines indented
        body = visible_lines(record["traceback"]).rstrip().replace("\t", "    ")
        lines.append("traceback:\n" + "\n".join("  " + line for line in body.split("\n")))
    return "\n".join(lines)
