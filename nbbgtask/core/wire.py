"""Bytes between processes: whole writes, exact reads, and length-prefixed frames.

The bottom layer: it imports nothing from nbbgtask, so every process (a kernel, a spawned task, a
Dask worker, its forker and its children) can use it.

A *frame* is one message: its length as 8 bytes, big-endian, then that many bytes.  What the
bytes mean (a pickle, usually) is up to the two ends; see `nbbgtask.local.launcher._spawn` and `nbbgtask.dask.wire`.
"""

from __future__ import annotations

import os

__all__ = ["HEAD", "frame", "frames", "read_exact", "read_frame", "write_all", "write_frame"]

#: the bytes of a frame's length
HEAD = 8


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data`` to ``fd`` (a blocking descriptor): os.write may write less than asked."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def read_exact(fd: int, size: int) -> bytes | None:
    """Exactly ``size`` bytes from ``fd``; ``None`` if the other end closes first."""
    chunks, left = [], size
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def frame(data: bytes) -> bytes:
    """``data`` as one frame."""
    return len(data).to_bytes(HEAD, "big") + data


def frames(*parts: bytes) -> bytes:
    """``parts`` as consecutive frames, to be written at once."""
    return b"".join(frame(part) for part in parts)


def write_frame(fd: int, data: bytes) -> None:
    write_all(fd, frame(data))


def read_frame(fd: int) -> bytes | None:
    """The next frame's bytes; ``None`` if the other end closes before all of it came."""
    head = read_exact(fd, HEAD)
    if head is None:
        return None
    return read_exact(fd, int.from_bytes(head, "big"))
