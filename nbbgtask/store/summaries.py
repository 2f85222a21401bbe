"""What the lookups need from one history shard, so that they do not read every finished task.

`tasks(limit=N)`, `find_last(name=...)` and the monitor's recent list ask for the newest finished
tasks, overall or of one name and state.  A `Summary` holds exactly that for one shard: its
newest `DEPTH` tasks by creation and by end, and its newest task of each (name, state).  The
store keeps one per shard and makes it again only when the shard's file changed (one stat tells),
and a shard's main file keeps its summary in a small index file beside it (`nbbgtask.store.index`),
so a lookup costs the same at 100,000 finished tasks as at none, in a new process too; the global
answer is the newest among the 64 summaries (the global newest N are each among their own
shard's newest N).  A shard whose summary cannot tell (a deeper page, a bigger limit) is read
whole through the summary's ``source``, and only that shard.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["DEPTH", "Summary", "count", "newest", "created_key", "finished_key"]

#: how many of a shard's newest tasks a summary keeps; tasks(limit=N) is answered from the
#: summaries for N up to this, and reads the shards it needs beyond it
DEPTH = 64


def created_key(record: dict[str, Any]) -> tuple[float, str]:
    """Newest first by creation; the id breaks ties, so that pages (``before=``) never overlap."""
    return record["created"], record["id"]


def finished_key(record: dict[str, Any]) -> float:
    return record.get("finished") or record["created"]  # type: ignore[no-any-return]


class Summary:
    __slots__ = ("by_created", "by_finished", "by_name", "complete", "count", "counts", "source")

    def __init__(self, records: Iterable[dict[str, Any]] = ()) -> None:
        records = list(records)
        #: how many tasks the shard holds
        self.count = len(records)
        #: every record of the shard is in the newest lists (a shard of DEPTH or fewer)
        self.complete = len(records) <= DEPTH
        self.by_created = heapq.nlargest(DEPTH, records, key=created_key)
        self.by_finished = heapq.nlargest(DEPTH, records, key=finished_key)
        #: name -> state -> the newest such record (by creation)
        self.by_name: dict[str, dict[str, dict[str, Any]]] = {}
        #: (name, state) -> how many of the shard's tasks have it (a listing's "N more")
        self.counts: dict[tuple[str, str], int] = {}
        for record in records:
            key = (record["name"], record["state"])
            self.counts[key] = self.counts.get(key, 0) + 1
            states = self.by_name.setdefault(record["name"], {})
            known = states.get(record["state"])
            if known is None or created_key(record) > created_key(known):
                states[record["state"]] = record
        #: every record of the shard, read anew, for a question the kept ones cannot answer
        self.source: Callable[[], Iterable[dict[str, Any]]] | None = None

    @classmethod
    def restore(
        cls,
        count: int,
        by_created: list[dict[str, Any]],
        by_finished: list[dict[str, Any]],
        by_name: dict[str, dict[str, dict[str, Any]]],
        counts: dict[tuple[str, str], int],
    ) -> Summary:
        """A summary as an index file kept it (`nbbgtask.store.index`)."""
        made = cls()
        made.count, made.complete, made.counts = count, count <= DEPTH, counts
        made.by_created, made.by_finished, made.by_name = by_created, by_finished, by_name
        return made


def count(summaries: list[Summary], states: set[str] | None, name: str | None) -> int:
    """How many finished tasks are in ``states`` (None: any) and named ``name`` (None: any); a
    task that a crash left in both files of its shard counts twice."""
    return sum(
        n
        for summary in summaries
        for (task_name, state), n in summary.counts.items()
        if (states is None or state in states) and (name is None or task_name == name)
    )


def newest(
    summaries: list[Summary],
    limit: int,
    states: set[str] | None,
    name: str | None,
    by: str = "created",
    before: tuple[float, str] | None = None,
) -> list[dict[str, Any]] | None:
    """The newest ``limit`` finished records in ``states`` (None: any) named ``name`` (None: any),
    newest first by ``by`` ("created" or "finished"), created before ``before`` (a record's
    ``(created, id)``; by creation only); ``None`` if the summaries cannot tell and a shard has
    no ``source`` to read it whole."""
    key: Callable[[dict[str, Any]], Any] = created_key if by == "created" else finished_key

    def wanted(r: dict[str, Any]) -> bool:
        return ((states is None or r["state"] in states) and (name is None or r["name"] == name)
                and (before is None or created_key(r) < before))

    chosen: list[dict[str, Any]] = []
    for summary in summaries:
        if name is not None and limit == 1 and by == "created" and before is None:
            # find_last(name=...): the newest of each state is kept for every name
            chosen.extend(r for s, r in summary.by_name.get(name, {}).items() if states is None or s in states)
            continue
        kept = summary.by_created if by == "created" else summary.by_finished
        matching = [r for r in kept if wanted(r)]
        # A shard whose kept records run out before it has ``limit`` matches may hold more below
        # them, unless it was kept whole: then it is read whole, if it can be.
        if len(matching) < limit and not summary.complete:
            if summary.source is None:
                return None
            matching = heapq.nlargest(limit, (r for r in summary.source() if wanted(r)), key=key)
        chosen.extend(matching[:limit])
    # A task is in two files of its shard only after a crash cut its move short: it counts once.
    unique = list({record["id"]: record for record in chosen}.values())
    return heapq.nlargest(limit, unique, key=key)
