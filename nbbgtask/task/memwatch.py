"""The watcher of a task with limits: a small process of its own, run by path
(``python .../memwatch.py PID LIMIT GRACE INTERVAL DEADLINE STARTED``), so it imports psutil and
nothing of nbbgtask.  STARTED is the task's start time: every signal goes only to what is proved to
be the task just before it is sent (`_signal`).  LIMIT 0: no memory limit; DEADLINE (seconds since the epoch, 0: none): the task's
timeout plus its grace, when the watcher kills the task's whole group (the task itself stops at
its timeout; this is for one that cannot, blocked in C with the GIL held, and for what it started).

A process rather than a thread of the task's, because a thread needs the task's GIL, and code
that grows fastest (one large allocation, a copy in C) holds it: a thread would see the memory
only once it had been freed again.  It sums the USS of the task's process tree (itself left
out) every INTERVAL seconds; past LIMIT it tells the task why on fd 0 (a socket), sends SIGTERM
to the task's group (as a cancel does), and SIGKILL after GRACE seconds if the task is still
there.  It tells the task each new peak too.  The end of the socket (the task has ended, or
closed it) ends the watcher.

Each line it writes: ``P <bytes>`` a new peak, ``B <bytes>`` past the limit at that peak.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from Linux's /proc/PID/task/TID/children (psutil's slower walk
    where there is no such file); ``[]`` if ``pid`` is gone.  A descendant that ends while it is
    read is left out.  The watcher's, and the task's own readings (`nbbgtask.core.limits`)."""
    found, i = [pid], 0
    while i < len(found):
        current = found[i]
        i += 1
        try:
            for tid in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{tid}/children", "rb") as f:
                    found.extend(int(x) for x in f.read().split())
        except OSError:
            if current == pid:
                import psutil

                try:
                    return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
                except psutil.Error:
                    return []
    return found


def _uss(pid: int, me: int) -> int:
    import psutil

    total = 0
    for p in tree(pid):
        if p == me:
            continue
        try:
            total += psutil.Process(p).memory_full_info().uss
        except psutil.Error:
            pass
    return total


def _is_task(pid: int, started: float | None) -> bool:
    """``pid`` is still the task: its start time, this user's, not a zombie (read just now)."""
    import psutil

    if started is None:
        return False
    try:
        proc = psutil.Process(pid)
        return (
            abs(proc.create_time() - started) <= 0.05
            and proc.uids().effective == os.geteuid()
            and proc.status() != psutil.STATUS_ZOMBIE
        )
    except (psutil.Error, OSError):
        return False


def _signal(pid: int, sig: int, started: float | None) -> None:
    """Signal the task's group, or the task alone if it leads none; nothing unless it is proved.

    This watcher is a member of the task's group (the task started it): a group's id is never
    given to another process while the group has a member, so while this process is in group
    ``pid`` that group is the task's, even once the task itself has ended (what it started is
    left).  Otherwise the task's own start time and user are checked just before the signal, so a
    reused pid is never signalled."""
    try:
        if os.getpgrp() == pid:
            os.killpg(pid, sig)
        elif _is_task(pid, started):
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
    except OSError:
        pass


def main(argv: list[str]) -> int:
    pid, limit, grace, interval = int(argv[0]), int(argv[1]), float(argv[2]), float(argv[3])
    deadline = float(argv[4]) if len(argv) > 4 and float(argv[4]) > 0 else None
    started = float(argv[5]) if len(argv) > 5 and float(argv[5]) > 0 else None
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group's SIGTERM is for the task
    me = os.getpid()
    channel = 0
    peak = reported = 0
    pause = interval if limit else 3600.0
    while True:
        if deadline is not None:
            pause = max(0.0, min(pause, deadline - time.time()))
        ready, _, _ = select.select([channel], [], [], pause)
        if ready and not os.read(channel, 4096):
            return 0  # the task has ended
        if deadline is not None and time.time() >= deadline:
            print("nbbgtask: the task did not stop within the grace after its timeout; killing it", file=sys.stderr, flush=True)
            _signal(pid, signal.SIGKILL, started)
            return 0
        if not limit:
            pause = 3600.0
            continue
        began = time.perf_counter()
        uss = _uss(pid, me)
        pause = max(interval, 20 * (time.perf_counter() - began))  # at most ~5 % of a core
        peak = max(peak, uss)
        if uss > limit:
            print(
                f"nbbgtask: the task went past its memory limit of {limit >> 20} MiB "
                f"(USS {peak >> 20} MiB, children included); stopping it",
                file=sys.stderr,
                flush=True,
            )
            try:
                os.write(channel, f"B {peak}\n".encode())
            except OSError:
                return 0
            _signal(pid, signal.SIGTERM, started)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                ready, _, _ = select.select([channel], [], [], max(0.0, deadline - time.monotonic()))
                if ready and not os.read(channel, 4096):
                    return 0  # it stopped within the grace
            _signal(pid, signal.SIGKILL, started)  # this process too, if it is in the group
            return 0
        if peak > reported + (1 << 20):
            reported = peak
            try:
                os.write(channel, f"P {peak}\n".encode())
            except OSError:
                return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
