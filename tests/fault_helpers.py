"""Helpers of the fault-injection suite (test_faults.py): reading the store's files as they are
on disk, killing task processes, a full disk for one process, a big history, running as nobody.

They use the public API where there is one.  What they still reach into, because nothing public
says it (the main checkout renames internals, so keep this list true):

- ``_supervisor.supervisor()``, its ``.lock`` and ``.children`` (pid -> entry whose [1] is the
  task id): which child of this process is which task before the task has reported its pid
  (`task_pid`), and whether every task process has been reaped (`supervisor_idle`);
- ``_store.HISTORY_SHARDS`` and ``_store.forget_instances()``: `fill_history` writes that many
  shards and then drops the cached stores, as a fresh process would see the files; `use_home`
  drops them when the home moves.

They also know the store's layout on disk (``live/<id>.json``, ``history/<NN>.json``, a
``tasks`` table, damaged files set aside as ``*.damaged-*``, the shard of an id is its first
two hex digits modulo the number of shards): the files are what a crash leaves behind, so the
checks read them rather than ask the library that wrote them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
from waiting import until

import nbbgtask as bg
from nbbgtask.local import supervisor as _supervisor
from nbbgtask.store import store as _store


def record_figures(test: str, **figures: Any) -> None:
    """Print what a test measured, and append it to $NBBGTASK_FIGURES (JSON lines) if set."""
    line = json.dumps({"test": test, **figures}, sort_keys=True)
    print(line)
    target = os.environ.get("NBBGTASK_FIGURES")
    if target:
        with open(target, "a") as f:
            f.write(line + "\n")


# -- the store's files, read as they are on disk -------------------------------------------------


def store_files(home: Path) -> list[Path]:
    return [*sorted((home / "live").glob("*.json")), *sorted((home / "history").glob("*.json"))]


def parses(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except ValueError:
        return False
    return True


def live_records(home: Path) -> dict:
    """id -> record of every live file, read from the files themselves."""
    records = {}
    for path in sorted((home / "live").glob("*.json")):
        with contextlib.suppress(FileNotFoundError):  # its task ended meanwhile
            records.update(json.loads(path.read_bytes())["tasks"])
    return records


def _history_records(home: Path) -> dict[str, dict]:
    """id -> record of every task in the history shards, read from the files themselves."""
    out: dict[str, dict] = {}
    for path in sorted((home / "history").glob("*.json")):
        out.update(json.loads(path.read_bytes()).get("tasks", {}))
    return out


def history_states(home: Path) -> dict[str, str]:
    """id -> state of every task in the history shards, read from the files themselves."""
    return {task_id: record["state"] for task_id, record in _history_records(home).items()}


def assert_store_intact(home: Path) -> dict:
    """Every store file parses as a TinyDB document; nothing was set aside as damaged."""
    records = {}
    for path in store_files(home):
        if path.name.endswith(".index.json"):  # an index, not a TinyDB file: checked by its reader
            continue
        data = json.loads(path.read_bytes())
        assert isinstance(data.get("tasks", {}), dict), path
        records.update(data.get("tasks", {}))
    damaged = [p.name for p in home.rglob("*") if ".damaged-" in p.name]
    assert not damaged, damaged
    return records


def history_file(home: Path, task_id: str) -> Path:
    """The history file that holds ``task_id``'s record: its shard's recent file, where a task
    that has just ended is, else the shard's main file."""
    index = _store.shard_of(task_id)
    recent = home / "history" / f"{index:02d}{_store.RECENT_SUFFIX}"
    if recent.exists() and task_id in json.loads(recent.read_bytes()).get("tasks", {}):
        return recent
    return home / "history" / f"{index:02d}.json"


def _fillers(base: dict, index: int, numbers: range, now: float) -> dict[str, dict]:
    """Finished tasks like ``base``, one per number, whose ids fall in shard ``index``."""
    records = {}
    for i in numbers:
        task_id = f"{index:02x}" + secrets.token_hex(15)  # its first two hex digits pick shard ``index``
        records[task_id] = {
            **base, "id": task_id, "name": f"filler-{i % 7}", "created": now - 20_000 + i,
            "finished": now - 20_000 + i + 0.5,
        }
    return records


def _add_to_file(path: Path, records: dict[str, dict]) -> None:
    old = json.loads(path.read_bytes()) if path.exists() else {}  # its schema mark is kept
    tmp = path.with_name(f".{path.name}.filling")
    tmp.write_text(json.dumps({**old, "tasks": {**old.get("tasks", {}), **records}}, separators=(",", ":")))  # as the store writes
    os.replace(tmp, path)  # whole, as the store writes a shard


def fill_history(home: Path, per_shard: int) -> int:
    """Put ``per_shard`` finished tasks in each history shard, in the store's own file format; how
    many finished tasks the history then holds (the fillers and one real task, their template)."""
    template = bg.run(lambda: "template", name="template")
    assert template.wait(30)
    base = _history_records(home)[template.id]
    now = time.time()
    for index in range(_store.HISTORY_SHARDS):
        _add_to_file(home / "history" / f"{index:02d}.json", _fillers(base, index, range(index, per_shard * _store.HISTORY_SHARDS, _store.HISTORY_SHARDS), now))
    _store.forget_instances()  # as a fresh process would see it
    return per_shard * _store.HISTORY_SHARDS + 1


