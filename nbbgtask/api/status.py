"""`TaskStatus`: the one handle through which a task reports and a notebook watches it."""

from __future__ import annotations

import base64
import copy
import datetime as _dt
import faulthandler
import importlib
import tempfile
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

from nbbgtask import backends as _backends
from nbbgtask.core import config as _config
from nbbgtask.core import display as _display
from nbbgtask.core import format as _format
from nbbgtask.core.errors import NbbgtaskError, TaskCancelled, TaskFailed, TaskNotFound
from nbbgtask.core.procs import same_process
from nbbgtask.core.record import TaskRecord
from nbbgtask.core.states import State
from nbbgtask.core.trust import read_owned
from nbbgtask.core.validate import percent as check_percent
from nbbgtask.core.validate import seconds, text, whole_number
from nbbgtask.store.files import log_path, result_path
from nbbgtask.store.store import store_for
from nbbgtask.store.tail import last_lines, read_log
from nbbgtask.task.reporter import Reporter
from nbbgtask.task.runner import current_reporter, trim_stack

__all__ = ["TaskStatus"]

_MISSING = object()
#: seconds `TaskStatus.stack` waits for the task to write its stack
STACK_TIMEOUT = 5.0
#: seconds a stack file must stay the same size before the dump counts as whole
_STACK_SETTLE = 0.05


def _utc(ts: float | None) -> _dt.datetime | None:
    return None if ts is None else _dt.datetime.fromtimestamp(ts, tz=_dt.timezone.utc)



def _asyncio() -> Any:
    """asyncio, imported when a status is first awaited (it costs a script that never awaits
    one most of the time ``import nbbgtask`` takes)."""
    import asyncio

    return asyncio


