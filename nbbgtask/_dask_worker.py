"""What runs on a Dask worker: the task in a child process (so a cancel can stop it for real),
with its progress, output and outcome sent to the kernel as worker events.

``run_on_worker`` is what Dask runs (a coroutine, on the worker's event loop; the rest of the
task's supervision runs in a thread of its own).  The child is forked from the worker, with the
same rules as a task forked from a kernel (`_launcher.fork_detached`), ahead of time: each worker
keeps one idle *spare* child ready and hands it the next task (see "the task's process" below).
Where there is no fork it is ``python -m nbbgtask._dask_worker FD``.  Either way it runs the task
with the same runner as a local task, runs that one task only, and reports through a pipe.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
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
            _signal_group(running[0].pid, signal.SIGTERM)
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

    from ._supervisor import describe_exit

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
        _signal_group(child.pid, signal.SIGTERM)
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
        _signal_group(child.pid, signal.SIGTERM)
        try:
            child.wait(grace)
        except subprocess.TimeoutExpired:
            _signal_group(child.pid, signal.SIGKILL)

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
            outcome.update(state="failed", error=describe_exit(child.pid, code).replace("task process", "task process on the worker"))
        outcome["finished"] = time.time()
    emit("final", **outcome)
    return str(outcome["state"])


# -- the task's process ----------------------------------------------------------------------------
#
# Forking a child from a worker costs milliseconds (more, the bigger the worker), which would be
# most of a task's start.  So each worker keeps one child forked ahead of time, idle: a *spare*,
# waiting on a pipe.  A task is handed to the spare (its job, and the worker's cwd, environment
# and sys.path of that moment), the spare runs that one task and exits, exactly as a child forked
# for the task would; a new spare is forked in the background.  When no spare is ready (two tasks
# at once on a worker with several threads, or the first task on a worker), one is forked there and
# then and handed the task at once.

#: an idle spare older than this is replaced, so it does not hold on to an old copy of the
#: worker's memory (pages the worker has since freed or changed stay in the spare)
SPARE_MAX_AGE = 60.0
#: seconds between two looks of the keeper thread at its idle spare (still alive? too old?)
SPARE_CHECK = 1.0
#: seconds after a task started before the next spare is forked, so that the fork (which copies
#: the worker's page tables) does not compete with the task's first steps
SPARE_DELAY = 0.02

# Every pipe end this module opens is listed here, and every fork from this module happens under
# the same lock: a child forked while another task's pipes are open (a second thread, the keeper)
# closes the ends that are not its own.  Else it would hold another task's report pipe open (so the
# worker would not see that task end until this child ends too), or an idle spare's command pipe
# (so that spare would not see the worker go away).
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
    """The task's process on this worker: a forked spare, or spawned where fork is missing.

    ``reports`` and ``output`` are the worker's ends of its report pipe and of its fds 1 and 2;
    ``commands`` (a spare not yet handed a task) is where its task will come from.
    """

    def __init__(
        self, pid: int, output: int, reports: int, commands: int | None = None, popen: subprocess.Popen[bytes] | None = None
    ) -> None:
        self.pid, self.output, self.reports, self.commands, self._popen = pid, output, reports, commands, popen
        self.born = time.monotonic()
        self._rest = memoryview(b"")
        #: the worker's folder, environment and sys.path when it was forked (see hand_over)
        self.context: tuple[str, dict[str, str], list[str]] | None = None
        self._code: int | None = None

    def poll(self) -> int | None:
        """Its exit code if it has ended (and is reaped), else ``None``."""
        if self._popen is not None:
            return self._popen.poll()
        if self._code is None:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self._code = os.waitstatus_to_exitcode(status)
        return self._code

    def wait(self, timeout: float | None = None) -> int:
        if self._popen is not None:
            return self._popen.wait(timeout)
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
        """End a spare that has no task (it runs nothing of anyone's), and reap it."""
        _close(self.commands)
        self.commands = None
        if self.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.wait()
        _close(self.output, self.reports)


def _context() -> tuple[str, dict[str, str], list[str]]:
    return os.getcwd(), dict(os.environ), list(sys.path)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fork_spare() -> _Child:
    """Fork an idle child of this worker, with the same rules as a task forked from a kernel."""
    from . import _sources  # noqa: F401 - used by every task: imported once here, not in each child
    from ._launcher import fork_detached

    commands_read, commands = _pipe()
    reports, reports_write = _pipe()
    output, output_write = _pipe()
    own = {commands_read, reports_write, output_write}
    try:
        context = _context()
        with _fds_lock:
            inherited = frozenset(_fds - own)
            pid = fork_detached(lambda: _spare_main(commands_read, reports_write, inherited), output_write)
    except BaseException:
        _close(commands_read, commands, reports, reports_write, output, output_write)
        raise
    _close(*own)
    child = _Child(pid, output, reports, commands=commands)
    child.context = context
    return child


def _spare_main(commands: int, reports: int, inherited: frozenset[int]) -> int:
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

        job = Job(record={"id": "rehearsal"}, home=Path("."), target=target, sources=collect(target))
        job = pickle.loads(cloudpickle.dumps(job))
        restore(job.target, job.sources)
        reporter = Reporter(job, _NoSink())
        reporter.start()
        reporter.stop()
    except Exception:  # only a warm-up: the task itself will say what is wrong, if anything is
        pass


class _Spares:
    """One spare kept ready on a worker by a thread of its own; ends, and reaps it, on close()."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._spare: _Child | None = None
        self._wanted = False
        self._closed = False
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

    def _keep(self) -> None:
        while True:
            old = None
            with self._cond:
                while not self._closed:
                    spare = self._spare
                    if spare is None and self._wanted:
                        break
                    if spare is not None and (spare.poll() is not None or time.monotonic() - spare.born > SPARE_MAX_AGE):
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
                fresh: _Child | None = _fork_spare()
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
        """Ends the worker's spare (and reaps it) when the worker closes."""

        def teardown(self, worker: Any) -> None:
            with _pools_lock:
                pool = _pools.pop(worker.id, None)
            if pool is not None:
                pool.close()

    return SparesPlugin()


def _reset_after_fork() -> None:
    # A child of the worker owns none of its pipes, spares or locks.
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
    child = _fork_spare()
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
