"""The kernel's check of the events a task on Dask sends (after `nbbgtask.dask.wire` has opened
them): every field checked before any reaches the store, and each event applied once, though the
scheduler sends them all again to a new kernel."""

from __future__ import annotations

import math
from typing import Any

from nbbgtask.core.states import State
from nbbgtask.core.trust import visible

__all__ = ["applied_once", "event_fault"]


#: at most this much text in a message or a log event; more is not what a worker sends
_MAX_TEXT = 16 * 1024 * 1024
#: what each kind of event may carry, and what each field must be
_EVENT_FIELDS: dict[str, dict[str, Any]] = {
    "started": {"pid": "pid", "host": "text", "worker": "text"},
    "progress": {
        "percent": "percent",
        "message": "text",
        "reported": "time",
        "pid": "pid",
        "pid_started": "time",
        "limit_error": "text?",
        # a task's attempts (`nbbgtask.task.attempts`): the keeper's reports between them
        "attempt": "count",
        "attempts": "attempts",
        "started": "time",
        "retry_at": "time?",
    },
    "log": {"text": "text"},
    "output": {"line": "text"},
    "final": {
        "state": "final",
        "finished": "time",
        "error": "text?",
        "traceback": "text?",
        "has_result": "bool",
        "result_type": "text",
        "result_inline": "text",
        "cancel_requested": "bool",
        "percent": "percent",
        "message": "text",
        "result": "bytes",
        "pid": "pid",
        "pid_started": "time",
        "peak_memory": "size?",
        "attempt": "count",
        "attempts": "attempts",
        "retry_at": "time?",
    },
}
#: what a progress event may set in the record
_PROGRESS = ("percent", "message", "reported", "limit_error", "attempt", "attempts", "started", "retry_at")
#: the most attempts a record keeps
_MAX_ATTEMPTS = 10_000
_ATTEMPT_KEYS = {"attempt": "count", "started": "time", "finished": "time", "state": "final", "error": "text?"}
_REQUIRED_FIELDS = {"started": ("pid", "worker"), "log": ("text",), "output": ("line",), "final": ("state",)}


def applied_once(doc: dict[str, Any], msg: dict[str, Any]) -> dict[str, Any] | None:
    """The fields an event sets in its live record ``doc``, with its mark; ``None`` if an event of
    its run numbered as high was applied already (by this kernel or an earlier one)."""
    marks: dict[str, int] = dict(doc.get("event_marks") or {})
    run, seq = msg["run"], msg["seq"]
    if seq <= marks.get(run, 0):
        return None
    kind = msg["kind"]
    fields: dict[str, Any] = {}
    if kind == "started":
        fields = {"state": State.RUNNING.value, "pid": msg["pid"], "worker": msg["worker"]}
        if any(other != run for other in marks):
            fields["message"] = f"restarted on {msg['worker']}: the worker it ran on was lost"
        else:
            fields["started"] = msg["time"]
    elif kind == "progress":
        fields = {k: msg[k] for k in _PROGRESS if k in msg}
    marks[run] = seq
    return {**fields, "event_marks": marks}


def _field_ok(kind: str, value: Any) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "pid":
        return isinstance(value, int) and not isinstance(value, bool) and value > 0
    if kind == "time":
        return number
    if kind == "time?":
        return value is None or number
    if kind == "count":
        return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= _MAX_ATTEMPTS
    if kind == "attempts":
        return isinstance(value, list) and len(value) <= _MAX_ATTEMPTS and all(
            isinstance(a, dict) and set(a) <= set(_ATTEMPT_KEYS) and all(_field_ok(_ATTEMPT_KEYS[k], v) for k, v in a.items())
            for a in value
        )
    if kind == "percent":
        return number and 0 <= value <= 100
    if kind in ("text", "text?"):
        return (value is None and kind == "text?") or (isinstance(value, str) and len(value) <= _MAX_TEXT)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "size?":
        return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)
    if kind == "bytes":
        return isinstance(value, bytes)
    if kind == "final":
        return value in {s.value for s in State if s.is_final}
    if kind == "run":
        return isinstance(value, str) and len(value) == 16 and all(c in "0123456789abcdef" for c in value)
    if kind == "seq":
        return isinstance(value, int) and not isinstance(value, bool) and value > 0
    return False


def event_fault(msg: dict[str, Any]) -> str | None:
    """What is wrong with an opened event, or ``None``: every field is checked before any
    reaches the store (a bad one is reported, never stored)."""
    kind = msg.get("kind")
    if not isinstance(kind, str) or kind not in _EVENT_FIELDS:
        return f"unknown kind {visible(repr(kind))[:40]}"
    for field in ("time", "run", "seq"):
        if not _field_ok(field, msg.get(field)):
            return f"no valid {field}"
    allowed = _EVENT_FIELDS[kind]
    for field in _REQUIRED_FIELDS.get(kind, ()):
        if field not in msg:
            return f"a {kind} event without {field!r}"
    for field, value in msg.items():
        if field in ("kind", "time", "run", "seq"):
            continue
        if field not in allowed:
            return f"a {kind} event with an unknown field {visible(field)[:40]!r}"
        if not _field_ok(allowed[field], value):
            return f"a {kind} event with a bad {field!r} ({visible(repr(value))[:40]})"
    return None
