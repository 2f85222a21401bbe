"""A task that may retry: its process becomes a small *keeper* that forks one child per attempt
from itself, records how each attempt ended, waits out the delay and starts the next.

Why a keeper, and a fork of it per attempt: whatever ends an attempt — an exception, the task's
timeout, its memory cap's kill, the OOM killer — ends only the attempt's process, and the keeper
sees it and goes on, wherever the task was started (forked from a kernel, by the fork server, by
spawn, or on a Dask worker) and whether or not the process that started it is still there.  A
forked task keeps fork's semantics: each attempt is a copy of the keeper, itself a copy of the
kernel as it was when the task started.  The keeper leads the task's process group and is the
process its record names (the attempt speaks for it, `nbbgtask.core.procs.speak_for`), so a
cancel signals the keeper and the attempt together, and stops all further attempts at once, also
during the delay.  A task without retries never gets here: nothing changes for it.

Between attempt and keeper: one pipe of pickles, ``("limit", text)`` (a limit the attempt went
past, before it may be killed for it) and ``("end", fields, retryable)`` (how the attempt ended,
as the runner would have recorded it).  An attempt that ends without the second was killed.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import select
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

from nbbgtask.core import limits as _limits
from nbbgtask.core.errors import StoreError
from nbbgtask.core.procs import EXIT_UNRECORDED, describe_exit, own_process, speak_for
from nbbgtask.core.retry import Retry, delay_before
from nbbgtask.core.states import State
from nbbgtask.task import notify as _notify

__all__ = ["keep", "Relay"]

#: seconds between a waiting keeper's looks at the store for a cancel request (a cancel from a
#: process that could not signal it); a signal wakes it at once
CANCEL_POLL = 0.1


class Relay:
    """The sink of one attempt, in the attempt's process: reports go to the task's sink as they
    would, but its end goes to the keeper, which decides whether it is the task's end."""

    def __init__(self, sink: Any, fd: int, policy: Retry) -> None:
        self._sink, self._fd, self._policy = sink, fd, policy
        self._failure: BaseException | None = None
        for optional in ("interval", "output"):  # the runner and reporter look for these
            if hasattr(sink, optional):
                setattr(self, optional, getattr(sink, optional))

    def _send(self, message: tuple[Any, ...]) -> None:
        data = pickle.dumps(message)
        while data:
            data = data[os.write(self._fd, data):]

    def progress(self, fields: dict[str, Any] | None) -> bool:
        if fields and fields.get("limit_error"):  # if the attempt is killed for it, the keeper says why
            with contextlib.suppress(OSError):
                self._send(("limit", fields["limit_error"]))
        return bool(self._sink.progress(fields))

    def save_result(self, data: bytes) -> None:
        self._sink.save_result(data)

    def failed_with(self, exc: BaseException | None) -> None:
        self._failure = exc

    def finish(self, fields: dict[str, Any]) -> None:
        failed = fields["state"] == State.FAILED.value
        retryable = failed and self._policy.wants(type(self._failure) if self._failure is not None else None)
        self._send(("end", fields, retryable))


