"""What runs inside the task's process around its code: the wrapper that runs it and records how it ended (its progress goes through `nbbgtask.task.reporter`)."""

from __future__ import annotations

import _signal
import base64
import dataclasses
import errno
import faulthandler
import inspect
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from nbbgtask.core import limits as _limits
from nbbgtask.core.errors import StoreError
from nbbgtask.core.notify import Notify
from nbbgtask.core.procs import EXIT_UNRECORDED, describe_exit, own_process, signal_left_group
from nbbgtask.core.states import State
from nbbgtask.core.trust import redactor
from nbbgtask.store import ends
from nbbgtask.store import outputs as _stored_outputs
from nbbgtask.store.files import atomic_write, result_path, stack_path
from nbbgtask.store.store import store_for
from nbbgtask.task import attempts as _attempts
from nbbgtask.task import notify as _notify
from nbbgtask.task import outputs as _outputs
from nbbgtask.task import tqdm_capture as _tqdm_capture
from nbbgtask.task.limits import Enforcer
from nbbgtask.task.logcap import DEFAULT_LOG_MAX, LogCap
from nbbgtask.task.reporter import Reporter
from nbbgtask.task.results import resolved

__all__ = [
    "Job", "StoreSink", "current", "current_reporter", "exit_child", "run_job", "run_pickled",
    "record_exit", "EXIT_UNRECORDED", "STACK_SIGNAL", "trim_stack",
]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


