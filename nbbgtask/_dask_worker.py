"""What runs on a Dask worker: the task in a child process (so a cancel can stop it for real),
with its progress, output and outcome sent to the kernel as worker events.

``run_on_worker`` is what Dask runs (a coroutine, on the worker's event loop; the rest of the
task's supervision runs in a thread of its own).  The child is forked ahead of time: each worker
keeps one idle *spare* ready and hands it the next task.  Spares are forked by the worker's
*forker*, a small process forked from the worker once with the same rules as a task forked from a
kernel (`_launcher.fork_detached`); see "the task's process" below.  Where there is no fork the
child is ``python -m nbbgtask._dask_worker FD``.  Either way it runs the task with the same runner
as a local task, runs that one task only, and reports through a pipe.
"""

from __future__ import annotations

import os
import pickle
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["TOPIC", "cancel_event_name", "run_on_worker"]

#: the worker-event topic every nbbgtask task reports on
TOPIC = "nbbgtask"
#: at most this much printed output per log event
LOG_CHUNK = 64 * 1024
#: at most this many seconds the worker waits, after handing a spare its task, before its own
#: bookkeeping for the task (see _first_sign)
STAND_BACK = 0.005


def cancel_event_name(task_id: str) -> str:
    return f"nbbgtask-cancel-{task_id}"


