"""Reading a task's log back, every way bounded: `last_lines` (``status.log(tail=N)``, ``nbbgtask
logs -n``, the monitor's Log), `read_log` (``status.log()``), `follow` (``nbbgtask logs -f``: by
byte offset), and `Tail`, what a task's bar shows under it: the tail of its log and its outputs, in
order (the outputs file's format is `nbbgtask.store.outputs`).  The tail reads from the end, so a
log of gigabytes costs what its last lines do.

A log over its cap has a hole where its middle was (`nbbgtask.task.logcap`); every reader here
skips holes (``SEEK_DATA``/``SEEK_HOLE``), so none reads the gigabytes of zeros a hole would give."""

from __future__ import annotations

import codecs
import errno
import os
from pathlib import Path
from typing import Any

from nbbgtask.core.trust import open_owned
from nbbgtask.store.files import log_path, outputs_path
from nbbgtask.store.outputs import MAX_FILE, STARTED_NOTE, parse_lines

__all__ = [
    "TAIL_BYTES", "TAIL_DISPLAYS", "TAIL_LINES", "Tail", "last_lines", "LAST_LINES_BYTES", "read_log", "follow",
    "FOLLOW_BYTES",
]


# -- reading them back ---------------------------------------------------------------------------


#: `last_lines` returns at most this many bytes of a log, however long its lines
LAST_LINES_BYTES = 1024 * 1024
_BLOCK = 65536


#: at most this many separate stretches of data are looked for in a log (a capped log has two)
_MAX_RANGES = 64


def _data_ranges(fd: int, start: int, size: int) -> list[tuple[int, int]]:
    """The stretches ``[begin, end)`` of ``fd`` between ``start`` and ``size`` that hold data, not a
    hole; the whole span where the file system cannot tell (two ``lseek`` calls for a plain file)."""
    ranges: list[tuple[int, int]] = []
    pos = start
    while pos < size:
        if len(ranges) >= _MAX_RANGES:
            ranges.append((pos, size))
            break
        try:
            begin = os.lseek(fd, pos, os.SEEK_DATA)
            end = min(os.lseek(fd, begin, os.SEEK_HOLE), size)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nothing but a hole from here on
                break
            return [*ranges, (pos, size)]  # no hole support here: all of it is data
        if begin >= size:
            break
        ranges.append((begin, end))
        pos = end
    return ranges


def last_lines(path: Path | str, lines: int, max_bytes: int = LAST_LINES_BYTES) -> str:
    """The last ``lines`` lines of a log, read backwards in blocks (each byte once), and at most
    ``max_bytes`` of them: a longer tail (a ``\r`` progress meter, one huge print) starts with a
    line saying how much before it was left out."""
    if lines <= 0:
        return ""
    fd = open_owned(path)
    try:
        ranges = _data_ranges(fd, 0, os.fstat(fd).st_size)
        blocks: list[bytes] = []
        newlines = total = before = 0
        for index in range(len(ranges) - 1, -1, -1):
            begin, pos = ranges[index]
            while pos > begin and newlines <= lines and total < max_bytes:
                step = min(_BLOCK, pos - begin, max_bytes - total)
                pos -= step
                block = os.pread(fd, step, pos)
                blocks.append(block)
                newlines += block.count(b"\n")
                total += len(block)
            if newlines > lines or total >= max_bytes:
                before = pos - begin + sum(e - b for b, e in ranges[:index])
                break
    finally:
        os.close(fd)
    kept = b"".join(reversed(blocks)).decode("utf-8", errors="replace").splitlines(keepends=True)[-lines:]
    if before > 0 and newlines <= lines:  # the byte bound, not the line count, ended the read
        kept.insert(0, f"[nbbgtask: {before:,} earlier bytes of this log are not shown: the tail is held to {max_bytes:,} bytes]\n")
    return "".join(kept)


def read_log(path: Path | str, max_bytes: int) -> bytes:
    """The whole log, holes skipped; one of more than ``max_bytes`` gives its first and last
    ``max_bytes // 2`` with a line between saying how much was left out."""
    fd = open_owned(path)
    try:
        ranges = _data_ranges(fd, 0, os.fstat(fd).st_size)
        total = sum(end - begin for begin, end in ranges)
        if total <= max_bytes:
            return _window(fd, ranges, 0, total)
        half = max_bytes // 2
        head, tail = _window(fd, ranges, 0, half), _window(fd, ranges, total - half, total)
    finally:
        os.close(fd)
    note = f"\n[nbbgtask: {total - 2 * half:,} bytes of this log are not shown here: it is read up to {max_bytes:,} bytes]\n"
    return head + note.encode() + tail


