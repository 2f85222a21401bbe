"""What the lookups need from one history shard, so that they do not read every finished task.

`tasks(limit=N)`, `find_last(name=...)` and the monitor's recent list ask for the newest finished
tasks, overall or of one name and state.  A `Summary` holds exactly that for one shard: its
newest `DEPTH` tasks by creation and by end, and its newest task of each (name, state).  The
store keeps one per shard and makes it again only when the shard's file changed (one stat tells),
so a lookup costs the same at 100,000 finished tasks as at none; the global answer is the newest
among the 64 summaries (the global newest N are each among their own shard's newest N).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import Any

__all__ = ["DEPTH", "Summary", "count", "newest"]

#: how many of a shard's newest tasks a summary keeps; tasks(limit=N) is answered from the
#: summaries for N up to this, and reads every record beyond it
DEPTH = 64


def _finished_key(record: dict[str, Any]) -> float:
    return record.get("finished") or record["created"]


class Summary:
    __slots__ = ("by_created", "by_finished", "by_name", "complete", "counts")

    def __init__(self, records: Iterable[dict[str, Any]]) -> None:
        records = list(records)
        #: every record of the shard is in the newest lists (a shard of DEPTH or fewer)
        self.complete = len(records) <= DEPTH
        self.by_created = heapq.nlargest(DEPTH, records, key=lambda r: r["created"])
        self.by_finished = heapq.nlargest(DEPTH, records, key=_finished_key)
        #: name -> state -> the newest such record (by creation)
        self.by_name: dict[str, dict[str, dict[str, Any]]] = {}
        #: (name, state) -> how many of the shard's tasks have it
        self.counts: dict[tuple[str, str], int] = {}
        for record in records:
            key = (record["name"], record["state"])
            self.counts[key] = self.counts.get(key, 0) + 1
            states = self.by_name.setdefault(record["name"], {})
            known = states.get(record["state"])
            if known is None or record["created"] > known["created"]:
                states[record["state"]] = record


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
    summaries: list[Summary], limit: int, states: set[str] | None, name: str | None, by: str = "created"
) -> list[dict[str, Any]] | None:
    """The newest ``limit`` finished records in ``states`` (None: any) named ``name`` (None: any),
    newest first by ``by`` ("created" or "finished"); ``None`` if the summaries cannot tell
    (more than they keep: read the whole history then)."""
    key = (lambda r: r["created"]) if by == "created" else _finished_key
    if name is not None:
        if limit > 1 or by != "created":
            return None
        found = [
            record
            for summary in summaries
            for state, record in summary.by_name.get(name, {}).items()
            if states is None or state in states
        ]
        return heapq.nlargest(1, found, key=key)
    chosen: list[dict[str, Any]] = []
    for summary in summaries:
        kept = summary.by_created if by == "created" else summary.by_finished
        matching = [r for r in kept if states is None or r["state"] in states]
        # A shard whose kept records run out before it has ``limit`` matches may hold more below
        # them, unless it was kept whole.
        if len(matching) < limit and not summary.complete:
            return None
        chosen.extend(matching[:limit])
    # A task is in two files of its shard only after a crash cut its move short: it counts once.
    unique = list({record["id"]: record for record in chosen}.values())
    return heapq.nlargest(limit, unique, key=key)
