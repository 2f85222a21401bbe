"""A history shard's index: its `Summary` kept in a small file beside its main file, so that a new
process answers ``tasks(limit=20)`` and ``find_last`` from 64 small files, not the history.

``history/NN.index.json`` is written by `ShardStorage` in the same locked write as the shard's
main file ``history/NN.json``, and names the file it was made from: its (inode, size, mtime).  The
main file stays the record: an index is used only while that file is still the one it names, it
is older than `SETTLE_NS` (a later write within the same clock tick could not be told apart), and
its own digest and records check out; else the shard is read and the index made again (by
whoever reads it, under the shard's lock, if the home can be written).  The old index is removed
before the main file is replaced, so a crash between the two writes leaves none, never a stale one.
A digest guards against accidents (a torn or hand-edited file, another program's write), not a
forger: whoever can write the index can write the shard itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from typing import Any

from nbbgtask.core import record as _record
from nbbgtask.core.errors import StoreError
from nbbgtask.core.trust import open_owned
from nbbgtask.store.files import atomic_write
from nbbgtask.store.locks import held
from nbbgtask.store.shards import SETTLE_NS, shard_of
from nbbgtask.store.storage import TASKS, AtomicJSONStorage
from nbbgtask.store.summaries import Summary

__all__ = ["INDEX_SUFFIX", "INDEX_VERSION", "ShardStorage", "index_path", "signature", "load", "write_index"]

#: the name of a shard's index file, after its two digits
INDEX_SUFFIX = ".index.json"
#: bumped when an index's layout changes; an index of another version is made again
INDEX_VERSION = 1
#: an index bigger than this is not read (a shard of many names): the shard is read instead
MAX_INDEX_BYTES = 4 << 20


def index_path(shard_path: str) -> str:
    return shard_path[: -len(".json")] + INDEX_SUFFIX


def fingerprint(st: os.stat_result) -> list[int]:
    """What names one version of a file: a write replaces it (a new inode) and stamps its time."""
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def write_index(shard_path: str, data: dict[str, Any] | None, st: os.stat_result) -> None:
    """Write the index of the main file ``shard_path`` (its ``data`` as written, its stat ``st``);
    the caller holds the shard's lock.  An index that cannot be written is left out: readers then
    read the shard."""
    summary = Summary(((data or {}).get(TASKS) or {}).values())
    records: dict[str, Any] = {}
    for record in (*summary.by_created, *summary.by_finished, *(r for s in summary.by_name.values() for r in s.values())):
        records[record["id"]] = record
    body = {
        "version": INDEX_VERSION, "of": fingerprint(st), "count": summary.count, "records": records,
        "by_created": [r["id"] for r in summary.by_created], "by_finished": [r["id"] for r in summary.by_finished],
        "by_name": {name: {state: r["id"] for state, r in states.items()} for name, states in summary.by_name.items()},
    }
    raw = json.dumps({**body, "digest": _digest(body)}, separators=(",", ":"), allow_nan=False).encode()
    path = index_path(shard_path)
    try:
        atomic_write(path, raw, durable=False, tmp=os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp"))
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _checked(raw: bytes, shard: int, of: list[int]) -> Summary | None:
    """The summary an index holds, if it is whole, of this version, made from the file ``of``
    names, and every record in it is a record of shard ``shard``; else ``None``."""
    try:
        found = json.loads(raw)
        body = {k: v for k, v in found.items() if k != "digest"}
        if body.get("version") != INDEX_VERSION or body.get("of") != of or found.get("digest") != _digest(body):
            return None
        records = body["records"]
        if any(_record.fault(key, rec) or shard_of(key) != shard for key, rec in records.items()):
            return None
        by_name = {name: {state: records[i] for state, i in states.items()} for name, states in body["by_name"].items()}
        return Summary.restore(int(body["count"]), [records[i] for i in body["by_created"]],
                               [records[i] for i in body["by_finished"]], by_name)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def signature(shard_path: str) -> tuple[tuple[int, ...] | None, bool]:
    """The main file's signature (``None``: there is no such file), and whether it is settled:
    written longer than `SETTLE_NS` ago, so that an index naming it was made from it."""
    try:
        st = os.lstat(shard_path)
    except FileNotFoundError:
        return None, False
    return tuple(fingerprint(st)), time.time_ns() - st.st_mtime_ns >= SETTLE_NS


def load(shard_path: str, shard: int, sig: tuple[int, ...]) -> Summary | None:
    """The summary of the main file of shard ``shard`` from its index, if the index names the
    settled file of signature ``sig`` and checks out; ``None``: read the shard."""
    try:
        fd = open_owned(index_path(shard_path))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if os.fstat(fd).st_size > MAX_INDEX_BYTES:
            return None
        raw = f.read()
    return _checked(raw, shard, list(sig))


class ShardStorage(AtomicJSONStorage):
    """A history shard's main file: every write of it also writes its index (`write_index`),
    under the same lock, and the old index goes before the file is replaced."""

    def write(self, data: dict[str, Any]) -> None:
        index = index_path(self.path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(index)
        super().write(data)
        try:
            st = os.lstat(self.path)
        except OSError:
            return
        write_index(self.path, data, st)

    def last_read(self) -> tuple[Any, Any]:
        """The signature of the copy `read` returned last, and that copy (both ``None`` if unknown)."""
        sig, _, data = self._cache
        return sig, data

    def repair(self, lock: Any, data: Any, sig: Any) -> None:
        """Write the index of ``data``, read from the main file when its signature was ``sig``,
        if it is still that file (under ``lock``, its shard's).  A home that cannot be written is
        read all the same, without an index."""
        try:
            with held(lock):
                st = os.lstat(self.path)
                if sig is not None and tuple(fingerprint(st)) == tuple(sig) and time.time_ns() - st.st_mtime_ns >= SETTLE_NS:
                    write_index(self.path, data, st)
        except (OSError, StoreError):
            pass
