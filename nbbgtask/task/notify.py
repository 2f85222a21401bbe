"""Sending word of a task's end to a webhook: one POST of JSON, by the process that records the end.

Each process that may record a task's end (the task itself, the kernel that started it, the fork
server, the kernel that follows a task on Dask) says which of its tasks want word (`expect`),
and hears from the store when it recorded one's end (`nbbgtask.store.ends`): the end is written
first, so a slow or dead endpoint never delays or loses it.  A POST gets `TIMEOUT` seconds and one
retry after `RETRY_AFTER`; a failure is noted in the task's log, never with the URL, which is a
secret.  In a task's own process the POST is made before the process exits (`SYNC`); elsewhere in
a thread of its own, so that one endpoint never holds up another task's end.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from nbbgtask.core.forks import renew_in_child
from nbbgtask.core.notify import Notify, payload
from nbbgtask.core.trust import open_owned
from nbbgtask.core.wire import write_all
from nbbgtask.store import ends
from nbbgtask.store.files import log_path

__all__ = ["expect", "forget", "send", "TIMEOUT", "RETRY_AFTER", "BOUND"]

#: seconds one POST may take
TIMEOUT = 5.0
#: seconds before the one retry of a POST that failed
RETRY_AFTER = 1.0
#: the most a dead endpoint can keep a task's process from exiting after its end is recorded
BOUND = 2 * TIMEOUT + RETRY_AFTER

_lock = threading.Lock()
#: task id -> where its end goes (URL targets only: a callable is the kernel's, `nbbgtask.api.notify`)
_pending: dict[str, Notify] = {}
#: send in the calling thread (a task's own process, which exits right after its end)
SYNC = False


def expect(task_id: str, notify: Notify | None) -> None:
    """This process may record ``task_id``'s end: if it does, send word to ``notify``'s URL."""
    if notify is None or notify.url is None:
        return
    with _lock:
        _pending[task_id] = notify
    ends.listen(_on_end)


def forget(task_id: str) -> None:
    """Another process recorded the end (or will): this one sends nothing for it."""
    with _lock:
        _pending.pop(task_id, None)


def _on_end(home: Path, record: dict[str, Any]) -> None:
    with _lock:
        notify = _pending.pop(str(record.get("id")), None)
    if notify is None or notify.url is None or not notify.wants(record):
        return
    if SYNC:
        send(notify.url, payload(record), home, record["id"])
    else:
        threading.Thread(
            target=send, args=(notify.url, payload(record), home, record["id"]), name="nbbgtask-notify", daemon=True
        ).start()


def send(url: str, body: dict[str, Any], home: Path | None = None, task_id: str | None = None) -> bool:
    """POST ``body`` as JSON to ``url``: ``TIMEOUT`` seconds, one retry; ``True`` if it was taken.
    A failure is noted in the task's log (when ``home`` and ``task_id`` name it)."""
    import urllib.error  # here: every task and script imports this module, few send word
    import urllib.request

    data = json.dumps(body).encode()
    why = ""
    for attempt in range(2):
        if attempt:
            time.sleep(RETRY_AFTER)
        request = urllib.request.Request(
            url, data=data, method="POST", headers={"Content-Type": "application/json", "User-Agent": "nbbgtask"}
        )
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as answer:  # noqa: S310 - http(s) only, checked by Notify
                if 200 <= answer.status < 300:
                    return True
                why = f"the endpoint answered {answer.status}"
        except urllib.error.HTTPError as exc:
            why = f"the endpoint answered {exc.code}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            why = f"{type(reason).__name__}: {reason}".replace(url, "<the URL>")
    if home is not None and task_id is not None:
        _note(home, task_id, f"nbbgtask: word of this task's end could not be sent to its notify URL: {why}\n")
    return False


def _note(home: Path, task_id: str, line: str) -> None:
    try:
        fd = open_owned(log_path(home, task_id), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC)
    except OSError:
        print(line, end="", file=sys.stderr)
        return
    try:
        write_all(fd, line.encode("utf-8", "replace"))
    finally:
        os.close(fd)


def _reset_after_fork() -> None:
    """A child forked from this process sends word only for the task it runs (it says which)."""
    global _lock
    _lock = threading.Lock()
    _pending.clear()


renew_in_child(_reset_after_fork)
