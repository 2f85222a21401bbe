"""Reading the Python stack of a task running on this machine: the task's process dumps every
thread's stack (faulthandler) into its stack file when asked by `STACK_SIGNAL`."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Any

from nbbgtask.core.errors import NbbgtaskError
from nbbgtask.core.procs import HOST, is_task_process, same_process
from nbbgtask.core.states import State
from nbbgtask.store.files import stack_files
from nbbgtask.store.store import store_for
from nbbgtask.task.runner import STACK_SIGNAL, trim_stack

__all__ = ["read_stack", "STACK_TIMEOUT"]

#: seconds `read_stack` waits for the task to write its stack
STACK_TIMEOUT = 5.0
#: seconds a stack file must stay the same size before the dump counts as whole
_STACK_SETTLE = 0.05


def _ended(home: Path, task_id: str) -> bool:
    record = store_for(home).get(task_id)
    return record is None or State(record["state"]).is_final


def _catches_signal(pid: int, sig: int) -> bool | None:
    """Whether ``pid`` has a handler for ``sig`` (Linux's /proc); ``None`` where that cannot be read."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (OSError, ValueError):
        pass
    return None


def _read_dump(fd: int, alive: Any, timeout: float) -> str | None:
    """The stack the task writes into ``fd`` (emptied before asking), once it stops growing;
    ``None`` if none came within ``timeout`` seconds or the process ended."""
    deadline = time.monotonic() + timeout
    size = 0
    while time.monotonic() < deadline:
        time.sleep(_STACK_SETTLE if size else 0.005)
        now = os.fstat(fd).st_size
        if now and now == size:
            return os.pread(fd, now, 0).decode("utf-8", errors="replace")
        if not now and not alive():
            return None
        size = now
    return None


def read_stack(home: Path, record: dict[str, Any], who: str) -> str:
    """The stack of ``record``'s running task, or `NbbgtaskError` saying why there is none."""
    state = State(record["state"])
    if record.get("host") not in (None, HOST):
        raise NbbgtaskError(
            f"{who} runs on the machine {record['host']}, not this one ({HOST}): ask there "
            f"(nbbgtask stack {record['id'][:8]})"
        )
    # The task's stack file names its process (the record has the pid only after the first
    # report, which a task that holds the GIL from its start never makes).
    deadline = time.monotonic() + STACK_TIMEOUT
    while True:  # a task that has just started may not be listening yet: give it a moment
        found = [f for f in stack_files(home, record["id"]) if same_process(f[1], f[2])]
        if found or state is not State.RUNNING or time.monotonic() > deadline:
            break
        time.sleep(0.02)
        if _ended(home, record["id"]):
            break
    if not found:
        if _ended(home, record["id"]):
            raise NbbgtaskError(f"{who} has ended: it has no stack any more")
        if state is State.QUEUED:
            raise NbbgtaskError(f"{who} is queued: it has no process yet; try again once it runs")
        raise NbbgtaskError(
            f"{who} is {state} but its process did not answer stack requests within "
            f"{STACK_TIMEOUT:g} s: try again in a moment (a task that keeps saying this was started "
            f"by an older nbbgtask, or could not make its file in {home / 'stacks'}: see its log)"
        )
    path, pid, started = found[0]
    alive = lambda: same_process(pid, started)  # noqa: E731
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise NbbgtaskError(f"{who} has ended: it has no stack any more") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # one request at a time, whoever asks
        if not alive():
            raise NbbgtaskError(f"{who} has ended: it has no stack any more")
        if not is_task_process(pid, started):
            # A stack file is data: it could name anyone's process.  Signal only one proved to be
            # the task (its start time, this user's, leading its own group), checked just before.
            raise NbbgtaskError(
                f"{who}: its stack file names process {pid}, which cannot be proved to be the task "
                f"(another user's process, or not leading its own group), so nothing was signalled"
            )
        if _catches_signal(pid, STACK_SIGNAL) is False:
            # Its default action would end the task: never send it to a process not listening.
            raise NbbgtaskError(
                f"{who} does not listen for {STACK_SIGNAL.name} any more (its code reset that "
                f"signal's handler), so its stack cannot be read"
            )
        os.ftruncate(fd, 0)
        try:
            os.kill(pid, STACK_SIGNAL)
        except ProcessLookupError:
            raise NbbgtaskError(f"{who} has ended: it has no stack any more") from None
        text = _read_dump(fd, alive, max(0.5, deadline - time.monotonic()))
    finally:
        os.close(fd)
    if text is None:
        if _ended(home, record["id"]) or not alive():
            raise NbbgtaskError(f"{who} ended while its stack was asked for")
        raise NbbgtaskError(
            f"{who} did not write its stack within {STACK_TIMEOUT:g} s: its process {pid} may be "
            f"stopped, or its code took over {STACK_SIGNAL.name} (nbbgtask's stack request)"
        )
    return trim_stack(text)
