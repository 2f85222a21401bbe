"""Process-wide settings (`bg.configure`) and the home folder that holds the store, logs and results."""

from __future__ import annotations

import dataclasses
import math
import os
import stat
from pathlib import Path
from typing import Any

from ._errors import HomeError
from ._validate import positive_seconds

__all__ = ["Settings", "checked_changes", "apply", "settings", "home", "default_home", "ensure_home"]

START_METHODS = ("auto", "fork", "forkserver", "spawn")
BACKENDS = ("local", "dask")


@dataclasses.dataclass
class Settings:
    """What `bg.configure` sets; `None` for `home` means "resolve on first use"."""

    home: Path | None = None
    #: "auto": fork when that is safe, else the fork server (`_local_backend`); or one forced
    start_method: str = "auto"
    #: tasks beyond this many running wait "queued"; ``math.inf`` for no limit
    max_running: float = math.inf
    #: seconds between refreshes of live widgets and between polls in ``wait``
    refresh_interval: float = 0.1
    #: seconds a cancelled task gets after SIGTERM before SIGKILL
    cancel_grace: float = 3.0
    #: at most one progress write per task per this many seconds
    progress_interval: float = 0.1
    backend: str = "local"
    dask_client: Any = None


_settings = Settings()


def settings() -> Settings:
    return _settings


def reset() -> None:
    """Back to the defaults (used by tests, and by a spawned task before it applies its parent's)."""
    global _settings
    _settings = Settings()


def default_home() -> Path:
    env = os.environ.get("NBBGTASK_HOME")
    if env:
        return Path(env).expanduser()
    from jupyter_core.paths import jupyter_data_dir

    return Path(jupyter_data_dir()) / "nbbgtask"


def home() -> Path:
    """The home folder, created (0700) on first use."""
    if _settings.home is None:
        _settings.home = ensure_home(default_home())
    return _settings.home


def ensure_home(path: Path) -> Path:
    """Create ``path`` and its sub-folders readable by the owner only, or raise `HomeError`."""
    path = Path(path).expanduser().absolute()
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if stat.S_IMODE(path.stat().st_mode) != 0o700:
            path.chmod(0o700)
        for sub in ("logs", "outputs", "results", "stacks"):
            (path / sub).mkdir(mode=0o700, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise HomeError(
            f"cannot use {path} as the nbbgtask home: {reason}. Point the NBBGTASK_HOME "
            f"environment variable, or bg.configure(home=...), at a folder you can write."
        ) from None
    return path


def checked_changes(
    home: str | os.PathLike[str] | None = None,
    start_method: str | None = None,
    max_running: float | None = None,
    refresh_interval: float | None = None,
    cancel_grace: float | None = None,
    backend: str | None = None,
    address: str | None = None,
    dask_client: Any = None,
) -> dict[str, Any]:
    """What `bg.configure` would change, every argument checked (``None``: leave it as it is).

    Raises a clear error for the first bad argument; nothing is applied here (see `apply`).
    """
    changes: dict[str, Any] = {}
    if start_method is not None:
        if start_method not in START_METHODS:
            raise ValueError(
                f"start_method must be one of {', '.join(repr(m) for m in START_METHODS)}, got {start_method!r}"
            )
        changes["start_method"] = start_method
    if max_running is not None:
        ok_int = isinstance(max_running, int) and not isinstance(max_running, bool) and max_running >= 1
        if not (ok_int or (type(max_running) is float and max_running == math.inf)):
            raise ValueError(
                f"max_running must be a whole number of tasks, 1 or more (math.inf for no limit), "
                f"got {max_running!r}"
            )
        changes["max_running"] = max_running
    if refresh_interval is not None:
        changes["refresh_interval"] = positive_seconds(refresh_interval, "refresh_interval")
    if cancel_grace is not None:
        changes["cancel_grace"] = positive_seconds(cancel_grace, "cancel_grace")
    if backend is not None or address is not None or dask_client is not None:
        chosen = backend or "dask"
        if chosen not in BACKENDS:
            raise ValueError(f"backend must be 'local' or 'dask', got {backend!r}")
        if chosen == "dask" and address is None and dask_client is None:
            raise ValueError("backend='dask' needs address='tcp://host:8786' or dask_client=a distributed.Client")
        if chosen == "local" and (address is not None or dask_client is not None):
            raise ValueError("address and dask_client go with backend='dask'")
        if dask_client is not None and not (hasattr(dask_client, "submit") and hasattr(dask_client, "scheduler")):
            raise TypeError(f"dask_client must be a distributed.Client, got {type(dask_client).__name__}")
        if address is not None and not isinstance(address, str):
            raise TypeError(f"address must be a string such as 'tcp://scheduler:8786', got {address!r}")
        changes["backend"] = chosen
    if home is not None:
        changes["home"] = ensure_home(Path(os.fspath(home)))
    return changes


def apply(changes: dict[str, Any]) -> None:
    """Put checked changes (`checked_changes`) in force."""
    for key, value in changes.items():
        setattr(_settings, key, value)
