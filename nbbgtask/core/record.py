"""The task record: the one definition of what the store keeps about a task.

Every part that makes, checks or changes a record uses this module: the API makes one with
`new_record`, the store checks each one it parses with `fault` and applies live updates with
`merge`, and each backend adds only the fields listed here.
"""

from __future__ import annotations

import math
import os
import secrets
import time
from collections.abc import Mapping
from typing import Any, TypedDict

from nbbgtask.core.states import State
from nbbgtask.core.trust import valid_id

__all__ = [
    "TaskRecord", "new_record", "new_task_id", "fault", "merge", "public", "FINAL_FIELDS", "RESULT_FIELDS",
    "PUBLIC_FIELDS",
]


class TaskRecord(TypedDict, total=False):
    """One task, as stored (JSON).  Times are seconds since the epoch (UTC)."""

    # -- given when the task is made (required: id, name, state, created) ----------------------
    id: str  #: 32 hex digits, unguessable
    name: str
    settings: dict[str, Any] | None  #: JSON, readable by the task and any later lookup
    state: str  #: a `State` value
    created: float
    #: the process that made the task (for a queued task: the one that will start it)
    owner_pid: int
    owner_started: float | None
    #: the machine of that process, for a task that waits in its memory (``after=``)
    owner_host: str | None
    # -- where and how it runs (from the backend's `placement`) -------------------------------
    backend: str  #: "local" or "dask"
    start_method: str  #: "fork", "forkserver", "spawn" or "dask"
    start_reason: str  #: why that one (the first line of the task's log says it too)
    #: the process that reaps the task's process and records how it ended if the task could not,
    #: when that is not the owner (the fork server)
    reaper_pid: int
    reaper_started: float | None
    host: str | None  #: the machine of a local task's process; None on a cluster
    dask_address: str  #: the scheduler of a Dask task
    worker: str  #: the Dask worker it runs on
    #: a Dask task's key for its events (hex), while it is live (`nbbgtask.dask.wire.seal`)
    event_key: str | None
    #: per run of a Dask task (its id), the number of the last event of it applied
    event_marks: dict[str, int] | None
    # -- while it runs -------------------------------------------------------------------------
    started: float | None
    percent: float  #: 0 to 100
    message: str
    #: when percent or message last changed (written with that change); long ago: "stalled"
    reported: float | None
    pid: int | None  #: the task's process; with pid_started, tells it from a reused pid
    pid_started: float | None
    cancel_requested: bool
    #: the task's limits (`nbbgtask.core.limits.Limits`): {"timeout": seconds or None, "memory": bytes or None};
    #: ``started`` + ``timeout`` is its deadline, which any reader enforces if the task did not
    limits: dict[str, Any] | None
    #: the machine's OOM kill count when the task started (/proc/vmstat): a SIGKILL while it rose
    #: is taken for the OOM killer's
    oom_kills: int | None
    #: which limit the task went past, written by the task before it is stopped (in case it has
    #: to be killed, so whoever records that can say why)
    limit_error: str | None
    # -- retries (`nbbgtask.core.retry`) and dependencies -------------------------------------
    #: how many times a failed attempt may be retried (0 or absent: none)
    retries: int
    #: the attempt running now, or the last one: 1 for the first, 2 for the first retry, …
    attempt: int
    #: each attempt that ended: {"attempt", "started", "finished", "state", "error"}
    attempts: list[dict[str, Any]]
    #: when the next attempt starts, while the task waits to retry
    retry_at: float | None
    #: the ids of the tasks it waits for (``after=``, and `TaskStatus` arguments)
    after: list[str]
    # -- once it ends --------------------------------------------------------------------------
    finished: float | None
    error: str | None  #: one line, "ValueError: bad spline"
    traceback: str | None
    has_result: bool
    result_type: str  #: "module.qualname" of the return value
    result_inline: str  #: a small pickled result, base64; a larger one has a file of its own
    #: the highest memory (USS, children included) the task's process tree was seen to use, bytes
    peak_memory: int | None


#: what a task's end may set (its final report, or a backend that saw how it ended)
FINAL_FIELDS = (
    "state", "percent", "message", "error", "traceback", "has_result", "result_type", "result_inline",
    "finished", "cancel_requested", "peak_memory", "attempt", "attempts",
)
#: the fields that say whether and where a result is
RESULT_FIELDS = ("has_result", "result_type", "result_inline")
#: what a task's record shows to anyone who lists tasks (``nbbgtask list --json``): no settings,
#: no result, no keys, no internal bookkeeping
PUBLIC_FIELDS = (
    "id", "name", "state", "percent", "message", "created", "started", "finished", "error", "start_method",
    "pid", "host",
)

