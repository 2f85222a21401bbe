"""Tasks that wait for other tasks (``after=``, and `TaskStatus` arguments): their prerequisites
checked at the call, the waiting tasks this process holds, and starting each when all its
prerequisites have completed, or ending it "cancelled" when one failed or was cancelled.

Waiting tasks belong to the process that made them, as queued ones do: their jobs (the function,
its arguments) live in its memory.  One thread here follows them: it is woken at once by an end
this process records or reaps (`nbbgtask.store.ends`), and else looks every `POLL` seconds (a
``stat`` per prerequisite).  If the process exits, its waiting tasks end "cancelled" saying so
(at exit, or by whoever reads them later: `nbbgtask.backends.reconcile`).
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from nbbgtask.api.status import TaskStatus
from nbbgtask.core.errors import TaskNotFound
from nbbgtask.core.forks import renew_in_child
from nbbgtask.core.format import waiting_text
from nbbgtask.core.procs import HOST
from nbbgtask.core.states import State
from nbbgtask.store import ends
from nbbgtask.store.store import Store, store_for
from nbbgtask.task.results import replaced

__all__ = ["prerequisites", "verdict", "hold", "end_cancelled", "waiting_here", "POLL"]

#: seconds between looks at the prerequisites of waiting tasks when no end woke the thread
POLL = 0.02
#: at most this much of a cancel's reason is kept (a long chain of cancels names each step)
_REASON_MAX = 500


def _task_id(value: Any) -> str | None:
    return value.id if isinstance(value, TaskStatus) else None


def prerequisites(
    after: Any, args: tuple[Any, ...], kwargs: dict[str, Any], home: Path
) -> tuple[tuple[Any, ...], dict[str, Any], list[str]]:
    """The arguments with each `TaskStatus` in them (one level deep) replaced by a stand-in for
    its result, and the ids of every prerequisite (those and ``after``'s), checked: an unknown
    id raises `TaskNotFound`, a cycle `ValueError`."""
    args, kwargs, ids = replaced(args, kwargs, _task_id)
    if after is not None:
        items: Iterable[Any] = (after,) if isinstance(after, (TaskStatus, str)) else after
        try:
            items = list(items)
        except TypeError:
            raise TypeError(f"after must be a list of TaskStatus (or task ids), got {type(after).__name__}") from None
        for item in items:
            task_id = item.id if isinstance(item, TaskStatus) else item
            if not isinstance(task_id, str):
                raise TypeError(f"after= takes TaskStatus handles (or task ids), got a {type(item).__name__}")
            if task_id not in ids:
                ids.append(task_id)
    if ids:
        _check(store_for(home), ids, home)
    return args, kwargs, ids


def _check(store: Store, ids: list[str], home: Path) -> None:
    """Every prerequisite exists, and following ``after`` from them never comes back to a task on
    the way (a new task cannot be its own prerequisite; a cycle could only come from records
    written by hand, and a task in one would wait for ever)."""
    records: dict[str, dict[str, Any] | None] = {}

    def record(task_id: str) -> dict[str, Any] | None:
        if task_id not in records:
            records[task_id] = store.get(task_id)
        return records[task_id]

    for task_id in ids:
        if record(task_id) is None:
            raise TaskNotFound(
                f"a prerequisite names task {task_id!r}, which is not in the store at {home}: pass the "
                f"TaskStatus that bg.run or initiate returned (or its full id)"
            )
    done: set[str] = set()

    def visit(task_id: str, path: list[str]) -> None:
        if task_id in path:
            loop = path[path.index(task_id):] + [task_id]
            names = " → ".join(f"{(record(i) or {}).get('name', '?')} ({i[:8]})" for i in loop)
            raise ValueError(f"these tasks wait for each other in a cycle, so none could ever start: {names}")
        if task_id in done:
            return
        found = record(task_id)
        for parent in (found or {}).get("after") or []:
            if isinstance(parent, str):
                visit(parent, [*path, task_id])
        done.add(task_id)

    for task_id in ids:
        visit(task_id, [])


def _reason(record: dict[str, Any]) -> str:
    """Why a task cannot start, given the prerequisite ``record`` that failed or was cancelled."""
    how = "failed" if record["state"] == State.FAILED.value else "was cancelled"
    why = record.get("error")
    text = f"prerequisite {record['name']} ({record['id'][:8]}) {how}" + (f" ({why})" if why else "")
    return text if len(text) <= _REASON_MAX else text[: _REASON_MAX - 1] + "…"


def verdict(store: Store, ids: list[str]) -> tuple[str, str]:
    """``("start", "")`` when every prerequisite has completed, ``("wait", words)`` while some
    have not, ``("cancel", reason)`` once one failed or was cancelled (or is gone)."""
    pending: list[tuple[str, str]] = []
    for task_id in ids:
        record = store.get(task_id)
        if record is None:
            return "cancel", f"prerequisite {task_id[:8]} is gone from the store (pruned)"
        state = State(record["state"])
        if state in (State.FAILED, State.CANCELLED):
            return "cancel", _reason(record)
        if state is not State.COMPLETE:
            pending.append((record["name"], task_id))
    if pending:
        return "wait", waiting_text(pending)
    return "start", ""


def end_cancelled(store: Store, task_id: str, reason: str) -> dict[str, Any] | None:
    """End a task that never started "cancelled", saying why (in its error, and its message)."""
    return store.finalize(
        task_id, {"state": State.CANCELLED.value, "error": reason, "message": reason, "finished": time.time()}
    )


@dataclasses.dataclass
class _Waiting:
    job: Any
    backend: Any
    after: list[str]
    #: what its bar says now (written again only when it changes)
    words: str = ""

    @property
    def task_id(self) -> str:
        return str(self.job.task_id)


class _Waiter:
    """The waiting tasks of this process, and the thread that starts or cancels them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tasks: dict[str, _Waiting] = {}
        self.thread: threading.Thread | None = None
        self.wake = threading.Event()
        self._atexit = False

    def hold(self, job: Any, backend: Any, after: list[str], words: str) -> None:
        job.record["owner_host"] = HOST  # whose memory it waits in (`nbbgtask.backends.reconcile`)
        store_for(job.home).insert(job.record)
        with self.lock:
            self.tasks[job.task_id] = _Waiting(job, backend, after, words)
            if not self._atexit:
                atexit.register(self.abandon)
                ends.listen(self._on_end)
                ends.watch(self._on_end)
                self._atexit = True
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="nbbgtask-after", daemon=True)
                self.thread.start()
        self.wake.set()

    def _on_end(self, home: Path, record: Any) -> None:
        self.wake.set()

    def _run(self) -> None:
        while True:
            self.wake.wait(POLL)
            self.wake.clear()
            with self.lock:
                waiting = list(self.tasks.values())
                if not waiting:
                    self.thread = None
                    return
            for entry in waiting:
                try:
                    if self._step(entry):
                        self.wake.set()  # an end here may free or cancel another: look again at once
                except Exception as exc:  # a full disk, say: reported, and looked at again next round
                    import warnings

                    try:
                        warnings.warn(f"nbbgtask could not start or cancel a waiting task: {exc}", RuntimeWarning, stacklevel=1)
                    except Exception:
                        pass

    def _drop(self, task_id: str) -> bool:
        with self.lock:
            return self.tasks.pop(task_id, None) is not None

    def _step(self, entry: _Waiting) -> bool:
        """Start or cancel ``entry`` if its prerequisites say so; ``True`` if it ended or started."""
        store = store_for(entry.job.home)
        if not store.is_live(entry.task_id):  # cancelled (or ended) by someone else
            return self._drop(entry.task_id)
        if any(store.is_live(task_id) for task_id in entry.after):
            return False  # one stat each: most rounds end here
        what, words = verdict(store, entry.after)
        if what == "wait":
            if words != entry.words:
                entry.words = words
                store.patch(entry.task_id, {"message": words})
            return False
        if not self._drop(entry.task_id):
            return False
        if what == "cancel":
            end_cancelled(store, entry.task_id, words)
            return True
        record = store.get(entry.task_id)
        if record is None or State(record["state"]).is_final or record.get("cancel_requested"):
            return True
        job = entry.job
        job.record.update(state=State.QUEUED.value, message="")
        try:
            entry.backend.submit(job)
        except Exception as exc:
            store.finalize(entry.task_id, {
                "state": State.FAILED.value, "error": f"NotStarted: {type(exc).__name__}: {exc}", "finished": time.time(),
            })
        return True

    def abandon(self) -> None:
        """This process exits: its waiting tasks can never start."""
        with self.lock:
            waiting, self.tasks = list(self.tasks.values()), {}
        for entry in waiting:
            end_cancelled(
                store_for(entry.job.home),
                entry.task_id,
                f"the process that made it ({os.getpid()}) exited before its prerequisites completed",
            )

    def waiting_here(self, task_id: str) -> bool:
        with self.lock:
            return task_id in self.tasks


_waiter = _Waiter()


def hold(job: Any, backend: Any, after: list[str], words: str) -> None:
    """Record ``job`` as "waiting" for the tasks ``after`` and start it once they have completed."""
    _waiter.hold(job, backend, after, words)


def waiting_here(task_id: str) -> bool:
    return _waiter.waiting_here(task_id)


def _reset_after_fork() -> None:
    """A task forked from this process starts none of its waiting tasks (this process still will),
    and the lock may have been held by another thread at the fork."""
    global _waiter
    _waiter = _Waiter()


renew_in_child(_reset_after_fork)
