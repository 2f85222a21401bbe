"""The entry point of a task process started by spawn: read the job from stdin and run it."""

from __future__ import annotations

import io
import os
import sys

from nbbgtask.core.wire import read_frame


def _read_frame() -> bytes:
    """The next of the frames `nbbgtask.local.launcher._spawn` wrote to stdin."""
    data = read_frame(0)
    if data is None:
        raise EOFError("the job did not come whole on stdin: the process that spawned this one is gone")
    return data


def main() -> int:
    path, job = _read_frame(), _read_frame()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    # As a forked task's (`nbbgtask.local.launcher._redirect_output`): line-buffered, whatever the environment
    # says.  Block-buffered (Python's default for a file) a print would reach the log after what
    # a subprocess wrote later, and not live; unbuffered (PYTHONUNBUFFERED) it costs two writes.
    sys.stdout = io.TextIOWrapper(open(1, "wb", closefd=False), line_buffering=True)  # noqa: SIM115
    sys.stderr = io.TextIOWrapper(open(2, "wb", closefd=False), line_buffering=True)  # noqa: SIM115
    from nbbgtask.task.runner import run_pickled

    return run_pickled(path, job)


def entry() -> None:
    """Run as the task's process (never returns): ``python -P -c "...; entry()"`` (`paths.interpreter`)."""
    from nbbgtask.task.runner import exit_child

    exit_child(main)


if __name__ == "__main__":
    entry()
