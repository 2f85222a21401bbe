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

from nbbgtask.core.errors import StoreError
from nbbgtask.core.trust import open_owned
from nbbgtask.store.files import atomic_write
from nbbgtask.store.locks import held
from nbbgtask.store.shards import SETTLE_NS, shard_of
from nbbgtask.store.storage import TASKS, AtomicJSONStorage
from nbbgtask.store.summaries import Summary

__all__ = ["INDEX_SUFFIX", "INDEX_VERSION", "KEYS", "ShardStorage", "Stub", "index_path", "signature", "load", "write_index"]

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


def _digest(body: bytes) -> bytes:
    return hashlib.sha256(body).hexdigest()[:32].encode()


#: the fields a lookup sorts and filters by, kept in an index's header for each task it holds
KEYS = ("name", "state", "created", "finished")


class Stub(dict):  # type: ignore[type-arg]
    """A task as an index's header holds it: the fields a lookup sorts and filters by (`KEYS`);
    `full` decodes the whole record, kept on a line of its own further down the index."""

    __slots__ = ("_line", "_record")

    def __init__(self, fields: dict[str, Any], line: tuple[bytes, int, int]) -> None:
        super().__init__(fields)
        self._line = line
        self._record: dict[str, Any] | None = None

    def full(self) -> dict[str, Any]:
        if self._record is None:
            raw, start, end = self._line
            record = json.loads(raw[start:end])
            if not isinstance(record, dict) or record.get("id") != self["id"]:
                raise ValueError(f"the index line of task {self['id']} holds another record")
            self._record = record
        return dict(self._record)


def write_index(shard_path: str, data: dict[str, Any] | None, st: os.stat_result) -> None:
    """Write the index of the main file ``shard_path`` (its ``data`` as written, its stat ``st``);
    the caller holds the shard's lock.  An index that cannot be written is left out: readers then
    read the shard.

    Three parts: a line with the digest of the rest; a header line (JSON) with the lists of the
    `Summary`, each task in it by its id and `KEYS`, and where its record is; then one record a
    line.  A reader decodes the header, and only the records it answers with."""
    summary = Summary(((data or {}).get(TASKS) or {}).values())
    records: dict[str, Any] = {}
    for record in (*summary.by_created, *summary.by_finished, *(r for s in summary.by_name.values() for r in s.values())):
        records[record["id"]] = record
    lines, keys, at = [], {}, 0
    try:
        for task_id, record in records.items():
            line = json.dumps(record, separators=(",", ":"), allow_nan=False).encode() + b"\n"
            keys[task_id] = [*(record.get(k) for k in KEYS), at, at + len(line)]
            lines.append(line)
            at += len(line)
    except (TypeError, ValueError):  # a record that is no strict JSON (NaN, from a foreign file): no index
        _remove(index_path(shard_path))
        return
    header = {
        "version": INDEX_VERSION, "of": fingerprint(st), "count": summary.count, "tasks": keys,
        "by_created": [r["id"] for r in summary.by_created], "by_finished": [r["id"] for r in summary.by_finished],
        "by_name": {name: {state: r["id"] for state, r in states.items()} for name, states in summary.by_name.items()},
        "counts": [[name, state, n] for (name, state), n in summary.counts.items()],
    }
    try:
        encoded = json.dumps(header, separators=(",", ":"), allow_nan=False).encode() + b"\n" + b"".join(lines)
    except (TypeError, ValueError):
        _remove(index_path(shard_path))
        return
    raw = _digest(encoded) + b"\n" + encoded
    path = index_path(shard_path)
    try:
        atomic_write(path, raw, durable=False, tmp=os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp"))
    except OSError:
        _remove(path)


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _checked(raw: bytes, shard: int, of: list[int]) -> Summary | None:
    """The summary an index holds, if it is whole (its digest), of this version, made from the
    file ``of`` names, and each task in it is of shard ``shard``; else ``None``.  (Each record was
    checked when the shard was read or written: the digest vouches that it is unchanged since.)"""
    digest, _, encoded = raw.partition(b"\n")
    if digest != _digest(encoded):
        return None
    try:
        line, _, rest = encoded.partition(b"\n")
        header = json.loads(line)
        if header.get("version") != INDEX_VERSION or header.get("of") != of:
            return None
        stubs: dict[str, Stub] = {}
        for task_id, (name, state, created, finished, start, end) in header["tasks"].items():
            if shard_of(task_id) != shard or not isinstance(created, (int, float)) or not isinstance(name, str):
                return None
            fields = {"id": task_id, "name": name, "state": state, "created": created, "finished": finished}
            stubs[task_id] = Stub(fields, (rest, start, end))
        by_name = {name: {state: stubs[i] for state, i in states.items()} for name, states in header["by_name"].items()}
        counts = {(str(name), str(state)): int(n) for name, state, n in header["counts"]}
        return Summary.restore(int(header["count"]), [stubs[i] for i in header["by_created"]],
                               [stubs[i] for i in header["by_finished"]], by_name, counts)  # type: ignore[arg-type]
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
