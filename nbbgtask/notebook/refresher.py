"""One background thread per kernel that reads the store and brings every live widget up to date.

Data flows one way: task process → store → this refresher → widgets.  A thread, not an asyncio
task, because asyncio tasks on the kernel's loop do not run while a cell is busy.  It reads the
store only when a file changed (or when elapsed times move), spends about half a percent of a
core at most (it sleeps longer after a costly round, up to five seconds), and stops when no live
view is left.
"""

from __future__ import annotations

import threading
import time
import weakref
from pathlib import Path
from typing import Any, Protocol

from nbbgtask.backends import for_record, reconcile
from nbbgtask.core import config as _config
from nbbgtask.core.forks import renew_in_child
from nbbgtask.store.store import store_for
from nbbgtask.task.resources import read_tree

__all__ = ["Snapshot", "View", "register", "refresher_running"]

#: a round may cost at most this share of a core (CPU time, not wall time); about as much again
#: is spent by the kernel's iopub thread sending what the round changed
BUDGET = 0.005
#: this much of a round's CPU (seconds) is free of the budget: a round of one or two bars costs
#: 1-2 ms, and held to the budget whole it came every 0.2-0.3 s, so a change took up to 0.4 s to
#: show.  The pause is ``(cost - CHEAP_ROUND) / BUDGET`` (at least refresh_interval), a slope
#: rather than a cliff at 1 ms: at most 1.5 % of a core (a 1.5 ms round every 0.1 s), falling
#: towards `BUDGET` as rounds grow (100 bars: a 38 ms round about every 5 s)
CHEAP_ROUND = 0.001
#: the weight of the latest round in the moving average of a round's cost
COST_WEIGHT = 0.25
#: however costly a round was, the next one comes within this many seconds
MAX_PAUSE = 5.0
#: elapsed times and ETAs move once a second, or less often with many views (each move is a
#: message per widget): once every ``views / VIEWS_PER_SECOND`` seconds
VIEWS_PER_SECOND = 20
#: reading tasks' CPU and memory may cost at most this share of a core, apart from the rounds'
RESOURCE_BUDGET = 0.005
#: liveness of tasks (psutil) is checked at most this often
RECONCILE_EVERY = 1.0


class Snapshot:
    """What the store holds at the start of one round, read at most once per round.

    ``now`` is the clock the views show elapsed times against: it moves in whole steps
    (a second, or more with many views), so a round sends nothing for a bar that did not change.
    """

    def __init__(self, home: Path, now: float) -> None:
        self.home = home
        self.now = now
        self.store = store_for(home)
        self.live = {r["id"]: r for r in self.store.live()}
        self._history: list[dict[str, Any]] | None = None
        self._costs: dict[str, dict[str, Any] | None] = {}

    def resources(self, record: dict[str, Any]) -> dict[str, Any] | None:
        """CPU % and RSS of a running task of this machine: a new reading at most once a round and
        once a second, or less often with many tasks (`_Readings`), else the last one; the CPU %
        is over the time between two readings."""
        task_id = record["id"]
        if task_id not in self._costs:
            self._costs[task_id] = _costs(record)
        return self._costs[task_id]

    def get(self, task_id: str) -> dict[str, Any] | None:
        record = self.live.get(task_id)
        return record if record is not None else self.store.get(task_id)

    def history(self) -> list[dict[str, Any]]:
        if self._history is None:
            self._history = self.store.history()
        return self._history

    def recent_finished(self, count: int, name: str | None = None) -> list[dict[str, Any]]:
        """The ``count`` finished tasks (named ``name``) that ended last, newest first, not counting
        any that is also live (a move cut short): from the shards' summaries where they can tell,
        so that a monitor costs the same at any size of the history."""
        wanted = count
        for _ in range(2):
            found = None if name is not None else self.store.newest_finished(wanted, by="finished")
            if found is None:
                break
            kept = [r for r in found if r["id"] not in self.live]
            if len(kept) >= count or len(found) < wanted:
                return kept[:count]
            wanted = count + len(found) - len(kept)
        everything = [r for r in self.history() if (name is None or r["name"] == name) and r["id"] not in self.live]
        everything.sort(key=lambda r: r.get("finished") or r["created"], reverse=True)
        return everything[:count]


#: the last reading of each task's costs: id -> (time.monotonic() when read, figures)
_COSTS: dict[str, tuple[float, dict[str, Any] | None]] = {}


