"""The one at-fork reset: what a forked child renews of its parent's state.

A child forked from a kernel (a task), from the fork server or from a Dask worker's forker
inherits every module's state as it was at the fork: locks another thread held, the kernel's
background threads (which do not exist in the child), caches of the parent's files and
processes.  Each module that keeps such state registers one function here, whose docstring says
what breaks without it; Python calls them all, in the order they were registered (the order the
modules were imported), through a single ``os.register_at_fork`` hook.
"""

from __future__ import annotations

import os
from collections.abc import Callable

__all__ = ["renew_in_child", "registered"]

_RESETS: list[Callable[[], None]] = []


def renew_in_child(reset: Callable[[], None]) -> Callable[[], None]:
    """Call ``reset`` in every child forked from this process, before anything else runs there."""
    _RESETS.append(reset)
    return reset


def registered() -> list[str]:
    """The resets, by ``module.function``, in the order they run (for tests and the docs)."""
    return [f"{r.__module__}.{r.__qualname__}" for r in _RESETS]


def _after_fork_in_child() -> None:
    for reset in _RESETS:
        reset()


os.register_at_fork(after_in_child=_after_fork_in_child)
