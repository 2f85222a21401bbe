"""Forking a task's process off this one, detached: a child that leaves the caller's process group
(and session, under a terminal), writes to the task's log, holds none of the caller's sockets and
sends nothing to a kernel.  Every rule a forked child needs to be safe lives here, each with its
reason; the kernel (`nbbgtask.local.launcher`), the fork server and a Dask worker's forker use it.
"""

from __future__ import annotations

import _signal
import contextlib
import faulthandler
import fcntl
import gc
import io
import os
import signal
import socket
import stat
import sys
import warnings
from collections.abc import Callable
from typing import Any, NoReturn

from nbbgtask.task.runner import exit_child

__all__ = ["fork_detached"]


def fork_detached(run: Callable[[], int], output: int) -> int:
    """Fork a child that leaves this process's group (and session, under a terminal), sends its fds 1 and 2 to
    ``output``, keeps none of this process's sockets, and exits with ``run()``; its pid.

    Used for a task forked from a kernel, and for a task forked from a Dask worker.
    """
    # Unflushed output would be printed twice: once by the kernel, once by the child's copy.
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass
    global _STDIO
    if _STDIO is None:
        with contextlib.suppress(OSError):  # one of this process's fds 0-2 is closed: the child makes them
            _STDIO = _make_stdio()
    # Frozen objects are skipped by the child's garbage collector, so it does not write to (and
    # so copy) every page of the kernel's heap; see the note on gc.freeze in Python's docs.
    gc.freeze()
    with warnings.catch_warnings() if _FORK_WARNS else contextlib.nullcontext():
        # Python 3.12+ warns when a process with threads forks (a kernel has about nine), since
        # a lock held by another thread stays locked in the child.  The child runs only the
        # runner and the task: the runner takes none of the kernel's locks (see _in_child), and
        # our own locks are renewed after the fork; code in the task that needs a lock another
        # kernel thread may hold should use start_method="spawn".
        if _FORK_WARNS:
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*fork\(\) may lead to deadlocks")
        # Until the child has a session of its own, the kernel's group signals would reach it:
        # it is born with them blocked, and drops any that arrived before it left the group.
        # _signal's functions, not signal's: its wrappers turn every number into an enum, and in
        # the child (where each first use copies the pages it touches) that took 0.2 ms.
        blocked = _signal.pthread_sigmask(_signal.SIG_BLOCK, _GROUP_SIGNALS)
        session = _has_terminal()
        # With a terminal, the child tells on this pair when it has a session of its own.  A
        # socket pair, not a pipe: a child another thread forks meanwhile drops its copies with
        # the other sockets (_release_sockets), so it cannot keep it open and make the wait long.
        waiting, telling = socket.socketpair() if session else (None, None)
        try:
            pid = os.fork()
            if pid == 0:
                if waiting is not None:
                    waiting.close()
                _in_child(run, output, blocked, telling)  # never returns
            if not session:
                # Both sides make the child a group leader (as shells do for their jobs), so it
                # is out of the kernel's group when this returns, with no wait for it to run.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.setpgid(pid, pid)
        finally:
            _signal.pthread_sigmask(_signal.SIG_SETMASK, blocked)
            if telling is not None:
                telling.close()
    gc.unfreeze()
    if waiting is not None:
        with waiting:
            _await_own_session(waiting)
    return pid


def _has_terminal() -> bool:
    """This process has a controlling terminal (a script or IPython in a terminal, not a kernel
    that Jupyter started: those have none).  Asked once per session."""
    sid = os.getsid(0)
    known = _TERMINAL.get(sid)
    if known is None:
        try:
            os.close(os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY))
            known = True
        except OSError:
            known = False
        _TERMINAL.clear()
        _TERMINAL[sid] = known
    return known


#: session id -> whether it has a controlling terminal
_TERMINAL: dict[int, bool] = {}
#: the standard streams of every task this process forks (`_make_stdio`)
_STDIO: tuple[Any, Any, Any] | None = None


#: Python warns on a fork with threads running from 3.12 on
_FORK_WARNS = sys.version_info >= (3, 12)
#: what Jupyter sends a kernel's whole process group (interrupt, restart, shutdown, hang-up)
_GROUP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def _await_own_session(waiting: socket.socket) -> None:
    """Return once the child has a session of its own: from then on no interrupt, restart or
    SIGKILL aimed at the caller's group can reach the task.

    Blocking on a socket rather than polling the child's group leaves the CPU to the child, which
    is what it waits for (polling took milliseconds per task on a busy two-core machine).  The
    answer is a byte, or the end of the stream if the child died first (the supervisor then
    records how); a second at most, in case a child forked meanwhile by another thread still
    holds the other end.
    """
    waiting.settimeout(1.0)
    with contextlib.suppress(OSError):  # a timeout included
        waiting.recv(1)


