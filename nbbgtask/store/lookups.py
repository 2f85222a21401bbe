"""Answering lookups over the history without reading it whole: which history files there are,
each shard's `Summary` (made again only for a shard that changed), and the newest finished tasks
from them.  `Store`'s methods of the same names call these with themselves."""

from __future__ import annotations

import os
import time
from typing import Any

from tinydb.table import Table

from nbbgtask.core.states import State
from nbbgtask.store import index as _index
from nbbgtask.store.shards import HISTORY_SHARDS, RECENT_SUFFIX, SETTLE_NS
from nbbgtask.store.storage import TASKS, storage_of
from nbbgtask.store.summaries import Summary, count, newest

__all__ = ["existing_history", "folder_signature", "summaries", "newest_finished", "count_finished", "ids_starting", "wait_final"]


def existing_history(self: Any) -> list[tuple[str, Table]]:
    """Every history file there is, main and recent, with its name."""
    try:
        names = sorted(os.listdir(self._history_dir))
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        digits = name[:2]
        if not digits.isdigit():
            continue
        if name == f"{digits}.json":
            found.append((name, self._shard(int(digits))))
        elif name == digits + RECENT_SUFFIX:
            found.append((name, self._recent(int(digits))))
    return found


def folder_signature(path: str) -> Any:
    """A folder's (inode, size, mtime), which a file renamed into it changes; ``None`` while it
    changed too recently for the clock to tell a later change (`SETTLE_NS`), or is missing."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    if time.time_ns() - st.st_mtime_ns < SETTLE_NS:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def summaries(self: Any) -> list[Summary]:
    """One `Summary` per history file; one stat when no file changed since the last call, and
    only the files that changed are summarised again: a shard's main file from its index
    (`nbbgtask.store.index`) where that can be trusted, its recent file (small) from itself."""
    signature = folder_signature(self._history_dir)
    known, summaries = self._summarised
    if signature is not None and signature == known:
        return summaries
    summaries = []
    for name, table in existing_history(self):
        if name.endswith(RECENT_SUFFIX):
            data = self._guard(table, storage_of(table).read)  # a stat, if the file is unchanged
            made = self._summary_of.get(name)
            if made is None or made[1] is not data:
                made = (None, data, Summary((data or {}).get(TASKS, {}).values()))
                self._summary_of[name] = made
            summaries.append(made[2])
        else:
            summary = _main_summary(self, name, table)
            if summary is not None:
                summaries.append(summary)
    self._summarised = (signature, summaries)
    return summaries


def _main_summary(self: Any, name: str, table: Table) -> Summary | None:
    """A shard's main file's summary: kept from the last call if the file is the same, else from
    its index, else from the file itself (and then its index is made again)."""
    storage: _index.ShardStorage = storage_of(table)  # type: ignore[assignment]
    shard = int(name[:2])
    sig, settled = _index.signature(storage.path)
    if sig is None:
        return None  # removed since the folder was listed
    made = self._summary_of.get(name)
    if made is not None and made[0] == sig and (settled or (made[1] is not None and made[1] is storage.read())):
        return made[2]  # type: ignore[no-any-return]
    summary = _index.load(storage.path, shard, sig) if settled else None
    data = None
    if summary is None:
        data = self._guard(table, storage.read)
        read_sig, copy = storage.last_read()
        summary = Summary((data or {}).get(TASKS, {}).values())
        if copy is data and read_sig is not None:
            storage.repair(self._locks.stripe(shard), data, read_sig)
            sig = read_sig
    summary.source = lambda: self._records(table).values()
    self._summary_of[name] = (sig, data, summary)
    return summary


def newest_finished(
    self: Any,
    limit: int,
    states: set[str] | None = None,
    name: str | None = None,
    by: str = "created",
    before: tuple[float, str] | None = None,
) -> list[dict[str, Any]] | None:
    """The newest ``limit`` finished tasks (in ``states``, named ``name``, created before
    ``before``, a record's ``(created, id)``), newest first by ``by`` ("created" or "finished"),
    from the shards' summaries, reading only the shards they cannot answer for: as cheap at
    100,000 finished tasks as at none.  ``None`` where they cannot tell: read `history`."""
    made = summaries(self)
    made_from, answers = self._answers
    if made_from is not made:
        answers = {}
        self._answers = (made, answers)
    key = (limit, None if states is None else frozenset(states), name, by, before)
    if key in answers:
        found = answers[key]
    else:
        found = answers[key] = newest(made, limit, states, name, by, before)
    return None if found is None else [r.full() if isinstance(r, _index.Stub) else dict(r) for r in found]


def count_finished(self: Any, states: set[str] | None = None, name: str | None = None) -> int:
    """How many finished tasks (in ``states``, named ``name``) there are, from the summaries."""
    return count(summaries(self), states, name)


def ids_starting(self: Any, prefix: str) -> list[str]:
    """The ids of every task that start with ``prefix``: of two hex digits or more, only the
    live folder and the one shard they name are read."""
    try:
        index: int | None = int(prefix[:2], 16) % HISTORY_SHARDS if len(prefix) >= 2 else None
    except ValueError:
        index = None
    if index is None:
        records = self.all()
    else:
        records = [*self.live(), *(r for t in self._history_pair(index) for r in self._records(t).values())]
    return sorted({r["id"] for r in records if r["id"].startswith(prefix)})


def wait_final(self: Any, task_id: str, seconds: float, poll: float = 0.02) -> dict[str, Any] | None:
    """Wait up to ``seconds`` for the task to end; its record then (``None`` if it is gone)."""
    deadline = time.monotonic() + seconds
    while True:
        record = self.get(task_id)
        if record is None or State(record["state"]).is_final or time.monotonic() >= deadline:
            return record
        time.sleep(poll)