@dataclasses.dataclass
class Job:
    """Everything a task process needs; in memory (fork) or pickled through a pipe (spawn)."""

    record: dict[str, Any]
    home: Path
    #: a `BackgroundTask` instance (calls ``execute(status)``) or any callable
    target: Any
    #: makes the handle the task reports through, ``make_status(record, home, reporter)``: the
    #: API's `TaskStatus` (handed down, since the runner sits below the layer that defines it)
    make_status: Callable[[dict[str, Any], Path, Reporter], Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    secrets: dict[str, Any] = dataclasses.field(default_factory=dict)
    is_task_class: bool = False
    #: the task stops itself when it sees ``cancel_requested`` (else SIGTERM interrupts it)
    cooperative_cancel: bool = False
    progress_interval: float = 0.1
    #: the task's `nbbgtask.core.limits.Limits`, as its record keeps them (None: no limit)
    limits: dict[str, Any] | None = None
    #: seconds a task stopped by a limit gets after SIGTERM before it is killed (as a cancel's)
    cancel_grace: float = 3.0
    #: bytes the task's log is held to (`nbbgtask.task.logcap`); None: the default
    log_max: int | None = None
    #: the files and lines of the task's code, for an interpreter that has not got them (`nbbgtask.core.sources`)
    sources: dict[str, Any] | None = dataclasses.field(default=None, repr=False)
    #: where word of its end goes (a webhook URL: a secret, in memory only; `nbbgtask.task.notify`)
    notify: Notify | None = dataclasses.field(default=None, repr=False)
    #: its retries (`nbbgtask.core.retry.Retry`): the task's process keeps its attempts
    #: (`nbbgtask.task.attempts`); None: one attempt, as before there were retries
    retry: Any = None
    #: the pickled job, for spawn (made by the launcher before anything is stored)
    payload: tuple[bytes, bytes] | None = dataclasses.field(default=None, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "payload": None}

    @property
    def task_id(self) -> str:
        return self.record["id"]


def pickled(job: Job, where: str, advice: str = "") -> bytes:
    """``job`` with its functions' sources (for readable tracebacks there), pickled by cloudpickle
    for a process that does not share this one's memory (``where``, for the error); a clear
    `TypeError` when something in it cannot be pickled."""
    import cloudpickle

    from nbbgtask.core.sources import collect

    try:
        return bytes(cloudpickle.dumps(dataclasses.replace(job, sources=collect(job.target))))
    except Exception as exc:
        raise TypeError(
            f"the task cannot be sent to {where}, because its function, arguments or secrets "
            f"cannot be pickled: {exc}. Pass something picklable (open files, connections and locks "
            f"are not){advice}"
        ) from None


class _Terminated(BaseException):
    """Raised in the task by SIGTERM (a cancel); a BaseException so ``except Exception`` lets it by."""


#: a pickled result up to this size is kept in the task's record, not a file of its own (a file
#: costs a create, a rename and an fsync: more than a trivial task's whole run)
INLINE_RESULT = 512
#: seconds of progress-write interval per live task (100 live tasks: each writes every 0.5 s)
WRITE_SHARE = 0.005


class StoreSink:
    """Where a local task's reports go: straight into the store."""

    def __init__(self, job: Job) -> None:
        self._job = job
        self._store = store_for(job.home)
        self._write_output: Callable[[bytes], None] | None = None
        #: the cap on the task's log (fds 1 and 2): `nbbgtask.task.logcap`
        self.logcap = LogCap(job.log_max if job.log_max is not None else DEFAULT_LOG_MAX)

    def interval(self, base: float) -> float:
        """Seconds until the next progress write: longer when many tasks are live,
        so that together their writes keep to a small share of the machine."""
        return max(base, WRITE_SHARE * self._store.live_count())

    def progress(self, fields: dict[str, Any] | None) -> bool:
        """Record ``fields`` (or only look, if ``None``); ``True`` if a cancel was requested."""
        if fields is None:
            record = self._store.get(self._job.task_id)
        else:
            recreate = {**self._job.record, "state": State.RUNNING.value}
            record = self._store.patch(self._job.task_id, fields, recreate=recreate)
        return bool(record and (record.get("cancel_requested") or State(record["state"]).is_final))

    def save_result(self, data: bytes) -> None:
        path = result_path(self._job.home, self._job.task_id)
        try:
            atomic_write(path, data, durable=True)
        except OSError as exc:
            # A full disk: the log gives way to the result (only its last part is kept), once.
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or not self.logcap.check(keep=_FULL_DISK_TAIL):
                raise
            atomic_write(path, data, durable=True)

    def output(self, line: bytes) -> None:
        """One of the task's outputs (`nbbgtask.task.outputs`), into its outputs file."""
        if self._write_output is None:
            self._write_output = _stored_outputs.file_writer(self._job.home, self._job.task_id)
        self._write_output(line)

    def finish(self, fields: dict[str, Any]) -> None:
        # This process is the task's: its pid and start time let a later reader tell it apart.
        self._store.finalize(self._job.task_id, {**fields, **own_process()}, fallback=self._job.record)


_current: Any = None


def current() -> Any:
    """The running task's status in its own process, else ``None``."""
    return _current


def current_reporter() -> Reporter | None:
    return _current_reporter


_current_reporter: Reporter | None = None


def _user_traceback(exc: BaseException) -> str:
    """The traceback without nbbgtask's own frames at its top."""
    tb = exc.__traceback__
    while tb is not None and os.path.dirname(os.path.abspath(tb.tb_frame.f_code.co_filename)) == _PACKAGE_DIR:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _call(job: Job, status: Any) -> Any:
    if job.sources:
        from nbbgtask.core.sources import restore

        restore(job.target, job.sources)
    if job.is_task_class:
        value = job.target.execute(status)
    else:
        # Other tasks' results given as arguments are read here, in the task's own process.
        args, kwargs = resolved(job.home, job.args, job.kwargs)
        value = job.target(*args, **kwargs)
    if inspect.isawaitable(value):
        import asyncio  # only for a coroutine: it costs a third of nbbgtask's import

        async def _await() -> Any:
            return await value

        value = asyncio.run(_await())
    return value


def _save_result(sink: Any, value: Any) -> dict[str, Any]:
    """Pickle the return value and hand it to the sink; the fields that say there is one."""
    if value is None:
        return {"has_result": False}
    import cloudpickle

    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    try:
        data = cloudpickle.dumps(value)
    except Exception as exc:
        raise TypeError(f"the task's return value (a {kind}) cannot be pickled: {exc}") from exc
    if len(data) <= INLINE_RESULT:
        return {"has_result": True, "result_type": kind, "result_inline": base64.b64encode(data).decode("ascii")}
    sink.save_result(data)
    return {"has_result": True, "result_type": kind}


#: the signal that asks a local task for its stack (`TaskStatus.stack`): faulthandler's handler,
#: which writes every thread's stack from the signal handler itself, without the GIL, so a task
#: blocked in C (a sleep, a lock, a regex holding the GIL) still answers.  SIGUSR2 rather than
#: SIGUSR1, which code of one's own more often takes (e.g. for its own faulthandler).
STACK_SIGNAL = signal.SIGUSR2


def _answer_stack_requests(job: Job) -> str | None:
    """Dump every thread's stack into the task's stack file on `STACK_SIGNAL`; the file's path.

    The file's name says which process to signal (`stack_path`); it appears only once the handler
    is in place, so nobody sends the signal before (its default action would end the task).  It is
    opened for appending: the asker empties it before each request, and the dump starts at its
    beginning.  No ``chain``, for the same reason.  It stays registered until the process exits:
    unregistering would put the default back, and a late request would kill a finished task.
    """
    me = own_process()
    path = stack_path(job.home, job.task_id, me["pid"], me["pid_started"])
    return listen_for_stack_requests(path)


def listen_for_stack_requests(path: str) -> str | None:
    """From now on `STACK_SIGNAL` makes faulthandler write every thread's stack into ``path`` (made
    whole by a rename, 0600, never through a link): ``path``, or ``None`` if it cannot be, said in
    the task's log (the task runs on; ``stack()`` then says it cannot answer).  A local task's
    file is in the home's ``stacks/``; a Dask task's in its worker's private folder."""
    tmp = path + ".tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        faulthandler.register(STACK_SIGNAL, file=fd, all_threads=True, chain=False)
        os.rename(tmp, path)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"nbbgtask: this task cannot show its stack: {exc}", file=sys.stderr)
        return None
    return path


