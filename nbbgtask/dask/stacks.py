"""What a worker does when a kernel asks for the stack of a task it runs (`nbbgtask.dask.wire`, 8): it
signals the task's child, reads the dump from the child's stack file, and returns it sealed with
the task's key.  Runs on the worker's event loop (``client.run`` awaits a coroutine), so its
waits are ``asyncio.sleep``, never a blocking one."""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from typing import Any

from nbbgtask.dask.wire import seal, stack_file
from nbbgtask.task.runner import STACK_SIGNAL, trim_stack

__all__ = ["dump_stack", "STACK_TIMEOUT"]

#: seconds the worker waits for the child to write its stack
STACK_TIMEOUT = 5.0
#: seconds a stack file must stay the same size before the dump counts as whole
_SETTLE = 0.05


def _descendant(pid: int) -> bool:
    """``pid`` is a process below this one (a spare is the forker's child, the forker ours)."""
    import psutil

    try:
        return any(p.pid == os.getpid() for p in psutil.Process(pid).parents())
    except psutil.Error:
        return False


async def _read_dump(fd: int, pid: int, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    size = 0
    while time.monotonic() < deadline:
        await asyncio.sleep(_SETTLE if size else 0.005)
        now = os.fstat(fd).st_size
        if now and now == size:
            return os.pread(fd, now, 0).decode("utf-8", errors="replace")
        if not now and not _descendant(pid):
            return None
        size = now
    return None


async def dump_stack(task_id: str, pid: int, key: str) -> dict[str, Any]:
    """The stack of task ``task_id``'s child ``pid`` here, sealed with the task's ``key`` (hex)."""
    secret = bytes.fromhex(key)

    def reply(**fields: Any) -> dict[str, Any]:
        return seal(secret, task_id, {"kind": "stack", **fields})

    try:
        path = stack_file(task_id, pid)
    except (OSError, ValueError) as exc:
        return reply(error=f"its worker keeps no stack files: {exc}")
    if not _descendant(pid):
        return reply(error=f"its process {pid} is not running on this worker any more")
    deadline = time.monotonic() + STACK_TIMEOUT
    while True:  # a task that has just started may not have made its file yet: give it a moment
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            break
        except FileNotFoundError:
            if time.monotonic() > deadline or not _descendant(pid):
                return reply(error="its process does not answer stack requests yet (it is starting, or has just ended)")
            await asyncio.sleep(0.02)
    try:
        while True:  # one request at a time, whoever asks
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return reply(error="another request for its stack is under way: try again")
                await asyncio.sleep(0.01)
        os.ftruncate(fd, 0)
        try:
            os.kill(pid, STACK_SIGNAL)
        except ProcessLookupError:
            return reply(error="it has ended: it has no stack any more")
        text = await _read_dump(fd, pid, max(0.5, deadline - time.monotonic()))
    finally:
        os.close(fd)
    if text is None:
        return reply(error=f"its process {pid} did not write its stack within {STACK_TIMEOUT:g} s")
    return reply(text=trim_stack(text))
