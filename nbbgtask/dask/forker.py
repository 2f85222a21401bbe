"""What runs in a Dask worker's *forker*: a small process, forked from the worker once, that forks
the worker's spares, signals them on its behalf and says how they end (`nbbgtask.dask.wire`, 4).

Why a forker: a fork makes parent and child share every page until one of them writes it.
Forked by the worker, each new spare would make the worker copy, page by page, whatever it writes
next (measured: a couple of milliseconds on its next task, whatever that task is), and each fork
would stall the worker's threads while its page tables are copied.  The forker writes next to
nothing: the worker copies what it writes once per forker, not once per task.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import time
from typing import Any

from nbbgtask.core.procs import signal_group
from nbbgtask.dask import wire
from nbbgtask.dask.child import spare_main
from nbbgtask.task.runner import exit_child

__all__ = ["forker_main"]


def forker_main(path: str, inherited: frozenset[int]) -> int:
    """The forker, in its own process: connect to the worker at ``path``, fork spares on request,
    report how they end; when the worker's end closes, end them all and leave.

    ``inherited``: the worker's pipes to its children, to close (see `nbbgtask.dask.spares`).
    """
    for fd in inherited:
        try:
            os.close(fd)
        except OSError:
            pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    signal.signal(signal.SIGCHLD, _noted)  # a handler, so that a child's end writes to wake_write
    signal.set_wakeup_fd(wake_write)
    events = select.poll()
    events.register(sock.fileno(), select.POLLIN)
    events.register(wake_read, select.POLLIN)
    children: set[int] = set()
    retiring = False
    while not (retiring and not children):
        for fd, _ in events.poll():
            if fd == wake_read:
                while True:
                    try:
                        if not os.read(wake_read, 512):
                            break
                    except BlockingIOError:
                        break
                _reap(children, sock)
                continue
            got = wire.recv_record(sock)
            if got is None:  # the worker closed, or is gone: the tasks it gave up go with it
                for pid in children:
                    signal_group(pid, signal.SIGKILL)
                for pid in children:
                    try:
                        os.waitpid(pid, 0)
                    except ChildProcessError:
                        pass
                return 0
            op, pid, number, fds = got
            if op == wire.FORK:
                try:
                    child = _fork_spare(fds, sock, (wake_read, wake_write))
                except OSError as exc:
                    wire.send_record(sock, wire.PID, -(exc.errno or 1))
                else:
                    children.add(child)
                    wire.send_record(sock, wire.PID, child)
                finally:
                    for fd in fds:
                        os.close(fd)
            elif op == wire.KILL:
                if pid in children:  # not reaped: its pid (and group) cannot be someone else's
                    signal_group(pid, number)
            elif op == wire.RETIRE:
                retiring = True
        _reap(children, sock)
    return 0


def _noted(signum: int, frame: Any) -> None:
    pass


def _reap(children: set[int], sock: socket.socket) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        try:
            wire.send_record(sock, wire.EXITED, pid, os.waitstatus_to_exitcode(status))
        except OSError:
            pass  # the worker is gone: the next read says so


def _fork_spare(fds: list[int], sock: socket.socket, wake: tuple[int, int]) -> int:
    """Fork a spare that keeps ``fds``; return once it has its own session."""
    if len(fds) != wire.FORK_FDS:
        raise OSError(22, "a spare needs three descriptors")
    commands, reports, output = fds
    pid = os.fork()
    if pid == 0:

        def main() -> int:
            os.setsid()  # its own group: a cancel signals the task and what it started, nothing else
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            sock.close()
            for fd in wake:
                os.close(fd)
            os.dup2(output, 1)  # sys.stdout and sys.stderr already write to fds 1 and 2
            os.dup2(output, 2)
            os.close(output)
            return spare_main(commands, reports)

        exit_child(main)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            if os.getpgid(pid) == pid:
                break
        except ProcessLookupError:
            break
        os.sched_yield()
    return pid


