"""The pipes between a Dask worker and its task processes, listed so that a process forked from the
worker keeps only its own."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

from nbbgtask.core.forks import renew_in_child

__all__ = ["pipe", "close_pipes", "open_pipes"]

# Every pipe end the worker opens for its task processes is listed here: a forker (or a child forked straight from the
# worker) closes those that are not its own.  Else it would hold another task's report pipe open
# (so the worker would not see that task end until the holder ends too), or an idle spare's
# command pipe (so that spare would not see the worker go away).
_fds_lock = threading.Lock()
_fds: set[int] = set()


def pipe() -> tuple[int, int]:
    with _fds_lock:
        read, write = os.pipe()
        _fds.update((read, write))
    return read, write


def close_pipes(*fds: int | None) -> None:
    """Close pipe ends this module opened; one already closed is skipped."""
    with _fds_lock:
        for fd in fds:
            if fd in _fds:
                _fds.discard(fd)
                os.close(fd)


def _reset_after_fork() -> None:
    # A child of the worker owns none of its pipes, and no lock another thread may hold.
    global _fds_lock
    _fds_lock = threading.Lock()
    _fds.clear()


renew_in_child(_reset_after_fork)


@contextlib.contextmanager
def open_pipes() -> Iterator[frozenset[int]]:
    """Every pipe end open now, held so while the caller forks: what the child must close, but
    for its own (no other thread opens one meanwhile, which the child would keep)."""
    with _fds_lock:
        yield frozenset(_fds)