def _write_frame(fd: int, obj: Any) -> None:
    data = pickle.dumps(obj)
    view = memoryview(len(data).to_bytes(8, "big") + data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(fd: int, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_frame(fd: int) -> Any:
    head = _read_exact(fd, 8)
    if head is None:
        return None
    body = _read_exact(fd, int.from_bytes(head, "big"))
    return None if body is None else pickle.loads(body)


class PipeSink:
    """Where the reports of a task on a worker go: frames on a pipe to `run_on_worker`."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def _send(self, kind: str, payload: Any) -> None:
        with self._lock:
            _write_frame(self._fd, (kind, payload))

    def progress(self, fields: dict[str, Any] | None) -> bool:
        if fields is not None:
            self._send("progress", fields)
        return False  # a cancel arrives as SIGTERM

    def save_result(self, data: bytes) -> None:
        self._send("result", data)

    def finish(self, fields: dict[str, Any]) -> None:
        self._send("final", fields)


async def run_on_worker(payload: bytes, task_id: str, grace: float, interval: float) -> str:
    """Run a task's child process on this worker and report everything as worker events.

    A coroutine, so Dask runs it on the worker's event loop as soon as the task arrives: a ready
    spare is handed the task there and then, with no thread to wake up first (a plain function
    waits for one of the worker's threads).  Watching the child and forwarding its reports then
    happen in a thread of the task's own (`_supervise`).  If Dask gives the task up while it runs
    (the worker closes, and Dask will run the task again elsewhere), its child is stopped.
    """
    import asyncio
    import contextvars

    from distributed import get_worker

    worker = get_worker()
    pool = _spares(worker) if hasattr(os, "fork") else None
    spare = pool.take() if pool is not None else None
    handed: tuple[_Child, float] | None = None
    if spare is not None:
        if _handed_over(spare, payload, block=False):
            handed = (spare, time.time())
        else:
            spare.discard()  # died just now, before it read the task
    loop = asyncio.get_running_loop()
    done: asyncio.Future[str] = loop.create_future()
    abandon = threading.Event()
    running: list[_Child] = [handed[0]] if handed else []
    context = contextvars.copy_context()  # get_worker() and get_client() work in the thread too

    def supervise() -> None:
        try:
            state = context.run(_supervise, worker, pool, payload, handed, running, abandon, task_id, grace, interval)
        except BaseException as exc:
            outcome: tuple[Any, Any] = (done.set_exception, exc)
        else:
            outcome = (done.set_result, state)
        try:
            loop.call_soon_threadsafe(_settle, done, *outcome)
        except RuntimeError:  # the loop is closed: the worker is gone, and nobody waits
            pass

    thread = threading.Thread(target=supervise, name=f"nbbgtask-{task_id[:8]}", daemon=True)
    try:
        if handed is not None and handed[0].commands is None:
            await _first_sign(loop, handed[0])  # see STAND_BACK
        thread.start()
        return await done
    except asyncio.CancelledError:
        abandon.set()
        if running:
            running[0].signal_group(signal.SIGTERM)
        if thread.ident is None:
            thread.start()  # it stops and reaps the child
        raise


def _settle(future: Any, setter: Any, value: Any) -> None:
    if not future.done():
        setter(value)


async def _first_sign(loop: Any, child: _Child) -> None:
    """Wait while a child just handed its task gets going: what the worker does next (the
    "started" event, which sets off the scheduler and a store write in the kernel, and a thread
    or four) would compete with its first steps for the processor.  Any sign from the child (a
    report, output, its end) or STAND_BACK seconds end the wait."""
    import asyncio

    sign = loop.create_future()

    def seen() -> None:
        if not sign.done():
            sign.set_result(None)

    fds = (child.reports, child.output)
    watched = []
    try:
        for fd in fds:
            loop.add_reader(fd, seen)
            watched.append(fd)
        await asyncio.wait({sign}, timeout=STAND_BACK)
    except NotImplementedError:  # an event loop that cannot watch pipes: no waiting
        pass
    finally:
        for fd in watched:
            loop.remove_reader(fd)


def _supervise(
    worker: Any,
    pool: _Spares | None,
    payload: bytes,
    handed: tuple[_Child, float] | None,
    running: list[_Child],
    abandon: threading.Event,
    task_id: str,
    grace: float,
    interval: float,
) -> str:
    """In the task's own thread: start its child unless a spare has it already, forward what the
    child reports as worker events, stop it on a cancel, and report how it ended."""
    from distributed import Event, get_client

    from ._procs import describe_exit

    def emit(kind: str, **fields: Any) -> None:
        worker.log_event(TOPIC, {"task_id": task_id, "kind": kind, "time": time.time(), **fields})

    child: _Child | None = None
    if handed is not None:
        child, started = handed
        if not child.finish_hand_over():  # died before it had read all of its task
            child.discard()
            child = None
    if child is None:
        child = _start_child(payload, pool)
        started = time.time()
        running[:] = [child]
    read_end = child.reports
    if abandon.is_set():  # given up before it started: the run Dask starts elsewhere reports
        child.signal_group(signal.SIGTERM)
    else:
        emit("started", pid=child.pid, host=socket.gethostname(), worker=worker.address, time=started)
    outcome: dict[str, Any] = {}
    stopping = threading.Event()

    def pump_output() -> None:
        pending: list[bytes] = []
        last = time.monotonic()
        fd = child.output
        while True:
            chunk = os.read(fd, LOG_CHUNK)
            if chunk:
                pending.append(chunk)
            if pending and (not chunk or time.monotonic() - last >= interval or sum(map(len, pending)) >= LOG_CHUNK):
                emit("log", text=b"".join(pending).decode("utf-8", errors="replace"))
                pending, last = [], time.monotonic()
            if not chunk:
                return

    def pump_reports() -> None:
        while True:
            frame = _read_frame(read_end)
            if frame is None:
                return
            kind, body = frame
            if kind == "progress":
                emit("progress", **body)
            elif kind == "result":
                outcome["result"] = body
            elif kind == "final":
                outcome.update(body)

    # In the task's own thread (with the task's context): the watcher could not find the client.
    event = Event(cancel_event_name(task_id), client=get_client())

    def stop() -> None:
        child.signal_group(signal.SIGTERM)
        try:
            child.wait(grace)
        except subprocess.TimeoutExpired:
            child.signal_group(signal.SIGKILL)

    def watch_cancel() -> None:
        while not stopping.is_set():
            if abandon.is_set():
                stop()
                return
            try:
                if not event.wait(timeout=0.5):
                    continue
            except Exception:  # scheduler busy or gone: keep running, look again
                time.sleep(0.5)
                continue
            outcome["cancel_requested"] = True
            stop()
            return

    threads = [threading.Thread(target=t, daemon=True) for t in (pump_output, pump_reports, watch_cancel)]
    for t in threads:
        t.start()
    if pool is not None:
        pool.replenish()
    code = child.wait()
    stopping.set()
    for t in threads[:2]:
        t.join()
    _close(read_end, child.output)
    if abandon.is_set():
        return "abandoned"  # Dask runs the task again elsewhere; that run reports
    if "state" not in outcome:
        if outcome.get("cancel_requested"):
            outcome["state"] = "cancelled"
        else:
            error = describe_exit(child.pid, code).replace("task process", "task process on the worker")
            if child.lost:
                error = (
                    f"the task process {child.pid} on the worker ended without reporting, and how is not "
                    f"known: the process that forked it there was lost"
                )
            outcome.update(state="failed", error=error)
        outcome["finished"] = time.time()
    emit("final", **outcome)
    return str(outcome["state"])


# -- the task's process ----------------------------------------------------------------------------
#
# Forking a child from a worker costs milliseconds (more, the bigger the worker), which would be
# most of a task's start.  So each worker keeps one child forked ahead of time, idle: a *spare*,
# waiting on a pipe.  A task is handed to the spare (its job, and the worker's cwd, environment
# and sys.path of that moment); the spare runs that one task and exits, exactly as a child forked
# for the task would, and a new spare is forked in the background.  When no spare is ready (two
# tasks at once on a worker with several threads, the first task) one is forked there and then.
#
# The spares are not forked by the worker itself but by a *forker*: a small process forked from
# the worker once (with fork_detached's rules), which does nothing but fork spares, pass on
# signals to them and report how they end.  A fork makes parent and child share every page until
# one of them writes it.  Forked by the worker, each new spare would make the worker copy, page by
# page, whatever it writes next (measured: a couple of milliseconds on its next task, whatever
# that task is), and each fork would stall the worker's threads while its page tables are copied.
# The forker writes next to nothing: the worker copies what it writes once per forker, not once
# per task.

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

# Every pipe end this module opens is listed here: a forker (or a child forked straight from the
# worker) closes those that are not its own.  Else it would hold another task's report pipe open
# (so the worker would not see that task end until the holder ends too), or an idle spare's
# command pipe (so that spare would not see the worker go away).
_fds_lock = threading.Lock()
_fds: set[int] = set()


def _pipe() -> tuple[int, int]:
    with _fds_lock:
        read, write = os.pipe()
        _fds.update((read, write))
    return read, write


def _close(*fds: int | None) -> None:
    """Close pipe ends this module opened; one already closed is skipped."""
    with _fds_lock:
        for fd in fds:
            if fd in _fds:
                _fds.discard(fd)
                os.close(fd)


class _Child:
    """The task's process on this worker: a spare (forked by a forker, or by the worker itself when
    it has no forker), or spawned where fork is missing.

    ``reports`` and ``output`` are the worker's ends of its report pipe and of its fds 1 and 2;
    ``commands`` (a spare not yet handed a task) is where its task will come from.
    """

    def __init__(
        self,
        pid: int,
        output: int,
        reports: int,
        commands: int | None = None,
        popen: subprocess.Popen[bytes] | None = None,
        forker: _Forker | None = None,
    ) -> None:
        self.pid, self.output, self.reports, self.commands, self._popen = pid, output, reports, commands, popen
        self.forker = forker
        self._rest = memoryview(b"")
        #: the worker's folder, environment and sys.path as this process has them (see hand_over)
        self.context: tuple[str, dict[str, str], list[str]] | None = None
        #: its forker went away before it could say how this process ended
        self.lost = False
        self._code: int | None = None
        self._ended = threading.Event()

    def _exited(self, code: int | None) -> None:
        """From its forker: it ended with ``code`` (``None``: the forker was lost, so not known)."""
        self._code, self.lost = (code, code is None)
        self._ended.set()

    def poll(self) -> int | None:
        """Its exit code once it has ended (and is reaped), else ``None`` (0 if lost)."""
        if self._popen is not None:
            return self._popen.poll()
        if self.forker is not None:
            return (self._code or 0) if self._ended.is_set() else None
        if self._code is None:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self._code = os.waitstatus_to_exitcode(status)
        return self._code

    def wait(self, timeout: float | None = None) -> int:
        if self._popen is not None:
            return self._popen.wait(timeout)
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
        _signal_group(self.pid, sig)  # the worker's own child (not reaped yet), or its forker is lost

    def hand_over(self, payload: bytes, block: bool = True) -> bool:
        """Give this spare its task; ``False`` if it is gone (it never saw the task).

        ``block=False`` (on the worker's event loop): write only what the pipe takes at once; the
        rest, if any, is written by `finish_hand_over`.
        """
        assert self.commands is not None
        now = _context()
        # The task runs as if forked now: in the worker's current folder, environment and
        # sys.path, which the spare is sent only if they changed since it was forked.
        context = b"" if now == self.context else pickle.dumps(now)
        self._rest = memoryview(b"".join(len(d).to_bytes(8, "big") + d for d in (context, payload)))
        if block:
            return self.finish_hand_over()
        os.set_blocking(self.commands, False)
        try:
            self._rest = self._rest[os.write(self.commands, self._rest) :]
        except BlockingIOError:
            pass  # a full pipe: all of it is left for finish_hand_over
        except BrokenPipeError:
            self._rest = memoryview(b"")
            _close(self.commands)
            self.commands = None
            return False
        if not self._rest:
            _close(self.commands)
            self.commands = None
        return True

    def finish_hand_over(self) -> bool:
        """Write what hand_over(block=False) left; ``False`` if the child died before it read it."""
        if self.commands is None:
            return True
        try:
            os.set_blocking(self.commands, True)
            _write_all(self.commands, self._rest)
            return True
        except BrokenPipeError:
            return False
        finally:
            self._rest = memoryview(b"")
            _close(self.commands)
            self.commands = None

    def discard(self) -> None:
        """Let a spare that has no task go (it runs nothing of anyone's), and see it reaped."""
        _close(self.commands)  # end of its pipe: it leaves by itself
        self.commands = None
        if self.poll() is None:
            try:
                self.wait(SPARE_LEAVE)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
                self.wait(SPARE_LEAVE)
        _close(self.output, self.reports)


def _context() -> tuple[str, dict[str, str], list[str]]:
    return os.getcwd(), dict(os.environ), list(sys.path)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# -- the forker ------------------------------------------------------------------------------------

#: one message between the worker and its forker: what (one byte), a pid, a number
_RECORD = struct.Struct("!cqq")


def _send_record(sock: socket.socket, op: bytes, pid: int = 0, number: int = 0, fds: tuple[int, ...] = ()) -> None:
    data = _RECORD.pack(op, pid, number)
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.sendall(data)


def _recv_record(sock: socket.socket) -> tuple[bytes, int, int, list[int]] | None:
    """The next message and the descriptors sent with it; ``None`` at the end of the connection."""
    data, fds, _, _ = socket.recv_fds(sock, _RECORD.size, 3)
    while data and len(data) < _RECORD.size:
        more = sock.recv(_RECORD.size - len(data))
        if not more:
            data = b""
        data += more
    if len(data) < _RECORD.size:
        for fd in fds:
            os.close(fd)
        return None
    op, pid, number = _RECORD.unpack(data)
    return op, pid, number, fds


class _ForkerLost(Exception):
    """The forker went away (killed, say): another is started for the next spare."""


class _Forker:
    """The worker's side of a forker (see "the task's process" above)."""

    def __init__(self) -> None:
        import tempfile

        from ._launcher import fork_detached

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
                with _fds_lock:
                    inherited = frozenset(_fds)
                    self.pid = fork_detached(lambda: _forker_main(path, inherited), output)
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
        self._children: dict[int, _Child] = {}
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
                raise _ForkerLost()
            try:
                with self._send:
                    _send_record(self._sock, b"F", fds=fds)
            except OSError:
                raise _ForkerLost() from None
            pid = self._replies.get()
        if pid is None:
            raise _ForkerLost()
        if pid < 0:
            raise OSError(-pid, f"cannot fork a spare: {os.strerror(-pid)}")
        return pid

    def adopt(self, child: _Child) -> None:
        with self._table:
            code = self._exits.pop(child.pid, None)
            if code is None and self.alive:
                self._children[child.pid] = child
                return
        child._exited(code)

    def signal(self, pid: int, sig: int) -> bool:
        """Have it signal the group of its child ``pid`` (if it has not reaped it); ``False`` if it is gone."""
        try:
            with self._send:
                _send_record(self._sock, b"K", pid, sig)
            return True
        except OSError:
            return False

    def retire(self) -> None:
        """No more spares: it leaves once the children it has end (it still reports how they end)."""
        try:
            with self._send:
                _send_record(self._sock, b"R")
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
                got = _recv_record(self._sock)
                if got is None:
                    break
                op, pid, number, fds = got
                for fd in fds:
                    os.close(fd)
                if op == b"P":
                    self._replies.put(pid)
                elif op == b"X":
                    with self._table:
                        child = self._children.pop(pid, None)
                        if child is None:
                            self._exits[pid] = number
                    if child is not None:
                        child._exited(number)
        except OSError:
            pass
        finally:
            with self._table:
                self.alive = False
                orphans = list(self._children.values())
                self._children.clear()
            self._replies.put(None)
            for child in orphans:
                child._exited(None)
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


def _forker_main(path: str, inherited: frozenset[int]) -> int:
    """The forker, in its own process: fork spares on request, report how they end; when the
    worker's end closes, end them all and leave."""
    import select

    for fd in inherited:  # the worker's pipes to its children (see _fds)
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
            got = _recv_record(sock)
            if got is None:  # the worker closed, or is gone: the tasks it gave up go with it
                for pid in children:
                    _signal_group(pid, signal.SIGKILL)
                for pid in children:
                    try:
                        os.waitpid(pid, 0)
                    except ChildProcessError:
                        pass
                return 0
            op, pid, number, fds = got
            if op == b"F":
                try:
                    child = _fork_from_forker(fds, sock, (wake_read, wake_write))
                except OSError as exc:
                    _send_record(sock, b"P", -(exc.errno or 1))
                else:
                    children.add(child)
                    _send_record(sock, b"P", child)
                finally:
                    for fd in fds:
                        os.close(fd)
            elif op == b"K":
                if pid in children:  # not reaped: its pid (and group) cannot be someone else's
                    _signal_group(pid, number)
            elif op == b"R":
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
            _send_record(sock, b"X", pid, os.waitstatus_to_exitcode(status))
        except OSError:
            pass  # the worker is gone: the next read says so


def _fork_from_forker(fds: list[int], sock: socket.socket, wake: tuple[int, int]) -> int:
    """In the forker: fork a spare that keeps ``fds``; return once it has its own session."""
    from ._runner import exit_child

    if len(fds) != 3:
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
            return _spare_main(commands, reports)

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


# -- spares ----------------------------------------------------------------------------------------


def _fork_spare(forker: _Forker | None) -> _Child:
    """An idle spare: forked by ``forker``, or (no forker) straight from the worker."""
    commands_read, commands = _pipe()
    reports, reports_write = _pipe()
    output, output_write = _pipe()
    own = (commands_read, reports_write, output_write)
    try:
        if forker is not None:
            pid = forker.fork(own)
        else:
            from ._launcher import fork_detached

            with _fds_lock:
                inherited = frozenset(_fds) - set(own)
                pid = fork_detached(lambda: _spare_main(commands_read, reports_write, inherited), output_write)
    except BaseException:
        _close(commands, reports, output)
        raise
    finally:
        _close(*own)
    child = _Child(pid, output, reports, commands=commands, forker=forker)
    if forker is not None:
        child.context = forker.context
        forker.adopt(child)
    else:
        child.context = _context()
    return child


def _spare_main(commands: int, reports: int, inherited: frozenset[int] = frozenset()) -> int:
    """A spare, in its own process: wait for a task, run it, exit.  End of the pipe: exit quietly."""
    for fd in inherited:  # other children's pipes (see _fds)
        try:
            os.close(fd)
        except OSError:
            pass
    # fork_detached leaves SIGTERM ignored until run_job handles it.  Here, in a session of its
    # own, only a cancel sends it: one that comes before run_job is ready must still stop the task.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _rehearse()
    context, payload = _read_chunk(commands), _read_chunk(commands)
    os.close(commands)
    if context is None or payload is None:
        return 0  # the worker let this spare go (replaced, closing, or gone) before it had a task
    if context:
        cwd, environ, path = pickle.loads(context)
        if os.getcwd() != cwd:
            os.chdir(cwd)
        if environ != dict(os.environ):
            os.environ.clear()
            os.environ.update(environ)
        sys.path[:] = path
    return _run_payload(payload, reports)


def _read_chunk(fd: int) -> bytes | None:
    head = _read_exact(fd, 8)
    return None if head is None else _read_exact(fd, int.from_bytes(head, "big"))


class _NoSink:
    def progress(self, fields: dict[str, Any] | None) -> bool:
        return False


def _no_status(record: Any, home: Any, reporter: Any) -> None:
    """The rehearsal's job reports through nothing."""


def _rehearse() -> None:
    """Go once through what starting a task does (unpickle a job, start and stop its reporter),
    while idle: the pages that touches are then this process's own, and the task, when it comes,
    does not wait for the kernel to copy them one by one."""
    try:
        import cloudpickle

        from ._runner import Job, Reporter
        from ._sources import collect, restore

        def target() -> None:
            pass

        job = Job(record={"id": "rehearsal"}, home=Path("."), target=target, make_status=_no_status, sources=collect(target))
        job = pickle.loads(cloudpickle.dumps(job))
        restore(job.target, job.sources)
        reporter = Reporter(job, _NoSink())
        reporter.start()
        reporter.stop()
    except Exception:  # only a warm-up: the task itself will say what is wrong, if anything is
        pass


class _Spares:
    """One spare kept ready on a worker by a thread of its own, and the forker that forks spares;
    close() ends them (and sees them reaped)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._spare: _Child | None = None
        self._wanted = False
        self._closed = False
        self._forking = threading.Lock()
        self._forker: _Forker | None = None
        self._forkers: list[_Forker] = []  # the current one, and retired ones whose tasks still run
        self._thread = threading.Thread(target=self._keep, name="nbbgtask-spares", daemon=True)
        self._thread.start()

    def take(self) -> _Child | None:
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

    def fork(self) -> _Child:
        """A new spare, from the current forker (a new one if it is gone or too old)."""
        with self._forking:
            if self._closed:
                return _fork_spare(None)
            forker = self._forker
            if forker is None or not forker.alive or forker.too_old():
                if forker is not None:
                    forker.retire()
                try:
                    forker = self._forker = _Forker()
                except Exception:  # a forker could not start: the worker forks this spare itself
                    self._forker = None
                    return _fork_spare(None)
                self._forkers = [f for f in self._forkers if f.alive] + [forker]
            try:
                return _fork_spare(forker)
            except _ForkerLost:
                self._forker = None
                return _fork_spare(None)

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
                fresh: _Child | None = self.fork()
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


_pools_lock = threading.Lock()
#: the spares of each worker in this process (by worker id; several only with in-process workers)
_pools: dict[str, _Spares] = {}


def _spares(worker: Any) -> _Spares | None:
    """The spares of ``worker``, made (with a plugin that ends them when it closes) on first use."""
    from distributed.core import Status

    with _pools_lock:
        pool = _pools.get(worker.id)
        if pool is None and worker.status in (Status.running, Status.paused):
            pool = _pools[worker.id] = _Spares()
            worker.loop.add_callback(worker.plugin_add, plugin=_spares_plugin(), name=SPARES_PLUGIN)
        return pool


#: the name of the worker plugin that ends a worker's spares when it closes
SPARES_PLUGIN = "nbbgtask-spares"


def _spares_plugin() -> Any:
    from distributed.diagnostics.plugin import WorkerPlugin

    class SparesPlugin(WorkerPlugin):
        """Ends the worker's spare and forker (and sees them reaped) when the worker closes."""

        def teardown(self, worker: Any) -> None:
            with _pools_lock:
                pool = _pools.pop(worker.id, None)
            if pool is not None:
                pool.close()

    return SparesPlugin()


def _reset_after_fork() -> None:
    # A child of the worker owns none of its pipes, spares, forkers or locks.
    global _fds_lock, _pools_lock
    _fds_lock, _pools_lock = threading.Lock(), threading.Lock()
    _fds.clear()
    _pools.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _start_child(payload: bytes, pool: _Spares | None) -> _Child:
    """The task's process, already running it: a spare if one is ready, else one forked now."""
    if not hasattr(os, "fork"):
        return _spawn_child(payload)
    spare = pool.take() if pool is not None else None
    if spare is not None:
        if _handed_over(spare, payload):
            return spare
        spare.discard()  # died just now, before it read the task
    child = pool.fork() if pool is not None else _fork_spare(None)
    _handed_over(child, payload)  # if it died already, the caller sees it end and says how
    return child


def _handed_over(child: _Child, payload: bytes, block: bool = True) -> bool:
    try:
        return child.hand_over(payload, block)
    except BaseException:  # the worker's folder is gone, say: the child must not be left behind
        child.discard()
        raise


def _spawn_child(payload: bytes) -> _Child:
    reports, reports_write = _pipe()
    output, output_write = _pipe()
    try:
        popen = subprocess.Popen(
            [sys.executable, "-m", "nbbgtask._dask_worker", str(reports_write)],
            stdin=subprocess.PIPE,
            stdout=output_write,
            stderr=output_write,
            pass_fds=(reports_write,),
            start_new_session=True,
        )
    except BaseException:
        _close(reports, output)
        raise
    finally:
        _close(reports_write, output_write)
    assert popen.stdin is not None
    try:
        popen.stdin.write(payload)
        popen.stdin.close()
    except BrokenPipeError:
        pass
    return _Child(popen.pid, output, reports, popen=popen)


def _run_payload(payload: bytes, reports: int) -> int:
    from ._runner import run_job

    job = pickle.loads(payload)
    job.home = Path(os.getcwd())
    return run_job(job, PipeSink(reports))


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _child_main(fd: int) -> int:
    """The spawned child, where fork is missing: the job comes on stdin."""
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # a pipe: else output comes late
    sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    payload = sys.stdin.buffer.read()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return _run_payload(payload, fd)


if __name__ == "__main__":
    from nbbgtask._runner import exit_child

    exit_child(lambda: _child_main(int(sys.argv[1])))
