"""``GET events``: what changed in the store, pushed to the browser as Server-Sent Events.

One `Watcher` per server follows the store for every client at once, and only while at least one
is connected: every `POLL` seconds it asks the store whether anything was written
(`Tasks.version`, two stats) and reads the live tasks only then, or every `RECHECK` seconds to
notice a task whose process died (a read for a change alone does not look at the processes) and
to read the running tasks' CPU and memory again (each at most every `_data.RESOURCES_EVERY`
seconds).  Two reads are at least `gap` apart: `READ_GAP` seconds
for each live task read last time, from `READ_GAP_MIN` to `READ_GAP_MAX`, so that a change shows
within about a fifth of a second when few tasks run and the reads cost no more when many do.
It sends each client the records that changed, in one event::

    event: tasks
    data: {"tasks": [record, ...], "ended": [id, ...], "running": n, "now": seconds}

``ended`` are the tasks that reached a final state since the last event (their final records are
in ``tasks``; an id there without a record was removed from the store).  A client's first event
holds every live task.  A comment line goes out every `HEARTBEAT` seconds when nothing else did,
and ``event: error`` (``{"error": "..."}``) when the home cannot be read: the stream stays open,
the watcher keeps trying, and once it can read again each client gets every live task again.  A
client that stops reading is dropped after `BACKLOG` unsent events.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

from jupyter_server.auth.decorator import authorized
from tornado import web
from tornado.iostream import StreamClosedError

import nbbgtask as bg

from ._data import Tasks, public
from .handlers import ApiError, NbbgtaskHandler

__all__ = ["BACKLOG", "HEARTBEAT", "POLL", "EventsHandler", "Watcher", "gap"]

#: seconds between two looks at the store (two stats, in a thread)
POLL = 0.2
#: seconds between two reads of the live tasks, per live task read last time, and their bounds
READ_GAP = 0.025
READ_GAP_MIN = 0.2
READ_GAP_MAX = 0.5
#: seconds between two full reads of the live tasks when the store did not change: a task whose
#: process died without a word is noticed (and ended "failed") within this
RECHECK = 1.0
#: seconds of silence after which a client gets a comment line (proxies close idle streams)
HEARTBEAT = 15.0
#: events a client may leave unread before it is dropped (it reconnects and starts afresh)
BACKLOG = 100
#: seconds a stopping server waits for the streams to end their responses
STOP_WAIT = 2.0
#: how many of the tasks that ended last are compared each round, to see ends the live files did
#: not show (a task that started and ended between two rounds)
NEWEST = 64


def gap(live: int) -> float:
    """Seconds to leave after a read of ``live`` live tasks before the next one."""
    return min(READ_GAP_MAX, max(READ_GAP_MIN, READ_GAP * live))


#: the states of a task that has not ended
LIVE = frozenset(("waiting", "queued", "running"))

T = TypeVar("T")
log = logging.getLogger(__name__)


class _Client:
    """One connected stream: what is waiting to be sent to it, ``None`` when it must end."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[str, dict[str, Any]] | None] = asyncio.Queue()
        #: it has not had its first event (every live task) yet
        self.fresh = True
        self.closed = False
        #: its handler has ended the response (or found the connection gone)
        self.ended = asyncio.Event()

    def send(self, event: str, data: dict[str, Any]) -> None:
        if self.closed:
            return
        if self.queue.qsize() >= BACKLOG:
            self.close()
            return
        self.queue.put_nowait((event, data))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            while not self.queue.empty():  # what it did not read is not sent: it starts afresh
                self.queue.get_nowait()
            self.queue.put_nowait(None)


