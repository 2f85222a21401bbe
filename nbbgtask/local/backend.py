"""The local backend: tasks run as processes of this machine, started by this process.

What a task's record means on this machine lives here: which start method a task gets (for
``"auto"``: fork, unless `nbbgtask.local.forksafety` names a runtime that would hang the copy, then the fork
server), admission under ``max_running`` and the queue, noticing a task whose process is gone
(`reconcile`), and cancelling by signalling the task's process group.  How a process is started
is its starter's (`STARTERS`); watching and reaping it is the supervisor's.
"""

from __future__ import annotations

import atexit
import math
import os
import signal
import threading
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any

from nbbgtask.core import config as _config
from nbbgtask.core import limits as _limits
from nbbgtask.core.errors import NbbgtaskError
from nbbgtask.core.forks import renew_in_child
from nbbgtask.core.procs import HOST, is_task_process, process_start_time, same_process, signal_group
from nbbgtask.core.states import State
from nbbgtask.local import launcher as _launcher
from nbbgtask.local.forksafety import hazard
from nbbgtask.local.forkserver import FORKSERVER
from nbbgtask.local.stack import read_stack
from nbbgtask.local.supervisor import supervisor
from nbbgtask.store.store import Store, store_for
from nbbgtask.task import notify
from nbbgtask.task.runner import Job, record_exit

__all__ = ["LocalBackend", "LOCAL", "PID_GRACE", "STARTERS"]

#: how each start method starts a process
STARTERS: dict[str, _launcher.Starter] = {**_launcher.STARTERS, "forkserver": FORKSERVER}

#: a running task records its pid with its first report (after 0.1 s); until this many seconds
#: have passed, a missing pid is not taken as a sign that it never started
PID_GRACE = 10.0


