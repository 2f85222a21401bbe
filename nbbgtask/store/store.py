"""The status store: task records in TinyDB files shared by kernels, task processes and the CLI.

The files themselves (atomic, cached, checked TinyDB files) are `nbbgtask.store.storage`'s; this
module says which files there are and what a task's life does to its record.  Each live task has
a file of its own, ``live/<id>.json``, which its progress writes replace; a finished task moves to
the history, 64 shards by id.  A shard is two files: ``history/NN.recent.json`` takes each task
that ends, and once it holds `RECENT_MAX` of them they join ``history/NN.json`` in one write, so
an end rewrites a small file, not one that grows with the history.  A read-modify-write takes one
of 64 stripe locks (``locks/NN.lock``, by id as the shard is); only admission under
``max_running`` takes the store-wide ``store.lock``.  Every write replaces its file atomically,
so readers take no lock and never see a torn file.  Upkeep apart from a task's life (sweeping,
bulk import, removal) is `nbbgtask.store.maintenance`; lookups, `nbbgtask.store.lookups`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from tinydb.table import Document, Table

from nbbgtask.core import record as _record
from nbbgtask.core.errors import StoreDamagedWarning, StoreError
from nbbgtask.core.forks import renew_in_child
from nbbgtask.core.states import State
from nbbgtask.core.trust import TASK_ID
from nbbgtask.store import ends, lookups, maintenance
from nbbgtask.store.files import make_folders
from nbbgtask.store.index import ShardStorage
from nbbgtask.store.locks import Stripes, held
from nbbgtask.store.shards import HISTORY_SHARDS, RECENT_SUFFIX, SETTLE_NS, shard_of
from nbbgtask.store.storage import SCHEMA_VERSION, TASKS, AtomicJSONStorage, Damaged, open_table, storage_of
from nbbgtask.store.summaries import Summary

__all__ = ["Store", "SCHEMA_VERSION", "HISTORY_SHARDS", "store_for", "forget_instances", "shard_of"]

#: A shard's recent file takes this many finished tasks before they join the shard's main file.
#: Ending a task rewrites the recent file (up to this many records), and one end in this many
#: rewrites the main file: at 100,000 finished tasks (1,560 a shard) that is 20 ms, where
#: rewriting the shard at every end cost each task those 20 ms.
RECENT_MAX = 32

#: what a task id must look like to have a live file, or any file (`nbbgtask.core.trust.TASK_ID`)
_FILE_ID = TASK_ID


def _live_name_ok(name: str) -> bool:
    return name.endswith(".json") and TASK_ID.match(name[:-5]) is not None


class Store:
    """Task records under one home folder.  One instance per home per process (`store_for`)."""

    def __init__(self, home: Path, *, ready: bool = False) -> None:
        self.home = Path(home)
        # Plain strings: these paths are joined on every write, and pathlib costs more than the write's Python.
        self._live_dir = os.path.join(self.home, "live")
        self._history_dir = os.path.join(self.home, "history")
        self._lock_dir = os.path.join(self.home, "locks")
        #: the folders are made and proved the user's own (`_make_folders`)
        self._ready = ready
        self._locks = Stripes(self.home, self._lock_dir, self._make_folders)
        self._shards: dict[int, Any] = {}
        self._recents: dict[int, Any] = {}
        #: live files' tables, kept while the task is live so that unchanged files are not re-parsed
        self._live: dict[str, Any] = {}
        self._tables_lock = threading.Lock()
        #: history file name -> (its signature, the parsed file it was made from or None, its summary)
        self._summary_of: dict[str, tuple[Any, Any, Summary]] = {}
        #: the history folder's signature when `_summarised` was made, and the summaries
        self._summarised: tuple[Any, list[Summary]] = (None, [])
        #: answers of `newest_finished` for the summaries they were made from (the monitor and
        #: the bars ask the same question every round)
        self._answers: tuple[list[Summary] | None, dict[Any, list[dict[str, Any]] | None]] = (None, {})

    # -- files and tables ----------------------------------------------------------------------

    def _cached(self, cache: dict[Any, Any], key: Any, make: Callable[[], Any]) -> Any:
        """``cache[key]``, made by ``make()`` only once even when threads ask at the same time."""
        value = cache.get(key)
        if value is None:
            with self._tables_lock:
                value = cache.get(key)
                if value is None:
                    value = cache[key] = make()
        return value

    def _shard(self, index: int) -> Any:
        return self._cached(
            self._shards,
            index,
            lambda: open_table(os.path.join(self._history_dir, f"{index:02d}.json"), ShardStorage, trust_stat=True, durable=True),
        )

    def _recent(self, index: int) -> Any:
        return self._cached(
            self._recents,
            index,
            lambda: open_table(os.path.join(self._history_dir, f"{index:02d}{RECENT_SUFFIX}"), trust_stat=True, durable=True),
        )

    def _history_pair(self, index: int) -> tuple[Any, Any]:
        """Shard ``index``'s recent file and main file, in the order a task is looked for."""
        return self._recent(index), self._shard(index)

    def _records(self, table: Table) -> dict[str, Any]:
        """A history file's records by id (a damaged file set aside first); no copy is made."""
        return (self._guard(table, storage_of(table).read) or {}).get(TASKS, {})

    def _finished(self, task_id: str) -> dict[str, Any] | None:
        """A finished task's record, from its shard's recent file or else its main file."""
        for table in self._history_pair(shard_of(task_id)):
            found = self._guard(table, table.get, doc_id=task_id)
            if found is not None:
                return dict(found)
        return None

    def _live_table(self, task_id: str) -> Any:
        return self._cached(self._live, task_id, lambda: open_table(self._live_path(task_id)))

    def _live_path(self, task_id: str) -> str:
        return os.path.join(self._live_dir, task_id + ".json")

    def _may_be_live(self, task_id: str) -> bool:
        """``task_id`` could name a live file, and it exists (an id from a user is never a path).

        A table kept for it while it was live is dropped once its file is gone: else every task
        read while it ran would stay in memory."""
        if _FILE_ID.match(task_id) is None:
            return False
        if os.path.exists(self._live_path(task_id)):
            return True
        if task_id in self._live:
            self._forget_live(task_id)
        return False

    def _forget_live(self, task_id: str) -> None:
        with self._tables_lock:
            self._live.pop(task_id, None)

    def _live_ids(self) -> list[str]:
        try:
            names = os.listdir(self._live_dir)
        except FileNotFoundError:
            return []
        return [n[:-5] for n in names if _live_name_ok(n)]

    def _make_folders(self) -> None:
        # On first write: a forked task process makes nothing until it first writes, off the path
        # to the task's code, and a read-only home can still be read.
        if not self._ready:
            make_folders(self.home, (self._live_dir, self._history_dir, self._lock_dir))
            self._ready = True

    @contextlib.contextmanager
    def _session(self, *tables: Table) -> Iterator[None]:
        """Read-modify-write ``tables``: each is parsed anew once, then the copy is reused."""
        entered = [storage_of(t) for t in tables if storage_of(t).begin_session()]
        try:
            yield
        finally:
            for storage in entered:
                storage.end_session()

    @contextlib.contextmanager
    def _task(self, task_id: str) -> Iterator[tuple[Any, Any, Any]]:
        """Hold ``task_id``'s stripe lock; yields its live table and its shard's recent and main
        tables, in session (each is parsed only if it is read)."""
        index = shard_of(task_id)
        live, (recent, shard) = self._live_table(task_id), self._history_pair(index)
        with held(self._locks.stripe(index)), self._session(live, recent, shard):
            yield live, recent, shard

    def _guard(self, table: Table, op: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one table operation; a damaged file is set aside once and the operation retried."""
        try:
            return op(*args, **kwargs)
        except Damaged as exc:
            self._set_aside(table, exc)
            return op(*args, **kwargs)

    def _set_aside(self, table: Table, damage: Damaged) -> None:
        """Keep a damaged file aside for inspection and put in its place what can be saved of it."""
        storage = storage_of(table)
        name = os.path.basename(storage.path)
        index = shard_of(name[:-5]) if storage.path.startswith(self._live_dir) else int(name[:2])
        with held(self._locks.stripe(index)), self._session(table):
            moved = storage.set_aside(f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
        if moved is None:
            return  # someone else already replaced it
        aside, kept = moved
        saved = f"; its {kept} sound record(s) were kept" if kept else " and a fresh file was started"
        warnings.warn(
            f"the nbbgtask store file {storage.path} was damaged ({damage}); it was kept as "
            f"{aside} for inspection{saved}",
            StoreDamagedWarning,
            stacklevel=4,
        )

    # -- reads (no lock: every file is replaced whole) --------------------------------------

    def version(self) -> tuple[Any, ...]:
        """Changes whenever a file is written (a write renames into its folder): two stat calls.

        A folder changed within the last `SETTLE_NS` may change again with the same time stamp,
        so then the answer is new on every call, and a caller that compares it re-reads.
        """
        sig: list[Any] = []
        now = time.time_ns()
        for path in (self._live_dir, self._history_dir):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                sig.append(None)
                continue
            if now - st.st_mtime_ns < SETTLE_NS:
                return (now, os.getpid(), threading.get_ident(), time.perf_counter_ns())
            sig.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(sig)

    def _read_live(self, task_id: str) -> dict[str, Any] | None:
        table = self._live_table(task_id)
        # The file's one record straight from the storage: TinyDB's Table.get would copy it
        # twice, and the refresher reads every live file on every round that something changed.
        data = self._guard(table, storage_of(table).read)
        rec = data.get(TASKS, {}).get(task_id) if data else None
        if rec is None and not os.path.exists(self._live_path(task_id)):
            self._forget_live(task_id)
        return dict(rec) if rec is not None else None

    def get(self, task_id: str) -> dict[str, Any] | None:
        # A finished task (the common case) has no live file, and no table is made for it.
        rec = self._read_live(task_id) if self._may_be_live(task_id) else None
        return rec if rec is not None else self._finished(task_id)

    def live(self) -> list[dict[str, Any]]:
        ids = self._live_ids()
        listed = set(ids)
        with self._tables_lock:
            for gone in [i for i in self._live if i not in listed]:
                del self._live[gone]
        return [rec for task_id in ids if (rec := self._read_live(task_id)) is not None]

    def wait_final(self, task_id: str, seconds: float, poll: float = 0.02) -> dict[str, Any] | None:
        """Wait up to ``seconds`` for the task to end; its record then (``None`` if it is gone)."""
        return lookups.wait_final(self, task_id, seconds, poll)

    def is_live(self, task_id: str) -> bool:
        """``task_id`` has a live file (one stat; a task that has ended has none)."""
        return self._may_be_live(task_id)

    def live_count(self) -> int:
        """How many tasks are queued or running now (one listing of a folder)."""
        return len(self._live_ids())

    def history(self) -> list[dict[str, Any]]:
        """Every finished task's record; one found in both files of its shard (a move into the
        main file cut short) once."""
        seen: dict[str, dict[str, Any]] = {}
        for _, table in self._existing_history():
            for doc in self._guard(table, table.all):
                seen.setdefault(doc.doc_id, dict(doc))
        return list(seen.values())

    def newest_finished(
        self, limit: int, states: set[str] | None = None, name: str | None = None, by: str = "created", before: Any = None
    ) -> list[dict[str, Any]] | None:
        """The newest ``limit`` finished tasks (in ``states``, named ``name``, created before
        ``before``: a record's (created, id)), newest first by ``by``, from the shards' summaries
        and indexes; ``None`` where they cannot tell: read `history`."""
        return lookups.newest_finished(self, limit, states, name, by, before)

    def count_finished(self, states: set[str] | None = None, name: str | None = None) -> int:
        """How many finished tasks (in ``states``, named ``name``) there are, from the summaries."""
        return lookups.count_finished(self, states, name)

    def ids_starting(self, prefix: str) -> list[str]:
        """The ids of every task that start with ``prefix``."""
        return lookups.ids_starting(self, prefix)

    def _existing_history(self) -> list[tuple[str, Table]]:
        return lookups.existing_history(self)

    def all(self) -> list[dict[str, Any]]:
        """Every record; a task found in both places (a move cut short) counts as finished."""
        live = self.live()
        finished = self.history()
        seen = {r["id"] for r in finished}
        return [r for r in live if r["id"] not in seen] + finished

    # -- writes ------------------------------------------------------------------------------

    def _count_running(self) -> int:
        return sum(1 for r in self.live() if r["state"] == State.RUNNING.value)

    def _create(self, doc: dict[str, Any]) -> None:
        """Write a new task's live file (nobody else knows its id yet, so no lock is needed)."""
        if not _FILE_ID.match(doc["id"]):
            raise ValueError(f"a task id must be letters, digits, '-' or '_', not {doc['id']!r}")
        self._make_folders()
        # A TinyDB file with one table of one record, written whole: there is nothing to read
        # yet, and no table is made for it until someone reads it.
        AtomicJSONStorage(self._live_path(doc["id"])).write({TASKS: {doc["id"]: doc}})

    def insert(self, record: Mapping[str, Any]) -> None:
        """Add a new live task as it is (the Dask backend: "queued" until a worker starts it)."""
        self._create(dict(record))

    def admit(self, record: Mapping[str, Any], limit: float) -> State:
        """Add a new task, "running" if fewer than ``limit`` run now (across processes), else "queued"."""
        if limit == float("inf"):
            self._create({**record, "state": State.RUNNING.value, "started": time.time()})
            return State.RUNNING
        with held(self._locks.whole()):
            state = State.RUNNING if self._count_running() < limit else State.QUEUED
            doc = {**record, "state": state.value}
            if state is State.RUNNING:
                doc["started"] = time.time()
            self._create(doc)
        return state

    def promote(self, task_id: str, limit: float) -> bool | None:
        """Queued → running if a slot is free: ``True`` done, ``None`` no slot yet, ``False`` not queued."""
        with held(self._locks.whole()):
            doc = self._read_live(task_id)
            if doc is None or doc["state"] != State.QUEUED.value:
                return False
            if self._count_running() >= limit:
                return None
            return self.patch(task_id, {"state": State.RUNNING.value, "started": time.time()}) is not None

    def patch(
        self,
        task_id: str,
        fields: Mapping[str, Any] | Callable[[dict[str, Any]], Mapping[str, Any] | None],
        *,
        recreate: Mapping[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """Merge ``fields`` into a live record and return it; ``None`` if it is not live.

        ``fields`` may be a function of the record, called under the task's lock, that returns
        the fields to merge, or ``None`` to leave the record as it is (then ``None`` is returned).
        ``recreate``: the full record to write back if the live one has vanished (a damaged
        file was set aside) and the task has not finished meanwhile.
        """
        with self._task(task_id) as (live, _, _):
            doc = self._guard(live, live.get, doc_id=task_id)
            if doc is None:
                if recreate is None or self._finished(task_id):
                    self._forget_live(task_id)
                    return None
                doc = dict(recreate)
            else:
                doc = dict(doc)
            if callable(fields):
                decided = fields(doc)
                if decided is None:
                    return None
                fields = decided
            _record.merge(doc, fields)
            live.upsert(Document(doc, task_id))  # type: ignore[arg-type]
        return doc

    def finalize(
        self, task_id: str, fields: Mapping[str, Any], *, fallback: Mapping[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """Move a task to the history with its final ``fields``; the first final state wins.

        Returns the final record, or ``None`` if the task is unknown and no ``fallback`` was given.
        """
        if not State(fields["state"]).is_final:
            raise ValueError(f"finalize needs a final state, got {fields['state']!r}")
        wrote: dict[str, Any] | None = None
        with self._task(task_id) as (live, recent, shard):
            final = self._guard(recent, recent.get, doc_id=task_id)
            if final is None:
                current = self._guard(live, live.get, doc_id=task_id)
                if current is None:
                    # Not live: it may have ended long ago, and joined the shard's main file.
                    # (A task with a live file is never there: see `_join_shard`.)
                    final = self._guard(shard, shard.get, doc_id=task_id)
                    current = fallback
                if final is None:
                    if current is None:
                        return None
                    final = wrote = {**current, **fields}
                    self._add_finished_doc(recent, shard, Document(final, task_id))  # type: ignore[arg-type]
            # History first, then live: a reader that misses it in one finds it in the other.
            self._unlink_live(task_id)
        self._forget_live(task_id)
        if wrote is not None:  # this call recorded the end (the first final state wins)
            ends.ended(self.home, dict(wrote))
        return dict(final)

    def _add_finished_doc(self, recent: Table, shard: Table, doc: Document) -> None:
        """Put a finished task's record in its shard's recent file; when that is full, it and
        the recent file's records join the main file instead, in one write (under the lock)."""
        waiting = self._records(recent)
        if len(waiting) + 1 >= RECENT_MAX:
            try:
                self._join_shard(recent, shard, [*(Document(r, i) for i, r in waiting.items()), doc])  # type: ignore[arg-type]
                return
            except StoreError:
                pass  # the big write failed (a full disk, say): the small one may still succeed
        recent.insert(doc)

    def _join_shard(self, recent: Table, shard: Table, docs: list[Document]) -> None:
        """Write ``docs`` into the shard's main file, then remove its recent file.  The main file
        first: a crash between the two leaves a task in both, and readers take it once."""
        known = self._records(shard)
        new = [doc for doc in docs if doc.doc_id not in known]
        if new:
            shard.insert_multiple(new)
        storage = storage_of(recent)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(storage.path)
        storage.session = None  # what the session read is gone with the file
        # A task in the main file never has a live file (`finalize` relies on it): remove those
        # a crash between a recent write and its live file's removal left.
        for doc in docs:
            self._unlink_live(str(doc.doc_id))

    def _unlink_live(self, task_id: str) -> bool:
        """Remove a task's live file, and the temp file a writer killed mid-write left (only the
        holder of the task's stripe lock calls this, so no write is under way).  ``True`` if the
        live file was there."""
        path = self._live_path(task_id)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self._live_dir, f".{task_id}.json.tmp"))
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        return True

    # -- upkeep (`nbbgtask.store.maintenance`) --------------------------------------------

    def sweep(self, older_than: float = 3600.0) -> int:
        """Remove temp files of tasks that were never made (what a killed process left); how many."""
        return maintenance.sweep(self, older_than)

    def add_finished(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Put finished tasks' records into the history as they are; how many were added."""
        return maintenance.add_finished(self, records)

    def remove(self, task_ids: Iterable[str]) -> list[str]:
        """Forget these tasks (their records; their files are the caller's); the ids removed."""
        return maintenance.remove(self, task_ids)


_instances: dict[Path, Store] = {}
_instances_lock = threading.Lock()


def store_for(home: Path) -> Store:
    with _instances_lock:
        store = _instances.get(home)
        if store is None:
            store = _instances[home] = Store(home)
        return store


def forget_instances() -> None:
    """Drop every Store (their locks belong to another process after a fork)."""
    global _instances_lock
    _instances.clear()
    _instances_lock = threading.Lock()


#: the parent's stores, in a forked child: kept, never freed, since freeing their caches there
#: would write to (and so copy) every page they sit on, at a cost that grew with the history read
_inherited: list[dict[Path, Store]] = []


def _after_fork_in_child() -> None:
    """Locks held by another thread at the moment of a fork would stay locked forever in the child,
    and the parent's file locks are not the child's: the child gets new Stores, the parent's are
    kept unused."""
    global _instances, _instances_lock
    _inherited.append(_instances)
    # What the parent proved of a home's folders (made, the user's own, not links) holds for the
    # child born from it a moment later: a new Store need not prove it again on its first write.
    _instances = {home: Store(home, ready=store._ready) for home, store in _inherited[-1].items()}
    _instances_lock = threading.Lock()


renew_in_child(_after_fork_in_child)
