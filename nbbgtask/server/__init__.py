"""nbbgtask's Jupyter server extension: a REST API over the tasks of one home folder, and a stream
of their changes, under ``{base_url}nbbgtask/api/`` (documented in docs/api.md, "REST API").

What it holds: `extension` (the ``Nbbgtask`` configurable and loading into a server), `handlers`
(the REST handlers), `events` (the event stream and its one watcher per server), `_data` (what
the server reads from and asks of nbbgtask) and `_paging` (pages of the history by an index).

What it may import: jupyter_server, tornado and traitlets; of nbbgtask, its public API
(``import nbbgtask as bg``), and its private modules only in `_data`, the one place to re-point
when they move.  Nothing of nbbgtask imports this package: jupyter_server finds it through
``nbbgtask._jupyter_server_extension_points``, so importing nbbgtask never imports a web server.
"""

from __future__ import annotations

from typing import Any

from .extension import load

__all__ = ["_load_jupyter_server_extension"]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    """Called by jupyter_server once it has found the extension (``ServerApp.jpserver_extensions``)."""
    load(serverapp)
