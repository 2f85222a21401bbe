"""Pages of the finished tasks, newest first, that cost the same at 100,000 tasks as at 100.

The history is spread over files (the store's shards); each file's records are indexed here by
``(created, id)``, and an index is made again only for a file whose parsed records changed (the
store hands out the same object while a file is unchanged).  A page is then, per file, a bisection
to the cursor, and a merge of the files' records from there back, newest first, stopped after
``limit``: about ``limit`` steps, at any size of the history.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

__all__ = ["Key", "HistoryIndex", "key_of"]

#: where a task sits in the order of the listing: newest first by creation, then by id
Key = tuple[float, str]


def key_of(record: Mapping[str, Any]) -> Key:
    return (record["created"], record["id"])


class _FileIndex:
    """One history file's records, their keys sorted oldest first, overall and by name and state."""

    __slots__ = ("all", "by_name", "by_state")

    def __init__(self, records: Mapping[str, Mapping[str, Any]]) -> None:
        self.all: list[Key] = sorted(key_of(record) for record in records.values())
        self.by_name: dict[str, list[Key]] = {}
        self.by_state: dict[str, list[Key]] = {}
        for key in self.all:
            record = records[key[1]]
            self.by_name.setdefault(record["name"], []).append(key)
            self.by_state.setdefault(record["state"], []).append(key)


class HistoryIndex:
    """The finished tasks of one store, by file, for `page`.  Not thread-safe: one caller at a time."""

    def __init__(self) -> None:
        #: file name -> (the records it was made from, their index)
        self._files: dict[str, tuple[Mapping[str, Mapping[str, Any]], _FileIndex]] = {}

    def update(self, files: Iterable[tuple[str, Mapping[str, Mapping[str, Any]]]]) -> None:
        """Take the history's files as they are now: ``(name, records by id)``; only a file whose
        records are a new object is indexed again."""
        kept = {}
        for name, records in files:
            made = self._files.get(name)
            if made is None or made[0] is not records:
                made = (records, _FileIndex(records))
            kept[name] = made
        self._files = kept

    def __contains__(self, task_id: object) -> bool:
        return any(task_id in records for records, _ in self._files.values())

    def page(self, before: Key | None, limit: int, state: str | None, name: str | None) -> list[Mapping[str, Any]]:
        """The newest ``limit`` finished records older than ``before`` (``None``: from the newest),
        in ``state`` and named ``name`` where given; newest first.  The records are the store's
        own: not to be changed."""
        walks = [self._walk(records, index, before, state, name) for records, index in self._files.values()]
        found: dict[str, Mapping[str, Any]] = {}
        # The files' walks merged newest first, lazily: about ``limit`` steps, whatever the history's size.
        for _, record in heapq.merge(*walks, key=lambda item: item[0], reverse=True):
            # A task is in two files of its shard only after a crash cut its move short: it counts once.
            found.setdefault(record["id"], record)
            if len(found) == limit:
                break
        return list(found.values())

    @staticmethod
    def _walk(
        records: Mapping[str, Mapping[str, Any]], index: _FileIndex, before: Key | None, state: str | None, name: str | None
    ) -> Iterator[tuple[Key, Mapping[str, Any]]]:
        """One file's matching records older than ``before``, newest first."""
        if name is not None:
            keys = index.by_name.get(name, [])
        elif state is not None:
            keys = index.by_state.get(state, [])
        else:
            keys = index.all
        for i in range((len(keys) if before is None else bisect_left(keys, before)) - 1, -1, -1):
            record = records[keys[i][1]]
            if state is None or record["state"] == state:
                yield keys[i], record
