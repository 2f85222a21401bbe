"""Waiting for something another process does, with a bound."""

from __future__ import annotations

import time
from collections.abc import Callable


def until(predicate: Callable[[], object], timeout: float = 10.0, every: float = 0.02) -> bool:
    """``True`` as soon as ``predicate()`` is true; ``False`` if ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False
