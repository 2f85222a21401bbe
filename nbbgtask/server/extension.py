"""The Jupyter server extension: its configuration (`Nbbgtask`, ``c.Nbbgtask.home``) and loading
it into a server (`load`): the handlers' routes under ``{base_url}nbbgtask/api/``, the threads that
read the store, and the one `Watcher` of the event stream."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from jupyter_server.utils import url_path_join
from traitlets import Unicode
from traitlets.config import Configurable

from ._data import Tasks
from .events import EventsHandler, Watcher
from .handlers import (
    CancelHandler,
    LogHandler,
    NotFoundHandler,
    OutputsHandler,
    StackHandler,
    TaskHandler,
    TasksHandler,
)

__all__ = ["API_PATH", "THREADS", "Nbbgtask", "load", "routes"]

#: where the REST API lives, under the server's base_url
API_PATH = "nbbgtask/api"
#: threads that read the store and wait for tasks' processes (a stack request waits up to 5 s)
THREADS = 8
#: a task id in a path: anything up to the next slash, so that a malformed one is answered 400
_ID = r"(?P<task_id>[^/]+)"


class Nbbgtask(Configurable):
    """The server extension's settings (``c.Nbbgtask.home = "..."`` in jupyter_server_config.py)."""

    home = Unicode(
        "",
        config=True,
        help="The nbbgtask home folder whose tasks the server shows. Empty: $NBBGTASK_HOME, else "
        "nbbgtask/ under the Jupyter data directory (as the library). It must be a folder of the "
        "user's that nobody else can write; one that is not is refused, naming the problem.",
    )


def routes(base_url: str) -> list[tuple[str, type, dict[str, Any]]]:
    api = url_path_join(base_url, API_PATH)
    return [
        (url_path_join(api, "tasks"), TasksHandler, {}),
        (url_path_join(api, "tasks", _ID), TaskHandler, {}),
        (url_path_join(api, "tasks", _ID, "log"), LogHandler, {}),
        (url_path_join(api, "tasks", _ID, "stack"), StackHandler, {}),
        (url_path_join(api, "tasks", _ID, "outputs"), OutputsHandler, {}),
        (url_path_join(api, "tasks", _ID, "cancel"), CancelHandler, {}),
        (url_path_join(api, "events"), EventsHandler, {}),
        (url_path_join(api, "(.*)"), NotFoundHandler, {}),
    ]


def load(serverapp: Any) -> None:
    """Add the extension to ``serverapp`` (a jupyter_server ``ServerApp``)."""
    config = Nbbgtask(parent=serverapp)
    tasks = Tasks(config.home or None)
    executor = ThreadPoolExecutor(THREADS, thread_name_prefix="nbbgtask-server")
    web_app = serverapp.web_app
    web_app.settings.update(
        {
            "nbbgtask.tasks": tasks,
            "nbbgtask.executor": executor,
            "nbbgtask.watcher": Watcher(tasks, executor),
        }
    )
    base_url = web_app.settings["base_url"]
    web_app.add_handlers(".*$", routes(base_url))
    serverapp.log.info(
        "nbbgtask: REST API at %s (home: %s)",
        url_path_join(base_url, API_PATH),
        config.home or "$NBBGTASK_HOME, else the default",
    )
