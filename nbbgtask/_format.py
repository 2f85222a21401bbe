"""Plain-text and HTML renderings of a task's progress, shared by the widgets, the magic and the CLI."""

from __future__ import annotations

import html
import time
from typing import Any

__all__ = ["duration", "eta_seconds", "summary", "text_bar", "html_snapshot", "short_id"]


def short_id(task_id: str) -> str:
    return task_id[:8]


def duration(seconds: float | None) -> str:
    """``0:07``, ``12:34``, ``1:02:03``."""
    if seconds is None:
        return "-"
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def elapsed(record: dict[str, Any], now: float | None = None) -> float | None:
    started = record.get("started")
    if started is None:
        return None
    end = record.get("finished") or (now if now is not None else time.time())
    return max(0.0, end - started)


def eta_seconds(record: dict[str, Any], now: float | None = None) -> float | None:
    """Time left at the average rate so far; ``None`` until there is a rate to go by."""
    if record.get("finished") or record.get("state") != "running":
        return None
    spent = elapsed(record, now)
    percent = float(record.get("percent") or 0)
    if not spent or percent <= 0 or percent >= 100:
        return None
    return spent * (100 - percent) / percent


def summary(record: dict[str, Any], now: float | None = None) -> str:
    """``42% · spline 17 of 40 · 0:12 elapsed · ETA 0:17`` (or how it ended)."""
    state = record["state"]
    parts = [f"{float(record.get('percent') or 0):.0f}%"]
    if record.get("message"):
        parts.append(str(record["message"]))
    if state == "failed" and record.get("error"):
        parts.append(str(record["error"]))
    spent = elapsed(record, now)
    if state == "queued":
        parts.append("queued")
    elif state == "running":
        parts.append(f"{duration(spent)} elapsed")
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
    return f"{record['name']} [{short_id(record['id'])}] {text_bar(float(record.get('percent') or 0))} {summary(record)}"


_COLOURS = {"complete": "#2e7d32", "failed": "#c62828", "cancelled": "#757575"}


def html_snapshot(record: dict[str, Any]) -> str:
    """A static picture of the bar, for nbconvert output and front ends without widgets."""
    percent = float(record.get("percent") or 0)
    colour = _COLOURS.get(record["state"], "#1976d2")
    return (
        '<div style="display:flex;align-items:center;gap:0.6em;font-family:sans-serif">'
        f"<b>{html.escape(str(record['name']))}</b>"
        f'<div style="width:40%;background:#eee;height:1em;border-radius:3px">'
        f'<div style="width:{percent:.1f}%;background:{colour};height:100%;border-radius:3px"></div></div>'
        f"<span>{html.escape(summary(record))}</span></div>"
    )