class _Keeper:
    def __init__(
        self, job: Any, sink: Any, run_once: Callable[[Any, Any, bool], int], local: bool, make_sink: Callable[[Any], Any]
    ) -> None:
        self.job, self.sink, self.run_once, self.local, self.make_sink = job, sink, run_once, local, make_sink
        self.policy: Retry = job.retry
        self.me = own_process()
        self.cancelled = False
        self.child: int | None = None
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        self.attempts: list[dict[str, Any]] = []

    # -- signals ------------------------------------------------------------------------------

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_term)
        # a request for the stack names the keeper (the record's process): the attempt answers it
        signal.signal(signal.SIGUSR2, self._on_stack)

    def _on_term(self, signum: int, frame: Any) -> None:
        # A cancel (or Dask giving the task up) signals the whole group: the attempt has it too.
        self.cancelled = True
        with contextlib.suppress(OSError):
            os.write(self.wake_w, b"x")

    def _on_stack(self, signum: int, frame: Any) -> None:
        if self.child is not None:
            with contextlib.suppress(OSError):
                os.kill(self.child, signum)

    # -- one attempt ----------------------------------------------------------------------------

    def _fork(self, write: int) -> int:
        with warnings.catch_warnings():  # the keeper has no thread: nothing is held across this fork
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:
            code = 70
            try:
                os.close(self.wake_r)
                os.close(self.wake_w)
                # A cancel before the runner handles SIGTERM ends the attempt (the keeper then
                # records the cancel); a stack request before it answers is ignored.
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGUSR2, signal.SIG_IGN)
                speak_for(self.me)
                # A local attempt writes the store through a sink of its own (the keeper's holds
                # its lock files' descriptors, which a lock shared with the attempt would not exclude).
                sink = self.make_sink(self.job) if self.local else self.sink
                code = self.run_once(self.job, Relay(sink, write, self.policy), self.local)
            except BaseException:
                with contextlib.suppress(BaseException):
                    traceback.print_exc()
            finally:
                for stream in (sys.stdout, sys.stderr):
                    with contextlib.suppress(BaseException):
                        stream.flush()
                os._exit(code)
        return pid

    def _collect(self, pid: int, read: int) -> tuple[bytes, int]:
        """What the attempt sent, and its exit code, once it has ended."""
        chunks: list[bytes] = []
        try:
            pidfd: int | None = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pidfd = None
        watched = [read, self.wake_r] + ([pidfd] if pidfd is not None else [])
        open_pipe = True
        try:
            while True:
                ready, _, _ = select.select(watched if open_pipe else watched[1:], [], [], None if pidfd is not None else 0.05)
                if self.wake_r in ready:
                    with contextlib.suppress(OSError):
                        os.read(self.wake_r, 64)
                if read in ready:
                    data = os.read(read, 65536)
                    if data:
                        chunks.append(data)
                    else:
                        open_pipe = False
                done, status = os.waitpid(pid, os.WNOHANG) if (pidfd is None or pidfd in ready or not open_pipe) else (0, 0)
                if done:
                    os.set_blocking(read, False)
                    with contextlib.suppress(OSError):  # what is left (a process it forked may hold the pipe)
                        while data := os.read(read, 65536):
                            chunks.append(data)
                    return b"".join(chunks), os.waitstatus_to_exitcode(status)
                if not open_pipe and pidfd is None:
                    time.sleep(0.01)
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def attempt(self, number: int) -> tuple[dict[str, Any], bool]:
        """Run attempt ``number``; how it ended (the runner's fields) and whether to retry it."""
        started = time.time()
        oom = _limits.oom_kills()
        fresh = {"attempt": number, "started": started, "retry_at": None, "limit_error": None, **self.me}
        if number > 1:  # one write says how the last attempt ended and that this one began
            fresh.update(percent=0.0, message="", attempts=list(self.attempts))
            print(f"\nnbbgtask: ──── attempt {number} of {self.policy.retries + 1} ────", flush=True)
        if self.sink.progress(fresh):
            self.cancelled = True
        if self.cancelled:
            return {"state": State.CANCELLED.value, "finished": time.time()}, False
        read, write = os.pipe()
        try:
            pid = self.child = self._fork(write)
        finally:
            os.close(write)
        try:
            data, code = self._collect(pid, read)
        finally:
            self.child = None
            os.close(read)
        ended: tuple[Any, ...] | None = None
        limit_error = None
        stream = io.BytesIO(data)
        while True:
            try:
                message = pickle.load(stream)
            except Exception:  # the end of what it sent (or a message cut short by its kill)
                break
            if message[0] == "limit":
                limit_error = message[1]
            elif message[0] == "end":
                ended = message
        if ended is not None:
            fields, retryable = dict(ended[1]), bool(ended[2])
        elif self.cancelled:
            fields, retryable = {"state": State.CANCELLED.value}, False
        else:
            view = {"limits": self.job.limits, "started": started, "oom_kills": oom, "limit_error": limit_error, "pid": pid}
            error = _limits.explain(view, describe_exit(pid, code), code)
            fields = {"state": State.FAILED.value, "error": error}
            retryable = self.policy.wants(_limits.death_kind(error))
        fields.setdefault("finished", time.time())
        if self.cancelled:
            fields["state"], retryable = State.CANCELLED.value, False
        self.attempts.append({
            "attempt": number, "started": started, "finished": fields["finished"],
            "state": fields["state"], "error": fields.get("error"),
        })
        return fields, retryable

    def wait(self, seconds: float) -> None:
        """Wait ``seconds`` before the next attempt, or less if a cancel comes."""
        deadline = time.monotonic() + seconds
        while not self.cancelled:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            ready, _, _ = select.select([self.wake_r], [], [], min(left, CANCEL_POLL))
            if ready:
                with contextlib.suppress(OSError):
                    os.read(self.wake_r, 64)
            elif self.local and self.sink.progress(None):
                self.cancelled = True

    # -- the whole task ---------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        total = self.policy.retries + 1
        for number in range(1, total + 1):
            fields, retryable = self.attempt(number)
            if not retryable or number == total or self.cancelled:
                break
            delay = delay_before(number + 1, self.policy.delay)
            retry_at = time.time() + delay
            error = fields.get("error") or "failed"
            print(f"nbbgtask: attempt {number} of {total} failed ({error}); attempt {number + 1} in {delay:.2g} s", flush=True)
            # While it waits, "started" is when the next attempt starts: a reader's timeout check
            # (started + timeout) never ends a task that waits to retry.
            if delay > 0:  # with no delay, the next attempt's first write says it all
                update = {"attempts": list(self.attempts), "retry_at": retry_at, "started": retry_at,
                          "message": f"attempt {number} failed: {error}"}
                if self.sink.progress(update):
                    self.cancelled = True
                self.wait(delay)
            if self.cancelled:
                fields = {"state": State.CANCELLED.value, "finished": time.time()}
                break
        if self.cancelled:
            fields["cancel_requested"] = True
        return {**fields, "attempt": len(self.attempts) or 1, "attempts": self.attempts, "retry_at": None}


def keep(job: Any, sink: Any, run_once: Callable[[Any, Any, bool], int], make_sink: Callable[[Any], Any]) -> int:
    """Run ``job``'s attempts (``job.retry``) in processes forked from this one, and record the
    task's end once (``sink``, or the store's for a local task); the exit code.

    ``run_once(job, sink, local)``: the runner's one run of the task, reporting to ``sink``."""
    local = sink is None
    if local:  # this process records the task's end, and so sends word of it
        _notify.SYNC = True
        _notify.expect(job.task_id, job.notify)
        sink = make_sink(job)
    keeper = _Keeper(job, sink, run_once, local, make_sink)
    keeper.install()
    fields = keeper.run()
    if fields["state"] == State.COMPLETE.value:
        fields["percent"] = 100.0
    try:
        sink.finish(fields)
    except StoreError as exc:
        with contextlib.suppress(Exception):
            print(f"nbbgtask: the task ended {fields['state']}, but that could not be recorded: {exc}", file=sys.stderr)
        return EXIT_UNRECORDED
    return 0