_NUMBER = (int, float)
#: what a record's fields must be, where present (``None`` is allowed for all but `_REQUIRED`)
_TYPES: dict[str, tuple[type, ...]] = {
    "id": (str,),
    "name": (str,),
    "state": (str,),
    "created": _NUMBER,
    "started": _NUMBER,
    "finished": _NUMBER,
    "percent": _NUMBER,
    "message": (str,),
    "reported": _NUMBER,
    "pid": (int,),
    "pid_started": _NUMBER,
    "owner_pid": (int,),
    "owner_started": _NUMBER,
    "reaper_pid": (int,),
    "reaper_started": _NUMBER,
    "error": (str,),
    "traceback": (str,),
    "settings": (dict,),
    "result_inline": (str,),
    "limits": (dict,),
    "peak_memory": (int,),
    "event_key": (str,),
    "event_marks": (dict,),
    "retries": (int,),
    "attempt": (int,),
    "attempts": (list,),
    "retry_at": _NUMBER,
    "after": (list,),
}
_REQUIRED = ("id", "name", "state", "created")
_PIDS = ("pid", "owner_pid", "reaper_pid")
_STATES = frozenset(s.value for s in State)
#: live states in the order a task goes through them: an update never moves a record back
_RANK = {State.WAITING: -1, State.QUEUED: 0, State.RUNNING: 1}


def new_task_id() -> str:
    return secrets.token_hex(16)


def new_record(
    name: str,
    settings: dict[str, Any] | None,
    placement: Mapping[str, Any],
    owner_started: float | None,
) -> TaskRecord:
    """A queued task's record; ``placement`` is the backend's (`backend`, `start_method`, `host`…)."""
    record: TaskRecord = {
        "id": new_task_id(),
        "name": name,
        "settings": settings,
        "state": State.QUEUED.value,
        "percent": 0.0,
        "message": "",
        "created": time.time(),
        "started": None,
        "finished": None,
        "pid": None,
        "pid_started": None,
        "owner_pid": os.getpid(),
        "owner_started": owner_started,
        "cancel_requested": False,
        "error": None,
        "traceback": None,
        "has_result": False,
    }
    record.update(placement)  # type: ignore[typeddict-item]
    return record


def fault(key: str, record: Any) -> str | None:
    """Why ``record`` (stored under ``key``) is not a task record, or ``None`` if it is one."""
    if not isinstance(record, dict):
        return f"record {key!r} is a {type(record).__name__}, not an object"
    for field in _REQUIRED:
        if record.get(field) is None:
            return f"record {key!r} has no {field!r}"
    for field, kinds in _TYPES.items():
        value = record.get(field)
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
            return f"record {key!r} has a {type(value).__name__} for {field!r}"
    if record["id"] != key:
        return f"record {key!r} says its id is {record['id']!r}"
    if not valid_id(key):  # ids become file names: one that is not 32 hex digits never does
        return f"record {key[:80]!r} has an id that is not 32 hex digits"
    for field in _PIDS:
        if record.get(field) is not None and record[field] <= 0:
            return f"record {key!r} has {field} {record[field]!r}, not a process id"
    if record["state"] not in _STATES:
        return f"record {key!r} has an unknown state {record['state']!r}"
    return None


def merge(doc: dict[str, Any], fields: Mapping[str, Any]) -> None:
    """Apply ``fields`` to a live record without ever moving its state backwards, or taking back
    a cancel request.  A final state is not a merge: the store's ``finalize`` writes it."""
    if "state" in fields and State(fields["state"]).is_final:
        raise ValueError("final states are written by Store.finalize")
    for key, value in fields.items():
        if key == "state" and _RANK[State(value)] < _RANK[State(doc["state"])]:
            continue
        if key == "cancel_requested" and doc.get("cancel_requested"):
            continue
        doc[key] = value


def public(record: Mapping[str, Any]) -> dict[str, Any]:
    """The `PUBLIC_FIELDS` of ``record``, each present (``None`` where missing); a number that JSON
    cannot hold (NaN, an infinity) is ``None`` too, so the result always dumps as strict JSON."""
    out = {}
    for field in PUBLIC_FIELDS:
        value = record.get(field)
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[field] = value
    return out
