"""Limits on a task (`Limits`: a timeout and a memory cap), their enforcement inside the task's own
process (`Enforcer`), the words for a task that died of one, and what a task costs (`read_tree`).

How each limit holds, and why this way:

- **timeout**: enforced by the task's own process, so it holds whoever started it and after the
  kernel that did has gone (a restart).  At the deadline an interval timer's SIGALRM sends SIGTERM
  to the task's process group, as a cancel does; the task's handler raises `TimeLimitExceeded`
  (a BaseException), which interrupts Python code and every blocking call that returns on a
  signal (sleeps, lock waits, reads, libc's sleep through ctypes).  Code that never gives the
  interpreter back (C holding the GIL) is ended ``grace`` seconds later by faulthandler's watchdog,
  a C thread that needs no GIL: it writes every thread's stack to the log and exits the process;
  whoever reaps it (the kernel's supervisor, the fork server, the Dask worker) or any later read
  of the record (`overdue`) then kills what is left of the group and says it timed out.
- **memory**: a watcher thread in the task sums the USS (memory private to the process, what it
  would give back by ending) over the task's process tree, and stops the task like a timeout
  once it goes past the cap, naming the cap and the peak.  USS rather than RSS: a forked task
  starts as a copy of the kernel, and RSS counts every page it still shares with it.  Not an
  rlimit: RLIMIT_AS counts address space, which a forked kernel already has hundreds of MB of
  and which runtimes reserve without using (JVM, Go, CUDA, glibc's per-thread arenas); RLIMIT_DATA
  counts the inherited heap too, and both are per process, not per tree.  Not a cgroup: one is
  writable only where systemd delegates it, which a notebook server seldom has.  The cost: the
  watcher samples (every 0.1 s, longer if a sample is costly), so one fast allocation can go past
  the cap before it is seen; the OOM score below covers what a sample misses.
- **the OOM killer**: every task raises its ``oom_score_adj`` to 1000 (raising needs no
  privilege; children inherit it), so when the machine runs out of memory the task, not the
  kernel, is killed; a task killed by SIGKILL while the machine's OOM kill count rose is recorded
  as killed by the OOM killer.

One job: a task's limits and costs, from the value a user writes to the words its end is
recorded with; split, its parts would each need the others' definitions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import math
import numbers
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

from ._memwatch import tree as _tree

__all__ = [
    "Limits",
    "LimitExceeded",
    "TimeLimitExceeded",
    "MemoryLimitExceeded",
    "Enforcer",
    "checked",
    "explain",
    "overdue",
    "oom_kills",
    "read_tree",
    "format_bytes",
    "compact",
]

_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1000**4, "tib": 1024**4,
}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*")


def _timeout(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"timeout must be a number of seconds above 0 (or None), got {value!r}")
    try:
        result = float(value)
    except OverflowError:
        result = math.inf
    if not (result > 0 and math.isfinite(result)):
        raise ValueError(f"timeout must be a finite number of seconds above 0 (or None), got {value!r}")
    return result


def _memory(value: Any) -> int | None:
    if value is None:
        return None
    problem = ValueError(
        f"memory must be a number of bytes above 0 or a size such as '512 MiB' or '4 GB' (or None), got {value!r}"
    )
    if isinstance(value, str):
        match = _SIZE.fullmatch(value)
        if match is None or match.group(2).lower() not in _UNITS:
            raise problem
        number = float(match.group(1)) * _UNITS[match.group(2).lower()]
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise problem
    else:
        try:
            number = float(value)
        except OverflowError:
            raise problem from None
    if not (number >= 1 and math.isfinite(number)):
        raise problem
    return int(number)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a task may spend: ``timeout`` seconds of wall time, ``memory`` bytes (or ``"4 GiB"``).

    ``None`` is no limit.  Bad values raise `ValueError` here, naming the value.
    """

    timeout: float | None = None
    memory: int | None = None

    def __init__(self, timeout: float | None = None, memory: int | str | None = None) -> None:
        object.__setattr__(self, "timeout", _timeout(timeout))
        object.__setattr__(self, "memory", _memory(memory))

    def __repr__(self) -> str:
        memory = None if self.memory is None else format_bytes(self.memory)
        return f"Limits(timeout={self.timeout!r}, memory={memory!r})"

    def to_record(self) -> dict[str, Any] | None:
        """As the task's record keeps them (``None`` when there is no limit)."""
        if self.timeout is None and self.memory is None:
            return None
        return {"timeout": self.timeout, "memory": self.memory}


def checked(value: Any, what: str = "limits") -> Limits | None:
    if value is None or isinstance(value, Limits):
        return value
    raise TypeError(f"{what} must be a bg.Limits(timeout=..., memory=...), got {type(value).__name__}")


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}".replace(".0 ", " ")
        n /= 1024
    raise AssertionError("unreachable")


def _seconds(value: float) -> str:
    return f"{value:g} s"


class LimitExceeded(BaseException):
    """Raised in a task that went past one of its limits; a BaseException, like a cancel's, so
    ``except Exception`` in the task lets it by."""


