"""The public functions: start tasks (`BackgroundTask`, `run`), report from them, and find them."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from nbbgtask import backends as _backends
from nbbgtask.api import after as _after
from nbbgtask.api import notify as _notify
from nbbgtask.api.status import TaskStatus
from nbbgtask.core import config as _config
from nbbgtask.core import limits as _limits
from nbbgtask.core import retry as _retry
from nbbgtask.core.errors import AmbiguousTaskId, StoreError, TaskNotFound
from nbbgtask.core.limits import Limits
from nbbgtask.core.notify import Notify
from nbbgtask.core.notify import checked as checked_notify
from nbbgtask.core.procs import process_start_time
from nbbgtask.core.record import new_record
from nbbgtask.core.states import State
from nbbgtask.core.validate import percent as check_percent
from nbbgtask.core.validate import shown, whole_number
from nbbgtask.store.files import remove_task_files
from nbbgtask.store.maintenance import prunable
from nbbgtask.store.store import store_for
from nbbgtask.store.summaries import created_key
from nbbgtask.task import runner as _runner

__all__ = [
    "BackgroundTask",
    "Limits",
    "run",
    "progress",
    "track",
    "current",
    "get",
    "tasks",
    "find_last",
    "prune",
    "configure",
]

T = TypeVar("T")
_LIVE = {State.WAITING.value, State.QUEUED.value, State.RUNNING.value}
_OWNER_STARTED: dict[int, float | None] = {}


def _checked_settings(settings: Any) -> dict[str, Any] | None:
    if settings is None:
        return None
    if not isinstance(settings, Mapping):
        raise TypeError(f"settings must be a dict, got {type(settings).__name__}")
    try:
        text = json.dumps(dict(settings), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise TypeError(
            f"settings must be JSON-serialisable, since they are stored with the task: {exc}. "
            f"Hand other objects to the task as secrets=, or start it with bg.run(fn, *args), "
            f"whose arguments need not be JSON"
        ) from None
    return json.loads(text)  # what the task and every later lookup will see


def _checked_secrets(secrets: Any) -> dict[str, Any]:
    if secrets is None:
        return {}
    if not isinstance(secrets, Mapping):
        raise TypeError(f"secrets must be a dict, got {type(secrets).__name__}")
    return dict(secrets)


def _checked_name(name: Any, default: str) -> str:
    if name is None:
        return default
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"name must be a non-empty string, got {shown(name)}")
    return name


def _owner_started() -> float | None:
    pid = os.getpid()
    if pid not in _OWNER_STARTED:
        _OWNER_STARTED[pid] = process_start_time(pid)
    return _OWNER_STARTED[pid]


def _launch(
    name: str,
    target: Any,
    *,
    settings: dict[str, Any] | None,
    secrets: dict[str, Any],
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    is_task_class: bool = False,
    cooperative_cancel: bool = False,
    limits: Limits | None = None,
    notify: Notify | None = None,
    retries: tuple[Any, Any, Any] = (None, None, None),
    after: Any = None,
) -> TaskStatus:
    config = _config.settings()
    notify = notify if notify is not None else config.notify
    home = _config.home()
    # Prerequisites first: an unknown id or a cycle is refused before anything is made.
    args, kwargs, prerequisites = _after.prerequisites(after, args, kwargs or {}, home)
    backend = _backends.current()
    chosen = limits if limits is not None else _limits.checked(config.limits)
    count, delay, on = retries
    retry = _retry.policy(
        count if count is not None else config.retries,
        delay if delay is not None else config.retry_delay,
        on if on is not None else config.retry_on,
    )
    record = dict(new_record(name, settings, backend.placement(), _owner_started()))
    limit_fields = chosen.to_record() if chosen is not None else None
    if limit_fields is not None:
        record["limits"] = limit_fields
    if retry is not None:
        record.update(retries=retry.retries, attempt=1, attempts=[])
    if prerequisites:
        record["after"] = prerequisites
    job = _runner.Job(
        record=record,
        home=home,
        target=target,
        make_status=TaskStatus._reporting,
        args=args,
        kwargs=kwargs or {},
        secrets=secrets,
        is_task_class=is_task_class,
        cooperative_cancel=cooperative_cancel,
        progress_interval=config.progress_interval,
        limits=limit_fields,
        cancel_grace=config.cancel_grace,
        # a URL travels with the job, in memory only; a callable stays in this process
        notify=notify if notify is not None and notify.url is not None else None,
        log_max=config.log_max,
        retry=retry,
    )
    backend.prepare(job)
    waits = False
    if prerequisites:
        store = store_for(home)
        what, words = _after.verdict(store, prerequisites)
        if what == "cancel":  # made, and ended at once, so that it can be seen why it never ran
            store.insert({**job.record, "state": State.WAITING.value})
            job.record.update(_after.end_cancelled(store, job.task_id, words) or {})
        elif what == "wait":
            job.record.update(state=State.WAITING.value, message=words)
            _after.hold(job, backend, prerequisites, words)
        waits = what != "start"
    if not waits:
        backend.submit(job)
    status = TaskStatus(dict(job.record), home)
    if notify is not None and notify.url is None:
        _notify.call_when_done(status, notify)
    return status


class BackgroundTask:
    """Subclass and define ``execute(self, status)``; start with ``MyTask.initiate(settings=...)``.

    The instance is made in the caller (so a failing ``__init__`` fails there) and its
    ``execute`` runs in the task's own process; what it returns becomes ``status.result()``.
    """

    #: True: a cancel only sets ``status.cancel_requested`` and the task stops itself (it is
    #: killed if it has not within the grace period).  False: a cancel interrupts it at once.
    cooperative_cancel: ClassVar[bool] = False
    #: this task's `bg.Limits` (a timeout, a memory cap); None: `bg.configure(limits=...)`'s
    limits: ClassVar[Limits | None] = None
    #: word when it ends: a webhook URL, a callable or a `bg.Notify`; None: `bg.configure(notify=...)`'s
    notify: ClassVar[Any] = None
    #: how many times a failed attempt is retried; None: `bg.configure(retries=...)`'s (0 by default)
    retries: ClassVar[int | None] = None
    #: seconds before the first retry, doubling each time (with jitter); None: the configured
    retry_delay: ClassVar[float | None] = None
    #: the exception types worth a retry (e.g. ``(ConnectionError, bg.TimeLimitExceeded)``); None: any failure
    retry_on: ClassVar[Any] = None

    def execute(self, status: TaskStatus) -> Any:
        raise NotImplementedError

    @classmethod
    def initiate(
        cls,
        settings: Mapping[str, Any] | None = None,
        *,
        secrets: Mapping[str, Any] | None = None,
        name: str | None = None,
        limits: Limits | None = None,
        notify: Any = None,
        retries: int | None = None,
        retry_delay: float | None = None,
        retry_on: Any = None,
        after: Any = None,
    ) -> TaskStatus:
        """Start this task in its own process and return its status at once.

        ``limits``: a `bg.Limits` for this run; else the class's ``limits``, else the configured.
        ``notify``: word when it ends (a webhook URL, a callable or a `bg.Notify`); else the
        class's ``notify``, else the configured.  ``retries``, ``retry_delay``, ``retry_on``:
        likewise.  ``after``: tasks (their `TaskStatus`) to wait for; it starts once all completed.
        """
        if cls is BackgroundTask or cls.execute is BackgroundTask.execute:
            raise TypeError(
                f"{cls.__name__} has no execute(self, status) method: subclass bg.BackgroundTask "
                f"and define execute, which runs in the task's process"
            )
        return _launch(
            _checked_name(name, cls.__name__),
            cls(),
            settings=_checked_settings(settings),
            secrets=_checked_secrets(secrets),
            is_task_class=True,
            cooperative_cancel=bool(cls.cooperative_cancel),
            limits=_limits.checked(limits) or _limits.checked(cls.limits, f"{cls.__name__}.limits"),
            notify=checked_notify(notify) or checked_notify(cls.notify),
            retries=_checked_retries(
                (retries, retry_delay, retry_on), (cls.retries, cls.retry_delay, cls.retry_on), cls.__name__
            ),
            after=after,
        )


def _checked_retries(given: tuple[Any, Any, Any], defaults: tuple[Any, Any, Any] = (None, None, None), owner: str = "") -> tuple[Any, Any, Any]:
    """(retries, retry_delay, retry_on), each checked: the given one, else the class attribute."""
    where = f"{owner}." if owner else ""
    count = _retry.checked_retries(given[0]) if given[0] is not None else _retry.checked_retries(defaults[0], f"{where}retries")
    delay = _retry.checked_delay(given[1]) if given[1] is not None else _retry.checked_delay(defaults[1], f"{where}retry_delay")
    on = _retry.checked_on(given[2]) if given[2] is not None else _retry.checked_on(defaults[2], f"{where}retry_on")
    return count, delay, on


def run(
    fn: Callable[..., Any],
    *args: Any,
    name: str | None = None,
    secrets: Mapping[str, Any] | None = None,
    limits: Limits | None = None,
    notify: Any = None,
    retries: int | None = None,
    retry_delay: float | None = None,
    retry_on: Any = None,
    after: Any = None,
    **kwargs: Any,
) -> TaskStatus:
    """Run ``fn(*args, **kwargs)`` as a background task; its return value is the result.

    ``name``, ``secrets``, ``limits`` (a `bg.Limits`), ``notify`` (word when it ends: a webhook
    URL, a callable or a `bg.Notify`), ``retries``/``retry_delay``/``retry_on`` (attempts after a
    failure) and ``after`` (tasks to wait for) are bg.run's own; every other keyword goes to
    ``fn``.  A `TaskStatus` among the arguments (or one level inside a list, tuple or dict) is
    waited for, and replaced by its result when the task starts.
    """
    if not callable(fn):
        raise TypeError(f"bg.run needs a function or other callable to run, got {type(fn).__name__}")
    default = getattr(fn, "__name__", None) or type(fn).__name__
    return _launch(
        _checked_name(name, default),
        fn,
        settings=None,
        secrets=_checked_secrets(secrets),
        args=args,
        kwargs=kwargs,
        limits=_limits.checked(limits),
        notify=checked_notify(notify),
        retries=_checked_retries((retries, retry_delay, retry_on)),
        after=after,
    )


def current() -> TaskStatus | None:
    """The running task's status, inside a task; ``None`` elsewhere."""
    return _runner.current()


