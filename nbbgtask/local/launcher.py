"""Starts task processes, one `Starter` per start method (forking itself is `nbbgtask.task.detach`).

A starter checks in the caller that a job can reach its process (`prepare`, before anything is
stored) and starts the process (`start`, returning its pid, and the Popen where there is one).
A new start method is one more entry in `STARTERS`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from typing import Any, Protocol

from nbbgtask.core import wire as _wire
from nbbgtask.core.trust import check_id, open_owned
from nbbgtask.task.detach import fork_detached
from nbbgtask.task.paths import interpreter, sender
from nbbgtask.task.runner import Job, pickled, run_job

__all__ = ["Starter", "STARTERS", "open_log", "pickle_job"]


def open_log(home: str | os.PathLike[str], task_id: str, record: dict[str, Any]) -> int:
    """The task's log, for its process's fds 1 and 2; its first line says how the task was started
    and why (the record's ``start_method`` and ``start_reason``)."""
    path = os.path.join(home, "logs", check_id(task_id) + ".log")  # log_path's, without pathlib's cost
    fd = open_owned(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)  # never through a symlink
    reason = record.get("start_reason")
    if reason:
        # A note, not the task's output: a full disk leaves it out and the task still starts, as
        # it did before there was a note (its output then fails as it would anyway).
        with contextlib.suppress(OSError):
            _wire.write_all(fd, f"nbbgtask: started by {record['start_method']} ({reason})\n".encode())
    return fd


def _open_log(job: Job) -> int:
    return open_log(job.home, job.task_id, job.record)


class Starter(Protocol):
    def prepare(self, job: Job) -> None:
        """Raise a clear `TypeError` here, in the caller, if the job cannot reach its process."""

    def start(self, job: Job) -> tuple[int, subprocess.Popen[bytes] | None]:
        """Start the task's process; its pid, and its Popen if it has one."""


# -- fork --------------------------------------------------------------------------------------


class _Fork:
    """A copy of this process: the task sees every object the notebook has, as it is."""

    def prepare(self, job: Job) -> None:
        pass

    def start(self, job: Job) -> tuple[int, subprocess.Popen[bytes] | None]:
        # The task pickles its result with cloudpickle: imported here (once per process) rather
        # than in every task, where it cost about 37 ms of CPU each.
        import cloudpickle  # noqa: F401

        log = _open_log(job)
        try:
            return fork_detached(lambda: run_job(job), log), None
        finally:
            os.close(log)


# -- spawn -------------------------------------------------------------------------------------


def pickle_job(job: Job, where: str) -> None:
    """Pickle ``job`` for a process that does not share this one's memory (``where``, for the
    error): the caller's sys.path and folder (`paths.sender`) and the job, into ``job.payload``."""
    how = job.record.get("start_reason") or ""
    why = f" (chosen by {how})" if how.startswith("start_method='auto'") else ""
    advice = ", or force start_method='fork', which copies this process as it is, at its own risk"
    job.payload = (sender(), pickled(job, where + why, advice))


class _Spawn:
    """A fresh interpreter; the job travels by cloudpickle through its stdin, never argv or env."""

    def prepare(self, job: Job) -> None:
        pickle_job(job, "a spawned task process")

    def start(self, job: Job) -> tuple[int, subprocess.Popen[bytes] | None]:
        frames = job.payload
        assert frames is not None, "prepare(job) first"
        log = _open_log(job)
        try:
            # In "/", with a sys.path free of the caller's folder (`paths`): the task enters the
            # caller's folder only once nbbgtask and what it needs are imported.
            popen = subprocess.Popen(
                interpreter("from nbbgtask.local.spawn import entry; entry()"),
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=log,
                cwd="/",
                start_new_session=True,
                close_fds=True,
            )
        finally:
            os.close(log)
        assert popen.stdin is not None
        try:
            popen.stdin.write(_wire.frames(*frames))  # read by _spawn.main
            popen.stdin.close()
        except BrokenPipeError:
            pass  # it died at once; the supervisor records how
        return popen.pid, popen


STARTERS: dict[str, Starter] = {"fork": _Fork(), "spawn": _Spawn()}