def fill_recent(home: Path, task_id: str, count: int) -> Path:
    """Put ``count`` finished tasks (like ``task_id``'s record) in the recent file of ``task_id``'s
    shard, in the store's own format; that file."""
    base = {**live_records(home).get(task_id, {}), **_history_records(home).get(task_id, {})}
    assert base, f"no record of {task_id}"
    base.update(state="complete", percent=100.0)
    index = _store.shard_of(task_id)
    path = home / "history" / f"{index:02d}{_store.RECENT_SUFFIX}"
    _add_to_file(path, _fillers(base, index, range(count), time.time()))
    return path


def use_home(path: Path) -> Path:
    """Move this process to the home ``path``; the home now in use."""
    _store.forget_instances()
    return bg.configure(home=path).home


# -- task processes --------------------------------------------------------------------------------


def sleeper(seconds: float = 30) -> None:
    print("go", flush=True)
    time.sleep(seconds)


def sigkill(pid: int | None) -> bool:
    """SIGKILL the task process ``pid``; False if it is gone.  psutil checks that the pid still
    names the same process, and None (never psutil.Process(None): that is this process) is refused."""
    if pid is None or pid == os.getpid():
        return False
    try:
        psutil.Process(pid).kill()
    except psutil.NoSuchProcess:
        return False
    return True


def task_pid(status: bg.TaskStatus) -> int | None:
    """The task's pid: from the store once the task has reported it (its first report), else from
    this process's supervisor while the child is not yet reaped; None if neither knows it."""
    pid = status.refresh().pid
    if pid is None:
        with _supervisor.supervisor().lock:
            pid = next((p for p, entry in _supervisor.supervisor().children.items() if entry[1] == status.id), None)
    return pid


def death_said(status: bg.TaskStatus) -> str:
    """How the error of a SIGKILLed task reads: it must name the signal ("precise").  A vaguer
    "ended without reporting" was the race of two threads reaping one child, fixed in 9376595
    (test_a_task_reaped_by_two_threads_at_once_still_says_how_it_died); it fails here too now."""
    assert status.error is not None and "killed by signal 9 (SIGKILL)" in status.error, status.error
    return "precise"


def supervisor_idle(timeout: float = 10.0) -> bool:
    """This process's supervisor has reaped every task process it started."""
    return until(lambda: not _supervisor.supervisor().children, timeout)


@contextlib.contextmanager
def thread_crashes() -> Iterator[list[str]]:
    """Collect exceptions that end a thread (e.g. the supervisor's) instead of letting them escape."""
    crashes: list[str] = []
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        name = args.thread.name if args.thread is not None else "?"
        crashes.append(f"{name}: {args.exc_type.__name__}: {args.exc_value}")

    threading.excepthook = hook
    try:
        yield crashes
    finally:
        threading.excepthook = previous


# -- a full disk, another user ------------------------------------------------------------------------


def limit_file_size(limit: int) -> None:
    """A full disk for this process only: writes past ``limit`` bytes fail with EFBIG."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))


def in_child_as(uid: int, gid: int, fn: Callable[..., Any], *args: Any, umask: int | None = None) -> dict:
    """``fn(*args)`` in a forked child running as ``uid``/``gid`` (no other groups), sent back
    through a pipe as JSON: ``{"value": ...}``, or ``{"error": repr}`` if it raised."""
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*fork\(\)")
        pid = os.fork()
    if pid == 0:  # the fork hooks already gave the child its own stores and supervisor
        found: dict = {}
        try:
            os.close(read)
            if os.geteuid() != uid:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
            if umask is not None:
                os.umask(umask)
            found = {"value": fn(*args)}
        except BaseException as exc:
            found = {"error": repr(exc)}
        finally:
            with contextlib.suppress(BaseException):
                os.write(write, json.dumps(found).encode())
            os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    return json.loads(b"".join(chunks) or b"{}")


def as_nobody(fn: Callable[..., dict], *args: Any) -> dict:
    """``fn(*args)`` in a forked child running as an ordinary user (permissions do not bind root);
    its dict of findings (``{"child_error": repr}`` if it raised)."""
    uid = 65534 if os.geteuid() == 0 else os.geteuid()
    found = in_child_as(uid, 65534 if os.geteuid() == 0 else os.getegid(), fn, *args)
    return found["value"] if "value" in found else {"child_error": found.get("error")}


#: the second user of the machine that the security tests act as (made by the `attacker` fixture)
ATTACKER = "nbbgtask-mallory"


def fill_disk(disk: Path, leave: int = 0, last_write: int = 4096) -> Path:
    """Fill ``disk`` until ENOSPC (in 64 KiB writes, then ``last_write`` bytes at a time), then free
    ``leave`` bytes; returns the filler file."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    for size in (65536, last_write):
        try:
            while True:
                os.write(fd, b"\0" * size)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
    os.close(fd)
    return filler