class TimeLimitExceeded(LimitExceeded):
    pass


class MemoryLimitExceeded(LimitExceeded):
    pass


def timeout_text(timeout: float) -> str:
    return f"TimeLimitExceeded: the task timed out after {_seconds(timeout)} (its limit) and was stopped"


def memory_text(limit: int, peak: int) -> str:
    return (
        f"MemoryLimitExceeded: the task went past its memory limit of {format_bytes(limit)} "
        f"(peak {format_bytes(peak)}) and was stopped"
    )


OOM_TEXT = "killed by the OOM killer (out of memory)"


# -- what a task costs ------------------------------------------------------------------------


def _cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


#: the last CPU reading of each task tree read here: (pid, started) -> (monotonic, CPU seconds)
_SEEN: dict[tuple[int, float | None], tuple[float, float]] = {}
_PROCS: dict[int, psutil.Process] = {}


def _process(pid: int) -> psutil.Process:
    proc = _PROCS.get(pid)
    if proc is None:
        if len(_PROCS) > 4096:
            _PROCS.clear()
        proc = _PROCS[pid] = psutil.Process(pid)
    return proc


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
                proc = _process(p)
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


def compact(resources: dict[str, Any] | None) -> str:
    """``CPU 98% · 212 MiB`` (RSS), or ``""``."""
    if not resources:
        return ""
    cpu = resources.get("cpu_percent")
    memory = format_bytes(resources["rss"])
    return f"CPU {cpu:.0f}% · {memory}" if cpu is not None else memory


# -- in the task's own process ----------------------------------------------------------------

#: seconds between memory samples with a memory limit (longer if a sample is costly), and without
MEMORY_EVERY = 0.1
PEAK_EVERY = 1.0
#: a sample may cost at most this share of the task's time
SAMPLE_SHARE = 0.02
OOM_SCORE_ADJ = 1000


def raise_oom_score() -> None:
    """Make this process (and what it starts) the OOM killer's first choice."""
    with contextlib.suppress(OSError):  # system calls, no file object: every task does this first
        fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, str(OOM_SCORE_ADJ).encode())
        finally:
            os.close(fd)


def _tree_memory(pid: int) -> tuple[int, int]:
    """(RSS, USS) of ``pid``'s tree, USS read only when RSS says it could matter: see `Enforcer`."""
    rss = uss = 0
    for p in _tree(pid):
        try:
            proc = _process(p)
            info = proc.memory_full_info()
            rss += info.rss
            uss += info.uss
        except psutil.Error:
            _PROCS.pop(p, None)
    return rss, uss


