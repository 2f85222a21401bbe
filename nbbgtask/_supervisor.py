"""Watches task processes from the outside: reaps children, notices deaths, starts queued tasks, cancels."""

from __future__ import annotations

import atexit
import math
import os
import select
import signal
import socket
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from . import _config
from ._runner import EXIT_UNRECORDED
from ._states import State
from ._store import store_for

if TYPE_CHECKING:
    import subprocess

    from ._runner import Job

__all__ = ["may_still_report", "read_record", "reconcile", "cancel", "submit", "HOST", "process_start_time"]

HOST = socket.gethostname()
#: seconds between the supervisor thread's rounds (reaping children, starting queued tasks)
POLL = 0.1
#: a liveness verdict from psutil is reused for this long
_LIVENESS_TTL = 0.25
#: a running task records its pid with its first report (after 0.1 s); until this many seconds
#: have passed, a missing pid is not taken as a sign that it never started
PID_GRACE = 10.0


def process_start_time(pid: int) -> float | None:
    """When ``pid`` started (psutil's create_time), or ``None`` if there is no such process."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _same_process(pid: int, started: float | None) -> bool:
    """``pid`` is alive and is the process that started at ``started`` (not a reused pid)."""
    try:
        proc = psutil.Process(pid)
        if started is not None and abs(proc.create_time() - started) > 0.05:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def describe_exit(pid: int, code: int) -> str:
    """How a task process that never reported ended, as one line."""
    if code < 0:
        sig = -code
        try:
            signame = signal.Signals(sig).name
        except ValueError:
            signame = "unknown signal"
        text = f"killed by signal {sig} ({signame}): the task process {pid} ended without reporting"
        if sig == signal.SIGKILL:
            text += " (killed, or out of memory)"
        return text
    if code == EXIT_UNRECORDED:
        return (
            f"the task process {pid} ended but could not record how: writing the nbbgtask store "
            f"failed (a full disk, or the home folder's permissions; see its log)"
        )
    return f"the task process {pid} exited with code {code} without reporting (see its log)"


class _ExitWatch:
    """Which children may have ended, without asking each one every round.

    On Linux (5.3+) each child gets a pidfd in one epoll, which the supervisor thread waits on:
    a child that ends wakes it at once, and a round costs nothing per running child (asking all
    of 100 children each 0.1 s was about 1 % of a core).  Where pidfds are missing every child
    is asked each round.
    """

    def __init__(self) -> None:
        self._epoll: Any = None
        self._fds: dict[int, int] = {}  # pidfd -> pid
        self._by_pid: dict[int, int] = {}  # pid -> pidfd
        self.polled: set[int] = set()  # children without a pidfd

    def add(self, pid: int) -> None:
        try:
            if self._epoll is None:
                self._epoll = select.epoll()
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # no epoll or pidfd here, or the child is gone already
            self.polled.add(pid)
            return
        self._fds[fd], self._by_pid[pid] = pid, fd
        self._epoll.register(fd, select.EPOLLIN)

    def discard(self, pid: int) -> None:
        self.polled.discard(pid)
        fd = self._by_pid.pop(pid, None)
        if fd is not None:
            del self._fds[fd]
            self._epoll.unregister(fd)
            os.close(fd)

    def wait(self, timeout: float) -> list[int]:
        """Wait up to ``timeout`` seconds; the children that have ended, or may have."""
        if self._epoll is None or (self.polled and not self._fds):
            time.sleep(timeout)
            return list(self.polled)
        ready = self._epoll.poll(timeout)
        return [self._fds[fd] for fd, _ in ready if fd in self._fds] + list(self.polled)

    def close(self) -> None:
        """In a forked child: the parent's pidfds and epoll are of no use to it."""
        for fd in self._fds:
            os.close(fd)
        if self._epoll is not None:
            self._epoll.close()


