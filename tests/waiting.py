"""Waiting for something another process does, with a bound."""

from __future__ import annotations

import time
from collections.abc import Callable

import psutil


def until(predicate: Callable[[], object], timeout: float = 10.0, every: float = 0.02) -> bool:
    """``True`` as soon as ``predicate()`` is true; ``False`` if ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False


def gone(pid: int) -> bool:
    """The process ``pid`` has ended: no such process, or a zombie its (adopting) parent has yet to reap.

    One read of its state, so a process that ends between two looks cannot raise ``NoSuchProcess``.
    """
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