class _Readings:
    """The CPU time that reading tasks' resources costs, held to a budget of its own.

    A reading (a task's process tree from /proc) costs about half a millisecond; a task is read
    again once `interval` has passed: a second, or longer so that reading every shown task costs
    at most `RESOURCE_BUDGET` of a core (100 tasks: about every 10 s).  Its cost is counted apart
    from the round's (``spent``), so it never slows the bars' own pace.
    """

    def __init__(self) -> None:
        #: moving average of one reading's CPU time
        self.average = 0.0
        #: CPU time spent reading in the round under way
        self.spent = 0.0

    def interval(self, tasks: int) -> float:
        return max(1.0, tasks * self.average / RESOURCE_BUDGET)

    def read(self, pid: int, started: float | None) -> dict[str, Any] | None:
        before = time.thread_time()
        figures = read_tree(pid, started, uss=False)
        cost = time.thread_time() - before
        self.spent += cost
        self.average = cost if not self.average else (1 - COST_WEIGHT) * self.average + COST_WEIGHT * cost
        return figures


_READINGS = _Readings()


def _costs(record: dict[str, Any]) -> dict[str, Any] | None:
    process = for_record(record).process_here(record)
    if process is None:
        _COSTS.pop(record["id"], None)
        return None
    last = _COSTS.get(record["id"])
    clock = time.monotonic()
    if last is not None and clock - last[0] < _READINGS.interval(len(_COSTS)):
        return last[1]
    figures = _READINGS.read(*process)
    if len(_COSTS) > 4096:
        _COSTS.clear()
    _COSTS[record["id"]] = (clock, figures)
    return figures


class View(Protocol):
    home: Path

    def _nbbg_refresh(self, snapshot: Snapshot, changed: bool) -> bool:
        """Bring the widget up to date; ``False`` once it has nothing more to follow."""


    # A view may also have ``_nbbg_poll()``, called every round, whether or not the store changed
    # (an output area, which follows files of its own).


class _Refresher:
    def __init__(self) -> None:
        self._views: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._versions: dict[Path, tuple[Any, ...]] = {}
        self._last_step = -1.0
        self._cost: float | None = None
        self._last_reconcile = 0.0

    def register(self, view: View) -> None:
        with self._lock:
            self._views.add(view)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="nbbgtask-refresher", daemon=True)
                self._thread.start()
        self._wake.set()

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while True:
            # CPU time of this thread: time spent waiting for the GIL or for the disk is not cost.
            started = time.thread_time()
            try:
                self._round()
            except Exception as exc:  # a bad round must not stop every bar; the next retries
                import sys

                print(f"nbbgtask: refreshing widgets failed: {exc!r}", file=sys.__stderr__)
            # Resource readings have a budget of their own (_Readings): not part of the pace.
            cost = time.thread_time() - started - _READINGS.spent
            _READINGS.spent = 0.0
            with self._lock:
                if not self._views:
                    self._thread = None
                    return
            # Paced by a moving average of the cost: one costly round (a garbage collection, a
            # burst of changes) spreads its pause over the next few, instead of one long gap.
            self._cost = cost if self._cost is None else (1 - COST_WEIGHT) * self._cost + COST_WEIGHT * cost
            interval = _config.settings().refresh_interval
            pause = min(MAX_PAUSE, max(interval, (self._cost - CHEAP_ROUND) / BUDGET))
            self._wake.wait(pause)
            self._wake.clear()

    def _round(self) -> None:
        views = list(self._views)
        step = max(1.0, len(views) / VIEWS_PER_SECOND)
        now = time.time() // step * step
        tick = now != self._last_step
        self._last_step = now
        check_liveness = now - self._last_reconcile >= RECONCILE_EVERY
        if check_liveness:
            self._last_reconcile = now
        by_home: dict[Path, list[Any]] = {}
        for view in views:
            if getattr(view, "_nbbg_closed", False):
                self._views.discard(view)
                continue
            by_home.setdefault(view.home, []).append(view)
        for home, group in by_home.items():
            for view in group:  # output areas: a look at their files every round
                poll = getattr(view, "_nbbg_poll", None)
                if poll is not None:
                    poll()
            store = store_for(home)
            if check_liveness:
                for record in store.live():
                    reconcile(store, record)
            version = store.version()
            changed = version != self._versions.get(home)
            if not changed and not tick:
                continue
            self._versions[home] = version
            snapshot = Snapshot(home, now)
            for view in group:
                if not view._nbbg_refresh(snapshot, changed):
                    self._views.discard(view)


_refresher = _Refresher()


def register(view: View) -> None:
    """Follow ``view`` from now on, until its ``_nbbg_refresh`` returns ``False``."""
    _refresher.register(view)


def refresher_running() -> bool:
    return _refresher.running()


def _reset_after_fork() -> None:
    """A forked task has none of the kernel's widgets, and the refresher's lock may be held."""
    global _refresher
    _refresher = _Refresher()


renew_in_child(_reset_after_fork)
