"""The ways a task runs, for the contract suite (tests/test_contract.py).

Each entry of ``WAYS`` names a way and says how to put nbbgtask into it; the ``way`` fixture
(tests/conftest.py) runs every contract test once per entry, as TinyDB runs its table tests over
each storage.  A new way is one more line in ``WAYS`` (its name is what ``started_by`` answers
for a task started that way).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import nbbgtask as bg


def _on_dask(request: pytest.FixtureRequest) -> None:
    bg.configure(backend="dask", dask_client=request.getfixturevalue("dask_client"))


@dataclasses.dataclass(frozen=True)
class Way:
    name: str
    #: puts nbbgtask into this way; called after the ``home`` fixture, with the test's request
    configure: Callable[[pytest.FixtureRequest], Any]
    #: the task is a fork of the caller, so it inherits the caller's state as it was at the start;
    #: otherwise the function and its arguments travel by cloudpickle and the rest is imported afresh
    forks_the_caller: bool


WAYS = [
    Way("fork", lambda request: bg.configure(start_method="fork"), forks_the_caller=True),
    Way("spawn", lambda request: bg.configure(start_method="spawn"), forks_the_caller=False),
    Way("forkserver", lambda request: bg.configure(start_method="forkserver"), forks_the_caller=False),
    Way("dask", _on_dask, forks_the_caller=False),
]


def started_by(status: bg.TaskStatus) -> str:
    """How ``status``'s task was started: "fork", "spawn", "dask", ... (a ``Way``'s name)."""
    return status.refresh().start_method


def started_line(status: bg.TaskStatus) -> str:
    """The first line of the log of a task started by a way forced with configure(start_method=...):
    nbbgtask's note of how it was started (a Dask task's log has none)."""
    method = status.refresh().start_method
    return "" if method == "dask" else f"nbbgtask: started by {method} (start_method={method!r})\n"


@contextlib.contextmanager
def local_cluster(n_workers: int, threads_per_worker: int, processes: bool = True) -> Iterator[Any]:
    """A real ``distributed.LocalCluster``; on the way out nbbgtask goes back to local tasks and
    drops its Dask backend before the cluster goes, so no client tries to reconnect to it."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=n_workers, threads_per_worker=threads_per_worker, processes=processes,
        dashboard_address=":0", silence_logs=50,
    ) as cluster:
        try:
            yield cluster
        finally:
            from nbbgtask.dask import backend as _dask_backend
            bg.configure(backend="local")
            _dask_backend.close()