def progress(percent: float | None = None, message: str | None = None) -> None:
    """Report on the current task; outside a task a harmless no-op (the input is still checked)."""
    reporter = _runner.current_reporter()
    if reporter is not None:
        reporter.update(percent, message)
    elif percent is not None:
        check_percent(percent)


def track(iterable: Iterable[T], total: int | None = None, message: str | None = None) -> Iterator[T]:
    """Yield the items of ``iterable`` and report the percentage done (like tqdm)."""
    if total is not None:
        whole_number(total, "total", "items")
    reporter = _runner.current_reporter()
    if reporter is None:
        return iter(iterable)
    return reporter.track(iterable, total, message)


# -- finding tasks -----------------------------------------------------------------------------


def get(task_id: str) -> TaskStatus:
    """The task with this id; `TaskNotFound` if there is none."""
    if not isinstance(task_id, str):
        raise TypeError(f"a task id is a string, got {type(task_id).__name__}")
    home = _config.home()
    record = _backends.read_record(home, task_id)
    if record is None:
        raise TaskNotFound(f"no task {task_id!r} in the store at {home}")
    return TaskStatus(record, home)


def resolve(id_or_prefix: str) -> TaskStatus:
    """The task whose id is ``id_or_prefix`` or starts with it (for the command line and the magic)."""
    if not isinstance(id_or_prefix, str) or not id_or_prefix.strip():
        raise TaskNotFound("give a task id, or the first characters of one")
    text = id_or_prefix.strip()
    home = _config.home()
    store = store_for(home)
    record = store.get(text)
    if record is None:
        matches = store.ids_starting(text)
        if not matches:
            raise TaskNotFound(f"no task id starts with {text!r} (see the list of tasks)")
        if len(matches) > 1:
            shown = ", ".join(m[: len(text) + 4] + "…" for m in matches[:5])
            raise AmbiguousTaskId(f"{text!r} matches {len(matches)} tasks ({shown}); give more of the id")
        record = store.get(matches[0])
        if record is None:
            raise TaskNotFound(f"task {matches[0]} was just removed")
    return TaskStatus(_backends.reconcile(store, record), home)