class Enforcer:
    """A task's limits, in its own process: `start` before the task runs, `stop` after.

    `poll` says which limit ended it, if one did (the runner's SIGTERM handler asks, and raises
    it instead of taking the signal for a cancel); ``peak`` is the highest USS of the task's
    tree seen.  The timeout is this process's (an interval timer, faulthandler's watchdog); the
    memory cap is a watcher process's (`_memwatch`); without a cap a thread samples the peak.
    """

    def __init__(self, limits: dict[str, Any] | None, grace: float, write: Callable[[dict[str, Any]], Any] | None = None) -> None:
        limits = limits or {}
        self.timeout: float | None = limits.get("timeout")
        self.memory: int | None = limits.get("memory")
        self.grace = grace
        self.breach: LimitExceeded | None = None
        self.peak: int | None = None
        self._write = write
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watcher: subprocess.Popen[bytes] | None = None
        self._channel: socket.socket | None = None
        self._pending = b""
        self._pid = os.getpid()
        #: when the task began (made just before it starts): the peak's first sample is due
        #: `PEAK_EVERY` after this
        self._began = time.monotonic()

    def start(self) -> None:
        raise_oom_score()
        if self.timeout is not None:
            signal.signal(signal.SIGALRM, self._on_alarm)
            signal.setitimer(signal.ITIMER_REAL, self.timeout)
            # For code that never lets the handler run (C holding the GIL): halfway through the
            # grace faulthandler's C thread writes every thread's stack to the log, and at its end
            # the watcher process kills the task's group.
            with contextlib.suppress(RuntimeError, ValueError, OSError):
                faulthandler.dump_traceback_later(self.timeout + self.grace / 2, exit=False, file=sys.stderr)
        if self.memory is not None or self.timeout is not None:
            self._start_watcher()

    def start_sampler(self) -> None:
        """Without a memory cap, start the thread that samples the peak (its first sample is
        due `PEAK_EVERY` after the task began).  The runner calls this once the task has run for
        a progress interval, so a task shorter than that starts no thread for it."""
        if self.memory is None and self._thread is None and not self._stop.is_set():
            self._thread = threading.Thread(target=self._sample_peak, name="nbbgtask-peak", daemon=True)
            self._thread.start()

    def _start_watcher(self) -> None:
        ours, theirs = socket.socketpair()
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_memwatch.py")
        try:
            self._watcher = subprocess.Popen(
                [
                    sys.executable, script, str(self._pid), str(self.memory or 0), repr(self.grace), repr(MEMORY_EVERY),
                    repr(0 if self.timeout is None else time.time() + self.timeout + self.grace),
                ],
                stdin=theirs.fileno(),
                stdout=subprocess.DEVNULL,
                close_fds=True,
            )
        except OSError as exc:
            ours.close()
            print(f"nbbgtask: the memory limit cannot be watched: {exc}", file=sys.stderr)
            return
        finally:
            theirs.close()
        ours.setblocking(False)
        self._channel = ours

    def poll(self) -> LimitExceeded | None:
        """The limit this task went past, if any (reads what the memory watcher said)."""
        if self._channel is not None:
            try:
                while True:
                    data = self._channel.recv(4096)
                    if not data:
                        break
                    self._pending += data
            except (BlockingIOError, OSError):
                pass
            *lines, self._pending = self._pending.split(b"\n")
            for line in lines:
                kind, _, number = line.partition(b" ")
                with contextlib.suppress(ValueError):
                    self.peak = max(self.peak or 0, int(number))
                if kind == b"B" and self.breach is None and self.memory is not None:
                    self.breach = MemoryLimitExceeded(memory_text(self.memory, self.peak or 0).split(": ", 1)[1])
                    if self._write is not None:  # if it has to be killed, whoever records that says why
                        with contextlib.suppress(Exception):
                            self._write({"limit_error": memory_text(self.memory, self.peak or 0)})
        return self.breach

    def stop(self) -> None:
        if self.timeout is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            faulthandler.cancel_dump_traceback_later()
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join()
        if self._watcher is not None and self._channel is not None:
            self.poll()
            self._channel.close()  # the watcher's cue to leave
            try:
                self._watcher.wait(2.0)
            except subprocess.TimeoutExpired:
                self._watcher.kill()
                self._watcher.wait()

    def _on_alarm(self, signum: int, frame: Any) -> None:
        assert self.timeout is not None
        if self.breach is not None:
            return
        self.breach = TimeLimitExceeded(timeout_text(self.timeout).split(": ", 1)[1])
        # As a cancel: SIGTERM to the task's group (it and what it started); ours raises the breach.
        try:
            if os.getpgrp() == self._pid:
                os.killpg(self._pid, signal.SIGTERM)
            else:
                os.kill(self._pid, signal.SIGTERM)
        except OSError:
            pass

    def _sample_peak(self) -> None:
        interval = max(0.0, PEAK_EVERY - (time.monotonic() - self._began))
        while not self._stop.wait(interval):
            began = time.perf_counter()
            _, uss = _tree_memory(self._pid)
            self.peak = max(self.peak or 0, uss)
            interval = max(PEAK_EVERY, (time.perf_counter() - began) / SAMPLE_SHARE)

    def error(self, exc: LimitExceeded) -> str:
        """The error line of a task stopped by ``exc``."""
        if isinstance(exc, MemoryLimitExceeded) and self.memory is not None:
            return memory_text(self.memory, self.peak or 0)
        return f"{type(exc).__name__}: {exc}"


# -- for whoever records a task's end ---------------------------------------------------------


def oom_kills() -> int | None:
    """How many processes the OOM killer has killed on this machine since boot (Linux 4.13+)."""
    # Asked before every local task: one read and a search, not a loop over its 180 lines.
    try:
        with open("/proc/vmstat", "rb", buffering=0) as f:
            text = f.read(65536)
        at = text.find(b"\noom_kill ")
        if at >= 0:
            return int(text[at + 10 : text.index(b"\n", at + 10)])
    except (OSError, ValueError):
        pass
    return None


def overdue(record: dict[str, Any], grace: float, now: float | None = None) -> bool:
    """A live task past its timeout by more than the grace and a second: its own process should
    have ended it; whoever reads this kills it."""
    limits = record.get("limits") or {}
    timeout, started = limits.get("timeout"), record.get("started")
    if timeout is None or started is None:
        return False
    return (time.time() if now is None else now) > started + timeout + grace + 1.0


def explain(record: dict[str, Any], error: str, code: int | None = None, now: float | None = None) -> str:
    """The error of a task whose process ended without saying how (``error`` says what is known):
    a limit it went past, or the OOM killer, where that is what ended it."""
    if record.get("limit_error"):
        return f"{record['limit_error']} ({error})"
    memory = (record.get("limits") or {}).get("memory")
    limits = record.get("limits") or {}
    timeout, started = limits.get("timeout"), record.get("started")
    if timeout is not None and started is not None and (time.time() if now is None else now) >= started + timeout:
        return f"{timeout_text(timeout)} ({error})"
    if code == -signal.SIGKILL and memory is not None:
        return f"MemoryLimitExceeded: the task went past its memory limit of {format_bytes(memory)} and was killed ({error})"
    if code == -signal.SIGKILL and record.get("oom_kills") is not None:
        count = oom_kills()
        if count is not None and count > record["oom_kills"]:
            return f"{OOM_TEXT}: the task process {record.get('pid') or ''} was killed (SIGKILL)".replace("  ", " ")
    return error
