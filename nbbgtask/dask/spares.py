"""Runs in the Dask worker: its handles on the task processes it keeps, the spares, and on the
forker that forks them.  (The pipes between them are `nbbgtask.dask.pipes`.)

Forking a child from a worker costs milliseconds (more, the bigger the worker), which would be
most of a task's start.  So each worker keeps one child forked ahead of time, idle: a *spare*,
waiting on a pipe.  A task is handed to the spare (its job, and the worker's cwd, environment and
sys.path of that moment); the spare runs that one task and exits, exactly as a child forked for
the task would, and a new spare is forked in the background.  When no spare is ready (two tasks at
once on a worker with several threads, the first task) one is forked there and then.

The spares are not forked by the worker itself but by a *forker* (`nbbgtask.dask.forker`, which says
why), forked from the worker once with the same rules as a task forked from a kernel
(`nbbgtask.task.detach`).  What the three say to each other is in `nbbgtask.dask.wire`.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from nbbgtask.core import wire as _wire
from nbbgtask.core.procs import signal_group
from nbbgtask.dask import wire
from nbbgtask.dask.child import spare_main
from nbbgtask.dask.forker import forker_main
from nbbgtask.dask.pipes import close_pipes, open_pipes, pipe
from nbbgtask.task.detach import fork_detached

__all__ = ["Child", "Forker", "Spares", "fork_spare", "handed_over", "start_child"]

#: a forker is replaced (by one forked from the worker as it is then) after this many seconds, so
#: that it and its spares do not hold on to an old copy of the worker's memory
FORKER_MAX_AGE = 60.0
#: seconds between two looks of the keeper thread at its idle spare (still alive? too old?)
SPARE_CHECK = 1.0
#: seconds after a task started before the next spare is forked, so that the fork does not
#: compete with the task's first steps for the processor
SPARE_DELAY = 0.02
#: seconds a spare that is let go (its pipe closed) has to leave before it is killed
SPARE_LEAVE = 5.0

Context = wire.Context

def _context() -> Context:
    return os.getcwd(), dict(os.environ), list(sys.path)


class Child:
    """The task's process on this worker: a spare, forked by a forker, or by the worker itself
    when it has no forker.

    ``reports`` and ``output`` are the worker's ends of its report pipe and of its fds 1 and 2;
    ``commands`` (a spare not yet handed a task) is where its task will come from.
    """

    def __init__(self, pid: int, output: int, reports: int, commands: int, forker: Forker | None = None) -> None:
        self.pid, self.output, self.reports = pid, output, reports
        self.commands: int | None = commands
        self.forker = forker
        self._rest = memoryview(b"")
        #: the worker's folder, environment and sys.path as this process has them (see hand_over)
        self.context: Context | None = None
        #: its forker went away before it could say how this process ended
        self.lost = False
        self._code: int | None = None
        self._ended = threading.Event()

    def exited(self, code: int | None) -> None:
        """From its forker: it ended with ``code`` (``None``: the forker was lost, so not known)."""
        self._code, self.lost = (code, code is None)
        self._ended.set()

    def poll(self) -> int | None:
        """Its exit code once it has ended (and is reaped), else ``None`` (0 if lost)."""
        if self.forker is not None:
            return (self._code or 0) if self._ended.is_set() else None
        if self._code is None:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self._code = os.waitstatus_to_exitcode(status)
        return self._code

    def wait(self, timeout: float | None = None) -> int:
        if self.forker is not None:
            if not self._ended.wait(timeout):
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
            return self._code or 0
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._code is None:
            done, status = os.waitpid(self.pid, 0 if deadline is None else os.WNOHANG)
            if done:
                self._code = os.waitstatus_to_exitcode(status)
            elif deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
            else:
                time.sleep(0.01)
        return self._code

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to its process group (it and any processes it started)."""
        if self.forker is not None:
            if self.forker.signal(self.pid, sig):
                return  # the forker, its parent, sends it only while it has not reaped it
            if self._ended.is_set() and not self.lost:
                return  # ended, and reaped by its forker: the pid may be someone else's by now
        signal_group(self.pid, sig)  # the worker's own child (not reaped yet), or its forker is lost

    def hand_over(self, payload: bytes, block: bool = True) -> bool:
        """Give this spare its task; ``False`` if it is gone (it never saw the task).

        ``block=False`` (on the worker's event loop): write only what the pipe takes at once; the
        rest, if any, is written by `finish_hand_over`.
        """
        assert self.commands is not None
        now = _context()
        # The task runs as if forked now: in the worker's current folder, environment and
        # sys.path, which the spare is sent only if they changed since it was forked.
        self._rest = memoryview(wire.task_message(None if now == self.context else now, payload))
        if block:
            return self.finish_hand_over()
        os.set_blocking(self.commands, False)
        try:
            self._rest = self._rest[os.write(self.commands, self._rest) :]
        except BlockingIOError:
            pass  # a full pipe: all of it is left for finish_hand_over
        except BrokenPipeError:
            self._rest = memoryview(b"")
            close_pipes(self.commands)
            self.commands = None
            return False
        if not self._rest:
            close_pipes(self.commands)
            self.commands = None
        return True

    def finish_hand_over(self) -> bool:
        """Write what hand_over(block=False) left; ``False`` if the child died before it read it."""
        if self.commands is None:
            return True
        try:
            os.set_blocking(self.commands, True)
            _wire.write_all(self.commands, self._rest)
            return True
        except BrokenPipeError:
            return False
        finally:
            self._rest = memoryview(b"")
            close_pipes(self.commands)
            self.commands = None

    def discard(self) -> None:
        """Let a spare that has no task go (it runs nothing of anyone's), and see it reaped."""
        close_pipes(self.commands)  # end of its pipe: it leaves by itself
        self.commands = None
        if self.poll() is None:
            try:
                self.wait(SPARE_LEAVE)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
                self.wait(SPARE_LEAVE)
        close_pipes(self.output, self.reports)


