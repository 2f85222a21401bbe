"""Reading the end of a task's log: `last_lines` (``status.log(tail=N)``, ``nbbgtask logs -n``),
and `Tail`, what a task's bar shows under it: the tail of its log and its outputs, in order,
bounded (the outputs file's format is `nbbgtask.store.outputs`).  Both read from the end, so a
log of gigabytes costs what its last lines do."""

from __future__ import annotations

import codecs
import os
from pathlib import Path
from typing import Any

from nbbgtask.core.trust import open_owned
from nbbgtask.store.files import log_path, outputs_path
from nbbgtask.store.outputs import MAX_FILE, STARTED_NOTE, parse_lines

__all__ = ["TAIL_BYTES", "TAIL_DISPLAYS", "TAIL_LINES", "Tail", "last_lines", "LAST_LINES_BYTES"]


# -- reading them back ---------------------------------------------------------------------------


#: `last_lines` returns at most this many bytes of a log, however long its lines
LAST_LINES_BYTES = 1024 * 1024
_BLOCK = 65536


def last_lines(path: Path | str, lines: int, max_bytes: int = LAST_LINES_BYTES) -> str:
    """The last ``lines`` lines of a log, read backwards in blocks (each byte once), and at most
    ``max_bytes`` of them: a longer tail (a ``\r`` progress meter, one huge print) starts with a
    line saying how much before it was left out."""
    if lines <= 0:
        return ""
    fd = open_owned(path)
    try:
        pos = os.fstat(fd).st_size
        blocks: list[bytes] = []
        newlines = total = 0
        while pos > 0 and newlines <= lines and total < max_bytes:
            step = min(_BLOCK, pos, max_bytes - total)
            pos -= step
            block = os.pread(fd, step, pos)
            blocks.append(block)
            newlines += block.count(b"\n")
            total += len(block)
    finally:
        os.close(fd)
    kept = b"".join(reversed(blocks)).decode("utf-8", errors="replace").splitlines(keepends=True)[-lines:]
    if pos > 0 and newlines <= lines:  # the byte bound, not the line count, ended the read
        kept.insert(0, f"[nbbgtask: {pos:,} earlier bytes of this log are not shown: the tail is held to {max_bytes:,} bytes]\n")
    return "".join(kept)


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
