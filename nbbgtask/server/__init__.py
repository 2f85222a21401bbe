"""nbbgtask's Jupyter server extension: a REST API over the tasks of one home folder, and a stream
of their changes, under ``{base_url}nbbgtask/api/`` (documented in docs/api.md, "REST API").

What it holds, top to bottom: `extension` (`Nbbgtask`, the extension app: its setting
``c.Nbbgtask.home``, its routes, its start and stop), `events` (the event stream and its one
watcher per server), `handlers` (the REST handlers), and `_data` (what the server reads from and asks
of nbbgtask: its pages come from the store's index of each history shard); a module imports only
those below it.

What it may import: jupyter_server, tornado and traitlets; of nbbgtask, its public API
(``import nbbgtask as bg``), and its private modules only in `_data`, the one place to re-point
when they move.  Nothing of nbbgtask imports this package but
``nbbgtask._jupyter_server_extension_points``, which only jupyter_server calls: importing nbbgtask
never imports a web server.
"""

from __future__ import annotations

from typing import Any

from .extension import Nbbgtask

__all__ = ["Nbbgtask", "_load_jupyter_server_extension"]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    """Load the extension into ``serverapp``, for a server that names this module itself in
    ``jpserver_extensions`` (installed, it is found as ``nbbgtask``, whose extension point names
    `Nbbgtask`; jupyter_server then loads and stops it through the app)."""
    Nbbgtask._load_jupyter_server_extension(serverapp)