def fork_spare(forker: Forker | None) -> Child:
    """An idle spare: forked by ``forker``, or (no forker) straight from the worker."""
    commands_read, commands = pipe()
    reports, reports_write = pipe()
    output, output_write = pipe()
    own = (commands_read, reports_write, output_write)
    try:
        if forker is not None:
            pid = forker.fork(own)
        else:
            with open_pipes() as held:
                inherited = held - set(own)
                pid = fork_detached(lambda: spare_main(commands_read, reports_write, inherited), output_write)
    except BaseException:
        close_pipes(commands, reports, output)
        raise
    finally:
        close_pipes(*own)
    child = Child(pid, output, reports, commands, forker)
    if forker is not None:
        child.context = forker.context
        forker.adopt(child)
    else:
        child.context = _context()
    return child


def handed_over(child: Child, payload: bytes, block: bool = True) -> bool:
    """`Child.hand_over`, which discards the child if the hand-over fails for good."""
    try:
        return child.hand_over(payload, block)
    except BaseException:  # the worker's folder is gone, say: the child must not be left behind
        child.discard()
        raise


def start_child(payload: bytes, pool: Spares | None) -> Child:
    """The task's process, already running it: a spare if one is ready, else one forked now."""
    spare = pool.take() if pool is not None else None
    if spare is not None:
        if handed_over(spare, payload):
            return spare
        spare.discard()  # died just now, before it read the task
    child = pool.fork() if pool is not None else fork_spare(None)
    handed_over(child, payload)  # if it died already, the caller sees it end and says how
    return child


class ForkerLost(Exception):
    """The forker went away (killed, say): another is started for the next spare."""