class _Supervisor:
    """One per process: owns the children this process started and the tasks it queued."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.children: dict[int, tuple[Path, str, subprocess.Popen[bytes] | None]] = {}
        #: exit codes of children collected but whose end is not recorded yet (None: unknown)
        self.exits: dict[int, int | None] = {}
        self.queue: deque[Job] = deque()
        self.thread: threading.Thread | None = None
        self.wake = threading.Event()
        self._atexit = False
        self._liveness: dict[tuple[int, Any], tuple[bool, float]] = {}
        self.exit_watch = _ExitWatch()

    # -- children ---------------------------------------------------------------------------

    def watch(self, pid: int, home: Path, task_id: str, popen: subprocess.Popen[bytes] | None) -> None:
        with self.lock:
            self.children[pid] = (home, task_id, popen)
            self.exit_watch.add(pid)
        self._ensure_thread()

    def reap(self, pid: int) -> bool:
        """Collect ``pid`` if it is our child and has ended; record its death.  ``True`` if ended.

        Several threads may call this for one child at once (the supervisor's round, a read's
        reconcile, a cancel): the exit status is taken under the lock and kept, and the child
        stays ours until its end is recorded, so every caller records the same cause of death,
        and none, finding the process gone, records a vaguer one.
        """
        with self.lock:
            entry = self.children.get(pid)
            if entry is None:
                return False
            home, task_id, popen = entry
            if pid in self.exits:
                code = self.exits[pid]
            else:
                try:
                    if popen is not None:
                        code = popen.poll()
                        if code is None:
                            return False
                    else:
                        done, status = os.waitpid(pid, os.WNOHANG)  # never blocks
                        if done == 0:
                            return False
                        code = os.waitstatus_to_exitcode(status)
                except ChildProcessError:  # reaped by someone else; its record says how it ended
                    code = None
                self.exits[pid] = code
                self.exit_watch.discard(pid)
        store = store_for(home)
        # A task that recorded its end has no live file: one stat, and nothing to read.
        record = store.get(task_id) if store.is_live(task_id) else None
        if record is not None and not State(record["state"]).is_final:
            if record.get("cancel_requested"):
                fields = {"state": State.CANCELLED.value}
            elif code is None:
                fields = {"state": State.FAILED.value, "error": f"the task process {pid} ended without reporting"}
            else:
                fields = {"state": State.FAILED.value, "error": describe_exit(pid, code)}
            store.finalize(task_id, {**fields, "finished": time.time()})
        with self.lock:
            self.children.pop(pid, None)
            self.exits.pop(pid, None)
        self.wake.set()
        return True

    def is_child(self, pid: int) -> bool:
        with self.lock:
            return pid in self.children

    def pid_of(self, task_id: str) -> int | None:
        """The pid of a task this process started, before the task has recorded it."""
        with self.lock:
            for pid, (_, child_task, _) in self.children.items():
                if child_task == task_id:
                    return pid
        return None

    # -- liveness of processes that are not our children ------------------------------------

    def alive(self, pid: int, started: float | None) -> bool:
        key = (pid, started)
        now = time.monotonic()
        hit = self._liveness.get(key)
        if hit is not None and now - hit[1] < _LIVENESS_TTL:
            return hit[0]
        verdict = _same_process(pid, started)
        if len(self._liveness) > 1000:
            self._liveness.clear()
        self._liveness[key] = (verdict, now)
        return verdict

    # -- the queue ----------------------------------------------------------------------------

    def enqueue(self, job: Job) -> None:
        with self.lock:
            self.queue.append(job)
            if not self._atexit:
                atexit.register(self._abandon_queue)
                self._atexit = True
        self._ensure_thread()

    def _dispatch(self) -> None:
        from ._launcher import start

        while True:
            with self.lock:
                if not self.queue:
                    return
                job = self.queue[0]
            store = store_for(job.home)
            limit = _config.settings().max_running
            for record in store.live():
                reconcile(store, record)
            verdict = store.promote(job.task_id, limit)
            if verdict is None:
                return  # no free slot yet
            with self.lock:
                self.queue.popleft()
            if verdict:
                start(job)

    def _abandon_queue(self) -> None:
        with self.lock:
            jobs, self.queue = list(self.queue), deque()
        for job in jobs:
            store_for(job.home).finalize(
                job.task_id,
                {
                    "state": State.FAILED.value,
                    "error": f"NotStarted: the process that queued it ({os.getpid()}) exited first",
                    "finished": time.time(),
                },
            )

    # -- the thread ---------------------------------------------------------------------------

    def _ensure_thread(self) -> None:
        with self.lock:
            if self.thread is not None and self.thread.is_alive():
                return
            self.thread = threading.Thread(target=self._run, name="nbbgtask-supervisor", daemon=True)
            self.thread.start()

    @staticmethod
    def _guarded(step: Any, *args: Any) -> None:
        """One step of a round; a failure (a full disk, say) is reported and the next round retries."""
        try:
            step(*args)
        except Exception as exc:
            import warnings

            try:
                warnings.warn(f"nbbgtask could not record or start a task: {exc}", RuntimeWarning, stacklevel=1)
            except Exception:  # warnings turned into errors must not end supervision either
                pass

    def _run(self) -> None:
        while True:
            # Woken by a child's end; else once a round, to start queued tasks and to retry
            # recording ends that failed (a full disk, say).
            ended = self.exit_watch.wait(0 if self.wake.is_set() else POLL)
            self.wake.clear()
            with self.lock:
                pending = list(self.exits)
            for pid in dict.fromkeys([*ended, *pending]):
                self._guarded(self.reap, pid)
            self._guarded(self._dispatch)
            with self.lock:
                if not self.children and not self.queue:
                    self.thread = None
                    return


_supervisor = _Supervisor()


def supervisor() -> _Supervisor:
    return _supervisor


def reset_after_fork() -> None:
    """A forked task owns none of its parent's children, queue or thread."""
    global _supervisor
    _supervisor.exit_watch.close()
    _supervisor = _Supervisor()


def submit(job: Job) -> None:
    """Start ``job`` now if a slot is free (``max_running``), else queue it in this process."""
    from ._launcher import start

    store = store_for(job.home)
    limit = _config.settings().max_running
    if limit != math.inf:
        for record in store.live():
            reconcile(store, record)
    state = store.admit(job.record, limit)
    job.record["state"] = state.value
    if state is State.RUNNING:
        start(job)
    else:
        _supervisor.enqueue(job)


