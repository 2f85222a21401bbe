"""_wire: whole writes, exact reads and length-prefixed frames, on real pipes."""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbbgtask.core import wire as _wire


@pytest.fixture
def pipe():
    read, write = os.pipe()
    ends = {"read": read, "write": write}
    yield ends
    for fd in ends.values():
        with contextlib.suppress(OSError):
            os.close(fd)


def _close(ends, which):
    os.close(ends.pop(which))


@contextlib.contextmanager
def _in_thread(target, *args):
    """Run ``target`` in a thread (a writer or reader that would block this one); its result."""
    out = {}

    def run():
        try:
            out["value"] = target(*args)
        except BaseException as exc:  # raised again below, in the test's thread
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        thread.join(30)
        assert not thread.is_alive()
    if "error" in out:
        raise out["error"]


def test_a_frame_is_its_length_in_eight_big_endian_bytes_then_the_bytes():
    assert _wire.frame(b"abc") == b"\0\0\0\0\0\0\0\3abc"
    assert _wire.frame(b"") == bytes(8)
    assert _wire.frames(b"a", b"", b"bc") == _wire.frame(b"a") + _wire.frame(b"") + _wire.frame(b"bc")


@settings(max_examples=50, deadline=None)
@given(st.lists(st.binary(max_size=2000), max_size=8))
def test_frames_come_back_as_they_were_written(parts):
    read, write = os.pipe()
    try:
        for part in parts:
            _wire.write_frame(write, part)
        os.close(write)
        write = None
        assert [_wire.read_frame(read) for _ in parts] == parts
        assert _wire.read_frame(read) is None  # then the end
    finally:
        os.close(read)
        if write is not None:
            os.close(write)


def test_frames_written_at_once_are_read_one_by_one(pipe):
    _wire.write_all(pipe["write"], _wire.frames(b"context", b"", b"payload"))
    assert [_wire.read_frame(pipe["read"]) for _ in range(3)] == [b"context", b"", b"payload"]


def test_a_frame_far_beyond_a_pipes_capacity_comes_back_whole(pipe):
    data = os.urandom(5_000_000)
    with _in_thread(_wire.read_frame, pipe["read"]) as read:
        _wire.write_frame(pipe["write"], data)
    assert read["value"] == data


def test_read_exact_gathers_bytes_that_come_in_small_pieces(pipe):
    data = os.urandom(300)

    def trickle():
        for i in range(0, len(data), 7):
            os.write(pipe["write"], data[i : i + 7])
            time.sleep(0.001)

    with _in_thread(trickle):
        assert _wire.read_exact(pipe["read"], len(data)) == data


def test_read_exact_of_nothing_reads_nothing(pipe):
    os.write(pipe["write"], b"x")
    assert _wire.read_exact(pipe["read"], 0) == b""
    assert os.read(pipe["read"], 1) == b"x"


@pytest.mark.parametrize(
    "sent",
    [
        b"",  # nothing at all
        b"\0\0\0",  # part of the length
        _wire.frame(b"0123456789")[:-3],  # the length, and part of the bytes
    ],
    ids=["nothing", "part-of-head", "part-of-body"],
)
def test_a_frame_cut_short_by_the_end_of_the_pipe_is_none(pipe, sent):
    os.write(pipe["write"], sent)
    _close(pipe, "write")
    assert _wire.read_frame(pipe["read"]) is None


def test_read_exact_is_none_when_the_pipe_ends_before_enough_came(pipe):
    os.write(pipe["write"], b"abc")
    _close(pipe, "write")
    assert _wire.read_exact(pipe["read"], 4) is None


def test_write_all_writes_everything_when_signals_cut_writes_short(pipe):
    """A signal that arrives while a write blocks on a full pipe makes os.write return what it
    wrote so far: write_all must go on with the rest."""
    data = os.urandom(8 << 20)
    main = threading.get_ident()
    stop = threading.Event()

    def read_slowly():
        chunks = []
        while chunk := os.read(pipe["read"], 65536):
            chunks.append(chunk)
            time.sleep(0.0005)
        return b"".join(chunks)

    def pester():
        while not stop.is_set():
            signal.pthread_kill(main, signal.SIGUSR1)
            time.sleep(0.001)

    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: None)
    try:
        with _in_thread(read_slowly) as read, _in_thread(pester):
            try:
                _wire.write_all(pipe["write"], data)
            finally:
                stop.set()
                _close(pipe, "write")
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert read["value"] == data


def test_a_sealed_event_opens_only_with_its_key_and_task_and_unaltered():
    from nbbgtask.dask.wire import new_key, seal, unseal

    key, task = new_key(), "ab" * 16
    event = {"kind": "final", "time": 1.5, "result": b"\x00pickle\xff" * 100}
    sealed = seal(key, task, event)
    assert b"pickle" not in repr(sealed).encode() and "final" not in repr(sealed)  # encrypted
    assert unseal(key, task, sealed) == event
    assert unseal(new_key(), task, sealed) is None  # another key
    assert unseal(key, "cd" * 16, {**sealed, "task_id": "cd" * 16}) is None  # moved to another task
    box = bytearray(base64.b64decode(sealed["box"]))
    box[3] ^= 1
    assert unseal(key, task, {**sealed, "box": base64.b64encode(bytes(box)).decode()}) is None  # altered
    assert unseal(key, task, {**sealed, "nonce": "!!"}) is None and unseal(key, task, "junk") is None
    assert seal(key, task, event)["nonce"] != sealed["nonce"]  # a fresh nonce each time
