"""What a running task costs: CPU % and memory of its process tree, read from this machine's
processes (the bar, the monitor, `status.resources()`, the command line, the server)."""

from __future__ import annotations

import socket
import time
from typing import Any

import psutil

from nbbgtask.task.memwatch import tree as _tree

__all__ = ["read_tree", "costs", "process", "forget"]

# ------------------------------------------------------------------------


def _cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


#: the last CPU reading of each task tree read here: (pid, started) -> (monotonic, CPU seconds)
_SEEN: dict[tuple[int, float | None], tuple[float, float]] = {}
_PROCS: dict[int, psutil.Process] = {}


def process(pid: int) -> psutil.Process:
    proc = _PROCS.get(pid)
    if proc is None:
        if len(_PROCS) > 4096:
            _PROCS.clear()
        proc = _PROCS[pid] = psutil.Process(pid)
    return proc


def forget(pid: int) -> None:
    """Drop the handle on a process that has gone."""
    _PROCS.pop(pid, None)


def read_tree(pid: int, started: float | None, uss: bool = True, settle: float = 0.0) -> dict[str, Any] | None:
    """CPU % and memory of the process tree ``pid`` leads, or ``None`` if it is gone.

    ``cpu_percent``: the tree's CPU time since the last reading of this tree in this process, per
    second of wall time (100 = one core); with no earlier reading, over ``settle`` seconds (0:
    ``None``).  ``rss``: resident memory, summed (pages shared between them counted in each);
    ``uss`` (if asked, it costs about a millisecond per 100 MB): memory private to each.
    """
    key = (pid, started)
    pids = _tree(pid)
    if not pids:
        _SEEN.pop(key, None)
        return None

    def sample() -> tuple[float, int, int, int]:
        cpu, rss, private, count = 0.0, 0, 0, 0
        for p in pids:
            try:
                proc = process(p)
                with proc.oneshot():
                    cpu += _cpu_seconds(proc)
                    if uss:
                        info = proc.memory_full_info()
                        rss += info.rss
                        private += info.uss
                    else:
                        rss += proc.memory_info().rss
                count += 1
            except psutil.NoSuchProcess:
                _PROCS.pop(p, None)
            except psutil.AccessDenied:
                pass
        return cpu, rss, private, count

    now = time.monotonic()
    cpu, rss, private, count = sample()
    if count == 0:
        _SEEN.pop(key, None)
        return None
    before = _SEEN.get(key)
    if before is None and settle > 0:
        before = (now, cpu)
        time.sleep(settle)
        now = time.monotonic()
        cpu, rss, private, count = sample()
    percent = None
    if before is not None and now > before[0]:
        percent = max(0.0, (cpu - before[1]) / (now - before[0]) * 100.0)
    if len(_SEEN) > 4096:
        _SEEN.clear()
    _SEEN[key] = (now, cpu)
    result: dict[str, Any] = {"cpu_percent": percent, "rss": rss, "processes": count}
    if uss:
        result["uss"] = private
    return result


def costs(records: list[dict[str, Any]], settle: float = 0.2) -> dict[str, dict[str, Any]]:
    """CPU and RSS of each running local task of this machine in ``records``, by id, over one
    ``settle`` for all of them (for a one-shot reader: the command line)."""
    host = socket.gethostname()
    running = [r for r in records if r["state"] == "running" and r.get("pid") and r.get("host") == host]
    for r in running:
        read_tree(r["pid"], r.get("pid_started"), uss=False)
    if running:
        time.sleep(settle)
    found = {}
    for r in running:
        figures = read_tree(r["pid"], r.get("pid_started"), uss=False)
        if figures is not None:
            found[r["id"]] = figures
    return found
