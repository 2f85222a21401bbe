"""The REST handlers under ``{base_url}nbbgtask/api/``: the task list, one task, its log, stack and
outputs, and cancel.  Each answers JSON, errors too (``{"error": "..."}``, never a traceback page),
behind Jupyter's own authentication (`tornado.web.authenticated`) and authorization
(`authorized`, resource `AUTH_RESOURCE`); a cookie-authenticated POST must carry the XSRF token,
as jupyter_server requires of every handler.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import Executor
from http.client import responses
from typing import Any, TypeVar

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from tornado import web

import nbbgtask as bg

from ._data import LOG_LINES, LOG_MAX_LINES, STATES, Tasks, public, valid_id

__all__ = [
    "AUTH_RESOURCE",
    "ApiError",
    "CancelHandler",
    "LIMIT_DEFAULT",
    "LIMIT_MAX",
    "LogHandler",
    "NotFoundHandler",
    "OutputsHandler",
    "StackHandler",
    "TaskHandler",
    "TasksHandler",
    "NbbgtaskHandler",
]

#: the resource name `authorized` checks (JupyterHub scopes access to it by this name)
AUTH_RESOURCE = "nbbgtask"
#: tasks in a page unless ``limit`` says otherwise, and the most a page holds
LIMIT_DEFAULT = 50
LIMIT_MAX = 500

T = TypeVar("T")


class ApiError(web.HTTPError):
    """An error the client caused or must hear of: its status, and a message naming the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, None)
        self.message = message


class NbbgtaskHandler(APIHandler):
    """What every handler of the extension shares: the tasks of the home, a thread to read them
    in, and errors as JSON."""

    auth_resource = AUTH_RESOURCE

    @property
    def tasks(self) -> Tasks:
        tasks: Tasks = self.settings["nbbgtask.tasks"]
        return tasks

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the extension's threads (it reads files, or waits for a process);
        the library's errors become answers: an unknown task 404, a home it refuses or a store it
        cannot read 503, and any other refusal of the library 409 (the task's state does not
        allow it now: a stack of a task that ended, a cancel that could not be confirmed)."""
        executor: Executor = self.settings["nbbgtask.executor"]
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
        except bg.TaskNotFound as exc:
            raise ApiError(404, str(exc)) from None
        except bg.StoreError as exc:  # bg.HomeError among them: the message names the path and the fault
            raise ApiError(503, f"nbbgtask cannot use its home folder: {exc}") from None
        except bg.NbbgtaskError as exc:
            raise ApiError(409, str(exc)) from None

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """``{"error": "..."}``: the message of an `ApiError`, the reason of any other HTTP error,
        and for an unexpected exception its one line (its traceback goes to the server's log)."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ApiError):
            message = exc.message
        elif isinstance(exc, web.HTTPError) or exc is None:
            message = responses.get(status_code, "Unknown HTTP error")
            if isinstance(exc, web.HTTPError) and exc.log_message and status_code != 404:
                message += f": {exc.log_message % exc.args if exc.args else exc.log_message}"
        else:
            message = f"the nbbgtask server extension failed: {type(exc).__name__}: {exc}"
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": message}))

    def task_id(self, raw: str) -> str:
        if not valid_id(raw):
            raise ApiError(400, f"{raw[:80]!r} is not a task id (32 hex digits)")
        return raw

    def whole_number(self, name: str, default: int, low: int, high: int) -> int:
        raw = self.get_query_argument(name, None)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw, 10)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise ApiError(400, f"{name} must be a whole number from {low} to {high}, got {raw[:40]!r}")
        return value

    async def with_resources(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The records as JSON, each running local task's CPU and memory read meanwhile."""
        figures = await asyncio.gather(*(self.resources(r) for r in records))
        return [public(r, f) for r, f in zip(records, figures, strict=True)]

    async def resources(self, record: dict[str, Any]) -> dict[str, Any] | None:
        return await self.tasks.resources_in(record, self.call)


class TasksHandler(NbbgtaskHandler):
    """``GET tasks?state=&name=&limit=&before=``: a page of tasks, newest first."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        state = self.get_query_argument("state", None) or None
        if state is not None and state not in STATES:
            raise ApiError(400, f"state must be one of {', '.join(STATES)}, got {state[:40]!r}")
        name = self.get_query_argument("name", None) or None
        limit = self.whole_number("limit", LIMIT_DEFAULT, 1, LIMIT_MAX)
        before = self.get_query_argument("before", None) or None
        if before is not None and not valid_id(before):
            raise ApiError(400, f"before must be a task id (32 hex digits), got {before[:80]!r}")
        records, following, running = await self.call(self.tasks.page, state, name, limit, before)
        self.finish({"tasks": await self.with_resources(records), "next": following, "running": running})


class TaskHandler(NbbgtaskHandler):
    """``GET tasks/{id}``: one task."""

    @web.authenticated
    @authorized
    async def get(self, task_id: str) -> None:
        record = await self.call(self.tasks.get, self.task_id(task_id))
        (shown,) = await self.with_resources([record])
        self.finish({"task": shown})


class LogHandler(NbbgtaskHandler):
    """``GET tasks/{id}/log?tail=N``: the end of what the task printed."""

    @web.authenticated
    @authorized
    async def get(self, task_id: str) -> None:
        task_id = self.task_id(task_id)
        lines = self.whole_number("tail", LOG_LINES, 1, LOG_MAX_LINES)
        self.finish(await self.call(self.tasks.log, task_id, lines))


class StackHandler(NbbgtaskHandler):
    """``GET tasks/{id}/stack``: the running task's Python stack; 409 when it has none."""

    @web.authenticated
    @authorized
    async def get(self, task_id: str) -> None:
        self.finish({"text": await self.call(self.tasks.stack, self.task_id(task_id))})


class OutputsHandler(NbbgtaskHandler):
    """``GET tasks/{id}/outputs``: what the task printed and displayed, as nbformat outputs."""

    @web.authenticated
    @authorized
    async def get(self, task_id: str) -> None:
        outputs = await self.call(self.tasks.outputs, self.task_id(task_id))
        self.finish({"outputs": outputs})


class CancelHandler(NbbgtaskHandler):
    """``POST tasks/{id}/cancel``: stop the task; it ends "cancelled"."""

    @web.authenticated
    @authorized
    async def post(self, task_id: str) -> None:
        cancelled, record = await self.call(self.tasks.cancel, self.task_id(task_id))
        self.finish({"cancelled": cancelled, "task": public(record)})


class NotFoundHandler(NbbgtaskHandler):
    """Any other path under the API: a JSON 404 (not Jupyter's HTML page)."""

    @web.authenticated
    @authorized
    def get(self, *args: Any) -> None:
        raise ApiError(404, f"no such nbbgtask endpoint: {self.request.path}")

    post = get
