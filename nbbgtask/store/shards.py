"""How the history is spread over files: 64 shards, chosen by a task's id."""

from __future__ import annotations

import zlib

__all__ = ["HISTORY_SHARDS", "shard_of"]

#: the history's shards (and the store's stripe locks): one is chosen by a task's id
HISTORY_SHARDS = 64


def shard_of(task_id: str) -> int:
    try:
        return int(task_id[:2], 16) % HISTORY_SHARDS
    except ValueError:
        return zlib.crc32(task_id.encode("utf-8", "surrogatepass")) % HISTORY_SHARDS
