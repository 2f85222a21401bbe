"""What runs in a Dask worker: the task in a child process (so a cancel can stop it for real),
with its progress, output and outcome sent to the kernel as worker events.

``run_on_worker`` is what Dask runs (a coroutine, on the worker's event loop); the rest of the
task's supervision (`_Supervision`) runs in a thread of its own.  The child is forked ahead of
time: each worker keeps one idle *spare* ready and hands it the next task (`nbbgtask.dask.spares`).  The
child runs the task with the same runner as a local task, runs that one task only, and reports
through a pipe (`nbbgtask.dask.child`).  Every message between kernel, worker, forker and child is
written down in `nbbgtask.dask.wire`.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import secrets
import select
import signal
import socket
import subprocess
import threading
import time
from typing import Any

from nbbgtask.core.forks import renew_in_child
from nbbgtask.core.procs import describe_exit
from nbbgtask.dask.pipes import close_pipes
from nbbgtask.dask.spares import Child, Spares, handed_over, start_child
from nbbgtask.dask.wire import FINAL, LOG_CHUNK, OUTPUT, PROGRESS, RESULT, TOPIC, cancel_event_name, read_report, seal
from nbbgtask.task.paths import preload

__all__ = ["TOPIC", "cancel_event_name", "run_on_worker"]

#: at most this many seconds the worker waits, after handing a spare its task, before its own
#: bookkeeping for the task (see _first_sign)
STAND_BACK = 0.005
#: seconds between a running task's looks at its cancel event on the scheduler
CANCEL_POLL = 0.5


async def run_on_worker(
    payload: bytes, task_id: str, grace: float, interval: float, key: bytes, modules: tuple[str, ...] = ()
) -> str:
    """Run a task's child process on this worker and report everything as worker events.

    A coroutine, so Dask runs it on the worker's event loop as soon as the task arrives: a ready
    spare is handed the task there and then, with no thread to wake up first (a plain function
    waits for one of the worker's threads).  Watching the child and forwarding its reports then
    happen in a thread of the task's own (`_Supervision`).  If Dask gives the task up while it
    runs (the worker closes, and Dask will run the task again elsewhere), its child is stopped.
    ``key``: the task's own key, which seals every event it sends (`nbbgtask.dask.wire.seal`).
    ``modules``: what every task's unpickling imports (`nbbgtask.task.paths.preloads`), imported
    here once, before the spares are forked, rather than in each task after its fork.
    """
    from distributed import get_worker

    preload(list(modules))
    worker = get_worker()
    supervision = _Supervision(worker, _spares(worker), payload, task_id, grace, interval, key)
    supervision.hand_to_spare()
    loop = asyncio.get_running_loop()
    done: asyncio.Future[str] = loop.create_future()
    context = contextvars.copy_context()  # get_worker() and get_client() work in the thread too

    def supervise() -> None:
        try:
            state = context.run(supervision.run)
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
        if supervision.handed is not None and supervision.handed.commands is None:
            await _first_sign(loop, supervision.handed)  # see STAND_BACK
        thread.start()
        return await done
    except asyncio.CancelledError:
        supervision.give_up()
        if thread.ident is None:
            thread.start()  # it stops and reaps the child
        raise


def _settle(future: Any, setter: Any, value: Any) -> None:
    if not future.done():
        setter(value)


async def _first_sign(loop: Any, child: Child) -> None:
    """Wait while a child just handed its task gets going: what the worker does next (the
    "started" event, which sets off the scheduler and a store write in the kernel, and a thread
    or four) would compete with its first steps for the processor.  Any sign from the child (a
    report, output, its end) or STAND_BACK seconds end the wait."""
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


class _Supervision:
    """One task's run on this worker: hand it to a spare (on the event loop), then, in the task's
    own thread (`run`), start its child unless a spare has it already, forward what the child
    reports as worker events, stop it on a cancel, and report how it ended."""

    def __init__(
        self, worker: Any, pool: Spares | None, payload: bytes, task_id: str, grace: float, interval: float,
        key: bytes,
    ) -> None:
        self.worker, self.pool, self.payload, self.key = worker, pool, payload, key
        self.task_id, self.grace, self.interval = task_id, grace, interval
        #: the spare handed the task on the event loop (perhaps not all of it yet), and when
        self.handed: Child | None = None
        self._handed_at = 0.0
        #: the task's process, once there is one (what a give_up signals)
        self.child: Child | None = None
        #: Dask gave the task up (the worker closes): stop the child, report nothing
        self.abandoned = threading.Event()
        self._ended = threading.Event()
        #: the fields of the "final" event, as they come from the child and the watchers
        self.outcome: dict[str, Any] = {}
        #: printed output not yet sent, and the lock that keeps it in order with the outputs
        self._printed: list[bytes] = []
        self._printed_lock = threading.Lock()
        #: this run's id and the number of its last event: the kernel applies each event once,
        #: though the scheduler replays them all to a kernel that starts later (_dask_wire, 3)
        self.run_id = secrets.token_hex(8)
        self._seq = 0
        self._emit_lock = threading.Lock()

    # -- on the worker's event loop ------------------------------------------------------------

    def hand_to_spare(self) -> None:
        """Give the task to the ready spare, if there is one, as far as the pipe takes it at once."""
        spare = self.pool.take() if self.pool is not None else None
        if spare is None:
            return
        # The time is taken before the hand-over: a short task can end on another core before
        # this thread runs again, and its start must not come after its end.
        handed_at = time.time()
        if handed_over(spare, self.payload, block=False):
            self.handed = self.child = spare
            self._handed_at = handed_at
        else:
            spare.discard()  # died just now, before it read the task

    def give_up(self) -> None:
        """Dask gave the task up: stop its child (the thread, started or not, then reaps it)."""
        self.abandoned.set()
        child = self.child
        if child is not None:
            child.signal_group(signal.SIGTERM)

    # -- in the task's own thread --------------------------------------------------------------

    def run(self) -> str:
        """The whole run, from start to the "final" event; the task's state."""
        from distributed import Event, get_client

        child, started = self._start()
        self._announce(child, started)
        # In the task's own thread (with the task's context): the watcher could not find the client.
        event = Event(cancel_event_name(self.task_id), client=get_client())
        pumps = [threading.Thread(target=t, args=(child,), daemon=True) for t in (self._pump_output, self._pump_reports)]
        watcher = threading.Thread(target=self._watch_cancel, args=(child, event), daemon=True)
        for t in (*pumps, watcher):
            t.start()
        if self.pool is not None:
            self.pool.replenish()
        code = child.wait()
        self._ended.set()
        for t in pumps:
            t.join()
        close_pipes(child.reports, child.output)
        if self.abandoned.is_set():
            return "abandoned"  # Dask runs the task again elsewhere; that run reports
        self._conclude(child, code)
        self._emit("final", **self.outcome)
        return str(self.outcome["state"])

    def _emit(self, kind: str, **fields: Any) -> None:
        with self._emit_lock:  # numbered in the order they are sent: several threads emit
            self._seq += 1
            event = {"kind": kind, "time": time.time(), "run": self.run_id, "seq": self._seq, **fields}
            self.worker.log_event(TOPIC, seal(self.key, self.task_id, event))  # for the kernel's eyes only

    def _start(self) -> tuple[Child, float]:
        """The task's process, running it, and when it was handed the task."""
        child = self.handed
        if child is not None:
            if child.finish_hand_over():
                return child, self._handed_at
            child.discard()  # died before it had read all of its task
        started = time.time()  # before: the child may have ended by the time this thread runs on
        child = self.child = start_child(self.payload, self.pool)
        return child, started

    def _announce(self, child: Child, started: float) -> None:
        if self.abandoned.is_set():  # given up before it started: the run Dask starts elsewhere reports
            child.signal_group(signal.SIGTERM)
        else:
            self._emit("started", pid=child.pid, host=socket.gethostname(), worker=self.worker.address, time=started)

    def _pump_output(self, child: Child) -> None:
        """Printed output, as "log" events: at most every ``interval`` seconds, or LOG_CHUNK bytes."""
        last = time.monotonic()
        while True:
            select.select([child.output], [], [], self.interval)
            with self._printed_lock:  # read under the lock: an output never overtakes what was printed before it
                ended = not self._take_printed(child, wait=False)
                pending = self._printed
                if pending and (ended or time.monotonic() - last >= self.interval or sum(map(len, pending)) >= LOG_CHUNK):
                    self._send_printed()
                    last = time.monotonic()
            if ended:
                return

    def _take_printed(self, child: Child, wait: bool) -> bool:
        """Read what the child printed and is there to read now; ``False`` at the end of the pipe."""
        while select.select([child.output], [], [], None if wait else 0)[0]:
            chunk = os.read(child.output, LOG_CHUNK)
            if not chunk:
                return False
            self._printed.append(chunk)
            if sum(map(len, self._printed)) >= LOG_CHUNK:
                break
        return True

    def _send_printed(self) -> None:
        if self._printed:
            self._emit("log", text=b"".join(self._printed).decode("utf-8", errors="replace"))
            self._printed = []

    def _pump_reports(self, child: Child) -> None:
        """The child's reports: progress goes on as events, result and end are kept for "final"."""
        while True:
            report = read_report(child.reports)
            if report is None:
                return
            kind, body = report
            if kind == PROGRESS:
                self._emit("progress", **body)
            elif kind == OUTPUT:
                # What it printed before it displayed this is in the pipe (the child flushed it
                # first): sent first, so the kernel places the output after it.
                with self._printed_lock:
                    self._take_printed(child, wait=False)
                    self._send_printed()
                    self._emit("output", line=bytes(body).decode("utf-8", errors="replace"))
            elif kind == RESULT:
                self.outcome["result"] = body
            elif kind == FINAL:
                self.outcome.update(body)

    def _watch_cancel(self, child: Child, event: Any) -> None:
        """Until the child ends: stop it if the kernel asks for a cancel, or Dask gives the task up.

        It asks whether the event is set every `CANCEL_POLL` seconds rather than waiting on it: a
        wait is held open on the scheduler, and one still open when the cluster closes (a script
        that ends its cluster as its last task ends) made the scheduler log a CancelledError."""
        while not self._ended.is_set():
            if self.abandoned.is_set():
                self._stop(child)
                return
            try:
                if not event.is_set():
                    self._ended.wait(CANCEL_POLL)
                    continue
            except Exception:  # scheduler busy or gone: keep running, look again
                self._ended.wait(CANCEL_POLL)
                continue
            self.outcome["cancel_requested"] = True
            self._stop(child)
            return

    def _stop(self, child: Child) -> None:
        child.signal_group(signal.SIGTERM)
        try:
            child.wait(self.grace)
        except subprocess.TimeoutExpired:
            child.signal_group(signal.SIGKILL)

    def _conclude(self, child: Child, code: int) -> None:
        """Fill in how the task ended if the child did not say (it was killed, or crashed)."""
        if "state" in self.outcome:
            return
        if self.outcome.get("cancel_requested"):
            self.outcome["state"] = "cancelled"
        elif child.lost:
            error = (
                f"the task process {child.pid} on the worker ended without reporting, and how is not "
                f"known: the process that forked it there was lost"
            )
            self.outcome.update(state="failed", error=error)
        else:
            error = describe_exit(child.pid, code).replace("task process", "task process on the worker")
            self.outcome.update(state="failed", error=error)
        self.outcome["finished"] = time.time()


# -- the spares of each worker ---------------------------------------------------------------------

_pools_lock = threading.Lock()
#: the spares of each worker in this process (by worker id; several only with in-process workers)
_pools: dict[str, Spares] = {}
#: the name of the worker plugin that ends a worker's spares when it closes
SPARES_PLUGIN = "nbbgtask-spares"


def _spares(worker: Any) -> Spares | None:
    """The spares of ``worker``, made (with a plugin that ends them when it closes) on first use;
    ``None`` if it is closing."""
    from distributed.core import Status

    with _pools_lock:
        pool = _pools.get(worker.id)
        if pool is None and worker.status in (Status.running, Status.paused):
            pool = _pools[worker.id] = Spares()
            worker.loop.add_callback(worker.plugin_add, plugin=_spares_plugin(), name=SPARES_PLUGIN)
        return pool


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
    # A child of the worker owns none of its spares, and no lock another thread may hold.
    global _pools_lock
    _pools_lock = threading.Lock()
    _pools.clear()


renew_in_child(_reset_after_fork)
