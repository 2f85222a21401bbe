"""The fork server: a clean process that forks tasks for a process that cannot fork safely itself.

Once a runtime whose thread pools do not survive a fork has run in a notebook (`nbbgtask.local.forksafety`),
a task forked from the kernel would hang.  The fork server is a fresh interpreter that nbbgtask
starts (``python -m nbbgtask.local.forkserver``), so it never holds those threads; it imports what
every task needs (nbbgtask, cloudpickle) once, and forks one child per task.  The job travels as
spawn's does (the caller's sys.path and the job, by cloudpickle), and is unpickled only in the
child: the server never imports the task's modules, so it stays safe to fork.

- **One per process that uses it** (a kernel), started on its first such task (``os.posix_spawn``,
  in a session of its own, so the kernel's interrupts are not its), over a socket pair on its
  fd 3.  A task's record names the server as its *reaper*: the server reaps the task's process
  and records how it ended if the task could not (the kernel's `reconcile` leaves that to it
  while it lives), so a task started here has every guarantee of a forked one.
- **No orphans**: when the kernel goes (exits, restarts, is killed), the socket closes; the
  server starts nothing more, waits for its running tasks to end, recording each, and exits.
  An idle server (no task for `IDLE` seconds) exits too; the kernel starts a new one when it
  needs one, and a request that finds its server gone is sent again to a new one.
- The wire: each request is four frames (`nbbgtask.core.wire`): a JSON header (home, task id, the log's
  first line), the caller's environment, its sys.path and folder, and the job (pickles); the answer is one
  JSON frame, ``{"pid": N}`` or ``{"error": "..."}``.
"""

from __future__ import annotations

import atexit
import json
import os
import pickle
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from nbbgtask.core import wire as _wire
from nbbgtask.core.forks import renew_in_child
from nbbgtask.core.notify import Notify
from nbbgtask.core.procs import process_start_time
from nbbgtask.local.launcher import open_log, pickle_job
from nbbgtask.local.supervisor import supervisor
from nbbgtask.store.store import store_for
from nbbgtask.task import notify
from nbbgtask.task.detach import fork_detached
from nbbgtask.task.paths import interpreter, preload, preloads
from nbbgtask.task.runner import Job, exit_child, record_exit, run_pickled

__all__ = ["FORKSERVER", "IDLE", "main", "serve"]

#: seconds an idle server (no task running, no request) waits before it exits
IDLE = 600.0
#: seconds to wait for a server's answer to one request (it forks at once)
ANSWER_TIMEOUT = 30.0


#: the server's end of the socket pair, in the server
_SERVER_FD = 3


