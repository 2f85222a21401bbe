"""The Dask backend: tasks run on a cluster; the kernel records them in the same store.

Each task is sent with ``client.submit`` to `nbbgtask.dask.worker.run_on_worker`, which runs it in a child
process on the worker and reports progress, printed output and the outcome as worker events
(topic ``nbbgtask``).  This module subscribes to them and writes the store, the log and the
result file, so everything that reads the store — status, widgets, magic, command line — works
unchanged.  A cancel is a ``distributed.Event`` the worker watches: it stops the child for real.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import Any

from nbbgtask.core import config as _config
from nbbgtask.core import limits as _limits
from nbbgtask.core import record as _record
from nbbgtask.core.errors import NbbgtaskError
from nbbgtask.core.states import State
from nbbgtask.core.trust import open_owned, valid_id
from nbbgtask.dask.events import applied_once, event_fault
from nbbgtask.dask.stacks import dump_stack
from nbbgtask.dask.wire import TOPIC, cancel_event_name, new_key, unseal
from nbbgtask.dask.worker import run_on_worker
from nbbgtask.store import outputs as _stored_outputs
from nbbgtask.store.files import atomic_write, log_path, result_path
from nbbgtask.store.store import Store, store_for
from nbbgtask.task import notify
from nbbgtask.task.paths import preloads
from nbbgtask.task.results import resolved
from nbbgtask.task.runner import pickled

__all__ = ["DaskBackend", "DaskRecords", "backend", "close", "connect", "for_address"]

#: seconds to reach the scheduler before configure() gives up
CONNECT_TIMEOUT = 10.0
#: seconds stack() waits for a task that has just started to be reported running
STACK_WAIT = 5.0

_backend: DaskBackend | None = None


class DaskRecords:
    """What a process that is not connected to a task's cluster can say about its record."""

    kind = "dask"

    def reconcile(self, store: Store, record: dict[str, Any]) -> dict[str, Any]:
        return record  # the kernel connected to the cluster records how its tasks end

    def may_still_report(self, record: dict[str, Any]) -> bool:
        return True  # on a cluster: nothing here can tell

    def stack(self, home: Path, record: dict[str, Any], who: str) -> str:
        """Ask the task's worker, which dumps its child's stack and answers sealed (`nbbgtask.dask.wire`, 8)."""
        # The worker's "started" event reaches this kernel a moment after the task runs: wait for it.
        deadline = time.monotonic() + STACK_WAIT
        while not State(record["state"]).is_final and not (record["state"] == State.RUNNING.value and record.get("pid")):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
            record = store_for(home).get(record["id"]) or record
        state = State(record["state"])
        pid, worker, key = record.get("pid"), record.get("worker"), record.get("event_key")
        if state.is_final:
            raise NbbgtaskError(f"{who} has ended ({state}): it has no stack any more")
        if state is not State.RUNNING:
            raise NbbgtaskError(f"{who} is {state}: it has no process yet; try again once it runs")
        if not pid or not worker or not key:
            raise NbbgtaskError(f"{who} has not reported from its worker yet: try again in a moment")
        client, close = self._client(record)
        try:
            answers = client.run(dump_stack, record["id"], pid, key, workers=[worker])
        except Exception as exc:
            raise NbbgtaskError(f"cannot ask the Dask worker {worker} for the stack of {who}: {exc}") from None
        finally:
            close()
        event = unseal(bytes.fromhex(key), record["id"], next(iter(answers.values()), None))
        if event is None or event.get("kind") != "stack":
            raise NbbgtaskError(f"the Dask worker {worker} answered for {who} with what was not sealed with its key")
        if "error" in event or not isinstance(event.get("text"), str):
            raise NbbgtaskError(f"{who} on the Dask worker {worker}: {event.get('error', 'no stack came')}")
        return event["text"]  # type: ignore[no-any-return]

    def _client(self, record: dict[str, Any]) -> tuple[Any, Any]:
        """A client of the task's scheduler, short-lived, and how to let it go."""
        from distributed import Client

        address = record.get("dask_address")
        try:
            client = Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise NbbgtaskError(f"cannot reach the Dask scheduler at {address}: {exc}") from None
        return client, client.close

    def process_here(self, record: dict[str, Any]) -> tuple[int, float | None] | None:
        return None  # its process is a Dask worker's child, on the cluster

    def cancel(self, home: Path, record: dict[str, Any]) -> dict[str, Any] | None:
        """Cancel through a short-lived client of the task's scheduler."""
        from distributed import Client

        address = record.get("dask_address")
        try:
            client = Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise NbbgtaskError(f"cannot reach the Dask scheduler at {address} to cancel: {exc}") from None
        try:
            _request_cancel(client, record["id"])
            return _await_final(home, record["id"], _config.settings().cancel_grace)
        finally:
            client.close()


