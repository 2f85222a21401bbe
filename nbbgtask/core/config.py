"""Process-wide settings (`bg.configure`) and the home folder that holds the store, logs and results."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

from nbbgtask.core.trust import check_home
from nbbgtask.core.trust import verify_home as verify
from nbbgtask.core.validate import positive_seconds, shown

__all__ = ["Settings", "checked_changes", "apply", "settings", "home", "default_home", "ensure_home", "verify_home"]

START_METHODS = ("auto", "fork", "forkserver", "spawn")
#: the default cap on a task's log, and the smallest one allowed (half of it is the head, half the tail)
LOG_MAX = 100 * 1024 * 1024
LOG_MAX_MIN = 1024 * 1024
BACKENDS = ("local", "dask")


@dataclasses.dataclass
class Settings:
    """What `bg.configure` sets; `None` for `home` means "resolve on first use"."""

    home: Path | None = None
    #: "auto": fork when that is safe, else the fork server (`nbbgtask.local.backend`); or one forced
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
    #: the limits of a task that names none (`nbbgtask.core.limits.Limits`); None: no limits
    limits: Any = None
    #: word when a task that names none ends (`nbbgtask.core.notify.Notify`); None: none
    notify: Any = None
    #: bytes a task's log is held to: past it the start and the end are kept (`nbbgtask.task.logcap`)
    log_max: int = LOG_MAX
    #: retries of a task that names none (`nbbgtask.core.retry`): how many, the first delay, which failures
    retries: int = 0
    retry_delay: float | None = None
    retry_on: Any = None


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
    """The home folder, created (0700) on first use, and checked (`nbbgtask.core.trust.check_home`)."""
    if _settings.home is None:
        _settings.home = ensure_home(default_home())
    return _settings.home


#: the (st_dev, st_ino) each home had when it was checked, to see it was not replaced since
_identity: dict[Path, tuple[int, int]] = {}


def ensure_home(path: Path, *, create: bool = True) -> Path:
    """Check that ``path`` is a home the user can trust (`nbbgtask.core.trust.check_home`), making it and its
    sub-folders (0700) if missing and ``create``; raises `HomeError` naming what is wrong."""
    path = Path(path).expanduser().absolute()
    _identity[path] = check_home(str(path), create=create)
    return path


def verify_home(path: Path) -> None:
    """Before trusting what the home holds: still the folder that was checked, ours alone."""
    verify(str(path), _identity.get(Path(path)))


def checked_changes(
    home: str | os.PathLike[str] | None = None,
    create_home: bool = True,
    start_method: str | None = None,
    max_running: float | None = None,
    refresh_interval: float | None = None,
    cancel_grace: float | None = None,
    backend: str | None = None,
    address: str | None = None,
    dask_client: Any = None,
    limits: Any = None,
    notify: Any = None,
    log_max: Any = None,
    retries: Any = None,
    retry_delay: Any = None,
    retry_on: Any = None,
) -> dict[str, Any]:
    """What `bg.configure` would change, every argument checked (``None``: leave it as it is).

    Raises a clear error for the first bad argument; nothing is applied here (see `apply`).
    """
    changes: dict[str, Any] = {}
    if start_method is not None:
        if start_method not in START_METHODS:
            raise ValueError(
                f"start_method must be one of {', '.join(repr(m) for m in START_METHODS)}, got {shown(start_method)}"
            )
        changes["start_method"] = start_method
    if max_running is not None:
        ok_int = isinstance(max_running, int) and not isinstance(max_running, bool) and max_running >= 1
        if not (ok_int or (type(max_running) is float and max_running == math.inf)):
            raise ValueError(
                f"max_running must be a whole number of tasks, 1 or more (math.inf for no limit), "
                f"got {shown(max_running)}"
            )
        changes["max_running"] = max_running
    if refresh_interval is not None:
        changes["refresh_interval"] = positive_seconds(refresh_interval, "refresh_interval")
    if cancel_grace is not None:
        changes["cancel_grace"] = positive_seconds(cancel_grace, "cancel_grace")
    if backend is not None or address is not None or dask_client is not None:
        chosen = backend or "dask"
        if chosen not in BACKENDS:
            raise ValueError(f"backend must be 'local' or 'dask', got {shown(backend)}")
        if chosen == "dask" and address is None and dask_client is None:
            raise ValueError("backend='dask' needs address='tcp://host:8786' or dask_client=a distributed.Client")
        if chosen == "local" and (address is not None or dask_client is not None):
            raise ValueError("address and dask_client go with backend='dask'")
        if dask_client is not None and not (hasattr(dask_client, "submit") and hasattr(dask_client, "scheduler")):
            raise TypeError(f"dask_client must be a distributed.Client, got {type(dask_client).__name__}")
        if address is not None and not isinstance(address, str):
            raise TypeError(f"address must be a string such as 'tcp://scheduler:8786', got {shown(address)}")
        changes["backend"] = chosen
    if limits is not None:
        from nbbgtask.core.limits import checked

        changes["limits"] = checked(limits)
    if notify is not None:
        from nbbgtask.core.notify import checked as checked_notify

        changes["notify"] = checked_notify(notify)
    if log_max is not None:
        changes["log_max"] = _log_max(log_max)
    if retries is not None or retry_delay is not None or retry_on is not None:
        from nbbgtask.core import retry as _retry

        if retries is not None:
            changes["retries"] = _retry.checked_retries(retries)
        if retry_delay is not None:
            changes["retry_delay"] = _retry.checked_delay(retry_delay)
        if retry_on is not None:
            changes["retry_on"] = _retry.checked_on(retry_on)
    if home is not None:
        if not isinstance(home, (str, os.PathLike)):
            raise TypeError(f"home must be a path (a str or a pathlib.Path), got {shown(home)}")
        changes["home"] = ensure_home(Path(os.fspath(home)), create=create_home)
    return changes


def _log_max(value: Any) -> int:
    from nbbgtask.core.limits import Limits

    problem = (
        f"log_max must be a number of bytes of at least {LOG_MAX_MIN:,} (1 MiB) or a size such as "
        f"'100 MiB', got {value!r}"
    )
    try:
        number = Limits(memory=value).memory
    except (TypeError, ValueError):
        raise ValueError(problem) from None
    if number is None or number < LOG_MAX_MIN:
        raise ValueError(problem)
    return number


def apply(changes: dict[str, Any]) -> None:
    """Put checked changes (`checked_changes`) in force."""
    for key, value in changes.items():
        setattr(_settings, key, value)
