"""What the processes of a task on Dask say to each other: every message, in one place.

Four kinds of process take part:

- the **kernel** (`nbbgtask.dask.backend`): sends the task, records what the worker reports;
- the **worker** (`nbbgtask.dask.worker`, `nbbgtask.dask.spares`): runs `run_on_worker`, keeps one idle *spare*
  child ready, hands it the next task, watches it and forwards what it reports;
- the **forker** (`nbbgtask.dask.forker`): a small process forked from the worker once; it forks the
  spares (so the worker itself does not), signals them and says how they end;
- the **child** (`nbbgtask.dask.child`): a spare, then the task's own process: it runs one task and exits.

Kernel and worker talk through Dask; worker, forker and child through pipes and one socket.

1. Kernel -> worker: the task.  ``client.submit(run_on_worker, payload, task_id, grace, interval)``;
   ``payload`` is the cloudpickled `_runner.Job` (with its home set to ``.``: the child runs in
   the worker's folder).

2. Kernel -> worker: a cancel.  The kernel sets the ``distributed.Event`` named
   `cancel_event_name` (task id); the worker, which asks whether it is set every half second,
   stops the child: SIGTERM to its process group, SIGKILL after ``grace`` seconds.

3. Worker -> kernel: what happens.  ``worker.log_event(TOPIC, sealed)``.  Every client of the
   scheduler can read the event log and write to it, so each event is sealed (`seal`) with the
   task's own key: 32 random bytes the kernel makes per task, keeps in the task's record (in the
   home, never in an event) and sends as an argument of 1.  A sealed event is
   ``{"task_id", "v": 2, "nonce", "box"}``: ``box`` is the event as JSON, encrypted and
   authenticated with AES-256-GCM (the `cryptography` package) under the task's key, with the
   task id as associated data and a fresh 96-bit nonce.  The kernel opens it before anything
   else and ignores (and counts, in a warning) an event that fails; then every field is checked.  So other clients see only ids, sizes and
   times: never the output, progress, errors or results.  Opened, an event is a dict with
   ``kind``, ``time``, ``run`` (16 hex digits, one per run of the task: Dask may run it again
   on another worker) and ``seq`` (1, 2, ... in the order the run sent its events).  The
   scheduler keeps the events and a kernel that starts later is sent them all again; the record
   keeps, per run, the last ``seq`` applied (``event_marks``), so each event is applied once.
   By kind:

   - ``"started"``: ``pid``, ``host``, ``worker`` (its address);
   - ``"log"``: ``text``, printed output (at most `LOG_CHUNK` bytes of it, decoded as UTF-8);
   - ``"progress"``: the fields of a progress report (percent, message, ...);
   - ``"output"``: ``line``, one output the task displayed (a JSON line of `nbbgtask.task.outputs`);
   - ``"final"``: the fields of the task's end (``state``, ``finished``, ``error``,
     ``cancel_requested``, ``result``: the pickled return value when it is too big for the
     record, ...).  Sent once, last.  A worker that gives the task up (it closes; Dask runs the
     task again elsewhere) sends none: the next run reports.

4. Worker -> forker, and back: one Unix stream socket.  The worker listens on a path in a folder
   only its user can enter, forks the forker (which keeps no socket of the worker's) and accepts
   its connection.  Every message is one `RECORD`: an op (one byte), a pid and a number (two
   signed 64-bit integers, network order); ``FORK`` carries three descriptors with it (SCM_RIGHTS).

   ========== ================ ==========================================================
   op         from -> to        meaning
   ========== ================ ==========================================================
   ``FORK``   worker -> forker  fork a spare that keeps these fds: its *commands* read end,
                                its *reports* write end, its *output* write end (fds 1, 2)
   ``PID``    forker -> worker  the answer to a ``FORK``: pid = the spare's pid, or -errno
   ``KILL``   worker -> forker  send signal ``number`` to the group of child ``pid``, if it
                                has not been reaped (so the pid cannot be someone else's)
   ``EXITED`` forker -> worker  child ``pid`` ended and was reaped; ``number``: its exit code
                                (negative: the signal that ended it)
   ``RETIRE`` worker -> forker  fork no more; leave once every child has ended and been told
   ========== ================ ==========================================================

   The end of the connection, either way, ends the conversation: the forker kills (SIGKILL) and
   reaps its children and leaves; the worker takes every child of that forker as ended in a way
   not known ("lost").

5. Worker -> child: its task, on the *commands* pipe, as two `nbbgtask.core.wire` frames written together:
   the worker's ``(cwd, environ, sys.path)`` pickled, or empty if unchanged since the spare was
   forked; then the payload of 1.  The worker closes its end after them.  The end of the pipe
   before both frames came: the spare was let go with no task, and leaves quietly.

6. Child -> worker: reports, on the *reports* pipe, as frames, each a pickled ``(kind, body)``:
   ``("progress", fields)``, ``("output", JSON line)``, ``("result", pickled value)``,
   ``("final", fields)``.  The end of the
   pipe: the child has ended (or closed it); how it ended comes from its exit code.

7. Child -> worker: printed output, as raw bytes on the *output* pipe (the child's fds 1 and 2).

8. Kernel -> worker -> child -> kernel: a stack request (`TaskStatus.stack`).  The kernel calls
   ``client.run(dump_stack, task_id, pid, key, workers=[the task's worker])`` (`_dask_stacks`);
   on the worker, the coroutine checks that ``pid`` is its own descendant and has the task's
   stack file (`stack_file`: made by the child, in a folder of the user's own under the temp
   folder, once its handler is in place), empties the file, sends the child `STACK_SIGNAL`
   (faulthandler writes every thread's stack into the file) and returns the dump sealed as an
   event of 3: ``{"kind": "stack", "text"}``, or ``{"kind": "stack", "error"}`` saying why there is none.

A cancel reaches the child as SIGTERM (to its group), never as a message: run_job's handler stops
the task.  A child forked by the worker itself (no forker) gets the same pipes, but the worker is
its parent, signals and reaps it.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import pickle
import secrets
import socket
import struct
from typing import Any

from nbbgtask.core import wire as _wire

__all__ = [
    "Context",
    "EXITED",
    "FINAL",
    "FORK",
    "FORK_FDS",
    "KILL",
    "LOG_CHUNK",
    "OUTPUT",
    "PID",
    "PROGRESS",
    "RECORD",
    "RESULT",
    "RETIRE",
    "TOPIC",
    "cancel_event_name",
    "new_key",
    "seal",
    "unseal",
    "read_report",
    "read_task",
    "recv_record",
    "send_record",
    "send_report",
    "stack_file",
    "task_message",
]

# -- 1 to 3: kernel and worker --------------------------------------------------------------------

#: the worker-event topic every nbbgtask task reports on
TOPIC = "nbbgtask"
#: at most this much printed output per log event
LOG_CHUNK = 64 * 1024


def cancel_event_name(task_id: str) -> str:
    return f"nbbgtask-cancel-{task_id}"


def new_key() -> bytes:
    """A task's key for its events (made in the kernel, per task)."""
    return secrets.token_bytes(32)


