"""Processes: who this one is, whether another is still the one we started, and signalling a task's group."""

from __future__ import annotations

import os
import signal
import socket
from typing import Any

import psutil

__all__ = [
    "HOST", "EXIT_UNRECORDED", "process_start_time", "same_process", "is_task_process", "own_process",
    "signal_group", "signal_task", "signal_left_group", "describe_exit", "speak_for",
]

HOST = socket.gethostname()
#: a task process's exit code when it ended but could not record how (sysexits' EX_IOERR)
EXIT_UNRECORDED = 74


def process_start_time(pid: int) -> float | None:
    """When ``pid`` started (psutil's create_time), or ``None`` if there is no such process."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def same_process(pid: int, started: float | None) -> bool:
    """``pid`` is alive and is the process that started at ``started`` (not a reused pid)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        proc = psutil.Process(pid)
        if started is not None and abs(proc.create_time() - started) > 0.05:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def is_task_process(pid: Any, started: Any) -> bool:
    """Proof enough to signal ``pid``'s group as a task's: its start time is known and matches,
    it lives, runs as this user, and leads its own process group (every task does).  Anything unknown (no start
    time, another user's process that cannot be read) is no proof."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or not isinstance(started, (int, float)):
        return False
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - started) > 0.05 or proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if proc.uids().effective != os.geteuid():  # a task runs as the user who started it
            return False
        return os.getpgid(pid) == pid
    except (psutil.Error, OSError, ValueError):
        return False


def own_process() -> dict[str, Any]:
    """The pid and start time that let others signal this process and tell it from a reused pid.

    Read once per process (a task asks at its start, its first report and its end): a forked
    child has a pid of its own, so the entry its parent made is never its answer."""
    pid = os.getpid()
    keeper = _SPEAKS_FOR.get(pid)
    if keeper is not None:
        return dict(keeper)
    started = _OWN_START.get(pid)
    if started is None:
        started = _OWN_START[pid] = _own_start_time()
    return {"pid": pid, "pid_started": started}


def _own_start_time() -> float:
    """psutil's ``create_time()`` of this process, as psutil reckons it on Linux (boot time from
    /proc/stat plus the start tick from /proc/self/stat), in two reads.  A forked task asks first
    thing, and psutil's general path, run for the first time in the child, wrote to (and so
    copied) about 85 of the pages it shares with the kernel: half a millisecond per task."""
    try:
        stat = _read_proc("/proc/self/stat", b")")
        ticks = int(stat[stat.rindex(b")") + 2 :].split(None, 20)[19])  # field 22, starttime
        text = _read_proc("/proc/stat", b"\nbtime ")
        at = text.index(b"\nbtime ")
        boot = float(text[at + 7 : text.index(b"\n", at + 1)])
        return ticks / _CLOCK_TICKS + boot
    except (OSError, ValueError, IndexError):
        return psutil.Process().create_time()


def _read_proc(path: str, needed: bytes) -> bytes:
    """The start of a /proc file, up to the end of the line holding ``needed`` (plain system
    calls: no file object)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        text = b"\n"
        while (at := text.find(needed)) < 0 or text.find(b"\n", at + len(needed)) < 0:
            more = os.read(fd, 65536)
            if not more:
                return text
            text += more
        return text
    finally:
        os.close(fd)


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


#: this process's start time, by pid
_OWN_START: dict[int, float] = {}
#: by pid: the process this one names as itself (`speak_for`)
_SPEAKS_FOR: dict[int, dict[str, Any]] = {}


def speak_for(keeper: dict[str, Any]) -> None:
    """From now on this process names ``keeper`` (``{"pid", "pid_started"}``) as the task's
    process: an attempt forked by its keeper (`nbbgtask.task.attempts`), since the keeper leads
    the group a cancel signals and outlives the attempt.  Keyed by pid: a process it forks in
    turn names itself again."""
    _SPEAKS_FOR[os.getpid()] = dict(keeper)


def signal_group(pid: int, sig: int) -> bool:
    """Send ``sig`` to the process group that ``pid`` leads (a task and whatever it started);
    ``True`` if it was sent, ``False`` if there is no such group or it is not ours to signal."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def signal_task(pid: int, started: Any, sig: int) -> bool:
    """Send ``sig`` to the group of ``pid`` only if it is proved to be the task just before
    (`is_task_process`: start time, user, leading its own group); ``True`` if it was sent."""
    return is_task_process(pid, started) and signal_group(pid, sig)


def signal_left_group(pid: int, sig: int) -> bool:
    """Send ``sig`` to what is left of the group a task led, once its own process ``pid`` has been
    reaped (what it started).  A group's id is not given to a new process while the group has
    members, so the group is still the task's unless ``pid`` is in use again: then nothing is
    sent.  ``True`` if it was sent."""
    if psutil.pid_exists(pid):  # the number is someone's again (or the task is not reaped yet)
        return False
    return signal_group(pid, sig)


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
