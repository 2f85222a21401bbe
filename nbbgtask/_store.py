"""The status store: task records in TinyDB files shared by kernels, task processes and the CLI.

This is the only module that imports TinyDB.  What changes often is kept small: ``live.json``
holds queued and running tasks (rewritten on every progress write), and finished tasks move to
the history, spread over ``history/NN.json`` shards by id, so that ending a task rewrites a
sixty-fourth of the history, not all of it.  Every read-modify-write happens under one file
lock, and every write replaces its file atomically, so readers never take the lock and never
see a torn file.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import warnings
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import filelock
from tinydb import TinyDB
from tinydb.storages import Storage
from tinydb.table import Document, Table

from ._errors import StoreDamagedWarning, StoreError
from ._states import State

__all__ = ["Store", "SCHEMA_VERSION", "HISTORY_SHARDS", "store_for", "forget_instances"]

#: Bumped when a record's layout changes incompatibly; recorded in every store file.
SCHEMA_VERSION = 1
#: Seconds to wait for another process's read-modify-write before giving up.
LOCK_TIMEOUT = 30.0
#: Seconds between tries for a busy lock (filelock's default, 0.05, made starting a task wait
#: hundreds of milliseconds while many tasks were reporting).
LOCK_POLL = 0.002
#: How many files the history is spread over (by task id).
HISTORY_SHARDS = 64

_TASKS = "tasks"
_META = "_meta"
_RANK = {State.QUEUED: 0, State.RUNNING: 1}


class _Damaged(Exception):
    pass


class _AtomicJSONStorage(Storage):
    """TinyDB storage: writes replace the file atomically; reads are cached.

    ``trust_stat``: a file whose (inode, size, mtime) did not change is not re-read; used for the
    history shards, which are rarely written.  The live file is small, so it is always re-read
    and only re-parsed when its bytes changed.  Under the store lock the first read parses the
    file anew and later reads in the same lock session reuse that copy, so a read-modify-write
    never starts from a stale or shared copy and never parses twice.

    ``durable``: fsync before the rename.  The history needs it; the live file does not, since
    no task is left running after the machine stops.
    """

    def __init__(self, path: str, trust_stat: bool = False, durable: bool = False) -> None:
        self.path = path
        self.trust_stat = trust_stat
        self.durable = durable
        #: set by the store while it holds the lock (and only then)
        self.session: dict[str, Any] | None = None
        self.in_session = False
        # (stat signature, bytes, parsed), replaced whole so threads never see a mixed triple
        self._cache: tuple[tuple[int, int, int] | None, bytes | None, Any] = (None, None, None)

    def _parse(self, raw: bytes) -> dict[str, Any] | None:
        if not raw.strip():
            return None
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise _Damaged(f"not valid JSON ({exc})") from None
        if not isinstance(data, dict) or not all(isinstance(t, dict) for t in data.values()):
            raise _Damaged("not a TinyDB document")
        version = data.get(_META, {}).get("1", {}).get("schema", SCHEMA_VERSION)
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the nbbgtask store {self.path} was written by a newer nbbgtask (schema "
                f"{version}, this one knows {SCHEMA_VERSION}); upgrade nbbgtask or use another home"
            )
        return data

    def _read_file(self) -> tuple[tuple[int, int, int], bytes] | None:
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                return (st.st_ino, st.st_size, st.st_mtime_ns), f.read()
        except FileNotFoundError:
            return None

    def read(self) -> dict[str, Any] | None:
        if self.in_session:
            if self.session is None:
                got = self._read_file()
                self.session = self._parse(got[1]) if got else None
            return self.session
        if self.trust_stat:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                return None
            if (st.st_ino, st.st_size, st.st_mtime_ns) == self._cache[0]:
                return self._cache[2]
        got = self._read_file()
        if got is None:
            self._cache = (None, None, None)
            return None
        sig, raw = got
        _, cached_raw, data = self._cache
        if raw != cached_raw:
            data = self._parse(raw)
        self._cache = (sig, raw, data)
        return data

    def write(self, data: dict[str, Any]) -> None:
        data[_META] = {"1": {"schema": SCHEMA_VERSION}}
        raw = json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
        directory, name = os.path.split(self.path)
        # Only the lock holder writes, so one temp name per file is enough.
        tmp = os.path.join(directory, f".{name}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _write_all(fd, raw)  # os.write may write less than asked (a nearly full disk)
                if self.durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as exc:
            self.session = None
            self._cache = (None, None, None)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StoreError(
                f"cannot write the nbbgtask store {self.path}: {exc.strerror or exc}. "
                f"The store is unchanged; free some space or fix the folder's permissions."
            ) from None
        # ``data`` came from a parse made under the lock, so no reader shares it yet.
        self.session = data
        self._cache = (None, raw, data)

    def close(self) -> None:
        pass


def _write_all(fd: int, raw: bytes) -> None:
    view = memoryview(raw)
    while view:
        view = view[os.write(fd, view) :]


class _TaskTable(Table):
    """Tasks keyed by their own string ids, so a lookup by id is one dict access."""

    document_id_class = str  # type: ignore[assignment]


class _DB(TinyDB):
    table_class = _TaskTable


def _merge(doc: dict[str, Any], fields: Mapping[str, Any]) -> None:
    """Apply ``fields`` to a live record without ever moving its state backwards."""
    if "state" in fields and State(fields["state"]).is_final:
        raise ValueError("final states are written by Store.finalize")
    for key, value in fields.items():
        if key == "state" and _RANK[State(value)] < _RANK[State(doc["state"])]:
            continue
        if key == "cancel_requested" and doc.get("cancel_requested"):
            continue
        doc[key] = value


def shard_of(task_id: str) -> int:
    try:
        return int(task_id[:2], 16) % HISTORY_SHARDS
    except ValueError:
        return zlib.crc32(task_id.encode("utf-8", "surrogatepass")) % HISTORY_SHARDS


class Store:
    """Task records under one home folder.  One instance per home per process (`store_for`)."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self._depth = threading.local()
        self._lock_obj: filelock.FileLock | None = None
        self._history_dir = self.home / "history"
        self._live_db = _DB(str(self.home / "live.json"), storage=_AtomicJSONStorage)
        # Typed Any: TinyDB's hints say document ids are ints, ours are strings (see _TaskTable).
        self._live: Any = self._live_db.table(_TASKS, cache_size=0)
        self._shards: dict[int, Any] = {}
        self._shards_lock = threading.Lock()
        #: how many tasks were live at this process's last progress write
        self.live_count = 0

    def _shard(self, index: int) -> Any:
        table = self._shards.get(index)
        if table is None:
            with self._shards_lock:
                table = self._shards.get(index)
                if table is None:
                    path = self._history_dir / f"{index:02d}.json"
                    db = _DB(str(path), storage=_AtomicJSONStorage, trust_stat=True, durable=True)
                    table = self._shards[index] = db.table(_TASKS, cache_size=0)
                    if self._depth_now():
                        self._enter(table)
        return table

    def _history(self, task_id: str) -> Any:
        return self._shard(shard_of(task_id))

    def _existing_shards(self) -> list[Table]:
        try:
            names = os.listdir(self._history_dir)
        except FileNotFoundError:
            return []
        return [self._shard(int(n[:-5])) for n in sorted(names) if n.endswith(".json") and n[:-5].isdigit()]

    # -- the one path through which every read-modify-write goes ---------------------------

    @property
    def _lock(self) -> filelock.FileLock:
        # Made on first use: a forked task process starts with no lock and makes one only
        # when it first writes, off the path to the task's code.
        if self._lock_obj is None:
            try:
                self._history_dir.mkdir(mode=0o700, exist_ok=True)
            except OSError as exc:
                raise StoreError(
                    f"cannot write the nbbgtask store in {self.home}: {exc.strerror or exc}; fix its "
                    f"permissions, or point NBBGTASK_HOME or bg.configure(home=...) at another folder"
                ) from None
            self._lock_obj = filelock.FileLock(str(self.home / "store.lock"), timeout=LOCK_TIMEOUT, mode=0o600)
        return self._lock_obj

    def _depth_now(self) -> int:
        return getattr(self._depth, "n", 0)

    def _tables(self) -> list[Table]:
        return [self._live, *self._shards.values()]

    @staticmethod
    def _enter(table: Table) -> None:
        storage: _AtomicJSONStorage = table.storage  # type: ignore[assignment]
        storage.session, storage.in_session = None, True

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        depth = self._depth_now()
        if depth:  # re-entered by the same thread (setting a damaged file aside mid-write)
            self._depth.n = depth + 1
            try:
                yield
            finally:
                self._depth.n = depth
            return
        lock = self._lock
        try:
            lock.acquire(poll_interval=LOCK_POLL)
        except filelock.Timeout:
            raise StoreError(
                f"waited {LOCK_TIMEOUT:.0f} s for the nbbgtask store lock {lock.lock_file}; "
                f"another process holds it (a stopped or hung process?)"
            ) from None
        self._depth.n = 1
        try:
            for table in self._tables():
                self._enter(table)
            yield
        finally:
            for table in self._tables():
                storage: _AtomicJSONStorage = table.storage  # type: ignore[assignment]
                storage.session, storage.in_session = None, False
            self._depth.n = 0
            lock.release()

    def _guard(self, table: Table, op: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one table operation; a damaged file is set aside once and the operation retried."""
        try:
            return op(*args, **kwargs)
        except _Damaged as exc:
            self._set_aside(table, str(exc))
            return op(*args, **kwargs)

    def _set_aside(self, table: Table, reason: str) -> None:
        storage: _AtomicJSONStorage = table.storage  # type: ignore[assignment]
        with self._locked():
            storage.session = None
            try:
                storage.read()
                return  # someone else already replaced it
            except _Damaged:
                pass
            stamp = time.strftime("%Y%m%dT%H%M%S")
            aside = f"{storage.path}.damaged-{stamp}-{os.getpid()}"
            os.replace(storage.path, aside)
            storage.session = None
        warnings.warn(
            f"the nbbgtask store file {storage.path} was damaged ({reason}); it was kept as "
            f"{aside} for inspection and a fresh store was started",
            StoreDamagedWarning,
            stacklevel=4,
        )

    # -- reads (no lock: every file is replaced whole) --------------------------------------

    def version(self) -> tuple[Any, ...]:
        """Changes whenever a file is rewritten (a rename changes its folder): two stat calls."""
        sig: list[Any] = []
        for path in (self._live_db.storage.path, self._history_dir):  # type: ignore[attr-defined]
            try:
                st = os.stat(path)
                sig.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except FileNotFoundError:
                sig.append(None)
        return tuple(sig)

    def get(self, task_id: str) -> dict[str, Any] | None:
        rec = self._guard(self._live, self._live.get, doc_id=task_id)
        if rec is None:
            shard = self._history(task_id)
            rec = self._guard(shard, shard.get, doc_id=task_id)
        return dict(rec) if rec is not None else None

    def live(self) -> list[dict[str, Any]]:
        return [dict(d) for d in self._guard(self._live, self._live.all)]

    def history(self) -> list[dict[str, Any]]:
        return [dict(d) for shard in self._existing_shards() for d in self._guard(shard, shard.all)]

    def all(self) -> list[dict[str, Any]]:
        """Every record; a task found in both places (a move cut short) counts as finished."""
        live = self.live()
        finished = self.history()
        seen = {r["id"] for r in finished}
        return [r for r in live if r["id"] not in seen] + finished

    # -- writes ------------------------------------------------------------------------------

    def _count_running(self) -> int:
        return sum(1 for d in self._live.all() if d["state"] == State.RUNNING.value)

    def insert(self, record: Mapping[str, Any]) -> None:
        """Add a new live task as it is (the Dask backend: "queued" until a worker starts it)."""
        with self._locked():
            self._guard(self._live, self._live.insert, Document(record, record["id"]))  # type: ignore[arg-type]

    def admit(self, record: Mapping[str, Any], limit: float) -> State:
        """Add a new task, "running" if fewer than ``limit`` run now (across processes), else "queued"."""
        with self._locked():
            running = self._guard(self._live, self._count_running) if limit != float("inf") else 0
            state = State.RUNNING if running < limit else State.QUEUED
            doc = {**record, "state": state.value}
            if state is State.RUNNING:
                doc["started"] = time.time()
            self._guard(self._live, self._live.insert, Document(doc, record["id"]))  # type: ignore[arg-type]
        return state

    def promote(self, task_id: str, limit: float) -> bool | None:
        """Queued → running if a slot is free: ``True`` done, ``None`` no slot yet, ``False`` not queued."""
        with self._locked():
            doc = self._guard(self._live, self._live.get, doc_id=task_id)
            if doc is None or doc["state"] != State.QUEUED.value:
                return False
            if self._count_running() >= limit:
                return None
            self._live.update({"state": State.RUNNING.value, "started": time.time()}, doc_ids=[task_id])
        return True

    def patch(
        self, task_id: str, fields: Mapping[str, Any], *, recreate: Mapping[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """Merge ``fields`` into a live record and return it; ``None`` if it is not live.

        ``recreate``: the full record to write back if the live one has vanished (a damaged
        store was replaced) and the task has not finished meanwhile.
        """
        with self._locked():
            done = self._guard(self._live, self._live.update, lambda d: _merge(d, fields), doc_ids=[task_id])
            if not done:
                shard = self._history(task_id)
                if recreate is None or self._guard(shard, shard.get, doc_id=task_id):
                    return None
                doc = dict(recreate)
                _merge(doc, fields)
                self._live.insert(Document(doc, task_id))  # type: ignore[arg-type]
            rec = self._live.get(doc_id=task_id)
            self.live_count = len(self._live)
        return dict(rec) if rec is not None else None

    def finalize(
        self, task_id: str, fields: Mapping[str, Any], *, fallback: Mapping[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """Move a task to the history with its final ``fields``; the first final state wins.

        Returns the final record, or ``None`` if the task is unknown and no ``fallback`` was given.
        """
        if not State(fields["state"]).is_final:
            raise ValueError(f"finalize needs a final state, got {fields['state']!r}")
        shard = self._history(task_id)
        with self._locked():
            final = self._guard(shard, shard.get, doc_id=task_id)
            if final is None:
                current = self._guard(self._live, self._live.get, doc_id=task_id) or fallback
                if current is None:
                    return None
                final = {**current, **fields}
                shard.insert(Document(final, task_id))  # type: ignore[arg-type]
            # History first, then live: a reader that misses it in one finds it in the other.
            self._live.remove(doc_ids=[task_id])
        return dict(final)

    def remove(self, task_ids: Iterable[str]) -> list[str]:
        by_shard: dict[int, list[str]] = {}
        for task_id in task_ids:
            by_shard.setdefault(shard_of(task_id), []).append(task_id)
        gone: list[str] = []
        with self._locked():
            for index, ids in by_shard.items():
                shard = self._shard(index)
                gone += self._guard(shard, shard.remove, doc_ids=ids)
                gone += self._guard(self._live, self._live.remove, doc_ids=ids)
        return gone


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