def _states(state: Any) -> set[str] | None:
    if state is None:
        return None
    if isinstance(state, (str, State)):
        return {State.parse(state).value}
    try:
        several = list(state)
    except TypeError:
        raise TypeError(f"state must be a state, its name, or a list of them, got {shown(state)}") from None
    return {State.parse(s).value for s in several}


def _reconciled(store: Any, record: dict[str, Any]) -> dict[str, Any]:
    """One record brought up to date; one that cannot be (its process unreadable, say) is
    listed as it is: one bad record never breaks a listing."""
    try:
        return _backends.reconcile(store, record)
    except StoreError:  # not written (a full disk): listed as the store has it
        return record
    except Exception:
        return record


def tasks(
    state: Any = None, name: str | None = None, limit: int | None = None, before: str | None = None
) -> list[TaskStatus]:
    """Tasks, newest first; ``state`` is one state or several, ``name`` an exact name.

    ``before``: a task's id: only the tasks created before it (the next page of a listing whose
    last task that was: ``tasks(limit=20, before=page[-1].id)``).  The newest pages are answered
    from the history's index files, not the history, in a new process too.
    """
    wanted = _states(state)
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a string (or None), got {shown(name)}")
    if limit is not None:
        whole_number(limit, "limit")
    home = _config.home()
    store = store_for(home)
    anchor = None
    if before is not None:
        if not isinstance(before, str):
            raise TypeError(f"before is a task id, got {type(before).__name__}")
        found = store.get(before)
        if found is None:
            raise TaskNotFound(f"no task {before!r} in the store at {home}")
        anchor = created_key(found)

    def matches(r: dict[str, Any]) -> bool:
        return ((wanted is None or r["state"] in wanted) and (name is None or r["name"] == name)
                and (anchor is None or created_key(r) < anchor))

    live = [_reconciled(store, r) for r in store.live()]
    finished: list[dict[str, Any]] = []
    if wanted is None or wanted - _LIVE:
        # The newest finished from the shards' summaries where they can tell, else every record.
        finals = None if wanted is None else wanted - _LIVE
        newest = None if limit is None else store.newest_finished(limit, finals, name, before=anchor)
        finished = store.history() if newest is None else newest
    ended = {r["id"] for r in finished}
    # A task found in both places (a move cut short, or reconcile just ended it) counts as finished.
    records = [r for r in live if r["id"] not in ended and matches(r)] + [r for r in finished if matches(r)]
    records.sort(key=created_key, reverse=True)
    return [TaskStatus(r, home) for r in records[:limit]]


