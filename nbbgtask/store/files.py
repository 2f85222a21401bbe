"""Files under the home folder: where a task's log, outputs and result are, and writing a file atomically."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Iterable
from pathlib import Path

from nbbgtask.core.errors import HomeError, StoreError
from nbbgtask.core.trust import NOFOLLOW, SUBFOLDERS, check_folder, check_id
from nbbgtask.core.wire import write_all

__all__ = ["log_path", "outputs_path", "result_path", "stack_path", "stack_files", "remove_task_files", "atomic_write"]


def log_path(home: Path | str, task_id: str) -> Path:
    """Every path made from a task id checks the id first: a record's id is never a path."""
    return Path(home) / "logs" / f"{check_id(task_id)}.log"


def outputs_path(home: Path | str, task_id: str) -> Path:
    """What the task displayed (`nbbgtask.task.outputs`): JSON lines, data only."""
    return Path(home) / "outputs" / f"{check_id(task_id)}.jsonl"


def result_path(home: Path | str, task_id: str) -> Path:
    return Path(home) / "results" / f"{check_id(task_id)}.pkl"


def stack_path(home: Path | str, task_id: str, pid: int, started: float) -> str:
    """Where a running task writes its stack when asked (`TaskStatus.stack`).  The name carries
    the task's pid and start time: an asker finds the process there even before the task's first
    report (which a task holding the GIL from its start never makes), and tells it from a reused pid."""
    return os.path.join(home, "stacks", f"{check_id(task_id)}.{pid}.{started:.3f}.txt")  # made in every task: no pathlib


def stack_files(home: Path | str, task_id: str) -> list[tuple[Path, int, float]]:
    """The stack files of a task, each with the pid and start time its name gives."""
    found = []
    for path in (Path(home) / "stacks").glob(f"{check_id(task_id)}.*.txt"):
        try:
            _, pid, started = path.name[: -len(".txt")].split(".", 2)
            found.append((path, int(pid), float(started)))
        except ValueError:
            continue
    return found


def remove_task_files(home: Path | str, task_ids: Iterable[str]) -> None:
    """Remove every file of these tasks: its log, outputs, result, stack files, and the temp files
    of a task killed while it wrote one.  Each folder is listed once and a file goes if its name
    starts with one of the ids and a dot (so no path is ever made from an id); a glob per task
    compiled a pattern per task, and took most of a prune of 90,000 tasks."""
    doomed = set(task_ids)
    if not doomed:
        return
    for folder in SUBFOLDERS:  # each file in them is a task's, named after its id
        path = os.path.join(home, folder)
        try:
            names = os.listdir(path)
        except FileNotFoundError:
            continue
        for name in names:
            owner, dot, _ = name.partition(".")
            if dot and owner in doomed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(path, name))  # a link goes, never what it names


def atomic_write(path: str | os.PathLike[str], data: bytes, *, durable: bool, tmp: str | None = None) -> None:
    """Replace ``path`` with ``data`` at once: readers see the old file or the new one, never a part.

    ``durable``: fsync before the rename, so the new content survives a crash of the machine.
    ``tmp``: the temporary file's path; by default ``<path without suffix>.<pid>.<thread>.tmp``,
    this thread's own.
    The temporary file is removed if anything fails, and the error is raised.  It is made new
    (``O_EXCL``, never through a symlink): one left by a writer that was killed is removed first.
    """
    path = os.fspath(path)
    if tmp is None:
        tmp = f"{os.path.splitext(path)[0]}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o600)
        except FileExistsError:
            os.unlink(tmp)  # a symlink is removed, not followed
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o600)
        try:
            write_all(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def make_folders(home: Path, folders: Iterable[str]) -> None:
    """Make the store's folders in ``home``, each proved a plain folder of the user's (not a link),
    or a `StoreError` that says what to do."""
    try:
        if os.geteuid() == 0 and not os.stat(home).st_mode & stat.S_IWUSR:
            # root may write anyway: a home its owner made read-only stays so
            raise PermissionError(errno.EACCES, "Permission denied (the folder is read-only)")
        for folder in folders:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            check_folder(home, folder)
    except HomeError:
        raise
    except OSError as exc:
        raise StoreError(
            f"cannot write the nbbgtask store in {home}: {exc.strerror or exc}; fix its "
            f"permissions, or point NBBGTASK_HOME or bg.configure(home=...) at another folder"
        ) from None
