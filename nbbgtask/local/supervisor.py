"""Watches the task processes this process started: reaps them and notices each end at once.

Process mechanics only.  What an end means for the task's record is the caller's: each child is
watched with an ``on_exit`` callback (the local backend's, which records how the task died), and
work that must happen every round while something waits (starting queued tasks) is a round hook.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbbgtask.core.forks import renew_in_child
from nbbgtask.core.procs import same_process

if TYPE_CHECKING:
    import subprocess

__all__ = ["OnExit", "RoundHook", "supervisor"]

#: seconds between the supervisor thread's rounds while a round hook has work (queued tasks)
POLL = 0.1
#: a liveness verdict from psutil is reused for this long
_LIVENESS_TTL = 0.25

#: called once a watched child has ended: (home, task id, pid, exit code or None if unknown)
OnExit = Callable[[Path, str, int, "int | None"], None]
#: called every round; returns True while it has more to do (keeps the thread going)
RoundHook = Callable[[], bool]


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
    """One per process: the children this process started, and a thread that reaps them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.children: dict[int, tuple[Path, str, subprocess.Popen[bytes] | None, OnExit]] = {}
        #: exit codes of children collected but whose end is not recorded yet (None: unknown)
        self.exits: dict[int, int | None] = {}
        self.hooks: list[RoundHook] = []
        self.thread: threading.Thread | None = None
        self.wake = threading.Event()
        self._liveness: dict[tuple[int, Any], tuple[bool, float]] = {}
        self.exit_watch = _ExitWatch()

    # -- children ---------------------------------------------------------------------------

    def watch(
        self, pid: int, home: Path, task_id: str, popen: subprocess.Popen[bytes] | None, on_exit: OnExit
    ) -> None:
        with self.lock:
            self.children[pid] = (home, task_id, popen, on_exit)
            self.exit_watch.add(pid)
        self.ensure_thread()

    def reap(self, pid: int) -> bool:
        """Collect ``pid`` if it is our child and has ended, and let its ``on_exit`` record the
        end.  ``True`` if it has ended.

        Several threads may call this for one child at once (the supervisor's round, a read's
        reconcile, a cancel): the exit status is taken under the lock and kept, and the child
        stays ours until ``on_exit`` has returned, so every caller records the same cause of
        death, and none, finding the process gone, records a vaguer one.
        """
        with self.lock:
            entry = self.children.get(pid)
            if entry is None:
                return False
            home, task_id, popen, on_exit = entry
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
        on_exit(home, task_id, pid, code)
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
            for pid, (_, child_task, _, _) in self.children.items():
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
        verdict = same_process(pid, started)
        if len(self._liveness) > 1000:
            self._liveness.clear()
        self._liveness[key] = (verdict, now)
        return verdict

    # -- the thread ---------------------------------------------------------------------------

    def add_hook(self, hook: RoundHook) -> None:
        """Call ``hook`` every round until it returns False (then it is dropped)."""
        with self.lock:
            if hook not in self.hooks:
                self.hooks.append(hook)
        self.ensure_thread()

    def ensure_thread(self) -> None:
        with self.lock:
            if self.thread is not None and self.thread.is_alive():
                return
            self.thread = threading.Thread(target=self._run, name="nbbgtask-supervisor", daemon=True)
            self.thread.start()

    @staticmethod
    def _guarded(step: Callable[..., Any], *args: Any) -> Any:
        """One step of a round; a failure (a full disk, say) is reported and the next round retries."""
        try:
            return step(*args)
        except Exception as exc:
            import warnings

            try:
                warnings.warn(f"nbbgtask could not record or start a task: {exc}", RuntimeWarning, stacklevel=1)
            except Exception:  # warnings turned into errors must not end supervision either
                pass
            return True

    def _run(self) -> None:
        while True:
            # Woken by a child's end; else once a round, to run the hooks (start queued tasks) and
            # to retry recording ends that failed (a full disk, say).
            ended = self.exit_watch.wait(0 if self.wake.is_set() else POLL)
            self.wake.clear()
            with self.lock:
                pending = list(self.exits)
                hooks = list(self.hooks)
            for pid in dict.fromkeys([*ended, *pending]):
                self._guarded(self.reap, pid)
            done = [hook for hook in hooks if not self._guarded(hook)]
            with self.lock:
                for hook in done:
                    self.hooks.remove(hook)
                if not self.children and not self.hooks:
                    self.thread = None
                    return


_supervisor = _Supervisor()


def supervisor() -> _Supervisor:
    return _supervisor


#: the parent's supervisor, in a forked child: kept rather than freed (freeing it would write to
#: the pages it sits on, copying them)
_inherited: list[_Supervisor] = []


def _reset_after_fork() -> None:
    """A forked task owns none of its parent's children, hooks or thread."""
    global _supervisor
    _supervisor.exit_watch.close()
    _inherited.append(_supervisor)
    _supervisor = _Supervisor()


renew_in_child(_reset_after_fork)
