"""The status store: task records in TinyDB files shared by kernels, task processes and the CLI.

This is the only module that imports TinyDB.  Two TinyDB files keep what changes often small:
``live.json`` holds queued and running tasks (rewritten on every progress write) and
``history.json`` holds finished ones (written once per task, when it ends).  Every
read-modify-write happens under one file lock, and every write replaces the file atomically,
so readers never take the lock and never see a torn file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import filelock
from tinydb import TinyDB
from tinydb.storages import Storage
from tinydb.table import Document, Table

from ._errors import StoreDamagedWarning, StoreError
from ._states import State

__all__ = ["Store", "SCHEMA_VERSION", "store_for"]

#: Bumped when a record's layout changes incompatibly; recorded in every store file.
SCHEMA_VERSION = 1
#: Seconds to wait for another process's read-modify-write before giving up.
LOCK_TIMEOUT = 30.0

_TASKS = "tasks"
_META = "_meta"
_RANK = {State.QUEUED: 0, State.RUNNING: 1}


class _Damaged(Exception):
    pass


class _AtomicJSONStorage(Storage):
    """TinyDB storage: writes go to a temp file, fsync, ``os.replace``; reads are cached.

    ``trust_stat``: a file whose (inode, size, mtime) did not change is not re-read.  Used for
    the history, which is large and rarely written; the live file is small, so it is always
    re-read and only re-parsed when its bytes changed.  Inside the store lock (``fresh``)
    every read is a new parse, so a read-modify-write never starts from a stale or shared copy.
    """

    def __init__(self, path: str, trust_stat: bool = False) -> None:
        self.path = path
        self.trust_stat = trust_stat
        self.fresh = False
        # (stat signature, bytes, parsed), replaced whole so threads never see a mixed pair
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

    def read(self) -> dict[str, Any] | None:
        fresh = self.fresh
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._cache = (None, None, None)
            return None
        sig = (st.st_ino, st.st_size, st.st_mtime_ns)
        cached_sig, cached_raw, cached_data = self._cache
        if self.trust_stat and not fresh and sig == cached_sig:
            return cached_data
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        if fresh:
            return self._parse(raw)
        if raw != cached_raw:
            cached_data = self._parse(raw)
        self._cache = (sig, raw, cached_data)
        return cached_data

    def write(self, data: dict[str, Any]) -> None:
        data[_META] = {"1": {"schema": SCHEMA_VERSION}}
        raw = json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
        directory, name = os.path.split(self.path)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException as exc:
            self._cache = (None, None, None)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(exc, OSError):
                raise StoreError(
                    f"cannot write the nbbgtask store {self.path}: {exc.strerror or exc}. "
                    f"The store is unchanged; free some space or fix the folder's permissions."
                ) from None
            raise
        # ``data`` came from a fresh parse under the lock, so no reader shares it yet.
        self._cache = (None, raw, data)

    def close(self) -> None:
        pass


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
        if key == "state" and _RANK.get(State(value), 2) < _RANK.get(State(doc["state"]), 2):
            continue
        if key == "cancel_requested" and doc.get("cancel_requested"):
            continue
        doc[key] = value


class Store:
    """Task records under one home folder.  One instance per home per process (`store_for`)."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self._depth = threading.local()
        self._lock = filelock.FileLock(
            str(self.home / "store.lock"), timeout=LOCK_TIMEOUT, mode=0o600
        )
        self._live_storage_db = _DB(str(self.home / "live.json"), storage=_AtomicJSONStorage)
        self._history_db = _DB(
            str(self.home / "history.json"), storage=_AtomicJSONStorage, trust_stat=True
        )
        self._live = self._live_storage_db.table(_TASKS, cache_size=0)
        self._history = self._history_db.table(_TASKS, cache_size=0)

    # -- the one path through which every read-modify-write goes ---------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        depth = getattr(self._depth, "n", 0)
        if depth:  # re-entered by the same thread (setting a damaged file aside mid-write)
            self._depth.n = depth + 1
            try:
                yield
            finally:
                self._depth.n = depth
            return
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise StoreError(
                f"waited {LOCK_TIMEOUT:.0f} s for the nbbgtask store lock {self._lock.lock_file}; "
                f"another process holds it (a stopped or hung process?)"
            ) from None
        storages = (self._live_storage_db.storage, self._history_db.storage)
        self._depth.n = 1
        try:
            for s in storages:
                s.fresh = True  # type: ignore[attr-defined]
            yield
        finally:
            for s in storages:
                s.fresh = False  # type: ignore[attr-defined]
            self._depth.n = 0
            self._lock.release()

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
            try:
                storage.read()
                return  # someone else already replaced it
            except _Damaged:
                pass
            stamp = time.strftime("%Y%m%dT%H%M%S")
            aside = f"{storage.path}.damaged-{stamp}-{os.getpid()}"
            os.replace(storage.path, aside)
        warnings.warn(
            f"the nbbgtask store file {storage.path} was damaged ({reason}); it was kept as "
            f"{aside} for inspection and a fresh store was started",
            StoreDamagedWarning,
            stacklevel=4,
        )

    # -- reads (no lock: every file is replaced whole) --------------------------------------

    def version(self) -> tuple[Any, ...]:
        """Changes whenever either file is rewritten: two stat calls, no read."""
        sig: list[Any] = []
        for db in (self._live_storage_db, self._history_db):
            try:
                st = os.stat(db.storage.path)  # type: ignore[attr-defined]
                sig.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except FileNotFoundError:
                sig.append(None)
        return tuple(sig)

    def get(self, task_id: str) -> dict[str, Any] | None:
        rec = self._guard(self._live, self._live.get, doc_id=task_id)
        if rec is None:
            rec = self._guard(self._history, self._history.get, doc_id=task_id)
        return dict(rec) if rec is not None else None

    def live(self) -> list[dict[str, Any]]:
        return [dict(d) for d in self._guard(self._live, self._live.all)]

    def history(self) -> list[dict[str, Any]]:
        return [dict(d) for d in self._guard(self._history, self._history.all)]

    def all(self) -> list[dict[str, Any]]:
        """Every record; a task found in both files (a move cut short) counts as finished."""
        live = self.live()
        finished = self.history()
        seen = {r["id"] for r in finished}
        return [r for r in live if r["id"] not in seen] + finished

    def ids(self) -> list[str]:
        return [r["id"] for r in self.all()]

    # -- writes ------------------------------------------------------------------------------

    def insert(self, record: Mapping[str, Any]) -> None:
        with self._locked():
            self._guard(self._live, self._live.insert, Document(record, record["id"]))

    def _count_running(self) -> int:
        return sum(1 for d in self._live.all() if d["state"] == State.RUNNING.value)

    def admit(self, record: Mapping[str, Any], limit: float) -> State:
        """Add a new task, "running" if fewer than ``limit`` run now (across processes), else "queued"."""
        with self._locked():
            running = self._guard(self._live, self._count_running) if limit != float("inf") else 0
            state = State.RUNNING if running < limit else State.QUEUED
            doc = {**record, "state": state.value}
            if state is State.RUNNING:
                doc["started"] = time.time()
            self._live.insert(Document(doc, record["id"]))
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
                if recreate is None or self._guard(self._history, self._history.get, doc_id=task_id):
                    return None
                doc = dict(recreate)
                _merge(doc, fields)
                self._guard(self._live, self._live.insert, Document(doc, task_id))
            rec = self._live.get(doc_id=task_id)
        return dict(rec) if rec is not None else None

    def finalize(
        self, task_id: str, fields: Mapping[str, Any], *, fallback: Mapping[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """Move a task to the history with its final ``fields``; the first final state wins.

        Returns the final record, or ``None`` if the task is unknown and no ``fallback`` was given.
        """
        assert State(fields["state"]).is_final
        with self._locked():
            final = self._guard(self._history, self._history.get, doc_id=task_id)
            if final is None:
                current = self._guard(self._live, self._live.get, doc_id=task_id) or fallback
                if current is None:
                    return None
                final = {**current, **fields}
                self._history.insert(Document(final, task_id))
            # History first, then live: a reader that misses it in one file finds it in the other.
            self._live.remove(doc_ids=[task_id])
        return dict(final)

    def remove(self, task_ids: Iterable[str]) -> list[str]:
        ids = list(task_ids)
        with self._locked():
            gone = self._guard(self._history, self._history.remove, doc_ids=ids)
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
