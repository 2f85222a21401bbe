"""What runs in the task's own process on a Dask worker: a spare waiting for its task, then the task.

A spare is forked ahead of time (by the worker's forker, `nbbgtask.dask.forker`, or by the worker itself)
and waits on its commands pipe; handed a task, it runs it with the same runner as a local task,
reports through its reports pipe (`nbbgtask.dask.wire`, 5 and 6), and exits.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import cloudpickle

from nbbgtask.core.sources import collect, restore
from nbbgtask.dask import wire as _dask_wire
from nbbgtask.task import outputs as _outputs
from nbbgtask.task.reporter import Reporter
from nbbgtask.task.runner import Job, listen_for_stack_requests, run_job

__all__ = ["PipeSink", "spare_main"]


class PipeSink:
    """Where the reports of a task on a worker go: frames on a pipe to `run_on_worker`."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def _send(self, kind: str, body: Any) -> None:
        with self._lock:
            _dask_wire.send_report(self._fd, kind, body)

    def progress(self, fields: dict[str, Any] | None) -> bool:
        if fields is not None:
            self._send(_dask_wire.PROGRESS, fields)
        return False  # a cancel arrives as SIGTERM

    def save_result(self, data: bytes) -> None:
        self._send(_dask_wire.RESULT, data)

    def output(self, line: bytes) -> None:
        self._send(_dask_wire.OUTPUT, line)

    def finish(self, fields: dict[str, Any]) -> None:
        self._send(_dask_wire.FINAL, fields)


def spare_main(commands: int, reports: int, inherited: frozenset[int] = frozenset()) -> int:
    """A spare, in its own process: wait for a task, run it, exit.  End of the pipe: exit quietly.

    ``inherited``: descriptors of the worker's that are not this spare's, to close (see
    `nbbgtask.dask.spares`'s list of pipe ends).
    """
    for fd in inherited:
        try:
            os.close(fd)
        except OSError:
            pass
    # fork_detached leaves SIGTERM ignored until run_job handles it.  Here, in a session of its
    # own, only a cancel sends it: one that comes before run_job is ready must still stop the task.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _rehearse()
    task = _dask_wire.read_task(commands)
    os.close(commands)
    if task is None:
        return 0  # the worker let this spare go (replaced, closing, or gone) before it had a task
    context, payload = task
    if context is not None:
        cwd, environ, path = context
        if os.getcwd() != cwd:
            os.chdir(cwd)
        if environ != dict(os.environ):
            os.environ.clear()
            os.environ.update(environ)
        sys.path[:] = path
    _outputs.prepare()  # before the job is unpickled: its display() is then this process's
    job = pickle.loads(payload)
    job.home = Path(os.getcwd())
    stack_file = _answer_stack_requests(job.task_id)
    try:
        return run_job(job, PipeSink(reports))
    finally:
        if stack_file is not None:  # ended: nothing more to ask (a late dump goes to the unlinked file)
            with contextlib.suppress(OSError):
                os.unlink(stack_file)


def _answer_stack_requests(task_id: str) -> str | None:
    """Dump every thread's stack into the task's stack file on `STACK_SIGNAL` (`nbbgtask.dask.wire`, 8),
    as a local task does; the file appears only once the handler is in place, since the signal's
    default action would end the task.  It stays registered until the process exits."""
    try:
        path = _dask_wire.stack_file(task_id, os.getpid())
    except (OSError, ValueError) as exc:  # the task runs on; stack() says it cannot answer
        print(f"nbbgtask: this task cannot show its stack: {exc}", file=sys.stderr)
        return None
    return listen_for_stack_requests(path)


class _NoSink:
    def progress(self, fields: dict[str, Any] | None) -> bool:
        return False


def _no_status(record: Any, home: Any, reporter: Any) -> None:
    """The rehearsal's job reports through nothing."""


def _rehearse() -> None:
    """Go once through what starting a task does (unpickle a job, start and stop its reporter),
    while idle: the pages that touches are then this process's own, and the task, when it comes,
    does not wait for the kernel to copy them one by one."""
    try:

        def target() -> None:
            pass

        job = Job(record={"id": "rehearsal"}, home=Path("."), target=target, make_status=_no_status, sources=collect(target))
        job = pickle.loads(cloudpickle.dumps(job))
        restore(job.target, job.sources)
        reporter = Reporter(job, _NoSink())
        reporter.start()
        reporter.stop()
    except Exception:  # only a warm-up: the task itself will say what is wrong, if anything is
        pass
