"""Reading what is left of a store file that does not parse: every intact task record, one by one.

A store file is one JSON document, ``{"tasks":{"<id>":{...},"<id>":{...}},"_meta":{...}}``, so one
bad byte (invalid UTF-8, a cut end, a record nested past the parser's depth) fails the whole
parse.  The records themselves are independent: each starts at its 32-hex-digit id and is read
here on its own (`json.JSONDecoder.raw_decode`); one that does not read, or reads but is not a
sound task record (`nbbgtask.core.record.fault`), or holds a byte that was not UTF-8, is counted
as lost and the scan goes on at the next id.
"""

from __future__ import annotations

import json
import re
from typing import Any

from nbbgtask.core import record as _record

__all__ = ["salvage_records"]

#: where a record may start: its id as a key, then its object
_START = re.compile(r'"([0-9a-f]{32})":\{')
#: what a byte that was not UTF-8 becomes when decoded with ``surrogateescape``
_NOT_UTF8 = re.compile("[\udc80-\udcff]")
_decoder = json.JSONDecoder()


def salvage_records(raw: bytes) -> tuple[dict[str, Any], int]:
    """The intact task records of a damaged store file's bytes, by id, and how many were lost."""
    text = raw.decode("utf-8", errors="surrogateescape")
    kept: dict[str, Any] = {}
    lost: set[str] = set()
    pos = 0
    while (found := _START.search(text, pos)) is not None:
        key, begin = found.group(1), found.end() - 1
        try:
            value, end = _decoder.raw_decode(text, begin)
        except (ValueError, RecursionError):
            lost.add(key)
            pos = found.end()
            continue
        if _NOT_UTF8.search(text, begin, end) or _record.fault(key, value) is not None:
            lost.add(key)
        else:
            kept[key] = value
        pos = end
    return kept, len(lost - kept.keys())