class DaskBackend(DaskRecords):
    """One per process: the client, its subscription, and the futures of the tasks it sent."""

    destination = "the cluster"

    def __init__(self, client: Any, home: Path, owns_client: bool = False) -> None:
        self.client = client
        self._owns_client = owns_client
        #: closed: the futures this client cancels as it closes say nothing of their tasks
        self._closed = False
        if owns_client:
            # A clean close sends what is still queued for the scheduler (a task submitted just
            # before the process exits); fire_and_forget keeps the task running after that.
            _at_exit(self.close)
        self.home = home
        self.address = client.scheduler.address
        self.futures: dict[str, Any] = {}
        #: events of the topic that were ignored: not sealed with their task's key, or malformed
        self.rejected = 0
        #: tasks sent but not yet recorded in the store (see submit)
        self._recording: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        # Events sent while no kernel listened (a restart) are still on the scheduler: those are
        # applied first, then what came meanwhile, in order (an event in both is applied once).
        self._order = threading.Lock()
        self._early: list[Any] | None = []
        client.subscribe_topic(TOPIC, self._on_new_event)
        try:
            for event in client.get_events(TOPIC):
                self._on_event(event)
        except Exception:  # an old scheduler without stored events: only new ones count
            pass
        with self._order:
            early, self._early = self._early, None
            for event in early:
                self._on_event(event)

    def _on_new_event(self, event: Any) -> None:
        with self._order:
            if self._early is not None:
                self._early.append(event)
            else:
                self._on_event(event)

    def close(self) -> None:
        self._closed = True
        if self.client.status == "running":
            self.client.unsubscribe_topic(TOPIC)
            if self._owns_client:
                self.client.close()

    def _client(self, record: dict[str, Any]) -> tuple[Any, Any]:
        return self.client, lambda: None  # this process's own client of the task's scheduler

    # -- sending -----------------------------------------------------------------------------

    def placement(self) -> dict[str, Any]:
        return {"backend": self.kind, "start_method": "dask", "host": None, "dask_address": self.address}

    def inherits_memory(self) -> bool:
        return False

    def prepare(self, job: Any) -> None:
        """Nothing to do ahead: `submit` pickles the job before it records anything."""

    def submit(self, job: Any) -> None:
        from distributed import fire_and_forget

        if self.client.status != "running":
            raise NbbgtaskError(
                f"the Dask scheduler at {self.address} is not reachable (client {self.client.status}); "
                f"bg.configure(backend='local') runs tasks here instead"
            )
        record = job.record
        # The task's own key for its events (see _dask_wire, 3): in its record, which only this
        # user can read, and sent with the task; never in the scheduler's event log.
        key = new_key()
        record["event_key"] = key.hex()
        # The notify URL stays here: this kernel records the end, and sends word of it.
        # Results of other tasks given as arguments are read here, where the results are (a worker
        # has no home folder), and travel with the job.
        args, kwargs = resolved(self.home, job.args, job.kwargs)
        remote = dataclasses.replace(job, home=Path("."), payload=None, notify=None, args=args, kwargs=kwargs)
        notify.expect(job.task_id, job.notify)
        payload = pickled(remote, "the Dask cluster")
        # The task is sent first and recorded while it travels: the record's write (a locked,
        # atomic file write) is then not part of its start.  Its events wait until it is recorded.
        recorded = threading.Event()
        with self._lock:
            self._recording[job.task_id] = recorded
        try:
            config = _config.settings()
            future = self.client.submit(
                run_on_worker,
                payload,
                job.task_id,
                config.cancel_grace,
                config.progress_interval,
                key,
                tuple(preloads(job.make_status)),
                key=f"nbbgtask-{job.task_id}",
                pure=False,
            )
            try:
                store_for(self.home).insert(record)
            except BaseException:
                # Not recorded, so not to run: nobody could see, wait for or cancel it.
                try:
                    future.cancel()  # not started yet: Dask drops it
                    _request_cancel(self.client, job.task_id)  # started: the worker stops it
                except Exception:  # the store's error is the one to report
                    pass
                raise
        finally:
            with self._lock:
                del self._recording[job.task_id]
            recorded.set()
        # The task runs to its end even if this kernel goes away; a later kernel records it.
        fire_and_forget(future)
        with self._lock:
            self.futures[job.task_id] = future
        future.add_done_callback(lambda f, task_id=job.task_id: self._on_done(task_id, f))
        _start_callback_thread(future)

    # -- what comes back -----------------------------------------------------------------------

    def _on_event(self, event: Any) -> None:
        """One event of the topic: from any client of the scheduler, so trusted only once its
        MAC checks with the task's key, and its every field is what it should be."""
        _, sealed = event
        task_id = sealed.get("task_id") if isinstance(sealed, dict) else None
        if not isinstance(task_id, str) or not valid_id(task_id):
            return  # not a task's event at all
        store = store_for(self.home)
        with self._lock:
            recording = self._recording.get(task_id)
        if recording is not None:  # came back before submit() recorded the task: a moment
            recording.wait(CONNECT_TIMEOUT)
        record = store.get(task_id)
        if record is None or record.get("backend") != "dask" or State(record["state"]).is_final:
            return  # not ours (another kernel's, or another home's), or over
        key = record.get("event_key")
        msg = unseal(bytes.fromhex(key), task_id, sealed) if isinstance(key, str) else None
        if msg is None:
            self._reject(task_id, "it was not sealed with the task's key (forged, or altered)")
            return
        problem = event_fault(msg)
        if problem is not None:
            self._reject(task_id, problem)
            return
        kind = msg["kind"]
        if kind == "final":  # the last event: once the record is final, none is applied
            self._finish(task_id, msg, record)
        elif store.patch(task_id, lambda doc: applied_once(doc, msg)) is None:
            return  # applied before (a replay to a kernel that started later), or not live
        elif kind == "log":
            fd = open_owned(log_path(self.home, task_id), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            try:
                os.write(fd, msg["text"].encode("utf-8", errors="replace"))
            finally:
                os.close(fd)
        elif kind == "output":
            _stored_outputs.append_line(self.home, task_id, str(msg.get("line", "")))

    def _reject(self, task_id: str, why: str) -> None:
        with self._lock:
            self.rejected += 1
            count = self.rejected
        warnings.warn(
            f"nbbgtask ignored an event for task {task_id[:8]} on the Dask topic {TOPIC!r}: {why}. "
            f"{count} ignored so far: another client of the scheduler at {self.address} may be "
            f"sending them",
            RuntimeWarning,
            stacklevel=2,
        )

    def _finish(self, task_id: str, msg: dict[str, Any], record: dict[str, Any]) -> None:
        fields: dict[str, Any] = {k: msg[k] for k in _record.FINAL_FIELDS if k in msg}
        fields.setdefault("finished", time.time())
        if fields.get("state") == State.FAILED.value and "percent" not in msg:
            # Not the child's own report of its end (that always has the percent) but the worker's
            # of a child that ended without one: say which limit ended it, if one did.
            fields["error"] = _limits.explain(record, str(fields.get("error") or ""), now=fields["finished"])
        fields["event_key"] = fields["event_marks"] = None  # no event is taken after the last
        problem = _record.fault(task_id, {**record, **fields})
        if problem is not None:
            self._reject(task_id, f"its final fields are not a task's end ({problem})")
            return
        data = msg.get("result")
        if data is not None:
            atomic_write(result_path(self.home, task_id), data, durable=True)
        store_for(self.home).finalize(task_id, fields)
        with self._lock:
            self.futures.pop(task_id, None)

    def _on_done(self, task_id: str, future: Any) -> None:
        """The future ended; if no final event says how (the task never started, or the worker
        died too often), record it from the future."""
        if future.status == "finished":
            return  # its final event says how, and may come a little after the result
        if self._closed:
            return  # cancelled by this client's close: the task runs on; a later kernel records it
        record = store_for(self.home).get(task_id)
        if record is None or State(record["state"]).is_final:
            return
        if future.status == "cancelled" or record.get("cancel_requested"):
            fields: dict[str, Any] = {"state": State.CANCELLED.value}
        else:
            try:
                exc = future.exception(timeout=5)
                error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}".rstrip(": ")
            except Exception as other:
                error = f"the Dask task ended without reporting ({type(other).__name__})"
            fields = {"state": State.FAILED.value, "error": error}
        fields["finished"] = time.time()
        store_for(self.home).finalize(task_id, fields)
        with self._lock:
            self.futures.pop(task_id, None)

    # -- cancel --------------------------------------------------------------------------------

    def cancel(self, home: Path, record: dict[str, Any]) -> dict[str, Any] | None:
        task_id = record["id"]
        _request_cancel(self.client, task_id)
        current = store_for(self.home).get(task_id)
        with self._lock:
            future = self.futures.get(task_id)
        if future is not None and current is not None and current["state"] == State.QUEUED.value:
            future.cancel()  # not started: Dask drops it (a running one is stopped by the event)
        return _await_final(home, task_id, _config.settings().cancel_grace)


