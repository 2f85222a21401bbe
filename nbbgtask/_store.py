"""The status store: task records in TinyDB files shared by kernels, task processes and the CLI.

The files themselves (atomic, cached, checked TinyDB files) are `_storage`'s; this module
says which files there are and what a task's life does to its record.  Each queued or running
task has a small file of its own, ``live/<id>.json``, which its progress writes replace; a finished task moves to the
history, spread over 64 shards by id.  A shard is two files: ``history/NN.recent.json`` takes
each task that ends, and once it holds `RECENT_MAX` of them they join ``history/NN.json`` in one
write, so ending a task rewrites a small file, not one that grows with the history.  A read-modify-write takes one of 64 stripe locks
(``locks/NN.lock``, chosen by id as the history shard is), so tasks that report or end at the
same moment seldom wait for each other.  Only admission under a ``max_running`` limit takes the
store-wide ``store.lock``, to count the running tasks.  Every write replaces its file
atomically, so readers take no lock and never see a torn file.

One job: the task records of one home folder, in their files and under their locks (about 650
lines: the layout, the locks, the reads with their caches, and each transition of a record).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from tinydb.table import Document, Table

from . import _record
from ._errors import HomeError, StoreDamagedWarning, StoreError
from ._locks import FileLock, LockTimeout
from ._states import State
from ._storage import SCHEMA_VERSION, TASKS, AtomicJSONStorage, Damaged, open_table, storage_of
from ._summaries import Summary, newest
from ._trust import TASK_ID, check_folder

__all__ = ["Store", "SCHEMA_VERSION", "HISTORY_SHARDS", "store_for", "forget_instances", "shard_of"]

#: Seconds to wait for another process's read-modify-write before giving up.
LOCK_TIMEOUT = 30.0
#: Seconds between tries for a busy lock (filelock's default, 0.05, made starting a task wait
#: hundreds of milliseconds while many tasks were reporting).
LOCK_POLL = 0.002
#: How many files the history is spread over (by task id); also the number of stripe locks.
HISTORY_SHARDS = 64
#: A shard's recent file takes this many finished tasks before they join the shard's main file.
#: Ending a task rewrites the recent file (up to this many records), and one end in this many
#: rewrites the main file: at 100,000 finished tasks (1,560 a shard) that is 20 ms, where
#: rewriting the shard at every end cost each task those 20 ms.
RECENT_MAX = 32
#: the name of a shard's recent file, after its two digits
RECENT_SUFFIX = ".recent.json"
#: A folder changed less than this long ago may change again within the same timestamp tick
#: (file times are taken from a coarse clock), so `Store.version` does not vouch for it yet.
SETTLE_NS = 50_000_000

#: what a task id must look like to have a live file, or any file (`_trust.TASK_ID`)
_FILE_ID = TASK_ID


def shard_of(task_id: str) -> int:
    try:
        return int(task_id[:2], 16) % HISTORY_SHARDS
    except ValueError:
        return zlib.crc32(task_id.encode("utf-8", "surrogatepass")) % HISTORY_SHARDS


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
        self._global: FileLock | None = None
        self._stripes: dict[int, FileLock] = {}
        self._shards: dict[int, Any] = {}
        self._recents: dict[int, Any] = {}
        #: live files' tables, kept while the task is live so that unchanged files are not re-parsed
        self._live: dict[str, Any] = {}
        self._tables_lock = threading.Lock()
        #: history file name -> (the parsed file it was made from, its summary)
        self._summary_of: dict[str, tuple[Any, Summary]] = {}
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
            lambda: open_table(os.path.join(self._history_dir, f"{index:02d}.json"), trust_stat=True, durable=True),
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

    def _existing_history(self) -> list[tuple[str, Table]]:
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

    def _folder_signature(self, path: str) -> Any:
        """A folder's (inode, size, mtime), which a file renamed into it changes; ``None`` while it
        changed too recently for the clock to tell a later change (`SETTLE_NS`), or is missing."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        if time.time_ns() - st.st_mtime_ns < SETTLE_NS:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _summaries(self) -> list[Summary]:
        """One `Summary` per history shard; one stat when no shard changed since the last call,
        and only the shards that changed are summarised again."""
        signature = self._folder_signature(self._history_dir)
        known, summaries = self._summarised
        if signature is not None and signature == known:
            return summaries
        summaries = []
        for name, table in self._existing_history():
            data = self._guard(table, storage_of(table).read)  # a stat, if the file is unchanged
            made = self._summary_of.get(name)
            if made is None or made[0] is not data:
                made = (data, Summary((data or {}).get(TASKS, {}).values()))
                self._summary_of[name] = made
            summaries.append(made[1])
        self._summarised = (signature, summaries)
        return summaries

    def _live_ids(self) -> list[str]:
        try:
            names = os.listdir(self._live_dir)
        except FileNotFoundError:
            return []
        return [n[:-5] for n in names if _live_name_ok(n)]

    def _make_folders(self) -> None:
        # On first write: a forked task process makes nothing until it first writes, off the path
        # to the task's code, and a read-only home can still be read.
        if self._ready:
            return
        try:
            if os.geteuid() == 0 and not os.stat(self.home).st_mode & stat.S_IWUSR:
                # root may write anyway: a home its owner made read-only stays so
                raise PermissionError(errno.EACCES, "Permission denied (the folder is read-only)")
            for folder in (self._live_dir, self._history_dir, self._lock_dir):
                os.makedirs(folder, mode=0o700, exist_ok=True)
                check_folder(self.home, folder)  # a plain folder of the user's, not a link
        except HomeError:
            raise
        except OSError as exc:
            raise StoreError(
                f"cannot write the nbbgtask store in {self.home}: {exc.strerror or exc}; fix its "
                f"permissions, or point NBBGTASK_HOME or bg.configure(home=...) at another folder"
            ) from None
        self._ready = True

    # -- the locks through which every read-modify-write goes ---------------------------------

    def _stripe_lock(self, index: int) -> FileLock:
        def make() -> FileLock:
            self._make_folders()
            return FileLock(os.path.join(self._lock_dir, f"{index:02d}.lock"), LOCK_TIMEOUT, LOCK_POLL)

        lock: FileLock = self._cached(self._stripes, index, make)
        return lock

    def _global_lock(self) -> FileLock:
        if self._global is None:
            self._make_folders()
            self._global = FileLock(os.path.join(self.home, "store.lock"), LOCK_TIMEOUT, LOCK_POLL)
        return self._global

    @staticmethod
    @contextlib.contextmanager
    def _held(lock: FileLock) -> Iterator[None]:
        try:
            lock.acquire()
        except LockTimeout:
            raise StoreError(
                f"waited {LOCK_TIMEOUT:.0f} s for the nbbgtask store lock {lock.path}; "
                f"another process holds it (a stopped or hung process?)"
            ) from None
        except OSError as exc:
            raise StoreError(
                f"cannot open the nbbgtask store lock {lock.path}: {exc.strerror or exc}; fix the "
                f"folder's permissions, or point NBBGTASK_HOME or bg.configure(home=...) elsewhere"
            ) from None
        try:
            yield
        finally:
            lock.release()

    @contextlib.contextmanager
    def _session(self, *tables: Table) -> Iterator[None]:
        """Read-modify-write ``tables``: each is parsed anew once, then the copy is reused."""
        entered = [t for t in tables if not storage_of(t).in_session]
        for table in entered:
            storage = storage_of(table)
            storage.session, storage.in_session = None, True
        try:
            yield
        finally:
            for table in entered:
                storage = storage_of(table)
                storage.session, storage.in_session = None, False

    @contextlib.contextmanager
    def _task(self, task_id: str) -> Iterator[tuple[Any, Any, Any]]:
        """Hold ``task_id``'s stripe lock; yields its live table and its shard's recent and main
        tables, in session (each is parsed only if it is read)."""
        index = shard_of(task_id)
        live, (recent, shard) = self._live_table(task_id), self._history_pair(index)
        with self._held(self._stripe_lock(index)), self._session(live, recent, shard):
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
        with self._held(self._stripe_lock(index)), self._session(table):
            storage.session = None
            try:
                storage.read()
                return  # someone else already replaced it
            except Damaged as again:
                damage = again
            stamp = time.strftime("%Y%m%dT%H%M%S")
            aside = f"{storage.path}.damaged-{stamp}-{os.getpid()}"
            os.replace(storage.path, aside)
            storage.session = None
            kept = ""
            if damage.salvage and damage.salvage.get(TASKS):
                storage.write(damage.salvage)
                kept = f"; its {len(damage.salvage[TASKS])} sound record(s) were kept"
            storage.session = None
        warnings.warn(
            f"the nbbgtask store file {storage.path} was damaged ({damage}); it was kept as "
            f"{aside} for inspection{kept or ' and a fresh file was started'}",
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

    def history_files(self) -> list[tuple[str, dict[str, Any]]]:
        """Each history file's name and its records by id, as parsed: the same object for as long
        as the file is unchanged (a stat tells), so that a reader can keep an index of its own
        per file (the server extension's pages).  Not to be changed."""
        return [(name, self._records(table)) for name, table in self._existing_history()]

    def newest_finished(
        self, limit: int, states: set[str] | None = None, name: str | None = None, by: str = "created"
    ) -> list[dict[str, Any]] | None:
        """The newest ``limit`` finished tasks (in ``states``, named ``name``), newest first by
        ``by`` ("created" or "finished"), from the shards' summaries: as cheap at 100,000
        finished tasks as at none.  ``None`` where the summaries cannot tell: read `history`."""
        summaries = self._summaries()
        made_from, answers = self._answers
        if made_from is not summaries:
            answers = {}
            self._answers = (summaries, answers)
        key = (limit, None if states is None else frozenset(states), name, by)
        if key in answers:
            found = answers[key]
        else:
            found = answers[key] = newest(summaries, limit, states, name, by)
        return None if found is None else [dict(r) for r in found]

    def ids_starting(self, prefix: str) -> list[str]:
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
        with self._held(self._global_lock()):
            state = State.RUNNING if self._count_running() < limit else State.QUEUED
            doc = {**record, "state": state.value}
            if state is State.RUNNING:
                doc["started"] = time.time()
            self._create(doc)
        return state

    def promote(self, task_id: str, limit: float) -> bool | None:
        """Queued → running if a slot is free: ``True`` done, ``None`` no slot yet, ``False`` not queued."""
        with self._held(self._global_lock()):
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
                    final = {**current, **fields}
                    self._add_finished_doc(recent, shard, Document(final, task_id))  # type: ignore[arg-type]
            # History first, then live: a reader that misses it in one finds it in the other.
            self._unlink_live(task_id)
        self._forget_live(task_id)
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

    def sweep(self, older_than: float = 3600.0) -> int:
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
            with self._held(self._stripe_lock(shard_of(task_id))):
                path = os.path.join(self._live_dir, name)
                try:
                    if os.path.exists(self._live_path(task_id)) or os.stat(path).st_mtime > cutoff:
                        continue
                    os.unlink(path)
                    removed += 1
                except FileNotFoundError:
                    pass
        return removed

    def add_finished(self, records: Iterable[Mapping[str, Any]]) -> int:
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
            with self._held(self._stripe_lock(index)), self._session(recent, shard):
                known = {*self._records(recent), *self._records(shard)}
                new = [Document(doc, doc["id"]) for doc in docs if doc["id"] not in known]
                if new:
                    shard.insert_multiple(new)  # type: ignore[arg-type]
                added += len(new)
        return added

    def remove(self, task_ids: Iterable[str]) -> list[str]:
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
            with self._held(self._stripe_lock(index)), self._session(recent, shard):
                for table in (recent, shard):
                    held = self._records(table)
                    present = [task_id for task_id in ids if task_id in held]
                    if present:  # else no write (and no recent file made just to be empty)
                        gone += table.remove(doc_ids=present)
                for task_id in ids:
                    if task_id in live and _FILE_ID.match(task_id) and self._unlink_live(task_id):
                        gone.append(task_id)
                    self._forget_live(task_id)
        return list(dict.fromkeys(gone))


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


os.register_at_fork(after_in_child=_after_fork_in_child)
