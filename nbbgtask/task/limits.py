"""A task's limits enforced inside its own process (`Enforcer`), and its OOM score.

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
  the cap before it is seen.  What a sample misses the kernel's own accounting catches at the
  end (`HighWater`): the task's peak resident memory (VmHWM, reset when the task starts, since a
  forked child inherits its parent's) and that of its children (``RUSAGE_CHILDREN``), so a burst
  that was freed again before a sample still ends the task ``failed``, never ``complete``, and
  ``peak_memory`` is the true peak.  The OOM score below covers a burst the machine cannot hold.
- **the OOM killer**: every task raises its ``oom_score_adj`` to 1000 (raising needs no
  privilege; children inherit it), so when the machine runs out of memory the task, not the
  kernel, is killed; a task killed by SIGKILL while the machine's OOM kill count rose is recorded
  as killed by the OOM killer.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

from nbbgtask.core.limits import LimitExceeded, MemoryLimitExceeded, TimeLimitExceeded, memory_text, timeout_text
from nbbgtask.core.procs import own_process
from nbbgtask.task.memwatch import tree as _tree
from nbbgtask.task.resources import forget, process

__all__ = ["Enforcer", "raise_oom_score"]

# ----------------------------------------------------------------

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


def _proc_status(*fields: str) -> dict[str, int]:
    """Fields of /proc/self/status given in kB, in bytes (plain system calls: no file object)."""
    found: dict[str, int] = {}
    try:
        fd = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
        try:
            text = os.read(fd, 65536)
        finally:
            os.close(fd)
    except OSError:
        return found
    for line in text.split(b"\n"):
        name, _, value = line.partition(b":")
        if name.decode() in fields:
            with contextlib.suppress(ValueError, IndexError):
                found[name.decode()] = int(value.split()[0]) * 1024
    return found


class HighWater:
    """The task's peak memory as the kernel counted it: read at the end, so nothing between two
    samples escapes it (Linux; elsewhere it reads nothing and the samples stand alone).

    A forked child starts with its parent's high-water mark (its resident set at the fork), so
    the mark is reset at the task's start (``5`` to ``/proc/self/clear_refs``), and what counts is
    the growth over the resident set then, plus what was private to the task then (its USS, read
    only when there is a cap to hold).  That is a lower bound of the peak USS the cap is about:
    memory the task shared with the kernel and then wrote (copy-on-write) is not in it.  Children
    (``RUSAGE_CHILDREN``: the largest one reaped, not their sum) count past what they shared with
    the task, so a forked helper is not charged for the pages it inherited.
    """

    def __init__(self, exact: bool) -> None:
        self.reset = False
        with contextlib.suppress(OSError):
            fd = os.open("/proc/self/clear_refs", os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, b"5")
                self.reset = True
            finally:
                os.close(fd)
        self.rss = _proc_status("VmRSS").get("VmRSS", 0)
        self.uss: int | None = None
        if exact and self.reset:
            with contextlib.suppress(psutil.Error):
                self.uss = psutil.Process().memory_full_info().uss
        self.children: int | None = None

    def note_children(self) -> None:
        """Read the children's mark now (before the memory watcher, a child too, is reaped)."""
        import resource

        self.children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024

    def peak(self) -> int | None:
        """The task's peak private memory by the kernel's count, or ``None`` where it cannot tell."""
        if not self.reset:
            return None
        hwm = _proc_status("VmHWM").get("VmHWM")
        if hwm is None:
            return None
        own = max(0, hwm - self.rss) + (self.uss or 0)
        if self.uss is not None and self.children:
            own = max(own, self.children - max(0, self.rss - self.uss))
        return own


def _tree_memory(pid: int) -> tuple[int, int]:
    """(RSS, USS) of ``pid``'s tree, USS read only when RSS says it could matter: see `Enforcer`."""
    rss = uss = 0
    for p in _tree(pid):
        try:
            proc = process(p)
            info = proc.memory_full_info()
            rss += info.rss
            uss += info.uss
        except psutil.Error:
            forget(p)
    return rss, uss


class Enforcer:
    """A task's limits, in its own process: `start` before the task runs, `stop` after.

    `poll` says which limit ended it, if one did (the runner's SIGTERM handler asks, and raises
    it instead of taking the signal for a cancel); ``peak`` is the highest USS of the task's
    tree seen.  The timeout is this process's (an interval timer, faulthandler's watchdog); the
    memory cap is a watcher process's (`nbbgtask.task.memwatch`); without a cap a thread samples the peak.
    """

    def __init__(
        self, limits: dict[str, Any] | None, grace: float, write: Callable[[dict[str, Any]], Any] | None = None
    ) -> None:
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
        self._high_water: HighWater | None = None

    def start(self) -> None:
        raise_oom_score()
        self._high_water = HighWater(exact=self.memory is not None)
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
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "memwatch.py")
        try:
            self._watcher = subprocess.Popen(
                [
                    sys.executable,
                    script,
                    str(self._pid),
                    str(self.memory or 0),
                    repr(self.grace),
                    repr(MEMORY_EVERY),
                    repr(0 if self.timeout is None else time.time() + self.timeout + self.grace),
                    # the watcher signals only what it proves to be this task (a pid may be reused)
                    repr(own_process()["pid_started"] if self._pid == os.getpid() else 0),
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
        if self._high_water is not None and self.memory is not None:
            self._high_water.note_children()
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

    def settle(self) -> LimitExceeded | None:
        """After `stop`: the peak by the kernel's own count; a memory breach that no sample saw
        (a burst freed again in between) becomes the task's breach, so it never ends complete."""
        found = self._high_water.peak() if self._high_water is not None else None
        if found is None:
            return self.breach
        self.peak = max(self.peak or 0, found)
        if self.memory is not None and self.breach is None and found > self.memory:
            self.breach = MemoryLimitExceeded(memory_text(self.memory, self.peak).split(": ", 1)[1])
        return self.breach

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