def _request_cancel(client: Any, task_id: str) -> None:
    from distributed import Event

    Event(cancel_event_name(task_id), client=client).set()


def _await_final(home: Path, task_id: str, grace: float) -> dict[str, Any] | None:
    """Wait for the worker to report the cancelled end; record it ourselves if it does not.
    The final record (``None`` if it is gone)."""
    store = store_for(home)
    record = store.wait_final(task_id, grace + 10, poll=0.05)
    if record is None or State(record["state"]).is_final:
        return record
    return store.finalize(task_id, {"state": State.CANCELLED.value, "finished": time.time()})


def connect(address: str | None, client: Any, home: Path) -> DaskBackend:
    """The backend for ``client`` (or a new client of ``address``), or a clear error."""
    global _backend
    _check_installed()
    current = _backend
    if (
        current is not None
        and current.home == home
        and current.client.status == "running"
        and (current.client is client or (client is None and _same_address(current.address, address)))
    ):
        return current  # configure() again with the same cluster: one client, one subscription
    owns = client is None
    if client is None:
        from distributed import Client
        try:
            client = Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise NbbgtaskError(
                f"cannot reach the Dask scheduler at {address}: {exc}. Tasks still run here with the "
                f"local backend; check the address and that the scheduler is up"
            ) from None
    if current is not None:
        current.close()  # another cluster or home: the old subscription would record events twice
    _backend = DaskBackend(client, home, owns_client=owns)
    return _backend


