"""What the server extension reads from and asks of nbbgtask, for one home folder: `Tasks`.

The one module of the server that imports nbbgtask's private modules (listed below, in one
place, so that a move of them is re-pointed here only); every other module of the server goes
through `Tasks`.  Everything here blocks (files, processes): the handlers call it from threads.
Records leave as `public` JSON only: never a secret, a setting or an internal field.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nbbgtask as bg

# -- nbbgtask's private modules: every import of one by the server is here ----------------------
from nbbgtask.backends import for_record, read_record, reconcile
from nbbgtask.core.config import default_home, ensure_home
from nbbgtask.core.procs import same_process
from nbbgtask.core.trust import valid_id
from nbbgtask.store.files import log_path
from nbbgtask.store.store import Store, store_for
from nbbgtask.store.tail import Tail, last_lines
from nbbgtask.task.resources import read_tree

__all__ = [
    "LOG_BYTES",
    "LOG_LINES",
    "LOG_MAX_LINES",
    "STATES",
    "Tasks",
    "public",
    "valid_id",
]

#: the states a listing can ask for (the public contract's, in the order a task goes through them)
STATES = ("waiting", "queued", "running", "complete", "failed", "cancelled")
_FINAL = frozenset(("complete", "failed", "cancelled"))
#: the fields of a record that leave the server, besides ``elapsed`` and ``resources``
FIELDS = (
    "id", "name", "state", "percent", "message", "created", "started", "finished", "error",
    "start_method", "pid", "host", "cancel_requested",
)
#: a log's tail: this many lines unless asked, at most `LOG_MAX_LINES`, and never more than
#: `LOG_BYTES` bytes of the log's end (a log of one endless line is not read whole)
LOG_LINES = 200
LOG_MAX_LINES = 5000
LOG_BYTES = 256 * 1024
#: a running task's CPU and memory are read again after this many seconds
RESOURCES_EVERY = 2.0
#: and its USS (which costs ten times the rest: the kernel sums it page by page) after this many
USS_EVERY = 10.0


def key_of(record: Mapping[str, Any]) -> tuple[float, str]:
    """Where a task sits in a listing: newest first by creation, then by id (as `bg.tasks`)."""
    return (record["created"], record["id"])


def _seconds(value: Any) -> float | None:
    return None if value is None else float(value)


def public(record: Mapping[str, Any], resources: Mapping[str, Any] | None = None, now: float | None = None) -> dict[str, Any]:
    """A record as the REST API shows it: `FIELDS`, ``elapsed`` (seconds run, so far or in all;
    ``None`` before it started) and ``resources`` (a running local task's CPU and memory)."""
    out = {field: record.get(field) for field in FIELDS}
    for field in ("created", "started", "finished"):
        out[field] = _seconds(out[field])
    out["percent"] = float(out["percent"] or 0.0)
    out["message"] = out["message"] or ""
    out["cancel_requested"] = bool(out["cancel_requested"])
    started = out["started"]
    end = out["finished"] or (time.time() if now is None else now)
    out["elapsed"] = None if started is None else max(0.0, end - started)
    out["resources"] = None if resources is None else {k: resources.get(k) for k in ("cpu_percent", "rss", "uss")}
    return out


class Tasks:
    """The tasks of one home folder, as the server sees them.

    ``configured``: the home the server was configured with (``c.Nbbgtask.home``), or ``None``
    for ``$NBBGTASK_HOME`` or the library's default.  The home is checked as the library checks
    it (`bg.HomeError`, naming the path and what is wrong) on every call, so that a home fixed
    while the server runs is used from then on, and one spoiled is refused from then on.
    """

    def __init__(self, configured: str | None) -> None:
        self.configured = configured
        #: task id -> (time.monotonic() when read, (pid, pid_started), figures, when its USS was read)
        self._readings: dict[str, tuple[float, tuple[Any, Any], dict[str, Any] | None, float]] = {}
        self._readings_lock = threading.Lock()

    # -- the home and its store -----------------------------------------------------------------

    def home(self) -> Path:
        """The home folder, checked now (made, 0700, if missing); `bg.HomeError` if it is not one."""
        path = Path(self.configured).expanduser() if self.configured else default_home()
        return ensure_home(path)

    def store(self) -> Store:
        return store_for(self.home())

    # -- records ----------------------------------------------------------------------------------

    def get(self, task_id: str) -> dict[str, Any]:
        """A task's record, brought up to date (a task whose process died ends "failed");
        `bg.TaskNotFound` if the store has none."""
        home = self.home()
        record = read_record(home, task_id)
        if record is None:
            raise bg.TaskNotFound(f"no task {task_id} in the store at {home}")
        return record

    def live(self, check: bool = True) -> list[dict[str, Any]]:
        """Every queued or running task's record, brought up to date (``check``: each one whose
        process died is ended "failed"; else the records as the store has them)."""
        store = self.store()
        return [reconcile(store, record) for record in store.live()] if check else store.live()

    def page(
        self, state: str | None, name: str | None, limit: int, before: str | None
    ) -> tuple[list[dict[str, Any]], str | None, int]:
        """Tasks newest first (by creation, then id), in ``state``, named ``name``, older than the
        task ``before``: ``(at most limit records, the id to pass as before for the next page or
        None, how many tasks run now)``.  The live tasks are read whole (they are few); the
        finished ones from the history's index."""
        store = self.store()
        cursor: tuple[float, str] | None = None
        if before is not None:
            found = store.get(before)
            if found is None:
                raise bg.TaskNotFound(f"before: no task {before} in the store (pruned?); start from the first page")
            cursor = key_of(found)
        live = [reconcile(store, record) for record in store.live()]  # before the history: a task
        # that ends in between is then found there.  The finished ones come from the store's index
        # of each history shard (a few small files, in a server just started too).
        finished: list[dict[str, Any]] = []
        if state is None or state in _FINAL:
            finals = None if state is None else {state}
            newest = store.newest_finished(limit + 1, finals, name, before=cursor)
            if newest is None:  # the index cannot tell: read the history (rare: a foreign file)
                newest = sorted(
                    (r for r in store.history() if (finals is None or r["state"] in finals)
                     and (name is None or r["name"] == name) and (cursor is None or key_of(r) < cursor)),
                    key=key_of, reverse=True,
                )[: limit + 1]
            finished = [dict(r) for r in newest]
        ended = {r["id"] for r in finished}
        live = [r for r in live if r["state"] not in _FINAL and r["id"] not in ended]
        running = sum(1 for r in live if r["state"] == "running")
        shown = [
            r for r in live
            if (state is None or r["state"] == state) and (name is None or r["name"] == name)
            and (cursor is None or key_of(r) < cursor)
        ]
        records = sorted(shown + finished, key=key_of, reverse=True)[: limit + 1]
        following = records[limit - 1]["id"] if len(records) > limit else None
        return records[:limit], following, running

    def newest_finished(self, count: int) -> list[dict[str, Any]] | None:
        """The ``count`` tasks that ended last, newest end first (``None``: the store cannot tell
        cheaply)."""
        return self.store().newest_finished(count, by="finished")

    def version(self) -> Any:
        """Changes whenever the store is written (two stats): read the records only then."""
        return self.store().version()

    # -- one task's process and files -------------------------------------------------------------

    def _status(self, record: dict[str, Any]) -> bg.TaskStatus:
        return bg.TaskStatus(dict(record), self.home())

    @staticmethod
    def measurable(record: Mapping[str, Any]) -> bool:
        """A running task of this machine whose process is known: `resources` can read it."""
        return for_record(dict(record)).process_here(dict(record)) is not None

    async def resources_in(self, record: Mapping[str, Any], call: Any) -> dict[str, Any] | None:
        """`resources`, read in a thread only when the processes must be read: ``call(fn, arg)``
        runs ``fn(arg)`` in one (the caller's executor)."""
        if not self.measurable(record):
            return None  # no need of a thread to say so
        fresh, figures = self.fresh_resources(record)
        if fresh:  # read less than RESOURCES_EVERY ago: no thread either
            return figures
        result: dict[str, Any] | None = await call(self.resources, record)
        return result

    def fresh_resources(self, record: Mapping[str, Any]) -> tuple[bool, dict[str, Any] | None]:
        """``(True, figures)`` when this task's process was read less than `RESOURCES_EVERY`
        seconds ago (nothing is read: cheap enough for the event loop), else ``(False, None)``."""
        proc = (record.get("pid"), record.get("pid_started"))
        with self._readings_lock:
            last = self._readings.get(record["id"])
        if last is not None and last[1] == proc and time.monotonic() - last[0] < RESOURCES_EVERY:
            return True, last[2]
        return False, None

    def resources(self, record: Mapping[str, Any]) -> dict[str, Any] | None:
        """A running task of this machine: its CPU % and memory, as ``status.resources()`` gives
        them, read again at most every `RESOURCES_EVERY` seconds (its USS every `USS_EVERY`
        seconds, the last one shown in between); else ``None``.  The process is the one
        ``record`` names (a record just read: the store is not read again)."""
        process = for_record(dict(record)).process_here(dict(record))
        if process is None:
            return None
        fresh, figures = self.fresh_resources(record)
        if fresh:
            return figures
        with self._readings_lock:
            last = self._readings.get(record["id"])
        now = time.monotonic()
        uss = None  # (the USS last read, when) if that is recent enough to show again
        if last is not None and last[1] == process and last[2] is not None and now - last[3] < USS_EVERY:
            uss = (last[2].get("uss"), last[3])
        figures = read_tree(*process, uss=uss is None, settle=0.2) if same_process(*process) else None
        if figures is not None and uss is not None:
            figures["uss"] = uss[0]
        with self._readings_lock:
            if len(self._readings) > 4096:
                self._readings.clear()
            self._readings[record["id"]] = (time.monotonic(), process, figures, now if uss is None else uss[1])
        return figures

    def cancel(self, task_id: str) -> tuple[bool, dict[str, Any]]:
        """Stop the task (``status.cancel()``); whether it was still running, and its record.
        `bg.NbbgtaskError` if the cancel could not be confirmed (its process not proved the task's)."""
        status = self._status(self.get(task_id))
        cancelled = status.cancel()
        return cancelled, status.to_dict()

    def stack(self, task_id: str) -> str:
        """The running task's Python stack (``status.stack()``); `bg.NbbgtaskError` saying why
        there is none (it has ended, is queued, runs elsewhere, or did not answer)."""
        return self._status(self.get(task_id)).stack()

    def log(self, task_id: str, lines: int) -> dict[str, Any]:
        """The last ``lines`` lines of the task's log, from at most its last `LOG_BYTES` bytes:
        ``{"text": str, "truncated": bool}`` (``truncated``: the log holds more than that)."""
        self.get(task_id)
        path = log_path(self.home(), task_id)
        try:
            text = last_lines(path, lines, LOG_BYTES)
            size = os.stat(path).st_size
        except FileNotFoundError:
            return {"text": "", "truncated": False}
        return {"text": text, "truncated": len(text.encode("utf-8", "surrogateescape")) < size}

    def outputs(self, task_id: str) -> list[dict[str, Any]]:
        """What the task's bar shows under it (nbformat outputs): the tail of what it printed,
        and what it displayed, in order, bounded as the bar bounds them."""
        record = self.get(task_id)
        tail = Tail(self.home(), record["id"], record["id"][:8])
        tail.read()
        return tail.outputs()