#: the line of a faulthandler dump for the runner's frame that calls the task's code
_CALL_FRAME = f'  File "{os.path.join(_PACKAGE_DIR, "runner.py")}", line '


def trim_stack(dump: str) -> str:
    """A faulthandler dump of a task's threads without what lies below the task's code: the
    runner, and the process it was forked from (a kernel's event loop and cell, a test runner).

    In each thread, the frames after (older than) the runner's ``_call`` give way to one line
    that says so; a thread the runner does not call into (the task's own, nbbgtask's progress
    writer) is left whole."""
    out: list[str] = []
    hiding = False
    for line in dump.splitlines():
        if not line.startswith("  "):  # a thread's header, or the blank line between threads
            hiding = False
        elif hiding:
            continue
        elif line.startswith(_CALL_FRAME) and line.endswith(" in _call"):
            out.append("  (below: nbbgtask's runner, and what started the task)")
            hiding = True
            continue
        out.append(line)
    return "\n".join(out) + ("\n" if dump.endswith("\n") else "")


def run_job(job: Job, sink: Any = None) -> int:
    """Run the task here and record how it ended (in the store, or through ``sink``); the exit code.

    A task with retries runs each attempt in a process forked from this one (`_attempts`)."""
    if job.retry is not None:
        return _attempts.keep(job, sink, _run_once, StoreSink)
    return _run_once(job, sink, sink is None)


def _run_once(job: Job, sink: Any, local: bool) -> int:
    """One run of the task; ``local``: it runs on this machine, with the store at hand."""
    global _current, _current_reporter
    # A local task answers stack requests before its first report names its pid.
    stack_file = _answer_stack_requests(job) if local else None
    # The secrets' text never reaches what nbbgtask writes: the error, traceback and log lines.
    redact = redactor(job.secrets)
    if sink is None:  # a local task records its own end, and so sends word of it
        _notify.SYNC = True
        _notify.expect(job.task_id, job.notify)
    sink = StoreSink(job) if sink is None else sink
    enforcer = Enforcer(job.limits, job.cancel_grace, sink.progress)
    logcap: LogCap | None = getattr(sink, "logcap", None)
    reporter = Reporter(job, sink, later=enforcer.start_sampler, tick=logcap.check if logcap is not None else None)
    status = job.make_status(dict(job.record), job.home, reporter)
    _current, _current_reporter = status, reporter
    _tqdm_capture.install()  # tqdm's bars in the task report to its status, in lines in its log
    output = getattr(sink, "output", None)
    if output is not None:  # display(), figures and a cell's last value, kept with the task
        _outputs.install(output)
    finishing = cancelled = False

    def on_sigterm(signum: int, frame: Any) -> None:
        breach = enforcer.poll()
        if breach is not None:  # a limit ended it, not a cancel
            if not finishing:
                raise breach
            return
        reporter.cancel_requested = True
        if not finishing and not job.cooperative_cancel:
            raise _Terminated()

    _signal.signal(_signal.SIGTERM, on_sigterm)  # _signal: see nbbgtask.task.detach
    _signal.signal(_signal.SIGINT, _signal.default_int_handler)
    reporter.start()
    fields: dict[str, Any]
    value: Any = None
    failure: BaseException | None = None
    try:
        try:
            enforcer.start()
            value = _call(job, status)
        finally:
            finishing = True
            enforcer.stop()
            enforcer.settle()  # the peak by the kernel's own count, before any error names it
            # A cancel asked for before the task ended wins over however it then ended.
            cancelled = reporter.cancel_requested
            if not cancelled and output is not None:
                _outputs.finish()  # figures left open are shown, as at the end of a cell
        if enforcer.breach is not None and not cancelled:
            raise enforcer.breach  # a cap passed between two samples: the kernel's count says so
        fields = {"state": State.COMPLETE.value}
        if logcap is not None:
            logcap.check()  # the result and the end are written before the log may grow further
        if not cancelled:
            fields.update(_save_result(sink, value))
    except _Terminated:
        fields = {"state": State.CANCELLED.value}
    except _limits.LimitExceeded as exc:
        failure = exc
        text = _user_traceback(exc)
        error = enforcer.error(exc)
        try:
            print(f"nbbgtask: {error}", file=sys.stderr)
        except Exception:
            pass
        fields = {"state": State.FAILED.value, "error": error, "traceback": text}
        cancelled = False
    except SystemExit as exc:
        failure = exc
        if exc.code in (None, 0):
            fields = {"state": State.COMPLETE.value}
        else:
            fields = {
                "state": State.FAILED.value,
                "error": redact(f"SystemExit: {exc.code}"),
                "traceback": redact(_user_traceback(exc)),
            }
    except BaseException as exc:
        failure = exc
        text = redact(_user_traceback(exc))
        try:
            print(text, file=sys.stderr, end="")
        except Exception:  # a full disk: the traceback still reaches the store below
            pass
        fields = {"state": State.FAILED.value, "error": redact(_one_line(exc)), "traceback": text}
    if cancelled:
        fields = {"state": State.CANCELLED.value}
    reporter.stop()
    fields.update(reporter.fields())
    if fields["state"] == State.COMPLETE.value:
        fields["percent"] = 100.0
    fields["finished"] = time.time()
    fields["cancel_requested"] = cancelled or reporter.cancel_requested
    if enforcer.peak is not None:
        fields["peak_memory"] = enforcer.peak
    failed_with = getattr(sink, "failed_with", None)
    if failed_with is not None:  # an attempt's: its keeper matches the failure to retry_on
        failed_with(failure)
    try:
        _finish(sink, fields, logcap)
    except StoreError as exc:  # a full disk, say: the exit code tells the parent what happened
        try:
            print(redact(f"nbbgtask: the task ended {fields['state']}, but that could not be recorded: {exc}"), file=sys.stderr)
        except Exception:
            pass
        return EXIT_UNRECORDED
    finally:
        if stack_file is not None:  # ended: nothing more to ask (a late dump goes to the unlinked file)
            try:
                os.unlink(stack_file)
            except OSError:
                pass
    return 0



