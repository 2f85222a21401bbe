"""A task's progress in its own process: held in memory, sent on by a writer thread.

``job`` is the runner's `_runner.Job` (its id, secrets, progress interval and cancel style); the
sink is where reports go: the store (`_runner.StoreSink`), or the Dask worker's events.
"""

from __future__ import annotations

import _thread
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from nbbgtask.core.procs import own_process
from nbbgtask.core.trust import redactor
from nbbgtask.core.validate import percent as check_percent
from nbbgtask.core.validate import text
from nbbgtask.task import tqdm_capture as _tqdm_capture

__all__ = ["Reporter"]

T = TypeVar("T")


class _Tracker:
    __slots__ = ("n", "total", "label")

    def __init__(self, total: int | None, label: str | None) -> None:
        self.n = 0
        self.total = total
        self.label = label


class Reporter:
    """Holds a task's progress in memory; a thread sends it on at most every interval.

    ``update`` only sets attributes, so calling it on every item of a loop costs next to nothing;
    the writer thread also brings ``cancel_requested`` back.
    """

    def __init__(
        self, job: Any, sink: Any, later: Callable[[], None] | None = None, tick: Callable[[], Any] | None = None
    ) -> None:
        self.task_id = job.task_id
        #: called from the writer thread every round (the log's cap: `nbbgtask.task.logcap`)
        self._tick = tick
        #: called once from the writer thread after its first interval: what only a task that
        #: runs that long needs (the peak sampler's thread)
        self._later = later
        self.secrets = job.secrets
        self.percent = 0.0
        self.message = ""
        self.cancel_requested = False
        self._job = job
        self._sink = sink
        #: what was last sent, to skip writes that would change nothing
        self._written: tuple[float, str] | None = None
        self._tracker: _Tracker | None = None
        self._tracked = -1
        self._stop = threading.Event()
        #: held by the writer thread while it runs; `stop` takes it to wait for the thread's end
        self._running: Any = None

    def start(self) -> None:
        # A bare thread, not a threading.Thread: in a task forked from a kernel holding 200 MB,
        # Thread.start() took 0.46 ms before the task's code could run (its objects, and its wait
        # for the new thread to say it started), start_new_thread 0.14 ms.
        running = _thread.allocate_lock()
        running.acquire()
        self._running = running
        _thread.start_new_thread(self._run, (running,))

    def _run(self, running: Any) -> None:
        try:
            # Named as a threading.Thread would be (threading.enumerate(), the task's own tools);
            # here, in parallel with the task's code rather than before it.
            threading.current_thread().name = "nbbgtask-progress"
            self._loop()
        finally:
            running.release()

    def update(self, percent: Any = None, message: Any = None) -> None:
        if percent is not None:
            self.percent = check_percent(percent)
        if message is not None:
            self.message = message if type(message) is str else text(message, "message")

    def track(self, iterable: Iterable[T], total: int | None, message: str | None) -> Iterator[T]:
        if total is None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        if message is not None:
            self.update(message=message)
        tracker = _Tracker(total, message)
        self._tracker = tracker
        n = 0
        try:
            for item in iterable:
                yield item
                n += 1
                tracker.n = n  # read by the writer thread, which turns it into a percentage
        finally:
            self._apply_tracker()
            if self._tracker is tracker:
                self._tracker = None

    def _apply_tracker(self) -> None:
        tracker = self._tracker
        if tracker is None or tracker.n == self._tracked:
            return
        self._tracked = tracker.n
        if tracker.total:
            self.update(percent=100.0 * tracker.n / tracker.total)
        else:
            self.update(message=f"{tracker.label or 'items'}: {tracker.n}")

    def fields(self) -> dict[str, Any]:
        return {"percent": self.percent, "message": self.message}

    def flush(self) -> None:
        self._apply_tracker()
        _tqdm_capture.apply(self)
        now = (self.percent, self.message)
        # ``reported``: when the progress last changed (a task whose progress stands still for long
        # is shown as stalled); it rides with the write of the change, never a write of its own.
        if self._written is None:  # the first report says who is running the task
            requested = self._sink.progress(
                {"percent": now[0], "message": now[1], "reported": time.time(), **own_process()}
            )
            self._written = now
        elif now == self._written:
            requested = self._sink.progress(None)
        else:
            requested = self._sink.progress({"percent": now[0], "message": now[1], "reported": time.time()})
            self._written = now
        if requested and not self.cancel_requested:
            self.cancel_requested = True
            if not self._job.cooperative_cancel:
                # A cancel from a process that had no pid to signal: the same path as SIGTERM.
                os.kill(os.getpid(), signal.SIGTERM)

    def _loop(self) -> None:
        base = interval = self._job.progress_interval
        pace = getattr(self._sink, "interval", None)
        while not self._stop.wait(interval):
            if self._later is not None:
                later, self._later = self._later, None
                try:
                    later()
                except Exception as exc:  # no thread to spare, say: the task runs on without it
                    print(f"nbbgtask: {exc}", file=sys.stderr)
            if self._written is None and pace is not None:
                # The first write keeps to the pace too: of many tasks started at once (each
                # waiting its turn for a CPU), those still running after one interval do not all
                # write then.  The end's write says who ran the task where there was none.
                rest = pace(base) - base
                if rest > 0 and self._stop.wait(rest):
                    break
            try:
                self.flush()
            except Exception as exc:  # a full disk must not kill the task; the final write says more
                print(redactor(self.secrets)(f"nbbgtask: could not record progress: {exc}"), file=sys.stderr)
            # What the task printed reaches its log, and so its bar, within an interval, also
            # where the task put a buffered stream of its own in place of sys.stdout.
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            if self._tick is not None:
                try:
                    self._tick()
                except Exception:  # the cap must never end the task
                    pass
            if pace is not None:
                interval = pace(base)

    def stop(self) -> None:
        self._stop.set()
        running = self._running
        if running is not None:  # started: wait for the writer's last write to end
            with running:
                pass
        self._apply_tracker()
        _tqdm_capture.apply(self)