def _aead(key: bytes) -> Any:
    # cryptography is the Dask extra's (imported here: a worker that runs no task never needs it)
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


def seal(key: bytes, task_id: str, event: dict[str, Any]) -> dict[str, Any]:
    """``event`` (JSON, with ``result`` bytes as base64) encrypted and authenticated with ``key``
    (AES-256-GCM, the task's id as associated data, a fresh 96-bit nonce each time)."""
    if isinstance(event.get("result"), bytes):
        event = {**event, "result": base64.b64encode(event["result"]).decode("ascii")}
    nonce = os.urandom(12)
    box = _aead(key).encrypt(nonce, json.dumps(event, allow_nan=False).encode(), task_id.encode())
    return {
        "task_id": task_id,
        "v": 2,
        "nonce": base64.b64encode(nonce).decode("ascii"),
        "box": base64.b64encode(box).decode("ascii"),
    }


def unseal(key: bytes, task_id: str, sealed: Any) -> dict[str, Any] | None:
    """The event in ``sealed``, or ``None`` if it was not sealed with ``key`` for ``task_id``."""
    from cryptography.exceptions import InvalidTag

    if not isinstance(sealed, dict) or sealed.get("v") != 2 or sealed.get("task_id") != task_id:
        return None
    try:
        nonce, box = (base64.b64decode(sealed[k], validate=True) for k in ("nonce", "box"))
        plain = _aead(key).decrypt(nonce, box, task_id.encode())
        event = json.loads(plain)
        if isinstance(event, dict) and isinstance(event.get("result"), str):
            event["result"] = base64.b64decode(event["result"], validate=True)
    except (KeyError, TypeError, ValueError, RecursionError, binascii.Error, InvalidTag):
        return None
    return event if isinstance(event, dict) else None