def count_tasks(state: Any = None, name: str | None = None) -> int:
    """How many tasks `tasks` would list with no limit: the finished ones counted from the shards'
    summaries, not read (for a listing's "N more")."""
    wanted = _states(state)
    store = store_for(_config.home())
    # First the live ones: a task that reconcile ends here is in the history when that is counted.
    live = [r for r in (_reconciled(store, r) for r in store.live()) if not State(r["state"]).is_final]
    finals = None if wanted is None else wanted - _LIVE
    finished = store.count_finished(finals, name) if finals is None or finals else 0
    return finished + sum((wanted is None or r["state"] in wanted) and (name is None or r["name"] == name) for r in live)


def find_last(state: Any = None, name: str | None = None) -> TaskStatus | None:
    """The newest task in ``state`` with ``name`` (either may be omitted), or ``None``."""
    found = tasks(state=state, name=name, limit=1)
    return found[0] if found else None


def prune(keep: int = 0, older_than: float | _dt.timedelta | None = None) -> int:
    """Forget finished tasks, with their logs, outputs and results; returns how many.

    ``keep``: the newest this many finished tasks stay.  ``older_than``: only tasks that finished
    more than this long ago (seconds or a timedelta) go.  ``prune()`` forgets every finished task.
    """
    whole_number(keep, "keep", "tasks")
    if isinstance(older_than, _dt.timedelta):
        older_than = older_than.total_seconds()
    if isinstance(older_than, int) and not isinstance(older_than, bool) and older_than > 1e15:
        older_than = math.inf  # nothing finished that long ago
    if older_than is not None and (
        isinstance(older_than, bool) or not isinstance(older_than, (int, float)) or not older_than >= 0
    ):
        raise ValueError(f"older_than must be a timedelta or seconds, 0 or more, got {shown(older_than)}")
    home = _config.home()
    _config.verify_home(home)  # it deletes files: only in the home that was checked
    store = store_for(home)
    cutoff = None if older_than is None else time.time() - older_than  # -inf: forget nothing
    gone = store.remove(prunable(store, keep, cutoff))  # streams: one history file at a time
    store.sweep()  # temp files of tasks whose start was cut short by a kill
    remove_task_files(home, gone)
    return len(gone)


def configure(
    home: str | os.PathLike[str] | None = None,
    start_method: str | None = None,
    max_running: float | None = None,
    refresh_interval: float | None = None,
    *,
    cancel_grace: float | None = None,
    backend: str | None = None,
    address: str | None = None,
    dask_client: Any = None,
    limits: Limits | None = None,
    notify: Any = None,
    log_max: int | str | None = None,
    retries: int | None = None,
    retry_delay: float | None = None,
    retry_on: Any = None,
) -> _config.Settings:
    """Change how tasks start and where their status lives; ``None`` leaves a setting as it is.

    All arguments are checked before any is applied, so a bad one changes nothing.
    Returns a copy of the settings now in force.
    """
    changes = _config.checked_changes(
        home=home,
        start_method=start_method,
        max_running=max_running,
        refresh_interval=refresh_interval,
        cancel_grace=cancel_grace,
        backend=backend,
        address=address,
        dask_client=dask_client,
        limits=limits,
        notify=notify,
        log_max=log_max,
        retries=retries,
        retry_delay=retry_delay,
        retry_on=retry_on,
    )
    if changes.get("backend") == "dask":
        # Connect now, so an unreachable scheduler is reported here and changes nothing.
        home_path: Path = changes.get("home") or _config.home()
        changes["dask_client"] = _backends.connect(address, dask_client, home_path)
    _config.apply(changes)
    return dataclasses.replace(_config.settings())
