"""What runs on a Dask worker: the task in a child process (so a cancel can stop it for real),
with its progress, output and outcome sent to the kernel as worker events.

``run_on_worker`` is the function Dask runs.  The child is forked from the worker, with the
same rules as a task forked from a kernel (`_launcher.fork_detached`), or where there is no
fork, ``python -m nbbgtask._dask_worker FD``; either way it runs the task with the same runner
as a local task and reports through a pipe.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["TOPIC", "cancel_event_name", "run_on_worker"]

#: the worker-event topic every nbbgtask task reports on
TOPIC = "nbbgtask"
#: at most this much printed output per log event
LOG_CHUNK = 64 * 1024


def cancel_event_name(task_id: str) -> str:
    return f"nbbgtask-cancel-{task_id}"


def _write_frame(fd: int, obj: Any) -> None:
    data = pickle.dumps(obj)
    view = memoryview(len(data).to_bytes(8, "big") + data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(fd: int, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_frame(fd: int) -> Any:
    head = _read_exact(fd, 8)
    if head is None:
        return None
    body = _read_exact(fd, int.from_bytes(head, "big"))
    return None if body is None else pickle.loads(body)


class PipeSink:
    """Where the reports of a task on a worker go: frames on a pipe to `run_on_worker`."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def _send(self, kind: str, payload: Any) -> None:
        with self._lock:
            _write_frame(self._fd, (kind, payload))

    def progress(self, fields: dict[str, Any] | None) -> bool:
        if fields is not None:
            self._send("progress", fields)
        return False  # a cancel arrives as SIGTERM

    def save_result(self, data: bytes) -> None:
        self._send("result", data)

    def finish(self, fields: dict[str, Any]) -> None:
        self._send("final", fields)


def run_on_worker(payload: bytes, task_id: str, grace: float, interval: float) -> str:
    """Run a task's child process on this worker and report everything as worker events."""
    from distributed import Event, get_client, get_worker

    from ._supervisor import describe_exit

    worker = get_worker()

    def emit(kind: str, **fields: Any) -> None:
        worker.log_event(TOPIC, {"task_id": task_id, "kind": kind, "time": time.time(), **fields})

    read_end, write_end = os.pipe()
    child = _start_child(payload, write_end)
    os.close(write_end)
    emit("started", pid=child.pid, host=socket.gethostname(), worker=worker.address)
    outcome: dict[str, Any] = {}
    stopping = threading.Event()

    def pump_output() -> None:
        pending: list[bytes] = []
        last = time.monotonic()
        fd = child.output
        while True:
            chunk = os.read(fd, LOG_CHUNK)
            if chunk:
                pending.append(chunk)
            if pending and (not chunk or time.monotonic() - last >= interval or sum(map(len, pending)) >= LOG_CHUNK):
                emit("log", text=b"".join(pending).decode("utf-8", errors="replace"))
                pending, last = [], time.monotonic()
            if not chunk:
                return

    def pump_reports() -> None:
        while True:
            frame = _read_frame(read_end)
            if frame is None:
                return
            kind, body = frame
            if kind == "progress":
                emit("progress", **body)
            elif kind == "result":
                outcome["result"] = body
            elif kind == "final":
                outcome.update(body)


    # After the child started (getting the worker's client can take a while the first time), and
    # in the task's own thread: the watcher thread could not find the client itself.
    event = Event(cancel_event_name(task_id), client=get_client())

    def watch_cancel() -> None:
        while not stopping.is_set():
            try:
                if not event.wait(timeout=0.5):
                    continue
            except Exception:  # scheduler busy or gone: keep running, look again
                time.sleep(0.5)
                continue
            outcome["cancel_requested"] = True
            _signal_group(child.pid, signal.SIGTERM)
            try:
                child.wait(grace)
            except subprocess.TimeoutExpired:
                _signal_group(child.pid, signal.SIGKILL)
            return

    threads = [threading.Thread(target=t, daemon=True) for t in (pump_output, pump_reports, watch_cancel)]
    for t in threads:
        t.start()
    code = child.wait()
    stopping.set()
    for t in threads[:2]:
        t.join()
    os.close(read_end)
    os.close(child.output)
    if "state" not in outcome:
        if outcome.get("cancel_requested"):
            outcome["state"] = "cancelled"
        else:
            outcome.update(state="failed", error=describe_exit(child.pid, code).replace("task process", "task process on the worker"))
        outcome["finished"] = time.time()
    emit("final", **outcome)
    return str(outcome["state"])


class _Child:
    """The task's process on this worker: forked (a millisecond), or spawned where fork is missing."""

    def __init__(self, pid: int, output: int, popen: subprocess.Popen[bytes] | None = None) -> None:
        self.pid, self.output, self._popen = pid, output, popen
        self._code: int | None = None

    def wait(self, timeout: float | None = None) -> int:
        if self._popen is not None:
            return self._popen.wait(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._code is None:
            done, status = os.waitpid(self.pid, 0 if deadline is None else os.WNOHANG)
            if done:
                self._code = os.waitstatus_to_exitcode(status)
            elif deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
            else:
                time.sleep(0.01)
        return self._code


def _start_child(payload: bytes, reports: int) -> _Child:
    out_read, out_write = os.pipe()
    if hasattr(os, "fork"):
        from ._launcher import fork_detached

        pid = fork_detached(lambda: _run_payload(payload, reports), out_write)
        os.close(out_write)
        return _Child(pid, out_read)
    popen = subprocess.Popen(
        [sys.executable, "-m", "nbbgtask._dask_worker", str(reports)],
        stdin=subprocess.PIPE,
        stdout=out_write,
        stderr=out_write,
        pass_fds=(reports,),
        start_new_session=True,
    )
    os.close(out_write)
    assert popen.stdin is not None
    try:
        popen.stdin.write(payload)
        popen.stdin.close()
    except BrokenPipeError:
        pass
    return _Child(popen.pid, out_read, popen)


def _run_payload(payload: bytes, reports: int) -> int:
    from ._runner import run_job

    job = pickle.loads(payload)
    job.home = Path(os.getcwd())
    return run_job(job, PipeSink(reports))


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _child_main(fd: int) -> int:
    """The spawned child, where fork is missing: the job comes on stdin."""
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # a pipe: else output comes late
    sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    payload = sys.stdin.buffer.read()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return _run_payload(payload, fd)


if __name__ == "__main__":
    from nbbgtask._runner import exit_child

    exit_child(lambda: _child_main(int(sys.argv[1])))
