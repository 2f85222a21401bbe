"""TinyDB files for the store: each written atomically, read through a cache, checked when parsed.

A file holds one table of task records keyed by
their ids, and a schema version; a file that is not valid JSON, or holds records that are not
task records (`nbbgtask.core.record.fault`), raises `Damaged` with what can be kept of it.  Which files there
are, their locks, and what a task's life does to its record are the store's (`nbbgtask.store.store`).
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any

from tinydb import TinyDB
from tinydb.storages import Storage
from tinydb.table import Table

from nbbgtask.core import record as _record
from nbbgtask.core.errors import StoreError
from nbbgtask.core.trust import open_owned
from nbbgtask.store.files import atomic_write
from nbbgtask.store.salvage import salvage_records

__all__ = ["SCHEMA_VERSION", "TASKS", "AtomicJSONStorage", "Damaged", "open_table", "storage_of"]

#: Bumped when a record's layout changes incompatibly; recorded in every store file.
#: 2: live tasks in ``live/<id>.json`` (1 kept them all in ``live.json``).
#: 3: a shard's newest finished tasks in ``history/NN.recent.json`` (which 2 would not read).
SCHEMA_VERSION = 3
TASKS = "tasks"
_META = "_meta"


class Damaged(Exception):
    """A store file that cannot be used as it is; ``salvage`` holds what can be kept of it."""

    def __init__(self, reason: str, salvage: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.salvage = salvage


class AtomicJSONStorage(Storage):
    """TinyDB storage: writes replace the file atomically; reads are cached.

    ``trust_stat``: a file whose (inode, size, mtime) did not change is not re-read; used for the
    history shards, which are rarely written.  A live file is small, so it is always re-read
    and only re-parsed when its bytes changed.  Under its lock the first read parses the file
    anew and later reads in the same lock session reuse that copy, so a read-modify-write never
    starts from a stale or shared copy and never parses twice.

    ``durable``: fsync before the rename.  The history needs it; live files do not, since no
    task is left running after the machine stops.
    """

    def __init__(self, path: str, trust_stat: bool = False, durable: bool = False) -> None:
        self.path = path
        self.trust_stat = trust_stat
        self.durable = durable
        #: set by the store while it holds this file's lock (and only then)
        self.session: dict[str, Any] | None = None
        self.in_session = False
        # (stat signature, bytes, parsed), replaced whole so threads never see a mixed triple
        self._cache: tuple[tuple[int, int, int] | None, bytes | None, Any] = (None, None, None)

    def _parse(self, raw: bytes) -> dict[str, Any] | None:
        if not raw.strip():
            return None
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            # Invalid UTF-8, a cut end, or nesting deeper than the parser goes (a RecursionError,
            # which would otherwise break every read that lists this file): this file alone is
            # damaged, and each of its records that is still whole is kept (`salvage_records`).
            kept, lost = salvage_records(raw)
            what = "nested too deep to parse" if isinstance(exc, RecursionError) else f"not valid JSON ({exc})"
            if lost:
                what += f"; {lost} damaged record(s) could not be read"
            salvage = {TASKS: kept} if kept else None
            raise Damaged(what, salvage=salvage) from None
        if not isinstance(data, dict) or not all(isinstance(t, dict) for t in data.values()):
            raise Damaged("not a TinyDB document")
        meta = data.get(_META, {}).get("1", {})
        version = meta.get("schema", SCHEMA_VERSION) if isinstance(meta, dict) else None
        if not isinstance(version, int) or isinstance(version, bool):
            raise Damaged(f"its schema version is {version!r}, not a number")
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the nbbgtask store {self.path} was written by a newer nbbgtask (schema "
                f"{version}, this one knows {SCHEMA_VERSION}); upgrade nbbgtask or use another home"
            )
        tasks = data.get(TASKS, {})
        faults = {key: problem for key, rec in tasks.items() if (problem := _record.fault(key, rec))}
        if faults:
            kept = {key: rec for key, rec in tasks.items() if key not in faults}
            first = next(iter(faults.values()))
            more = f" and {len(faults) - 1} more" if len(faults) > 1 else ""
            raise Damaged(f"{first}{more}", salvage={**data, TASKS: kept})
        return data

    def _read_file(self) -> tuple[tuple[int, int, int], bytes] | None:
        # Never through a symlink, and only a file of the user's (`nbbgtask.core.trust.open_owned`).
        try:
            fd = open_owned(self.path)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            return (st.st_ino, st.st_size, st.st_mtime_ns), f.read()

    def read(self) -> dict[str, Any] | None:
        if self.in_session:
            if self.session is None:
                got = self._read_file()
                self.session = self._parse(got[1]) if got else None
            return self.session
        if self.trust_stat:
            try:
                st = os.lstat(self.path)
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
        raw = _encode(data).encode()
        directory, name = os.path.split(self.path)
        # Only the holder of the file's lock (or the maker of a new task's file) writes it, so
        # one temp name per file is enough.
        try:
            atomic_write(self.path, raw, durable=self.durable, tmp=os.path.join(directory, f".{name}.tmp"))
        except OSError as exc:
            self.session = None
            self._cache = (None, None, None)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreError(f"cannot write the nbbgtask store {self.path}: {full_disk(directory, exc)}") from None
            raise StoreError(
                f"cannot write the nbbgtask store {self.path}: {exc.strerror or exc}. "
                f"The store is unchanged; free some space or fix the folder's permissions."
            ) from None
        if self.in_session:
            # ``data`` came from a parse made under the lock, so no reader shares it yet.
            self.session = data
            self._cache = (None, raw, data)
        else:
            self._cache = (None, None, None)

    def begin_session(self) -> bool:
        """Start a read-modify-write: the file is parsed anew once, then that copy is reused.
        ``False`` if one is already open (the caller that opened it ends it)."""
        if self.in_session:
            return False
        self.session, self.in_session = None, True
        return True

    def end_session(self) -> None:
        self.session, self.in_session = None, False

    def set_aside(self, stamp: str) -> tuple[str, int] | None:
        """Move this damaged file to ``<path>.damaged-<stamp>`` and put in its place what can be
        saved of it; ``(where it went, how many records were kept)``, or ``None`` if it reads
        well now (someone else replaced it already).  The caller holds its lock and session."""
        self.session = None
        try:
            self.read()
            return None
        except Damaged as damage:
            salvage = damage.salvage
        aside = f"{self.path}.damaged-{stamp}"
        os.replace(self.path, aside)
        self.session = None
        kept = 0
        if salvage and salvage.get(TASKS):
            self.write(salvage)
            kept = len(salvage[TASKS])
        self.session = None
        return aside, kept

    def close(self) -> None:
        pass


def full_disk(directory: str, exc: OSError) -> str:
    """What to say when a write found no room: which disk is full, and what to do."""
    mount = os.path.realpath(directory)
    while not os.path.ismount(mount) and mount != os.path.dirname(mount):
        mount = os.path.dirname(mount)
    try:
        st = os.statvfs(directory)
        free = f"{st.f_bavail * st.f_frsize:,} bytes free"
    except OSError:
        free = "free space unknown"
    what = "the disk quota is used up" if exc.errno == errno.EDQUOT else "the disk is full"
    return (
        f"{what} ({exc.strerror}; the file system mounted at {mount}, {free}). The store is "
        f"unchanged and no new task is started; free some space there (bg.prune() forgets "
        f"finished tasks with their logs and results)."
    )


#: one encoder for every write (json.dumps would make a new one each time)
_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode




class _TaskTable(Table):
    """Tasks keyed by their own string ids, so a lookup by id is one dict access."""

    document_id_class = str  # type: ignore[assignment]


class _DB(TinyDB):
    table_class = _TaskTable


def open_table(path: str, storage_class: type[AtomicJSONStorage] = AtomicJSONStorage, **storage: Any) -> Any:
    # Typed Any: TinyDB's hints say document ids are ints, ours are strings (see _TaskTable).
    return _DB(path, storage=storage_class, **storage).table(TASKS, cache_size=0)


def storage_of(table: Table) -> AtomicJSONStorage:
    return table.storage  # type: ignore[return-value]