#: what the Dask backend needs beyond nbbgtask's own dependencies: the ``[dask]`` extra
EXTRA = ("distributed", "cryptography.hazmat.primitives.ciphers.aead")


def _check_installed() -> None:
    """Every package of the ``[dask]`` extra imports here, or a clear error at ``configure``: a
    task would otherwise fail inside the worker (its events are sealed with ``cryptography``)."""
    import importlib

    for name in EXTRA:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise NbbgtaskError(
                f"the Dask backend needs the '{name.partition('.')[0]}' package, which is not installed "
                f"({exc}); install the Dask extra: pip install \"nbbgtask[dask]\""
            ) from None


def _at_exit(close: Any) -> None:
    """Call ``close`` as this process exits, before its thread pools shut down (as they do,
    with ``threading._register_atexit``, before `atexit`): Dask runs a closing client's future
    callbacks in such a pool, and logged "cannot schedule new futures after interpreter
    shutdown" with a traceback for each task still running when a script ended.

    Only in this process: a ``multiprocessing`` child forked from it runs those hooks too as it
    ends (``threading._shutdown``), and has no client to close (it ended with exit code 1)."""
    pid = os.getpid()

    def at_exit() -> None:
        if os.getpid() == pid:
            close()

    register = getattr(threading, "_register_atexit", None)  # CPython 3.9+; else plain atexit
    try:
        (register or atexit.register)(at_exit)
    except RuntimeError:  # already shutting down
        atexit.register(at_exit)


def _start_callback_thread(future: Any) -> None:
    """Start the thread Dask runs future callbacks in now, not when the first one comes.

    A client closing as the process exits ends its futures, and their callbacks go to that
    thread; Python 3.12 refuses to start a thread by then, and Dask logged the error with a
    traceback for each task still running when a script ended.  Dask makes the pool (one
    thread, ``Future._cb_executor``) in `add_done_callback`; a pool it no longer has is skipped."""
    executor = getattr(type(future), "_cb_executor", None)
    if executor is None or executor in _primed:
        return
    _primed.add(executor)
    try:
        executor.submit(int)  # any no-op call: the pool's first task starts its thread
    except RuntimeError:  # the pool, or the interpreter, is already shutting down
        pass


#: the callback pools already given their thread (one per process, as Dask keeps it)
_primed: weakref.WeakSet[Any] = weakref.WeakSet()


def _same_address(a: str | None, b: str | None) -> bool:
    def plain(address: str | None) -> str:
        return (address or "").removeprefix("tcp://").replace("localhost", "127.0.0.1")

    return plain(a) == plain(b)


def backend() -> DaskBackend | None:
    return _backend


def close() -> None:
    """Stop listening to the cluster (and close the client if this module made it)."""
    global _backend
    if _backend is not None:
        _backend.close()
        _backend = None


def for_address(address: str | None) -> DaskRecords:
    """What answers for a task of the cluster at ``address``: this process's connected backend if
    it is that cluster's, else a short-lived connection's worth."""
    if _backend is not None and _backend.address == address:
        return _backend
    return DaskRecords()


def active() -> DaskBackend:
    """The backend that starts new tasks when ``backend="dask"`` (the seam's entry):
    `bg.configure` connects it first."""
    if _backend is None:
        raise NbbgtaskError("the Dask backend is not connected: call bg.configure(backend='dask', address=...) again")
    return _backend


def records(record: dict[str, Any]) -> DaskRecords:
    """What answers for a Dask task's record (the seam's entry)."""
    return for_address(record.get("dask_address"))
