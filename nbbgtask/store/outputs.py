"""The file that keeps what a task displayed, ``outputs/<id>.jsonl``: its format, its writer, and
reading it back (the task writes it through `nbbgtask.task.outputs`; `nbbgtask.store.tail` shows it
under the bar; the command line and the server read it).

Printed output is not here: it goes to the task's log at the descriptor level (so C extensions and
subprocesses are captured), and the bar tails the log.  This file holds the rich outputs, one JSON
object a line, each appended with one write (a line without its newline is not read yet)::

    {"kind": "display" | "result" | "clear", "data": {mime type: value}, "metadata": {...},
     "offset": the log's size when it was produced, or null, "display_id": str | null,
     "update": bool, "time": seconds since the epoch}

``offset`` places it among the printed lines.  The file is data: it is parsed as JSON, never
unpickled, and a line that is not such an object is skipped.  It is bounded: a bundle bigger than
`MAX_RECORD` is kept as its text, and past `MAX_FILE` bytes further outputs are left out with a note.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nbbgtask.core.trust import open_owned
from nbbgtask.core.wire import write_all
from nbbgtask.store.files import log_path, outputs_path

__all__ = [
    "KINDS",
    "MAX_FILE",
    "MAX_RECORD",
    "STARTED_NOTE",
    "append_line",
    "encode",
    "file_writer",
    "open_for_append",
    "parse_lines",
    "read_records",
    "text_parts",
]

#: a task's outputs file grows to at most this many bytes; later outputs are left out with a note
MAX_FILE = 16 * 1024 * 1024
#: one output bigger than this (as JSON) is kept as its text, with a note
MAX_RECORD = 2 * 1024 * 1024
#: the log's first line, nbbgtask's note of how the task was started: not the task's output
STARTED_NOTE = b"nbbgtask: started by "

KINDS = ("display", "result", "clear")


def encode(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, default=_json_default, allow_nan=False, separators=(",", ":")) + "\n").encode()


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):  # images, as the kernel sends them
        return base64.b64encode(bytes(value)).decode("ascii")
    raise TypeError(f"a {type(value).__name__} is not JSON")


def file_writer(home: Path | str, task_id: str) -> Callable[[bytes], None]:
    """Appends to the task's outputs file, created (0600) with its first output."""
    fd: list[int] = []

    def write(line: bytes) -> None:
        if not fd:
            fd.append(open_for_append(outputs_path(home, task_id)))
        write_all(fd[0], line)

    return write


def open_for_append(path: Path) -> int:
    """The outputs file, under the home's trust rules (no symlink, the user's own, 0600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
    try:
        return open_owned(path, flags)
    except FileNotFoundError:  # a home made by an older nbbgtask: no outputs folder yet
        path.parent.mkdir(mode=0o700, exist_ok=True)
        return open_owned(path, flags)


def append_line(home: Path | str, task_id: str, line: str) -> None:
    """Keep an output that came from elsewhere (a task on Dask): checked, placed after the printed
    output received so far, and held to `MAX_FILE`."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return
    if not _valid(record):
        return
    path = outputs_path(home, task_id)
    try:
        size = os.stat(path, follow_symlinks=False).st_size
    except FileNotFoundError:
        size = 0
    if size + len(line) > MAX_FILE:
        return
    try:
        record["offset"] = os.stat(log_path(home, task_id)).st_size
    except OSError:
        record["offset"] = None
    fd = open_for_append(path)
    try:
        write_all(fd, encode(record))
    finally:
        os.close(fd)


def _valid(record: Any) -> bool:
    return (
        isinstance(record, dict)
        and record.get("kind") in KINDS
        and isinstance(record.get("data", {}), dict)
        and all(isinstance(k, str) for k in record.get("data", {}))
        and isinstance(record.get("metadata", {}), dict)
        and (
            record.get("offset") is None
            or (isinstance(record["offset"], int) and not isinstance(record["offset"], bool))
        )
        and (record.get("display_id") is None or isinstance(record["display_id"], str))
    )


def parse_lines(raw: bytes) -> list[dict[str, Any]]:
    found = []
    for line in raw.splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # a line nested past the parser's depth: skipped too
            continue
        if _valid(record):
            found.append(record)
    return found


def read_records(home: Path | str, task_id: str) -> list[dict[str, Any]]:
    """Every output kept for a task, in order (none if it has no file)."""
    try:
        with os.fdopen(open_owned(outputs_path(home, task_id)), "rb") as f:
            raw = f.read(MAX_FILE + MAX_RECORD)
    except FileNotFoundError:
        return []
    end = raw.rfind(b"\n") + 1  # a last line still being written is not read
    return parse_lines(raw[:end])


def text_parts(records: list[dict[str, Any]]) -> list[str]:
    """The text of each output still shown (after the last clear, updates applied), for a terminal."""
    shown: list[dict[str, Any]] = []
    for record in records:
        if record["kind"] == "clear":
            shown = []
        elif record.get("update") and record.get("display_id"):
            shown = [record if r.get("display_id") == record["display_id"] else r for r in shown]
        else:
            shown.append(record)
    parts = []
    for record in shown:
        text = record.get("data", {}).get("text/plain")
        if isinstance(text, list):  # nbformat allows a list of lines
            text = "".join(str(t) for t in text)
        if isinstance(text, str) and text:
            parts.append(text)
    return parts