def _in_child(
    run: Callable[[], int], output: int, mask: set[int | signal.Signals], telling: socket.socket | None
) -> NoReturn:
    def main() -> int:
        # Jupyter interrupts, restarts and shuts a kernel down by signalling its whole process
        # group: a group of its own keeps the task out of that.  Under a terminal, a session of
        # its own too: a program in the task that asks the terminal for a password then fails at
        # once, instead of being stopped for good as a background job.
        if telling is None:
            os.setpgid(0, 0)
        else:
            os.setsid()
            with telling, contextlib.suppress(OSError):
                telling.send(b"\0")
        for sig in _GROUP_SIGNALS:  # ignoring a pending signal discards it
            _signal.signal(sig, _signal.SIG_IGN)
        _signal.pthread_sigmask(_signal.SIG_SETMASK, mask)
        _signal.signal(_signal.SIGHUP, _signal.SIG_DFL)  # SIGINT and SIGTERM: set by run_job
        _redirect_output(output)
        _release_sockets()
        # A crash dump (segfault) belongs in the task's log, not on a descriptor of the kernel's.
        if faulthandler.is_enabled():
            faulthandler.enable(file=sys.stderr)
        _silence_kernel()
        # The kernel's asyncio loop is "running" in the thread we were forked from; without this
        # asyncio.run() in the task fails with "cannot be called from a running event loop".
        asyncio = sys.modules.get("asyncio")  # a process that never loaded it has no loop to drop
        if asyncio is not None:
            asyncio.events._set_running_loop(None)
            if getattr(asyncio.events, "_event_loop_policy", True) is not None:  # None: no loop was ever set
                asyncio.set_event_loop(None)
        # The kernel may have pointed signal wake-ups at its event loop's socket.
        signal.set_wakeup_fd(-1)
        return run()

    exit_child(main)


def _redirect_output(output: int) -> None:
    """fd 1 and 2 to the task's log (so C extensions and subprocesses are captured), stdin from /dev/null.

    The kernel's sys.stdout/sys.stderr send to its zmq sockets from a thread the child does not
    have; plain files on the new fds replace them.
    """
    # The log and /dev/null are first moved above 2: where the parent had fd 0, 1 or 2 closed,
    # either may sit on one of them, and a dup2 onto it, or its close, would lose it.
    null = os.open(os.devnull, os.O_RDONLY)
    sources = {fd: fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3) for fd in (output, null)}
    for fd in (output, null):
        if fd > 2:
            os.close(fd)
    os.dup2(sources[output], 1)
    os.dup2(sources[output], 2)
    os.dup2(sources[null], 0)
    for fd in sources.values():
        os.close(fd)
    global _STDIO
    # Made by the parent and never used there; this process uses them, so one it forks in turn
    # (a Dask forker) gets new ones.  Made here if the parent could not (its fd 0 was closed).
    made, _STDIO = _STDIO, None
    sys.stdin, sys.stdout, sys.stderr = made if made is not None else _make_stdio()


def _make_stdio() -> tuple[Any, Any, Any]:
    """The task's sys.stdin, sys.stdout and sys.stderr, over fds 0, 1 and 2: made once in the
    process that forks tasks, before its first fork, and never written to there, so every child
    inherits them empty.  Made in each child they cost 0.4 ms before the task's code could run.
    They are not seekable (the parent's fds 1 and 2 are a pipe or a terminal when they are made);
    a log is written, not sought."""
    return (
        open(0, closefd=False),  # noqa: SIM115 - lives as long as the process
        io.TextIOWrapper(open(1, "wb", closefd=False), line_buffering=True),  # noqa: SIM115
        io.TextIOWrapper(open(2, "wb", closefd=False), line_buffering=True),  # noqa: SIM115
    )


def _release_sockets() -> None:
    """Swap every inherited socket for /dev/null.

    The child holds copies of the kernel's zmq sockets, listening ones included: while the task
    runs, a restarted kernel could not bind its ports again ("Address already in use") and the
    front end's connections would not close with the kernel.  dup2 rather than close, so the
    numbers stay taken and no object still holding one can close some other file later.
    """
    fd_dir = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for name in os.listdir(fd_dir):
            fd = int(name)
            if fd <= 2 or fd == null:
                continue
            try:
                if stat.S_ISSOCK(os.fstat(fd).st_mode):
                    os.dup2(null, fd)
            except OSError:
                pass  # the directory's own descriptor, already gone
    finally:
        os.close(null)


def _silence_kernel() -> None:
    """The child must never write to the kernel's zmq sockets: widgets and comms would send
    through the parent's session ("attempted to send message from fork").  display() does not
    come here: the runner keeps its bundles with the task (`nbbgtask.task.outputs`)."""
    if "ipykernel" not in sys.modules:
        return
    from ipykernel.kernelbase import Kernel

    if not Kernel.initialized():
        return
    session = Kernel.instance().session
    noted: list[bool] = []

    def dropped(*args: Any, **kwargs: Any) -> None:
        if not noted:
            noted.append(True)
            print(
                "nbbgtask: this task tried to send a message to the notebook (a widget or a comm); "
                "a task's widgets are not shown: print, display() and figures are",
                file=sys.stderr,
            )

    session.send = dropped  # type: ignore[method-assign,union-attr]
