"""Locks between processes on a lock file: re-entrant per thread, and never held by a forked child.

This is ``flock(2)`` on a descriptor opened for each hold (nbbgtask is POSIX-only: it starts
tasks by fork).  filelock does the same, portably, but its acquire and release took about 200 µs
here against 3 µs for the system calls, and a store write takes a lock: at 1,000 tasks ending at
once that was most of their cost.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator

from nbbgtask.core.errors import StoreError
from nbbgtask.core.forks import renew_in_child

__all__ = ["FileLock", "LockTimeout", "Stripes", "held", "LOCK_TIMEOUT", "LOCK_POLL"]

#: Seconds to wait for another process's read-modify-write before giving up.
LOCK_TIMEOUT = 30.0
#: Seconds between tries for a busy lock (filelock's default, 0.05, made starting a task wait
#: hundreds of milliseconds while many tasks were reporting).
LOCK_POLL = 0.002

#: descriptors of the locks this process holds now: a forked child closes its copies at once,
#: since a flock lasts while any descriptor of it is open, and the child would hold the lock on
_held: set[int] = set()


class LockTimeout(Exception):
    """The lock stayed busy for the whole timeout."""


def _drop_inherited() -> None:
    for fd in list(_held):
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


renew_in_child(_drop_inherited)


class FileLock:
    """An exclusive lock on ``path`` shared by every process (and thread) that opens it."""

    def __init__(self, path: str, timeout: float, poll: float) -> None:
        self.path = path
        self.timeout = timeout
        self.poll = poll
        self._local = threading.local()

    def acquire(self) -> None:
        local = self._local
        if getattr(local, "depth", 0):
            local.depth += 1
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        deadline = None
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    now = time.monotonic()
                    if deadline is None:
                        deadline = now + self.timeout
                    elif now >= deadline:
                        raise LockTimeout(self.path) from None
                    time.sleep(self.poll)
        except BaseException:
            os.close(fd)
            raise
        _held.add(fd)
        local.fd, local.depth = fd, 1

    def release(self) -> None:
        local = self._local
        local.depth -= 1
        if local.depth:
            return
        _held.discard(local.fd)
        os.close(local.fd)  # which releases the lock


class Stripes:
    """The store's locks in one home: one per history shard (``locks/NN.lock``, the stripe a
    task's id falls in) and the store-wide ``store.lock``, each opened on first use (after
    ``ready()`` has made the folders)."""

    def __init__(self, home: str | os.PathLike[str], lock_dir: str, ready: Callable[[], None]) -> None:
        self._home, self._dir, self._ready = os.fspath(home), lock_dir, ready
        self._stripes: dict[int, FileLock] = {}
        self._whole: FileLock | None = None
        self._lock = threading.Lock()

    def stripe(self, index: int) -> FileLock:
        lock = self._stripes.get(index)
        if lock is None:
            with self._lock:
                lock = self._stripes.get(index)
                if lock is None:
                    self._ready()
                    lock = self._stripes[index] = FileLock(os.path.join(self._dir, f"{index:02d}.lock"), LOCK_TIMEOUT, LOCK_POLL)
        return lock

    def whole(self) -> FileLock:
        if self._whole is None:
            self._ready()
            self._whole = FileLock(os.path.join(self._home, "store.lock"), LOCK_TIMEOUT, LOCK_POLL)
        return self._whole


@contextlib.contextmanager
def held(lock: FileLock) -> Iterator[None]:
    """Hold ``lock``; a lock that cannot be had is a `StoreError` that says why and what to do."""
    try:
        lock.acquire()
    except LockTimeout:
        raise StoreError(
            f"waited {LOCK_TIMEOUT:.0f} s for the nbbgtask store lock {lock.path}; "
            f"another process holds it (a stopped or hung process?)"
        ) from None
    except OSError as exc:
        raise StoreError(
            f"cannot open the nbbgtask store lock {lock.path}: {exc.strerror or exc}; fix the "
            f"folder's permissions, or point NBBGTASK_HOME or bg.configure(home=...) elsewhere"
        ) from None
    try:
        yield
    finally:
        lock.release()
