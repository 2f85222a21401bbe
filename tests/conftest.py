"""Fixtures: a fresh home folder per test, and a real ipykernel driven over jupyter_client."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import nbbgtask as bg
from nbbgtask import _config

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """Every test gets its own store; settings go back to the defaults afterwards."""
    path = tmp_path / "home"
    _config.reset()
    bg.configure(home=path, cancel_grace=2)
    yield path
    for status in bg.tasks(state=["queued", "running"]):
        status.cancel()
    _config.reset()


@pytest.fixture
def kernel(home: Path) -> Iterator[object]:
    from kernel_driver import Kernel

    k = Kernel(env={**os.environ, "NBBGTASK_HOME": str(home)})
    try:
        yield k
    finally:
        k.shutdown()
