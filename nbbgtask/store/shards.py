"""How the history is spread over files: 64 shards, chosen by a task's id."""

from __future__ import annotations

import zlib

__all__ = ["HISTORY_SHARDS", "RECENT_SUFFIX", "SETTLE_NS", "shard_of"]

#: the history's shards (and the store's stripe locks): one is chosen by a task's id
HISTORY_SHARDS = 64
#: the name of a shard's recent file, after its two digits
RECENT_SUFFIX = ".recent.json"
#: A folder changed less than this long ago may change again within the same timestamp tick
#: (file times are taken from a coarse clock), so `Store.version` does not vouch for it yet.
SETTLE_NS = 50_000_000


def shard_of(task_id: str) -> int:
    try:
        return int(task_id[:2], 16) % HISTORY_SHARDS
    except ValueError:
        return zlib.crc32(task_id.encode("utf-8", "surrogatepass")) % HISTORY_SHARDS
