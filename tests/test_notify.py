"""Word when work ends (`notify=`): one POST of JSON per qualifying end, by whoever records the end,
for every way a task runs; a dead endpoint never delays the end; the URL is a secret.

A real HTTP server on 127.0.0.1 receives the POSTs; the tasks are real processes.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from waiting import until

import nbbgtask as bg
from nbbgtask.task import notify as _task_notify

#: a secret in the URL's path, looked for wherever the URL must never be
TOKEN = "s3cr3t-webhook-token-7f1e"


class Hook:
    """A webhook endpoint on loopback that keeps every JSON body it is sent."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers["Content-Length"])
                hook.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/{TOKEN}"

    def for_task(self, task_id: str) -> list[dict]:
        return [b for b in self.bodies if b.get("id") == task_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.close()


def _sleep_then(seconds: float, value: object) -> object:
    time.sleep(seconds)
    return value


def _fail() -> None:
    raise ValueError("bad spline\nsecond line")


def test_one_post_per_end_for_every_way(way, hook):
    notify = bg.Notify(hook.url, min_seconds=0)
    good = bg.run(_sleep_then, 0.2, "ok", notify=notify, name="load")
    bad = bg.run(_fail, notify=notify, name="train")
    assert good.result(timeout=60) == "ok"
    with pytest.raises(bg.TaskFailed):
        bad.result(timeout=60)
    assert until(lambda: hook.for_task(good.id) and hook.for_task(bad.id), timeout=20)
    time.sleep(1.0)  # a second POST for either would have come by now
    [sent_good], [sent_bad] = hook.for_task(good.id), hook.for_task(bad.id)
    assert sent_good["state"] == "complete" and sent_good["name"] == "load" and sent_good["error"] is None
    assert sent_good["text"].startswith(f"nbbgtask: load ({good.id[:8]}) completed in ")
    assert sent_good["elapsed"] >= 0.2
    assert sent_bad["state"] == "failed" and sent_bad["error"] == "ValueError: bad spline"
    assert "failed after" in sent_bad["text"] and sent_bad["text"].endswith("ValueError: bad spline")


def test_a_task_killed_from_outside_is_reported_once_by_whoever_recorded_its_end(way, hook):
    if way.name == "dask":
        pytest.skip("a Dask task's process is a worker's child: test_dask covers killed workers")
    status = bg.run(_sleep_then, 60, None, notify=bg.Notify(hook.url, min_seconds=0))
    assert until(lambda: status.refresh().pid is not None, timeout=30)
    os.kill(status.pid, signal.SIGKILL)
    assert status.wait(30) and status.state == "failed"
    assert until(lambda: hook.for_task(status.id), timeout=20)
    time.sleep(1.0)
    [sent] = hook.for_task(status.id)
    assert sent["state"] == "failed" and "SIGKILL" in (sent["error"] or "")


def test_only_the_ends_asked_for_and_long_enough_are_sent(home, hook):
    quick = bg.run(_sleep_then, 0, 1, notify=hook.url)  # a plain URL: only tasks of 30 s or more
    only_failures = bg.run(_sleep_then, 0, 1, notify=bg.Notify(hook.url, on=("failed",), min_seconds=0))
    failure = bg.run(_fail, notify=bg.Notify(hook.url, on="failed", min_seconds=0))
    for s in (quick, only_failures, failure):
        s.wait(30)
    assert until(lambda: hook.for_task(failure.id), timeout=20)
    time.sleep(1.0)
    assert hook.for_task(quick.id) == [] and hook.for_task(only_failures.id) == []


def test_configure_and_a_class_attribute_set_the_default(home, hook):
    bg.configure(notify=bg.Notify(hook.url, min_seconds=0))
    by_default = bg.run(_sleep_then, 0, 1)

    class Quiet(bg.BackgroundTask):
        notify = bg.Notify(hook.url, on=("failed",), min_seconds=0)

        def execute(self, status):
            return 1

    quiet = Quiet.initiate()
    for s in (by_default, quiet):
        s.wait(30)
    assert until(lambda: hook.for_task(by_default.id), timeout=20)
    time.sleep(1.0)
    assert hook.for_task(quiet.id) == []


def test_a_callable_is_called_in_this_process_with_the_status(home):
    seen: list[tuple[str, str, int]] = []
    status = bg.run(_sleep_then, 0.1, 5, notify=bg.Notify(lambda s: seen.append((s.id, s.state, os.getpid())), min_seconds=0))
    assert status.result(timeout=30) == 5
    assert until(lambda: seen, timeout=10)
    assert seen == [(status.id, "complete", os.getpid())]


def test_a_dead_endpoint_never_delays_the_end_and_its_failure_is_in_the_log(way):
    # A socket that listens and never answers: each POST waits out its whole timeout.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/{TOKEN}"
        status = bg.run(_sleep_then, 0.1, "done", notify=bg.Notify(url, min_seconds=0))
        began = time.monotonic()
        assert status.result(timeout=60) == "done"
        # The end was recorded before the POST was tried: result() did not wait for it.
        assert status.state == "complete"
        if way.name != "dask":
            assert time.monotonic() - began < _task_notify.TIMEOUT
            # The task's process exits within the documented bound, and says why word was not sent.
            bound = _task_notify.BOUND + 10
            assert until(lambda: "could not be sent" in status.log(), timeout=bound), status.log()
            assert TOKEN not in status.log()
    finally:
        silent.close()


def test_the_url_never_reaches_the_store_a_log_or_a_process_list(way, hook, home):
    status = bg.run(_sleep_then, 2, 1, notify=bg.Notify(hook.url, min_seconds=0))
    assert until(lambda: status.refresh().state == "running", timeout=30)
    for proc in psutil.process_iter(["cmdline", "environ"]):
        try:
            assert TOKEN not in " ".join(proc.info["cmdline"] or [])
            assert TOKEN not in json.dumps(proc.info["environ"] or {})
        except psutil.Error:
            continue
    status.wait(30)
    assert until(lambda: hook.for_task(status.id), timeout=20)
    for path in Path(home).rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert TOKEN not in repr(bg.Notify(hook.url))


@pytest.mark.parametrize(
    ("value", "error", "words"),
    [
        ("ftp://example.org/hook", ValueError, "http:// or https://"),
        ("not a url", ValueError, "http:// or https://"),
        (42, TypeError, "webhook URL, a callable or bg.Notify"),
    ],
)
def test_a_bad_notify_is_refused_at_the_call_and_nothing_starts(home, value, error, words):
    with pytest.raises(error, match=words):
        bg.run(_sleep_then, 0, 1, notify=value)
    with pytest.raises(error, match=words):
        bg.configure(notify=value)
    assert bg.tasks() == []


def test_a_bad_notify_choice_names_what_is_allowed():
    with pytest.raises(ValueError, match="'complete', 'failed', 'cancelled'"):
        bg.Notify("https://example.org/h", on=("done",))
    with pytest.raises(ValueError, match="min_seconds"):
        bg.Notify("https://example.org/h", min_seconds=-1)