class Forker:
    """The worker's side of a forker."""

    def __init__(self) -> None:
        # fork_detached hands the child none of the worker's sockets (it would keep the worker's
        # ports): the forker connects back, by a path in a folder only this user can enter.
        folder = tempfile.mkdtemp(prefix="nbbg-")
        path = os.path.join(folder, "forker")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)
            listener.listen(1)
            listener.settimeout(30)
            output = os.dup(2)  # what it prints (a crash, say) goes to the worker's own log
            try:
                with open_pipes() as inherited:
                    self.pid = fork_detached(lambda: forker_main(path, inherited), output)
            finally:
                os.close(output)
            try:
                self._sock, _ = listener.accept()
            except BaseException:
                _kill_and_reap(self.pid)
                raise
        finally:
            listener.close()
            for remove in (lambda: os.unlink(path), lambda: os.rmdir(folder)):
                try:
                    remove()
                except OSError:
                    pass
        self._sock.settimeout(None)
        self.born = time.monotonic()
        self.context = _context()
        self.alive = True
        self._children: dict[int, Child] = {}
        self._exits: dict[int, int] = {}  # ends reported before their child was adopted
        self._table = threading.Lock()
        self._replies: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._request = threading.Lock()
        self._send = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="nbbgtask-forker", daemon=True)
        self._reader.start()

    def too_old(self) -> bool:
        return time.monotonic() - self.born > FORKER_MAX_AGE

    def fork(self, fds: tuple[int, int, int]) -> int:
        """Have it fork a spare that keeps ``fds`` (its commands, reports and output ends); its pid."""
        with self._request:
            if not self.alive:
                raise ForkerLost()
            try:
                with self._send:
                    wire.send_record(self._sock, wire.FORK, fds=fds)
            except OSError:
                raise ForkerLost() from None
            pid = self._replies.get()
        if pid is None:
            raise ForkerLost()
        if pid < 0:
            raise OSError(-pid, f"cannot fork a spare: {os.strerror(-pid)}")
        return pid

    def adopt(self, child: Child) -> None:
        with self._table:
            code = self._exits.pop(child.pid, None)
            if code is None and self.alive:
                self._children[child.pid] = child
                return
        child.exited(code)

    def signal(self, pid: int, sig: int) -> bool:
        """Have it signal the group of its child ``pid`` (if it has not reaped it); ``False`` if it is gone."""
        try:
            with self._send:
                wire.send_record(self._sock, wire.KILL, pid, sig)
            return True
        except OSError:
            return False

    def retire(self) -> None:
        """No more spares: it leaves once the children it has end (it still reports how they end)."""
        try:
            with self._send:
                wire.send_record(self._sock, wire.RETIRE)
        except OSError:
            pass

    def close(self) -> None:
        """The worker closes: the forker ends its children (Dask runs given-up tasks again elsewhere)
        and leaves; it is reaped here."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._reader.join(SPARE_LEAVE + 5)

    def _read(self) -> None:
        try:
            while True:
                got = wire.recv_record(self._sock)
                if got is None:
                    break
                op, pid, number, fds = got
                for fd in fds:
                    os.close(fd)
                if op == wire.PID:
                    self._replies.put(pid)
                elif op == wire.EXITED:
                    with self._table:
                        child = self._children.pop(pid, None)
                        if child is None:
                            self._exits[pid] = number
                    if child is not None:
                        child.exited(number)
        except OSError:
            pass
        finally:
            with self._table:
                self.alive = False
                orphans = list(self._children.values())
                self._children.clear()
            self._replies.put(None)
            for child in orphans:
                child.exited(None)
            self._sock.close()
            _kill_and_reap(self.pid, patience=SPARE_LEAVE)  # it ends its children first


def _kill_and_reap(pid: int, patience: float = 0.0) -> None:
    """Reap the child ``pid``, killing it if it has not ended within ``patience`` seconds."""
    deadline = time.monotonic() + patience
    try:
        while not os.waitpid(pid, os.WNOHANG)[0]:
            if time.monotonic() >= deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return
            time.sleep(0.01)
    except (ChildProcessError, ProcessLookupError):
        pass


class Spares:
    """One spare kept ready on a worker by a thread of its own, and the forker that forks spares;
    close() ends them (and sees them reaped)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._spare: Child | None = None
        self._wanted = False
        self._closed = False
        self._forking = threading.Lock()
        self._forker: Forker | None = None
        self._forkers: list[Forker] = []  # the current one, and retired ones whose tasks still run
        self._thread = threading.Thread(target=self._keep, name="nbbgtask-spares", daemon=True)
        self._thread.start()

    def take(self) -> Child | None:
        """The ready spare, if there is one alive."""
        with self._cond:
            spare, self._spare = self._spare, None
        if spare is not None and spare.poll() is not None:  # killed while idle
            spare.discard()
            return None
        return spare

    def replenish(self) -> None:
        """Fork a new spare, in the background, if none is ready (called once a task has started)."""
        with self._cond:
            if self._spare is None:
                self._wanted = True
                self._cond.notify()

    def fork(self) -> Child:
        """A new spare, from the current forker (a new one if it is gone or too old)."""
        with self._forking:
            if self._closed:
                return fork_spare(None)
            forker = self._forker
            if forker is None or not forker.alive or forker.too_old():
                if forker is not None:
                    forker.retire()
                try:
                    forker = self._forker = Forker()
                except Exception:  # a forker could not start: the worker forks this spare itself
                    self._forker = None
                    return fork_spare(None)
                self._forkers = [f for f in self._forkers if f.alive] + [forker]
            try:
                return fork_spare(forker)
            except ForkerLost:
                self._forker = None
                return fork_spare(None)

    def _keep(self) -> None:
        while True:
            old = None
            with self._cond:
                while not self._closed:
                    spare = self._spare
                    if spare is None and self._wanted:
                        break
                    if spare is not None and (
                        spare.poll() is not None or (spare.forker is not None and spare.forker.too_old())
                    ):
                        old, self._spare = spare, None  # died while idle, or too old: a new one
                        break
                    self._cond.wait(SPARE_CHECK if spare is not None else None)
                if self._closed:
                    return
                self._wanted = False
                if old is None:  # a task has just started: let it have the processor first
                    self._cond.wait(SPARE_DELAY)
                    if self._closed:
                        return
            if old is not None:
                old.discard()
            try:
                fresh: Child | None = self.fork()
            except Exception:  # no memory or processes to spare now, say: tasks fork their own meanwhile
                with self._cond:
                    self._wanted = True
                    self._cond.wait(SPARE_CHECK)
                continue
            with self._cond:
                if not self._closed and self._spare is None:
                    self._spare, fresh = fresh, None
            if fresh is not None:  # closed meanwhile
                fresh.discard()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            spare, self._spare = self._spare, None
            self._cond.notify_all()
        if spare is not None:
            spare.discard()
        if self._thread is not threading.current_thread():
            self._thread.join()
        with self._forking:
            forkers, self._forkers, self._forker = self._forkers, [], None
        for forker in forkers:
            forker.close()