class Watcher:
    """Follows the store of one home for every connected client; runs only while one is connected."""

    def __init__(self, tasks: Tasks, executor: Executor) -> None:
        self.tasks = tasks
        self._executor = executor
        self._clients: set[_Client] = set()
        self._task: asyncio.Task[None] | None = None
        #: the server stops: no new client
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        #: the store's version at the last full read
        self._version: Any = None
        self._last_read = 0.0
        #: when the live tasks' processes were last looked at (`RECHECK`)
        self._last_check = 0.0
        #: seconds from the last read before the next one may be made (`gap`)
        self._gap = READ_GAP_MIN
        #: live task id -> its record as last sent (without ``elapsed``, which moves by itself)
        self._shown: dict[str, dict[str, Any]] = {}
        #: the ids of the tasks that ended last, as last seen (None: not looked yet)
        self._recent_final: set[str] | None = None
        self._running = -1
        self._error: str | None = None

    @property
    def clients(self) -> int:
        return len(self._clients)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def subscribe(self) -> _Client:
        if self.closed:
            raise RuntimeError("the watcher was closed: the server is stopping")
        client = _Client()
        self._clients.add(client)
        if not self.running:
            self._reset()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="nbbgtask-events")
        return client

    def unsubscribe(self, client: _Client) -> None:
        client.close()
        self._clients.discard(client)
        if not self._clients and self._task is not None:
            self._task.cancel()
            self._task = None

    async def close(self, timeout: float = STOP_WAIT) -> None:
        """End every stream, and the watcher with them; no stream starts after.  Returns once
        each stream's response has ended (the server stops its loop right after), or ``timeout``."""
        self.closed = True
        clients = list(self._clients)
        for client in clients:
            self.unsubscribe(client)
        if clients:
            waits = asyncio.gather(*(client.ended.wait() for client in clients))
            try:
                await asyncio.wait_for(waits, timeout)
            except asyncio.TimeoutError:
                log.warning("nbbgtask: %d event stream(s) did not end within %g s", len(clients), timeout)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _run(self) -> None:
        while self._clients:
            try:
                if self._error is not None:  # after an error, every client gets every live task again
                    for client in self._clients:
                        client.fresh = True
                await self._round()
                self._error = None
            except bg.StoreError as exc:  # the home refused, or unreadable: say so once, keep trying
                message = f"nbbgtask cannot use its home folder: {exc}"
                if message != self._error:
                    self._error = message
                    for client in list(self._clients):
                        client.send("error", {"error": message})
            except Exception:  # one bad round must not end every stream; the next one retries
                log.exception("nbbgtask: reading the task store for the event stream failed")
            await asyncio.sleep(POLL)

    def _read(
        self, previous: list[str], look_at_ends: bool, check: bool
    ) -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, Any]] | None]:
        """In a thread: the live records (``check``: a task whose process died is ended), the
        records of the tasks in ``previous`` that are no longer live (``None`` for one gone from
        the store), and the tasks that ended last."""
        live = self.tasks.live(check)
        now_live = {r["id"] for r in live if r["state"] in LIVE}
        left: dict[str, Any] = {}
        for task_id in previous:
            if task_id not in now_live:
                try:
                    left[task_id] = self.tasks.get(task_id)
                except bg.TaskNotFound:
                    left[task_id] = None
        newest = self.tasks.newest_finished(NEWEST) if look_at_ends else None
        return live, left, newest

    async def _resources(self, record: dict[str, Any]) -> dict[str, Any] | None:
        return await self.tasks.resources_in(record, self._call)

    async def _round(self) -> None:
        clock = time.monotonic()
        fresh = [c for c in self._clients if c.fresh]
        if not fresh and clock - self._last_read < self._gap:
            return  # too soon after the last read to read again: no need to look
        version = await self._call(self.tasks.version)
        changed_store = version != self._version
        due = clock - self._last_check >= RECHECK
        if not (changed_store or due or fresh):
            return
        self._version, self._last_read = version, clock
        check = due or bool(fresh)  # a change alone: the records as written, their processes not looked at
        if check:
            self._last_check = clock
        records, left, newest = await self._call(self._read, list(self._shown), changed_store, check)
        live = [r for r in records if r["state"] in LIVE]
        ended = {r["id"]: r for r in records if r["state"] not in LIVE}  # ended just now, by reconcile
        ended.update((task_id, record) for task_id, record in left.items() if task_id not in ended)
        if newest is not None:
            if self._recent_final is not None:
                for record in newest:
                    if record["id"] not in self._recent_final and record["id"] not in ended:
                        ended[record["id"]] = record
            self._recent_final = {r["id"] for r in newest}
        if self._recent_final is not None:  # said once: not again when they show among the newest
            self._recent_final |= set(ended)
        figures = await asyncio.gather(*(self._resources(r) for r in live))
        now = time.time()
        current = {r["id"]: public(r, f, now) for r, f in zip(live, figures, strict=True)}
        changed = [shown for task_id, shown in current.items() if _without_elapsed(shown) != self._shown.get(task_id)]
        finals = [public(r, None, now) for r in ended.values() if r is not None]
        running = sum(1 for r in live if r["state"] == "running")
        base = {"ended": list(ended), "running": running, "now": now}
        if changed or ended or running != self._running:
            for client in self._clients:
                if not client.fresh:
                    client.send("tasks", {"tasks": changed + finals, **base})
        for client in fresh:
            client.fresh = False
            client.send("tasks", {"tasks": list(current.values()) + finals, **base})
        self._shown = {task_id: _without_elapsed(shown) for task_id, shown in current.items()}
        self._running = running
        self._gap = gap(len(records))


def _without_elapsed(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "elapsed"}


class EventsHandler(NbbgtaskHandler):
    """``GET events``: the stream of changes (`Watcher`), until the client goes or the server stops."""

    _client: _Client | None = None
    #: the client has gone (its connection closed)
    _gone = False

    @property
    def watcher(self) -> Watcher:
        watcher: Watcher = self.settings["nbbgtask.watcher"]
        return watcher

    @web.authenticated
    @authorized
    async def get(self) -> None:
        await self.call(self.tasks.home)  # a home it refuses is a JSON 503, before the stream starts
        if self.watcher.closed:
            raise ApiError(503, "the server is stopping")
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")  # nginx: pass each event on at once
        client = self._client = self.watcher.subscribe()
        try:
            await self._stream(client)
        finally:
            client.ended.set()

    async def _stream(self, client: _Client) -> None:
        try:
            self.write("retry: 3000\n\n")
            await self.flush()
            while True:
                try:
                    item = await asyncio.wait_for(client.queue.get(), HEARTBEAT)
                except asyncio.TimeoutError:
                    self.write(": heartbeat\n\n")
                else:
                    if item is None:
                        break
                    event, data = item
                    self.write(f"event: {event}\ndata: {json.dumps(data)}\n\n")
                await self.flush()
            if not self._gone:  # the server ends the stream: it stops
                await self.finish(set_content_type="text/event-stream; charset=utf-8")
        except StreamClosedError:
            self._gone = True
        finally:
            self.watcher.unsubscribe(client)

    def on_connection_close(self) -> None:
        self._gone = True
        if self._client is not None:
            self._client.close()
