"""Holding a task's log to its cap (``bg.configure(log_max=...)``), from inside the task's process.

The task's fds 1 and 2 are the log file itself (opened for appending), shared with every process
the task starts, so C code, subprocesses and Python all write straight to it and nothing can
block them.  Rather than put a pipe and a copying thread in between (a pipe that fills while C
code holds the GIL would stop the task for good), the log is cut in place, as journald and
Docker's ``max-size`` keep a bounded log: once it is over the cap, the middle is given back to the
file system with ``fallocate(PUNCH_HOLE)``, which never disturbs a writer appending at the end.
The first half of the cap (the head) and the last half (the tail) stay; the last line of the head
is overwritten with a marker saying how many bytes were dropped.  The file keeps its length, with
a hole where the middle was: the readers in `nbbgtask.store.tail` skip holes.

The check is an ``fstat`` each progress interval (the reporter's writer thread) and once before the
task writes its result and its end, so those are written before the log can take the room they
need.  Between two checks a task may write past the cap by what it prints in one interval.  A
file system without hole punching (rare: tmpfs, ext4, xfs, btrfs all have it) leaves the log
uncapped, and the log says so once.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys

__all__ = ["LogCap", "DEFAULT_LOG_MAX", "MIN_LOG_MAX"]

#: the cap when none is configured
DEFAULT_LOG_MAX = 100 * 1024 * 1024
#: the smallest cap: a head and a tail of half a MiB each, well above what a bar shows
MIN_LOG_MAX = 1024 * 1024
#: bytes at the end of the head given to the marker line
MARKER_ROOM = 200
_PUNCH_HOLE = 0x02
_KEEP_SIZE = 0x01


def _marker(dropped: int, limit: int) -> bytes:
    text = f"\n[nbbgtask: {dropped:,} bytes of this log were dropped here: a log is held to {limit:,} bytes (log_max); its start and end are kept]"
    return text.encode()[: MARKER_ROOM - 1].ljust(MARKER_ROOM - 1) + b"\n"


class LogCap:
    """The cap on the log behind this process's fd 1 (nothing is done if fd 1 is not a file)."""

    def __init__(self, limit: int | None, fd: int = 1) -> None:
        self.limit = max(MIN_LOG_MAX, int(limit)) if limit else None
        self._fd = fd
        self._inode: tuple[int, int] | None = None
        self._punched = 0
        self._broken = False
        with contextlib.suppress(OSError):
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                self._inode = (st.st_dev, st.st_ino)
        self._block = 4096

    @property
    def active(self) -> bool:
        return self.limit is not None and self._inode is not None and not self._broken

    def check(self, keep: int | None = None) -> int:
        """Cut the log if it is over the cap (or keep only ``keep`` bytes of its tail: a full disk);
        how many bytes were given back now."""
        if not self.active:
            return 0
        assert self.limit is not None
        try:
            st = os.fstat(self._fd)
        except OSError:
            return 0
        if (st.st_dev, st.st_ino) != self._inode:
            return 0  # the task put something else on fd 1: not ours to cut
        half = self.limit // 2
        head = -(-half // self._block) * self._block  # rounded up to whole blocks
        tail = half if keep is None else min(half, keep)
        if st.st_size <= head + tail + self._block:
            return 0
        end = (st.st_size - tail) // self._block * self._block
        start = max(head, self._punched)
        if end <= start:
            return 0
        try:
            self._punch(start, end - start)
            self._write_marker(end - head, head)
        except OSError as exc:
            self._broken = True
            with contextlib.suppress(Exception):
                print(f"nbbgtask: this task's log cannot be held to log_max here ({exc}); it is not cut", file=sys.stderr)
            return 0
        self._punched = end
        return end - start

    def _punch(self, offset: int, length: int) -> None:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
        if libc.fallocate(self._fd, _PUNCH_HOLE | _KEEP_SIZE, offset, length) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))

    def _write_marker(self, dropped: int, head: int) -> None:
        # fd 1 appends wherever it writes: the marker needs a description of its own, at an offset
        fd = os.open(f"/proc/self/fd/{self._fd}", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.pwrite(fd, _marker(dropped, self.limit or 0), head - MARKER_ROOM)
        finally:
            os.close(fd)
