"""The ways a task runs, behind one seam: `Backend`, and the one place that picks one.

A backend places a new task (the record fields that say where and how it runs), checks that the
job can reach it, starts it, and answers for its records afterwards: whether a live record's
task is really still there (`reconcile`), whether a vanished one may come back, and how to
cancel it.  The local backend runs processes of this machine (by fork or spawn: its start
methods, `nbbgtask.local.launcher.STARTERS`); the Dask backend sends tasks to a cluster.  Which one starts new
tasks is `bg.configure(backend=...)`'s; which one answers for a record is the record's own
``backend`` field, so a task is followed the same way whoever started it.

Each backend is a module named in `MODULES`, imported the first time a task of its kind is
started or read (``import nbbgtask`` loads no Dask code): it provides ``active()``, the backend
that starts new tasks once configured, and ``records(record)``, what answers for a record.
Nothing outside a backend asks which backend a task has: it asks the seam.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from nbbgtask.core import config as _config
from nbbgtask.core.errors import StoreError, TaskNotFound
from nbbgtask.core.procs import HOST, same_process
from nbbgtask.core.states import State
from nbbgtask.store.store import Store, store_for
from nbbgtask.task.runner import Job

__all__ = ["Backend", "Records", "current", "for_record", "reconcile", "may_still_report", "read_record", "cancel", "connect"]


class Records(Protocol):
    """What answers for the records of one backend's tasks (no connection to it needed)."""

    #: the record's ``backend`` field for the tasks it runs
    kind: str

    def reconcile(self, store: Store, record: dict[str, Any]) -> dict[str, Any]:
        """A live record whose task is gone ends "failed" (or "cancelled", if asked); the record to show."""

    def may_still_report(self, record: dict[str, Any]) -> bool:
        """For a live record gone from the store: may its task still write it again?"""

    def cancel(self, home: Path, record: dict[str, Any]) -> dict[str, Any] | None:
        """Stop the task of ``record`` (which already has ``cancel_requested``); its final record."""

    def stack(self, home: Path, record: dict[str, Any], who: str) -> str:
        """The running task's Python stack, every thread, or `NbbgtaskError` saying why not
        (``who`` names the task in that message)."""

    def process_here(self, record: dict[str, Any]) -> tuple[int, float | None] | None:
        """The process of this machine that runs the task (pid, start time), if it runs here
        now: what its CPU and memory are read from."""


class Backend(Records, Protocol):
    """A way tasks run: places, checks and starts new tasks, and answers for their records."""

    #: where its tasks run, for messages ("the cluster")
    destination: str

    def placement(self) -> dict[str, Any]:
        """The fields of a new record that say where and how the task runs (``backend``,
        ``start_method``, ``host``, …)."""

    def inherits_memory(self) -> bool:
        """A task sees the caller's objects as they are (fork), rather than copies sent to it."""

    def prepare(self, job: Job) -> None:
        """Raise a clear `TypeError` in the caller, before anything is stored, if ``job`` cannot
        reach the place it runs."""

    def submit(self, job: Job) -> None:
        """Record the task and start or queue it; its record exists when this returns."""


#: backend kind (`bg.configure(backend=...)`, a record's ``backend``) -> the module that runs it
MODULES = {"local": "nbbgtask.local.backend", "dask": "nbbgtask.dask.backend"}


def module(kind: str) -> ModuleType:
    """The module of backend ``kind``, imported on first use."""
    try:
        name = MODULES[kind]
    except KeyError:
        raise StoreError(f"a task record names an unknown backend {kind!r}: it was written by another program") from None
    return importlib.import_module(name)


def current() -> Backend:
    """The backend that starts new tasks, as `bg.configure` set it."""
    backend: Backend = module(_config.settings().backend).active()
    return backend


def for_record(record: dict[str, Any]) -> Records:
    """The backend that answers for ``record``'s task."""
    records: Records = module(record.get("backend") or "local").records(record)
    return records


def reconcile(store: Store, record: dict[str, Any]) -> dict[str, Any]:
    """``record`` brought up to date (a task whose process is gone is ended).  A reconcile that
    cannot write its finding (a full disk) answers with the record as it is on disk: a read
    never fails for want of room, and the next read once there is room records the end."""
    if State(record["state"]).is_final:
        return record
    if record["state"] == State.WAITING.value:
        return _orphaned(store, record)
    records = for_record(record)
    try:
        return records.reconcile(store, record)
    except StoreError:  # it cannot be written now (a full disk): answer with what is on disk
        return record


def _orphaned(store: Store, record: dict[str, Any]) -> dict[str, Any]:
    """A waiting task lives in the memory of the process that made it (`nbbgtask.api.after`): if
    that process has gone (killed, so it could not say so itself), the task can never start."""
    owner = record.get("owner_pid")
    if owner is None or record.get("owner_host") != HOST or same_process(owner, record.get("owner_started")):
        return record
    reason = f"the process that made it ({owner}) exited before its prerequisites completed"
    fields = {"state": State.CANCELLED.value, "error": reason, "message": reason, "finished": time.time()}
    return store.finalize(record["id"], fields) or record


def may_still_report(record: dict[str, Any]) -> bool:
    return not State(record["state"]).is_final and for_record(record).may_still_report(record)


def read_record(home: Path, task_id: str) -> dict[str, Any] | None:
    """The task's record, reconciled; ``None`` if the store has none."""
    store = store_for(home)
    record = store.get(task_id)
    return None if record is None else reconcile(store, record)


def cancel(home: Path, task_id: str) -> tuple[bool, dict[str, Any] | None]:
    """Ask the task to stop and stop it; ``(it was still live, its final record)``."""
    store = store_for(home)
    record = read_record(home, task_id)
    if record is None:
        raise TaskNotFound(f"no task {task_id} in the store at {home}")
    if State(record["state"]).is_final:
        return False, record
    record = store.patch(task_id, {"cancel_requested": True})
    if record is None:  # it ended meanwhile
        return False, read_record(home, task_id)
    if record["state"] == State.WAITING.value:  # nothing runs yet: its waiter drops it when it sees this
        final = store.finalize(task_id, {"state": State.CANCELLED.value, "finished": time.time()})
        return bool(final and final["state"] == State.CANCELLED.value), final
    final = for_record(record).cancel(home, record)
    return bool(final and final["state"] == State.CANCELLED.value), final


def connect(address: str | None, client: Any, home: Path) -> Any:
    """Connect the Dask backend now (so an unreachable scheduler is reported by configure); its client."""
    return module("dask").connect(address, client, home).client