def stack_file(task_id: str, pid: int) -> str:
    """Where the child ``pid`` of task ``task_id`` dumps its stack on a worker (8): in a folder of
    this user's own, ``nbbgtask-stacks-<uid>`` under the temp folder, made if need be."""
    import tempfile

    from nbbgtask.core.trust import check_id

    folder = os.path.join(tempfile.gettempdir(), f"nbbgtask-stacks-{os.getuid()}")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    st = os.lstat(folder)
    if st.st_uid != os.getuid() or st.st_mode & 0o077 or not os.path.isdir(folder) or os.path.islink(folder):
        raise PermissionError(f"{folder} is not a private folder of this user's")
    return os.path.join(folder, f"{check_id(task_id)}.{int(pid)}.txt")


# -- 4: worker and forker -------------------------------------------------------------------------

#: one message between the worker and its forker: op (one byte), pid, number
RECORD = struct.Struct("!cqq")
FORK, PID, KILL, EXITED, RETIRE = b"F", b"P", b"K", b"X", b"R"
#: the descriptors a FORK carries: commands, reports, output
FORK_FDS = 3


def send_record(sock: socket.socket, op: bytes, pid: int = 0, number: int = 0, fds: tuple[int, ...] = ()) -> None:
    data = RECORD.pack(op, pid, number)
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.sendall(data)


def recv_record(sock: socket.socket) -> tuple[bytes, int, int, list[int]] | None:
    """The next record and the descriptors sent with it (now the receiver's to close); ``None``
    at the end of the connection."""
    data, fds, _, _ = socket.recv_fds(sock, RECORD.size, FORK_FDS)
    while data and len(data) < RECORD.size:
        more = sock.recv(RECORD.size - len(data))
        if not more:
            data = b""
        data += more
    if len(data) < RECORD.size:
        for fd in fds:
            os.close(fd)
        return None
    op, pid, number = RECORD.unpack(data)
    return op, pid, number, fds


# -- 5: worker to child, the task -----------------------------------------------------------------

Context = tuple[str, dict[str, str], list[str]]


def task_message(context: Context | None, payload: bytes) -> bytes:
    """What the worker writes on a spare's commands pipe: ``context`` (``None``: unchanged since
    the spare was forked) and the task's payload."""
    return _wire.frames(b"" if context is None else pickle.dumps(context), payload)


def read_task(fd: int) -> tuple[Context | None, bytes] | None:
    """In the spare: its task, as `task_message` wrote it; ``None`` if the pipe ended first."""
    context, payload = _wire.read_frame(fd), _wire.read_frame(fd)
    if context is None or payload is None:
        return None
    return (pickle.loads(context) if context else None), payload


# -- 6: child to worker, the reports --------------------------------------------------------------

PROGRESS, OUTPUT, RESULT, FINAL = "progress", "output", "result", "final"


def send_report(fd: int, kind: str, body: Any) -> None:
    _wire.write_frame(fd, pickle.dumps((kind, body)))


def read_report(fd: int) -> tuple[str, Any] | None:
    """The next report; ``None`` once the child's end of the pipe is closed."""
    data = _wire.read_frame(fd)
    return None if data is None else pickle.loads(data)