def reconcile(store: Any, record: dict[str, Any]) -> dict[str, Any]:
    """Notice a live record whose process is gone and end it "failed"; returns the record to show."""
    if State(record["state"]).is_final or record.get("host") != HOST or record.get("backend", "local") != "local":
        return record
    pid = record.get("pid")
    if pid is None:
        pid = _supervisor.pid_of(record["id"])
    if pid is not None and _supervisor.is_child(pid):
        if _supervisor.reap(pid):
            return store.get(record["id"]) or record
        return record
    if pid is not None:
        if _supervisor.alive(pid, record.get("pid_started")):
            return record
        error = f"the task process {pid} ended without reporting (killed, or crashed)"
    else:
        owner = record.get("owner_pid")
        if owner is None or _supervisor.alive(owner, record.get("owner_started")):
            return record
        started = record.get("started")
        if record["state"] == State.RUNNING.value and started is not None and time.time() - started < PID_GRACE:
            return record  # it may not have reported its pid yet
        what = "queued" if record["state"] == State.QUEUED.value else "started"
        error = f"NotStarted: the process that {what} it ({owner}) ended before it could run"
    if record.get("cancel_requested"):
        fields = {"state": State.CANCELLED.value, "finished": time.time()}
    else:
        fields = {"state": State.FAILED.value, "error": error, "finished": time.time()}
    return store.finalize(record["id"], fields, fallback=record) or record


def may_still_report(record: dict[str, Any]) -> bool:
    """For a live record that has vanished from the store (its file damaged and set aside, say):
    can the task still write it again?  Only if its process lives on (or it waits in this
    process's queue); if it has ended, the record is gone for good."""
    if State(record["state"]).is_final:
        return False
    if record.get("host") != HOST or record.get("backend", "local") != "local":
        return True  # on another machine or a cluster: nothing here can tell
    with _supervisor.lock:
        if any(job.task_id == record["id"] for job in _supervisor.queue):
            return True
    pid = record.get("pid") or _supervisor.pid_of(record["id"])
    if pid is not None:
        return _supervisor.is_child(pid) or _supervisor.alive(pid, record.get("pid_started"))
    if record.get("owner_pid") == os.getpid():
        return False  # we started it, and it is no longer our child: it has ended
    owner = record.get("owner_pid")
    started = record.get("started") or record.get("created") or 0.0
    return owner is not None and _supervisor.alive(owner, record.get("owner_started")) and time.time() - started < PID_GRACE


def read_record(home: Path, task_id: str) -> dict[str, Any] | None:
    store = store_for(home)
    record = store.get(task_id)
    return None if record is None else reconcile(store, record)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(pid, sig)


def _await_end(store: Any, task_id: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        record = store.get(task_id)
        if record is None or State(record["state"]).is_final:
            return
        time.sleep(0.02)


def cancel(home: Path, task_id: str) -> tuple[bool, dict[str, Any] | None]:
    """SIGTERM to the task's process group, SIGKILL after the grace period; it ends "cancelled"."""
    from ._errors import TaskNotFound

    store = store_for(home)
    record = read_record(home, task_id)
    if record is None:
        raise TaskNotFound(f"no task {task_id} in the store at {home}")
    if State(record["state"]).is_final:
        return False, record
    record = store.patch(task_id, {"cancel_requested": True})
    if record is not None and record.get("backend") == "dask":
        from ._dask_backend import cancel as cancel_on_cluster

        cancel_on_cluster(home, record, _config.settings().cancel_grace)
        final = store.get(task_id)
        return bool(final and final["state"] == State.CANCELLED.value), final
    if record is None:  # it ended meanwhile
        return False, read_record(home, task_id)
    with _supervisor.lock:
        for job in list(_supervisor.queue):
            if job.task_id == task_id:
                _supervisor.queue.remove(job)
    pid, started = record.get("pid"), record.get("pid_started")
    if pid is None:  # not reported yet: our own child, or the task finds the request itself
        pid = _supervisor.pid_of(task_id)
        started = process_start_time(pid) if pid is not None else None
    if pid is None and record["state"] == State.RUNNING.value:
        _await_end(store, task_id, _config.settings().cancel_grace + 2 * _config.settings().progress_interval + 1)
    if record["state"] == State.RUNNING.value and pid is not None and record.get("host") == HOST:
        if _same_process(pid, started):
            _signal_group(pid, signal.SIGTERM)
            deadline = time.monotonic() + _config.settings().cancel_grace
            while time.monotonic() < deadline and _same_process(pid, started):
                if _supervisor.is_child(pid) and _supervisor.reap(pid):
                    break
                time.sleep(0.01)
            else:
                if _same_process(pid, started):
                    _signal_group(pid, signal.SIGKILL)
        if _supervisor.is_child(pid):
            for _ in range(100):
                if _supervisor.reap(pid):
                    break
                time.sleep(0.01)
    final = store.finalize(task_id, {"state": State.CANCELLED.value, "finished": time.time()})
    return bool(final and final["state"] == State.CANCELLED.value), final
