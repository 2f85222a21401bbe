"""The store's upkeep, apart from a task's own life: sweeping what killed processes left, importing
finished records in bulk, and removing tasks (``prune``).  `Store`'s methods of the same names
call these with themselves; they use its locks and files."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

from tinydb.table import Document

from nbbgtask.core import record as _record
from nbbgtask.core.states import State
from nbbgtask.core.trust import TASK_ID as _FILE_ID
from nbbgtask.core.trust import open_owned
from nbbgtask.store.locks import held
from nbbgtask.store.lookups import existing_history
from nbbgtask.store.shards import shard_of
from nbbgtask.store.storage import storage_of
from nbbgtask.store.summaries import finished_key

__all__ = ["sweep", "add_finished", "remove", "prunable"]


def sweep(self: Any, older_than: float = 3600.0) -> int:
    """Remove temp files in ``live/`` older than ``older_than`` seconds whose task has no live
    file: what a process killed while it made a new task's file left.  How many were removed."""
    removed = 0
    cutoff = time.time() - older_than
    try:
        names = os.listdir(self._live_dir)
    except FileNotFoundError:
        return 0
    for name in names:
        if not (name.startswith(".") and name.endswith(".json.tmp")):
            continue
        task_id = name[1:-9]
        if not _FILE_ID.match(task_id):
            continue
        with held(self._locks.stripe(shard_of(task_id))):
            path = os.path.join(self._live_dir, name)
            try:
                if os.path.exists(self._live_path(task_id)) or os.stat(path).st_mtime > cutoff:
                    continue
                os.unlink(path)
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def add_finished(self: Any, records: Iterable[Mapping[str, Any]]) -> int:
    """Put finished tasks' records into the history as they are, one write per shard touched
    (a task already there keeps its record); how many were added.  For importing a history
    (e.g. 100,000 tasks for a benchmark in seconds): finishing a task is `finalize`'s."""
    by_shard: dict[int, list[dict[str, Any]]] = {}
    for record in records:
        if _record.fault(record.get("id", ""), record) or not State(record["state"]).is_final:
            raise ValueError(f"not a finished task's record: {record!r:.200}")
        by_shard.setdefault(shard_of(record["id"]), []).append(dict(record))
    self._make_folders()
    added = 0
    for index, docs in by_shard.items():
        recent, shard = self._history_pair(index)
        with held(self._locks.stripe(index)), self._session(recent, shard):
            known = {*self._records(recent), *self._records(shard)}
            new = [Document(doc, doc["id"]) for doc in docs if doc["id"] not in known]
            if new:
                shard.insert_multiple(new)  # type: ignore[arg-type]
            added += len(new)
    return added


def remove(self: Any, task_ids: Iterable[str]) -> list[str]:
    by_shard: dict[int, list[str]] = {}
    for task_id in task_ids:
        by_shard.setdefault(shard_of(task_id), []).append(task_id)
    gone: list[str] = []
    # A finished task seldom has a live file (only after a crash between its end's two steps):
    # one listing, not two failing unlinks per task.
    try:
        names = os.listdir(self._live_dir)
    except FileNotFoundError:
        names = []
    live = {name.lstrip(".").partition(".")[0] for name in names}  # <id>.json, .<id>.json.tmp
    for index, ids in by_shard.items():
        recent, shard = self._history_pair(index)
        with held(self._locks.stripe(index)), self._session(recent, shard):
            for table in (recent, shard):
                stored = self._records(table)
                present = [task_id for task_id in ids if task_id in stored]
                if present:  # else no write (and no recent file made just to be empty)
                    gone += table.remove(doc_ids=present)
            for task_id in ids:
                if task_id in live and _FILE_ID.match(task_id) and self._unlink_live(task_id):
                    gone.append(task_id)
                self._forget_live(task_id)
    return list(dict.fromkeys(gone))


def prunable(self: Any, keep: int, cutoff: float | None) -> list[str]:
    """The finished tasks that ``prune(keep, older_than)`` forgets: all but the ``keep`` that
    ended last, and of those only the ones that ended before ``cutoff`` (``None``: any time).

    The history is read one file at a time and let go before the next (a read through the store's
    caches kept every file's parsed copy, which at 100,000 tasks peaked at 215 MB): what stays is
    each task's id and end time.  Only those two fields are looked at here, so a file is parsed
    without the check of every record; `remove` reads each file again, checked, under its lock."""
    ended: dict[str, float] = {}
    for _, table in existing_history(self):
        for task_id, when in _ends(self, table):
            ended.setdefault(task_id, when)
    order = sorted(ended, key=ended.__getitem__, reverse=True)
    return [task_id for task_id in order[keep:] if cutoff is None or ended[task_id] < cutoff]


def _ends(self: Any, table: Any) -> list[tuple[str, float]]:
    """Each task's id and end time in one history file; a file that is not plain JSON, or holds an
    id that is no task id, is read the checked way (which sets it aside and keeps what it can)."""
    path = storage_of(table).path
    try:
        with os.fdopen(open_owned(path), "rb") as f:
            tasks = json.loads(f.read()).get("tasks", {})
        if not all(_FILE_ID.match(task_id) for task_id in tasks):
            raise ValueError("an id that is no task id: the checked read sets that record aside")
        return [(task_id, finished_key(record)) for task_id, record in tasks.items()]
    except FileNotFoundError:
        return []
    except (ValueError, TypeError, AttributeError, KeyError):
        with self._session(table):
            data = self._guard(table, storage_of(table).read)
            return [(task_id, finished_key(record)) for task_id, record in ((data or {}).get("tasks") or {}).items()]