class TaskStatus:
    """The state, progress and outcome of one background task.

    In the task's own process it also reports (`update`); everywhere else it reads the store,
    and `refresh` (or any method that says it re-reads) brings it up to date.
    """

    def __init__(self, record: TaskRecord | dict[str, Any], home: Path) -> None:
        self._record: dict[str, Any] = record  # type: ignore[assignment]
        self._home = home
        self._result: Any = _MISSING
        #: set in the task's own process only
        self._reporter: Reporter | None = None

    @classmethod
    def _reporting(cls, record: dict[str, Any], home: Path, reporter: Reporter) -> TaskStatus:
        """The handle a task reports through, in its own process (made by the runner)."""
        status = cls(record, home)
        status._reporter = reporter
        return status

    # -- for the widgets, the magic and the command line ------------------------------------

    @property
    def home(self) -> Path:
        """The home folder whose store holds this task."""
        return self._home

    def to_dict(self) -> dict[str, Any]:
        """The task's record as last read (a copy): the fields of `TaskRecord`, as stored."""
        return copy.deepcopy(self._record)

    # -- the record ---------------------------------------------------------------------------

    @property
    def id(self) -> str:
        return self._record["id"]

    @property
    def name(self) -> str:
        return self._record["name"]

    @property
    def settings(self) -> dict[str, Any]:
        """The task's settings (a copy: changing it changes nothing stored)."""
        return copy.deepcopy(self._record.get("settings") or {})

    @property
    def secrets(self) -> dict[str, Any]:
        """The secrets handed to the task; they exist only in the task's own process."""
        if self._reporter is None:
            raise AttributeError(
                "secrets exist only inside the task's own process: they are never stored, "
                "so a status read from the store has none"
            )
        return self._reporter.secrets

    @property
    def state(self) -> State:
        return State(self._record["state"])

    @property
    def percent(self) -> float:
        if self._reporter is not None:
            return self._reporter.percent
        return float(self._record.get("percent") or 0.0)

    @property
    def message(self) -> str:
        if self._reporter is not None:
            return self._reporter.message
        return self._record.get("message") or ""

    @property
    def created(self) -> _dt.datetime:
        return _utc(self._record["created"])  # type: ignore[return-value]

    @property
    def started(self) -> _dt.datetime | None:
        return _utc(self._record.get("started"))

    @property
    def finished(self) -> _dt.datetime | None:
        return _utc(self._record.get("finished"))

    @property
    def attempt(self) -> int:
        """1 for the first attempt, 2 for the first retry, …"""
        return int(self._record.get("attempt") or 1)

    @property
    def attempts(self) -> list[dict[str, Any]]:
        """Each attempt that ended, first to last: ``attempt``, ``started``, ``finished``,
        ``state`` and ``error`` (times in seconds since the epoch)."""
        return copy.deepcopy(self._record.get("attempts") or [])

    @property
    def pid(self) -> int | None:
        return self._record.get("pid")

    @property
    def start_method(self) -> str:
        """How the task was started: ``"fork"``, ``"forkserver"``, ``"spawn"`` or ``"dask"``."""
        return self._record.get("start_method") or "fork"

    @property
    def error(self) -> str | None:
        return self._record.get("error")

    @property
    def traceback(self) -> str | None:
        return self._record.get("traceback")

    @property
    def cancel_requested(self) -> bool:
        if self._reporter is not None:
            return self._reporter.cancel_requested
        return bool(self._record.get("cancel_requested"))

    @property
    def elapsed(self) -> float:
        """Seconds the task has run (so far, or in all once it ended)."""
        return _format.elapsed(self._record) or 0.0

    # -- reporting (in the task) -------------------------------------------------------------

    def update(self, percent: float | None = None, message: str | None = None) -> None:
        """Report progress from inside the task; cheap enough to call on every item.

        ``percent`` is clamped to 0–100 (NaN is refused); nothing is written here: the
        task's writer thread records the latest values at most every 0.1 s.
        """
        reporter = self._reporter
        if reporter is None:
            reporter = current_reporter()
            if reporter is None or reporter.task_id != self.id:
                raise NbbgtaskError(
                    f"update() reports progress from inside task {self.id[:8]}'s own process; "
                    f"this process only watches it"
                )
        # The common case inline (one call per item matters in tight loops); the rest is checked.
        if percent is not None:
            if type(percent) is float and 0.0 <= percent <= 100.0:
                reporter.percent = percent
            else:
                reporter.percent = check_percent(percent)
        if message is not None:
            reporter.message = message if type(message) is str else text(message, "message")

    # -- watching ----------------------------------------------------------------------------

    def refresh(self) -> TaskStatus:
        """Re-read from the store; returns ``self``."""
        if self._reporter is not None or self.state.is_final:
            return self  # a final record never changes
        store = store_for(self._home)
        record = store.get(self.id)
        if record is None:
            # A live record that vanished was in a damaged file that was set aside: the task
            # writes it again on its next report, if it still runs.
            if not _backends.may_still_report(self._record):
                raise TaskNotFound(
                    f"task {self.id[:8]}'s record is gone from the store at {self._home}: it was "
                    f"pruned, or the file that held it was damaged and set aside (see the warning)"
                )
            record = self._record
        self._record = _backends.reconcile(store, record)
        return self

    def is_running(self) -> bool:
        """Re-reads; ``True`` while the task is waiting, queued or running."""
        return not self.refresh().state.is_final

    def done(self) -> bool:
        """Re-reads; ``True`` once the task is complete, failed or cancelled."""
        return self.refresh().state.is_final

    def _poll_delays(self) -> Generator[float, None, None]:
        delay, cap = 0.002, min(0.1, _config.settings().refresh_interval)
        while True:
            yield delay
            delay = min(delay * 1.5, cap)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the task ends or ``timeout`` seconds pass; returns `done()`."""
        timeout = seconds(timeout, "timeout")
        deadline = None if timeout is None else time.monotonic() + timeout
        for delay in self._poll_delays():
            if self.done():
                return True
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                delay = min(delay, left)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def result(self, timeout: float | None = None) -> Any:
        """The task's return value, once it completes (blocking up to ``timeout`` seconds)."""
        if not self.wait(timeout):
            raise TimeoutError(
                f"task {self.name!r} ({self.id[:8]}) is still {self.state} after {timeout} s"
            )
        return self._outcome()

    def _outcome(self) -> Any:
        state = self.state
        if state is State.FAILED:
            raise TaskFailed(
                f"task {self.name!r} ({self.id[:8]}) failed{_format.earlier_failures(self._record)}: {self.error}",
                task_id=self.id,
                error=self.error,
                traceback=self.traceback,
            )
        if state is State.CANCELLED:
            why = f": {self.error}" if self.error else ""  # a prerequisite's failure, say
            raise TaskCancelled(f"task {self.name!r} ({self.id[:8]}) was cancelled{why}", task_id=self.id)
        if self._result is _MISSING:
            self._result = self._load_result()
        return self._result

    def _load_result(self) -> Any:
        if not self._record.get("has_result"):
            return None
        import cloudpickle

        inline = self._record.get("result_inline")
        if inline is not None:
            data = base64.b64decode(inline)
        else:
            path = result_path(self._home, self.id)
            # Unpickling runs code: only a file of the user's, in the home that was checked.
            _config.verify_home(self._home)
            try:
                data = read_owned(path)
            except FileNotFoundError:
                raise NbbgtaskError(
                    f"the result of task {self.id[:8]} is gone: {path} was deleted"
                ) from None
        try:
            return cloudpickle.loads(data)
        except Exception as exc:
            kind = self._record.get("result_type", "object")
            raise NbbgtaskError(
                f"the result of task {self.id[:8]} (a {kind}) cannot be loaded here: "
                f"{type(exc).__name__}: {exc}. Import or define what it needs, then call result() again."
            ) from exc

    def __await__(self) -> Generator[Any, None, Any]:
        return self._async_result().__await__()

    async def _async_result(self) -> Any:

        for delay in self._poll_delays():
            if self.done():
                break
            await _asyncio().sleep(delay)
        return self._outcome()

    def cancel(self) -> bool:
        """Stop the task; it ends "cancelled".  ``True`` if it was still running."""
        was_live, record = _backends.cancel(self._home, self.id)
        if record is not None:
            self._record = record
        return was_live

    def resources(self) -> dict[str, Any] | None:
        """A running task's CPU and memory, its children included; ``None`` once it has ended.

        ``{"cpu_percent": 98.0, "rss": bytes, "uss": bytes, "processes": 1}``: CPU % since the
        last reading in this process (100 = one core; the first reading takes 0.2 s), RSS
        (resident, pages shared with the kernel or between the processes counted in each) and
        USS (memory private to them: what ending the task gives back).  Re-reads the record.
        Read from this machine's processes: ``None`` for a task on a Dask cluster.
        """
        from nbbgtask.task.resources import read_tree

        record = self.refresh()._record
        process = _backends.for_record(record).process_here(record)
        if process is None or not same_process(*process):
            return None
        return read_tree(*process, uss=True, settle=0.2)

    @property
    def peak_memory(self) -> int | None:
        """The most memory (USS, children included, bytes) the task was seen to use, once it
        has ended (sampled each second while it ran; ``None`` for one that ended sooner)."""
        return self._record.get("peak_memory")

    def stack(self) -> str:
        """The running task's current Python stack, every thread, as text (what a stuck task is
        doing), most recent call first.  Works while the task is blocked in C code too.

        Raises `NbbgtaskError` with what to do instead when there is no stack to read: the task
        has ended, has not started (or reported its process) yet, runs on another machine or on
        Dask, or did not answer within `STACK_TIMEOUT` seconds.
        """
        who = f"task {self.name!r} ({self.id[:8]})"
        if self._reporter is not None:  # asked from inside the task itself: no signal needed
            with tempfile.TemporaryFile() as f:
                faulthandler.dump_traceback(file=f, all_threads=True)
                f.seek(0)
                return trim_stack(f.read().decode("utf-8", errors="replace"))
        record = self.refresh()._record
        state = State(record["state"])
        if state.is_final:
            raise NbbgtaskError(
                f"{who} has ended ({state}): it has no stack any more; see its traceback and log instead"
            )
        return _backends.for_record(record).stack(self._home, record, who)

    def log(self, tail: int | None = None) -> str:
        """What the task printed (stdout and stderr), or its last ``tail`` lines.

        Bounded both ways: the last lines are at most `LAST_LINES_BYTES` (1 MiB), the whole log at
        most ``log_max`` (its cap, 100 MiB by default; a log written before there was a cap gives
        its start and end); either says in a line what it left out."""
        path = log_path(self._home, self.id)
        if tail is not None:
            whole_number(tail, "tail", "lines")
        try:
            if tail is not None:
                return last_lines(path, tail)
            return read_log(path, _config.settings().log_max).decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def __repr__(self) -> str:
        text = f"<TaskStatus {self.id[:8]} {self.name!r} {self.state} {self.percent:.0f}%"
        if self.message:
            text += f" {self.message!r}"
        if self.error:
            text += f" error={self.error!r}"
        return text + ">"

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        # A handle that ends a cell shows as a live bar, and the bar is the notebook layer's: it is
        # reached through the name in `nbbgtask.core.display`, never by an import from here.
        if not _display.RENDERER:
            return {"text/plain": repr(self)}
        module, _, function = _display.RENDERER.partition(":")
        render = getattr(importlib.import_module(module), function)
        bundle: dict[str, Any] = render(self, include, exclude)
        return bundle

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskStatus) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)