#: seconds between attempts to record a task's end that could not be written (a full disk): about
#: 15 s in all, for room to be made, before the task leaves its end to its reaper
FINISH_RETRIES = (0.1, 0.3, 1.0, 2.0, 4.0, 8.0)
#: bytes of the log kept when the disk is too full for a task's result or end
_FULL_DISK_TAIL = 64 * 1024


def _finish(sink: Any, fields: dict[str, Any], logcap: LogCap | None) -> None:
    """Record the task's end, retried while the store cannot be written; the log gives way first."""
    for delay in (*FINISH_RETRIES, None):
        try:
            sink.finish(fields)
            return
        except StoreError:
            if delay is None:
                raise
            if logcap is not None:
                logcap.check(keep=_FULL_DISK_TAIL)
            time.sleep(delay)


def exit_child(main: Callable[[], int]) -> NoReturn:
    """Run the entry point of a task's own process (forked or spawned), then end it with ``os._exit``.

    A failure before the job could even start (its module not importable here, say) is printed
    to the task's log, and the exit code (70) tells the parent the task never reported.  Returning,
    raising or sys.exit() instead would let a forked task run on as a copy of the kernel: atexit
    handlers would end IPython's shared history session and delete the kernel's connection file.
    """
    code = 70
    try:
        code = main()
    except BaseException:
        try:
            traceback.print_exc()
        except BaseException:  # no room for the log: the exit code still says it
            pass
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        os._exit(code)


def run_pickled(path: bytes, job: bytes) -> int:
    """Run a job sent as pickles (by spawn, or through the fork server): ``path`` is the sender's
    sys.path and folder (`paths.sender`), put in place first, since the job's pickle names the
    sender's modules by reference."""
    import pickle

    from nbbgtask.core import config as _config
    from nbbgtask.task.paths import restore

    restore(path)
    _outputs.prepare()  # before the job is unpickled: its display() is then this process's
    loaded: Job = pickle.loads(job)
    _config.settings().home = loaded.home
    return run_job(loaded)


def record_exit(home: Path, task_id: str, pid: int, code: int | None) -> None:
    """A task's process ended (``code``: its exit code, or None if unknown): if its record does
    not say how, say it from the exit code.  Called by whoever reaped it."""
    store = store_for(home)
    # A task that recorded its end has no live file: one stat, and nothing to read.
    record = store.get(task_id) if store.is_live(task_id) else None
    if record is None or State(record["state"]).is_final:
        _notify.forget(task_id)  # the task recorded its end, and sent word of it
        ends.seen(home, task_id)
        return
    if record.get("cancel_requested"):
        fields: dict[str, Any] = {"state": State.CANCELLED.value}
    else:
        error = f"the task process {pid} ended without reporting" if code is None else describe_exit(pid, code)
        fields = {"state": State.FAILED.value, "error": _limits.explain(record, error, code)}
        if fields["error"] != error:  # a limit (or the OOM killer) ended it: end what it started too
            signal_left_group(pid, signal.SIGKILL)  # only while the group is provably still the task's
    store.finalize(task_id, {**fields, "finished": time.time()})  # word of it goes out from here
    _notify.forget(task_id)