class LocalBackend:
    kind = "local"
    destination = "the task's process"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: tasks this process queued (``max_running``), in the order they were made
        self._queue: deque[Job] = deque()
        self._atexit = False
        #: the hazards a forced fork was already warned of
        self._warned: set[str] = set()

    # -- starting ------------------------------------------------------------------------------

    def _method(self) -> tuple[str, str]:
        """The start method for a task started now, and why (the first line of its log)."""
        chosen = _config.settings().start_method
        if chosen == "auto":
            danger = hazard()
            if danger is None:
                return "fork", "start_method='auto': no runtime that breaks a fork has started threads here"
            return "forkserver", f"start_method='auto': not by fork, since {danger}"
        if chosen == "fork":
            danger = hazard()
            if danger is not None and danger not in self._warned:
                self._warned.add(danger)
                warnings.warn(
                    f"nbbgtask: forking this process although {danger}: the task may hang. "
                    f"start_method='auto' (the default) starts such tasks from a fork server instead",
                    RuntimeWarning,
                    stacklevel=5,
                )
        return chosen, f"start_method={chosen!r}"

    def placement(self) -> dict[str, Any]:
        method, reason = self._method()
        # the machine's OOM kill count at the start: a SIGKILL with a higher count was the OOM killer
        return {
            "backend": self.kind, "start_method": method, "start_reason": reason, "host": HOST,
            "oom_kills": _limits.oom_kills(),
        }

    def stack(self, home: Path, record: dict[str, Any], who: str) -> str:
        return read_stack(home, record, who)

    def process_here(self, record: dict[str, Any]) -> tuple[int, float | None] | None:
        pid = record.get("pid")
        if record["state"] != State.RUNNING.value or pid is None or record.get("host") != HOST:
            return None
        return pid, record.get("pid_started")

    def inherits_memory(self) -> bool:
        return self._method()[0] == "fork"

    def prepare(self, job: Job) -> None:
        STARTERS[job.record["start_method"]].prepare(job)

    def submit(self, job: Job) -> None:
        """Start ``job`` now if a slot is free (``max_running``), else queue it in this process."""
        store = store_for(job.home)
        limit = _config.settings().max_running
        if limit != math.inf:
            self._reconcile_live(store)
        notify.expect(job.task_id, job.notify)  # if this process records its end (a kill, a queue abandoned)
        state = store.admit(job.record, limit)
        job.record["state"] = state.value
        if state is State.RUNNING:
            self._start(job)
        else:
            self._enqueue(job)

    def _start(self, job: Job) -> None:
        """Start ``job``'s process (its record already says "running").

        The task records its own pid, with its first report; until then the supervisor knows
        it (to reap it, record how it died, or cancel it), and a cancel asked for by another
        process reaches the task through the store.  So starting a task writes the store once.
        """
        pid, popen = STARTERS[job.record["start_method"]].start(job)
        if job.record.get("reaper_pid") is None:  # else another process reaps it (the fork server)
            supervisor().watch(pid, job.home, job.task_id, popen, record_exit)
        else:
            notify.forget(job.task_id)  # the fork server records how it died, and sends word

    def _enqueue(self, job: Job) -> None:
        with self._lock:
            self._queue.append(job)
            if not self._atexit:
                atexit.register(self._abandon_queue)
                self._atexit = True
        supervisor().add_hook(self._dispatch)

    def _dispatch(self) -> bool:
        """Start queued tasks while slots are free; ``True`` while some still wait."""
        while True:
            with self._lock:
                if not self._queue:
                    return False
                job = self._queue[0]
            store = store_for(job.home)
            self._reconcile_live(store)
            verdict = store.promote(job.task_id, _config.settings().max_running)
            if verdict is None:
                return True  # no free slot yet
            with self._lock:
                self._queue.popleft()
            if verdict:
                self._start(job)

    def _abandon_queue(self) -> None:
        with self._lock:
            jobs, self._queue = list(self._queue), deque()
        for job in jobs:
            store_for(job.home).finalize(
                job.task_id,
                {
                    "state": State.FAILED.value,
                    "error": f"NotStarted: the process that queued it ({os.getpid()}) exited first",
                    "finished": time.time(),
                },
            )

    def _queued_here(self, task_id: str) -> bool:
        with self._lock:
            return any(job.task_id == task_id for job in self._queue)

    def _unqueue(self, task_id: str) -> None:
        with self._lock:
            self._queue = deque(job for job in self._queue if job.task_id != task_id)

    # -- records -------------------------------------------------------------------------------

    def _reconcile_live(self, store: Store) -> None:
        for record in store.live():
            if record.get("backend", "local") == self.kind:
                self.reconcile(store, record)

    def reconcile(self, store: Store, record: dict[str, Any]) -> dict[str, Any]:
        """Notice a live record whose process is gone and end it "failed"; returns the record to show."""
        if State(record["state"]).is_final or record.get("host") != HOST:
            return record
        watcher = supervisor()
        pid = record.get("pid")
        if pid is None:
            pid = watcher.pid_of(record["id"])
        if pid is not None and _limits.overdue(record, _config.settings().cancel_grace):
            # Past its timeout and its grace, and still not ended by its own process (which
            # enforces it): whoever reads it now ends it, kernel restarts or not.
            # A record is data: only a process proved to be the task (or our own unreaped child) is signalled.
            if watcher.is_child(pid) or is_task_process(pid, record.get("pid_started")):
                signal_group(pid, signal.SIGKILL)
                time.sleep(0.05)
        if pid is not None and watcher.is_child(pid):
            if watcher.reap(pid):
                return store.get(record["id"]) or record
            return record
        if pid is not None:
            if watcher.alive(pid, record.get("pid_started")):
                return record
            reaper = record.get("reaper_pid")
            if reaper is not None and reaper != os.getpid() and watcher.alive(reaper, record.get("reaper_started")):
                return record  # its reaper (the fork server) records how it ended, at once
            error = f"the task process {pid} ended without reporting (killed, or crashed)"
        else:
            owner = record.get("owner_pid")
            if owner is None or watcher.alive(owner, record.get("owner_started")):
                return record
            started = record.get("started")
            if record["state"] == State.RUNNING.value and started is not None and time.time() - started < PID_GRACE:
                return record  # it may not have reported its pid yet
            what = "queued" if record["state"] == State.QUEUED.value else "started"
            error = f"NotStarted: the process that {what} it ({owner}) ended before it could run"
        if record.get("cancel_requested"):
            fields = {"state": State.CANCELLED.value, "finished": time.time()}
        else:
            fields = {"state": State.FAILED.value, "error": _limits.explain(record, error), "finished": time.time()}
        return store.finalize(record["id"], fields, fallback=record) or record

    def may_still_report(self, record: dict[str, Any]) -> bool:
        """For a live record that has vanished from the store (its file damaged and set aside, say):
        can the task still write it again?  Only if its process lives on (or it waits in this
        process's queue); if it has ended, the record is gone for good."""
        if record.get("host") != HOST:
            return True  # on another machine: nothing here can tell
        if self._queued_here(record["id"]):
            return True
        watcher = supervisor()
        pid = record.get("pid") or watcher.pid_of(record["id"])
        if pid is not None:
            return watcher.is_child(pid) or watcher.alive(pid, record.get("pid_started"))
        if record.get("owner_pid") == os.getpid():
            return False  # we started it, and it is no longer our child: it has ended
        owner = record.get("owner_pid")
        started = record.get("started") or record.get("created") or 0.0
        return owner is not None and watcher.alive(owner, record.get("owner_started")) and time.time() - started < PID_GRACE

    def cancel(self, home: Path, record: dict[str, Any]) -> dict[str, Any] | None:
        """SIGTERM to the task's process group, SIGKILL after the grace period; it ends
        "cancelled".  ``record`` already has ``cancel_requested``; returns the final record."""
        store = store_for(home)
        task_id = record["id"]
        config = _config.settings()
        self._unqueue(task_id)
        watcher = supervisor()
        pid, started = record.get("pid"), record.get("pid_started")
        if pid is None:  # not reported yet: our own child, or the task finds the request itself
            pid = watcher.pid_of(task_id)
            started = process_start_time(pid) if pid is not None else None
        if pid is None and record["state"] == State.RUNNING.value:
            store.wait_final(task_id, config.cancel_grace + 2 * config.progress_interval + 1)
        if record["state"] == State.RUNNING.value and pid is not None and record.get("host") == HOST:
            # Only a process proved to be the task is signalled: a record is data, and its pid
            # could name anyone's process (a reused pid, or a planted record).
            if not is_task_process(pid, started) and not watcher.is_child(pid):
                return self._unproven(store, record, pid, started, config)
            if same_process(pid, started):
                if not signal_group(pid, signal.SIGTERM) and not watcher.is_child(pid):
                    return self._unproven(store, record, pid, started, config)
                deadline = time.monotonic() + config.cancel_grace
                while time.monotonic() < deadline and same_process(pid, started):
                    if watcher.is_child(pid) and watcher.reap(pid):
                        break
                    time.sleep(0.01)
                else:
                    # Proved again just before the signal: the grace is long enough for a pid to be reused.
                    if watcher.is_child(pid) or is_task_process(pid, started):
                        signal_group(pid, signal.SIGKILL)
            if watcher.is_child(pid):
                for _ in range(100):
                    if watcher.reap(pid):
                        break
                    time.sleep(0.01)
        return store.finalize(task_id, {"state": State.CANCELLED.value, "finished": time.time()})


    def _unproven(
        self, store: Store, record: dict[str, Any], pid: int, started: Any, config: _config.Settings
    ) -> dict[str, Any] | None:
        """The record's process cannot be proved to be the task: signal nothing.  The cancel
        request is stored, and a task that still runs stops itself when it sees it; say so if
        it does not end."""
        task_id = record["id"]
        store.wait_final(task_id, config.cancel_grace + 2 * config.progress_interval + 1)
        now = store.get(task_id)
        if now is not None and State(now["state"]).is_final:
            return now
        if not same_process(pid, started):
            # its process is gone: nothing runs to be cancelled
            return store.finalize(task_id, {"state": State.CANCELLED.value, "finished": time.time()})
        why = "its start time is not recorded" if started is None else (
            "it is not that process (another start time, another user's, or not leading its own group)"
        )
        raise NbbgtaskError(
            f"cancel of task {task_id[:8]} not confirmed: its record names process {pid}, but {why}, "
            f"so nothing was signalled. The cancel request is stored: the task stops itself when it "
            f"sees it, if it is still running"
        )


LOCAL = LocalBackend()


def active() -> LocalBackend:
    """The backend that starts new tasks when ``backend="local"`` (the seam's entry)."""
    return LOCAL


def records(record: dict[str, Any]) -> LocalBackend:
    """What answers for a local task's record (the seam's entry)."""
    return LOCAL


def _reset_after_fork() -> None:
    """A forked task starts none of its parent's queued tasks (their parent still will), and
    the queue's lock may have been held by another thread at the fork."""
    LOCAL.__init__()  # type: ignore[misc]


renew_in_child(_reset_after_fork)
