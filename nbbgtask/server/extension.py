"""The Jupyter server extension itself: `Nbbgtask`, its settings (``c.Nbbgtask.home``) and its
life in a server: the handlers' routes under ``{base_url}nbbgtask/api/``, the threads that read
the store, and the one `Watcher` of the event stream, all ended with the server.

An ``ExtensionApp`` rather than a bare loader function because only an ``ExtensionApp`` hears that
the server stops (``stop_extension``): the event streams are then ended properly and the threads
let go, rather than cut off when the process exits.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from jupyter_server.extension.application import ExtensionApp
from jupyter_server.utils import url_path_join
from traitlets import Unicode

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

__all__ = ["API_PATH", "THREADS", "Nbbgtask", "routes"]

#: where the REST API lives, under the server's base_url
API_PATH = "nbbgtask/api"
#: threads that read the store and wait for tasks' processes (a stack request waits up to 5 s)
THREADS = 8
#: a task id in a path: anything up to the next slash, so that a malformed one is answered 400
_ID = r"(?P<task_id>[^/]+)"


def routes() -> list[tuple[str, type, dict[str, Any]]]:
    """The handlers, by path under the server's base_url."""
    return [
        (url_path_join(API_PATH, "tasks"), TasksHandler, {}),
        (url_path_join(API_PATH, "tasks", _ID), TaskHandler, {}),
        (url_path_join(API_PATH, "tasks", _ID, "log"), LogHandler, {}),
        (url_path_join(API_PATH, "tasks", _ID, "stack"), StackHandler, {}),
        (url_path_join(API_PATH, "tasks", _ID, "outputs"), OutputsHandler, {}),
        (url_path_join(API_PATH, "tasks", _ID, "cancel"), CancelHandler, {}),
        (url_path_join(API_PATH, "events"), EventsHandler, {}),
        (url_path_join(API_PATH, "(.*)"), NotFoundHandler, {}),
    ]


class Nbbgtask(ExtensionApp):
    """nbbgtask's server extension (``c.Nbbgtask.home = "..."`` in jupyter_server_config.py)."""

    name = "nbbgtask"
    #: loaded beside JupyterLab and the rest, never the application a server is started for
    load_other_extensions = True

    home = Unicode(
        "",
        config=True,
        help="The nbbgtask home folder whose tasks the server shows. Empty: $NBBGTASK_HOME, else "
        "nbbgtask/ under the Jupyter data directory (as the library). It must be a folder of the "
        "user's that nobody else can write; one that is not is refused, naming the problem.",
    )

    def initialize_settings(self) -> None:
        self.tasks = Tasks(self.home or None)
        self.executor = ThreadPoolExecutor(THREADS, thread_name_prefix="nbbgtask-server")
        self.watcher = Watcher(self.tasks, self.executor)
        self.settings.update(
            {"nbbgtask.tasks": self.tasks, "nbbgtask.executor": self.executor, "nbbgtask.watcher": self.watcher}
        )
        self.log.info(
            "nbbgtask: REST API at %s (home: %s)",
            url_path_join(self.serverapp.base_url, API_PATH),  # type: ignore[union-attr]
            self.home or "$NBBGTASK_HOME, else the default",
        )

    def initialize_handlers(self) -> None:
        self.handlers.extend(routes())

    async def stop_extension(self) -> None:
        """The server stops: end every event stream, and let the threads go (a read under way
        finishes on its own; nothing waits for it)."""
        await self.watcher.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