def _window(fd: int, ranges: list[tuple[int, int]], lo: int, hi: int) -> bytes:
    """Bytes ``lo`` to ``hi`` of the log's data (its holes left out)."""
    parts, seen = [], 0
    for begin, end in ranges:
        start, stop = max(lo, seen), min(hi, seen + end - begin)
        if start < stop:
            parts.append(_pread_all(fd, begin + start - seen, stop - start))
        seen += end - begin
    return b"".join(parts)


def _pread_all(fd: int, offset: int, length: int) -> bytes:
    chunks = []
    while length > 0:
        chunk = os.pread(fd, min(length, 1 << 24), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
        length -= len(chunk)
    return b"".join(chunks)


#: `follow` returns at most this many bytes per call
FOLLOW_BYTES = 1024 * 1024


def follow(path: Path | str, offset: int, max_bytes: int = FOLLOW_BYTES) -> tuple[bytes, int]:
    """What the log holds from byte ``offset`` on (at most ``max_bytes``), and the offset to ask
    from next time: ``nbbgtask logs -f`` calls this in a loop and decodes the bytes itself (an
    incremental decoder), so an invalid byte never moves the offset and no line is ever lost.
    Where the log was cut at its cap since the last call (the offset now falls in a hole), the
    answer starts with a line saying how much was dropped, and the data after it."""
    fd = open_owned(path)
    try:
        size = os.fstat(fd).st_size
        if offset >= size:
            return b"", min(offset, size)  # a log is never truncated; a smaller one is another file
        ranges = _data_ranges(fd, offset, size)
        if not ranges:
            return b"", offset
        begin, end = ranges[0]
        data = _pread_all(fd, begin, min(end - begin, max_bytes))
    finally:
        os.close(fd)
    note = b""
    if begin > offset:
        note = f"\n[nbbgtask: {begin - offset:,} bytes of this log were dropped before they were read (log_max)]\n".encode()
    return note + data, begin + len(data)


#: the printed output shown under a bar: at most this many lines ...
TAIL_LINES = 100
#: ... and this many bytes (the whole log is one call away: status.log())
TAIL_BYTES = 16 * 1024
#: displays kept under a bar; older ones go, with a note
TAIL_DISPLAYS = 50
#: more new log than this in one read is skipped unread (only the tail is shown anyway)
SKIP_AFTER = 4 * TAIL_BYTES


class Tail:
    """What the bar of one task shows under it: the tail of its log and its outputs, in order.

    `read` takes what was appended to the two files since the last call (a stat each, then a read
    from the last offset) and says whether anything changed; `outputs` is the list of nbformat
    outputs to show.  Bounded: `TAIL_LINES` / `TAIL_BYTES` of printed output, `TAIL_DISPLAYS`
    displays, with a note of what was left out and where to find it all.
    """

    def __init__(self, home: Path | str, task_id: str, short_id: str) -> None:
        self.log = str(log_path(home, task_id))
        self.path = str(outputs_path(home, task_id))
        self.short_id = short_id
        self._log_pos = 0
        self._out_pos = 0
        self._log_stat: tuple[int, int] | None = None
        self._out_stat: tuple[int, int] | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        #: ["text", str] and ["display", nbformat output, display_id]
        self._items: list[list[Any]] = []
        self._dropped_lines = 0
        self._dropped_bytes = 0
        self._dropped_displays = 0
        self._first = True

    @staticmethod
    def _stat(path: str) -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns

    def read(self) -> bool:
        """Take in what was appended since the last call; ``True`` if the outputs changed."""
        # The outputs first, then the log: every output read then has its offset within the log read.
        out_stat = self._stat(self.path)
        records: list[dict[str, Any]] = []
        if out_stat is not None and out_stat != self._out_stat:
            records = self._read_outputs(out_stat[0])
            self._out_stat = out_stat
        log_stat = self._stat(self.log)
        chunk = b""
        start = self._log_pos
        if log_stat is not None and log_stat != self._log_stat:
            chunk, start = self._read_log(log_stat[0])
            self._log_stat = log_stat
        if not chunk and not records:
            return False
        self._merge(start, chunk, records)
        self._bound()
        return True

    def _read_outputs(self, size: int) -> list[dict[str, Any]]:
        if size <= self._out_pos:
            return []
        try:
            with os.fdopen(open_owned(self.path), "rb") as f:
                f.seek(self._out_pos)
                raw = f.read(min(size - self._out_pos, MAX_FILE))
        except OSError:
            return []
        end = raw.rfind(b"\n") + 1
        self._out_pos += end
        return parse_lines(raw[:end])

    def _read_log(self, size: int) -> tuple[bytes, int]:
        if size <= self._log_pos:
            return b"", self._log_pos
        start = self._log_pos
        if size - start > SKIP_AFTER:  # only the tail is shown: skip the rest unread
            skipped = size - TAIL_BYTES - start
            self._dropped_bytes += skipped
            start += skipped
            self._decoder.reset()
        try:
            with os.fdopen(open_owned(self.log), "rb") as f:
                f.seek(start)
                chunk = f.read(size - start)
        except OSError:
            return b"", self._log_pos
        self._log_pos = start + len(chunk)
        if self._first:
            self._first = False
            if start == 0 and chunk.startswith(STARTED_NOTE):  # nbbgtask's note, not the task's
                cut = chunk.find(b"\n") + 1 or len(chunk)
                chunk, start = chunk[cut:], cut
        return chunk, start

    def _add_text(self, raw: bytes) -> None:
        text = self._decoder.decode(raw)
        if not text:
            return
        if self._items and self._items[-1][0] == "text":
            self._items[-1][1] += text
        else:
            self._items.append(["text", text])

    def _merge(self, start: int, chunk: bytes, records: list[dict[str, Any]]) -> None:
        pos = start
        for record in records:
            offset = record.get("offset")
            if offset is not None and offset > pos:
                cut = min(offset, start + len(chunk)) - start
                self._add_text(chunk[pos - start : cut])
                pos = start + cut
            self._add_record(record)
        self._add_text(chunk[pos - start :])

    def _add_record(self, record: dict[str, Any]) -> None:
        kind = record["kind"]
        if kind == "clear":
            self._items = []
            self._dropped_lines = self._dropped_bytes = self._dropped_displays = 0
            return
        output: dict[str, Any] = {
            "output_type": "execute_result" if kind == "result" else "display_data",
            "data": record.get("data") or {},
            "metadata": record.get("metadata") or {},
        }
        if kind == "result":
            output["execution_count"] = None
        display_id = record.get("display_id")
        if record.get("update") and display_id:
            for item in self._items:
                if item[0] == "display" and item[2] == display_id:
                    item[1] = output
            return
        self._items.append(["display", output, display_id])

    def _bound(self) -> None:
        texts = [item for item in self._items if item[0] == "text"]
        lines = sum(item[1].count("\n") for item in texts)
        size = sum(len(item[1]) for item in texts)
        for item in texts:
            if lines <= TAIL_LINES and size <= TAIL_BYTES:
                break
            text = item[1]
            # drop whole lines from the front of this text until the tail fits
            cut = 0
            while cut < len(text) and (lines > TAIL_LINES or size > TAIL_BYTES):
                end = text.find("\n", cut)
                end = len(text) if end < 0 else end + 1
                lines -= text.count("\n", cut, end)
                size -= end - cut
                self._dropped_lines += text.count("\n", cut, end)
                cut = end
            item[1] = text[cut:]
        self._items = [item for item in self._items if item[0] != "text" or item[1]]
        displays = [item for item in self._items if item[0] == "display"]
        extra = len(displays) - TAIL_DISPLAYS
        if extra > 0:
            gone = {id(item) for item in displays[:extra]}
            self._items = [item for item in self._items if id(item) not in gone]
            self._dropped_displays += extra

    def outputs(self) -> list[dict[str, Any]]:
        """What to show, as nbformat outputs: a note of what was left out, then the tail."""
        shown: list[dict[str, Any]] = []
        left_out = []
        if self._dropped_lines:
            left_out.append(f"{self._dropped_lines:,} earlier lines")
        if self._dropped_bytes:
            left_out.append(f"{self._dropped_bytes / 1024:,.0f} KiB more of printed output")
        if self._dropped_displays:
            left_out.append(f"{self._dropped_displays} earlier displays")
        if left_out:
            note = (
                f"… {' and '.join(left_out)} not shown here; the whole log: status.log(), "
                f"or nbbgtask logs {self.short_id}\n"
            )
            shown.append({"output_type": "stream", "name": "stderr", "text": note})
        for item in self._items:
            if item[0] == "text":
                shown.append({"output_type": "stream", "name": "stdout", "text": item[1]})
            else:
                shown.append(item[1])
        return shown