class _Connection:
    """The kernel's end: the server process and the socket to it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pid: int | None = None
        self.sock: socket.socket | None = None
        self.started: float | None = None
        self._atexit = False

    def reaper(self) -> tuple[int, float | None]:
        """The running server's pid and start time, starting one if there is none."""
        with self.lock:
            self._ensure()
            assert self.pid is not None
            return self.pid, self.started

    def _alive(self) -> bool:
        """The server runs (reaped here if it has ended: it is this process's child)."""
        if self.pid is None:
            return False
        try:
            done, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # reaped by someone else
            return False
        return done == 0

    def _ensure(self) -> None:
        if self.sock is not None and self._alive():
            return
        self._close()
        ours, theirs = socket.socketpair()
        null = os.devnull
        try:
            # Not subprocess.Popen: the server outlives this process's interest in it (it waits for
            # its tasks), and a Popen collected while its process runs warns.
            self.pid = os.posix_spawn(
                sys.executable,
                # Started in "/" with a sys.path free of the kernel's folder (`paths.interpreter`):
                # a module planted in a folder others can write is never imported here.
                interpreter("from nbbgtask.local.forkserver import main; main()"),
                os.environ,
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, theirs.fileno(), _SERVER_FD),
                    (os.POSIX_SPAWN_OPEN, 0, null, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 1, null, os.O_WRONLY, 0),
                ],
                setsid=True,  # out of the kernel's group: its interrupts are not the server's
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self.started = process_start_time(self.pid)
        if not self._atexit:
            atexit.register(self.close)
            self._atexit = True

    def request(self, frames: list[bytes]) -> tuple[int, bool]:
        """Send one request; the task's pid, and whether the server had to be started anew."""
        with self.lock:
            for attempt in (1, 2):
                restarted = not self._alive()
                self._ensure()
                assert self.sock is not None
                try:
                    _wire.write_all(self.sock.fileno(), b"".join(_wire.frame(f) for f in frames))
                    ready, _, _ = select.select([self.sock], [], [], ANSWER_TIMEOUT)
                    answer = _wire.read_frame(self.sock.fileno()) if ready else None
                except OSError:
                    answer = None
                if answer is not None:
                    reply = json.loads(answer)
                    if "error" in reply:
                        raise RuntimeError(f"the nbbgtask fork server could not start the task: {reply['error']}")
                    return int(reply["pid"]), restarted or attempt > 1
                self._close()  # gone (idle, or killed): once more with a new one
        raise RuntimeError("the nbbgtask fork server did not answer; start_method='spawn' starts tasks without it")

    def _close(self) -> None:
        """Let the server go: it ends once its tasks have (reaped here if it already has)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self._alive()
        self.pid = None

    def close(self) -> None:
        with self.lock:
            self._close()


_connection = _Connection()


def _reset_after_fork() -> None:
    """A forked task does not share its parent's server (nor its socket's lock)."""
    global _connection
    _connection = _Connection()


renew_in_child(_reset_after_fork)


class _ForkServerStarter:
    """The `Starter` for ``start_method="forkserver"``."""

    def prepare(self, job: Job) -> None:
        pickle_job(job, "the fork server")  # the same pickles as spawn
        job.record["reaper_pid"], job.record["reaper_started"] = _connection.reaper()

    def start(self, job: Job) -> tuple[int, subprocess.Popen[bytes] | None]:
        assert job.payload is not None, "prepare(job) first"
        header = {
            "home": str(job.home),
            "task_id": job.task_id,
            "start_method": job.record["start_method"],
            "start_reason": job.record.get("start_reason"),
            "preload": preloads(job.make_status),
        }
        if job.notify is not None and job.notify.url is not None:  # over the socket pair, never on disk
            header["notify"] = [job.notify.url, list(job.notify.on), job.notify.min_seconds]
        frames = [json.dumps(header).encode(), pickle.dumps(dict(os.environ)), *job.payload]
        pid, restarted = _connection.request(frames)
        if restarted:  # the server named in the record is gone: name the one that has the task
            reaper_pid, reaper_started = _connection.reaper()
            store_for(job.home).patch(job.task_id, {"reaper_pid": reaper_pid, "reaper_started": reaper_started})
        return pid, None


FORKSERVER = _ForkServerStarter()


# -- the server process ------------------------------------------------------------------------


def _child(header: dict[str, Any], environ: bytes, path: bytes, job: bytes) -> int:
    # The caller's folder is entered by `run_pickled` (`paths.restore`), once its path is in place.
    os.environ.clear()
    os.environ.update(pickle.loads(environ))
    return run_pickled(path, job)


def _start(frames: list[bytes]) -> int:
    header = json.loads(frames[0])
    preload(header.get("preload"))  # once: every later fork has them
    record = {"start_method": header["start_method"], "start_reason": header["start_reason"]}
    log = open_log(header["home"], header["task_id"], record)
    try:
        pid = fork_detached(lambda: _child(header, frames[1], frames[2], frames[3]), log)
    finally:
        os.close(log)
    if header.get("notify"):  # the server records the end if the task could not
        notify.expect(header["task_id"], Notify(*header["notify"]))
    supervisor().watch(pid, Path(header["home"]), header["task_id"], None, record_exit)
    return pid


def _read_request(fd: int) -> list[bytes] | None:
    frames = []
    for _ in range(4):
        frame = _wire.read_frame(fd)
        if frame is None:
            return None
        frames.append(frame)
    return frames


def serve(sock: socket.socket) -> int:
    """Start each requested task until the kernel's end closes; then wait for the tasks to end."""
    import cloudpickle  # noqa: F401 - every child unpickles its job with it: imported once, here

    fd = sock.fileno()
    connected = True
    last = time.monotonic()
    while True:
        busy = bool(supervisor().children)
        if not connected and not busy:
            return 0
        if connected and not busy and time.monotonic() - last > IDLE:
            return 0
        ready, _, _ = select.select([sock] if connected else [], [], [], 1.0)
        if not ready:
            continue
        frames = _read_request(fd)
        if frames is None:
            connected = False  # the kernel has gone: no more requests
            continue
        last = time.monotonic()
        try:
            answer: dict[str, Any] = {"pid": _start(frames)}
        except Exception as exc:
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        try:
            _wire.write_frame(fd, json.dumps(answer).encode())
        except OSError:
            connected = False


def main() -> None:
    """The server process's entry point (never returns)."""
    exit_child(lambda: serve(socket.socket(fileno=_SERVER_FD)))
