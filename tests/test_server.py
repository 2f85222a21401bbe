"""The Jupyter server extension: its REST API and event stream, in a real jupyter_server, over a
real store, with real task processes.

pytest-jupyter's fixtures are imported here rather than loaded as a plugin: as a plugin its
autouse server clean-up would run around every test of the suite.  Its async test runner is a
plugin hook too, so these tests are plain functions that run coroutines on its loop (`run`).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import pytest
from jupyter_server.utils import url_path_join
from pytest_jupyter.jupyter_server import *  # noqa: F403  (the fixtures jp_fetch, jp_serverapp, ... for this module)
from waiting import until

import nbbgtask as bg
from nbbgtask.store.store import store_for

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

API = ("nbbgtask", "api")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def jp_server_config(home: Path) -> dict[str, Any]:
    """The server loads the extension (as the installed config file does) and reads the test's home."""
    return {"ServerApp": {"jpserver_extensions": {"nbbgtask": True}}, "Nbbgtask": {"home": str(home)}}


@pytest.fixture
def run(jp_asyncio_loop: asyncio.AbstractEventLoop) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    return jp_asyncio_loop.run_until_complete


class Reply:
    def __init__(self, code: int, body: bytes, headers: Any) -> None:
        self.code = code
        self.headers = headers
        self.text = body.decode()
        self.json = json.loads(body) if headers.get("Content-Type", "").startswith("application/json") else None


@pytest.fixture
def api(jp_fetch: Any, run: Any) -> Callable[..., Reply]:
    """``api("tasks", params={...})``: one request to the extension, token-authenticated."""

    def call(*path: str, method: str = "GET", params: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> Reply:
        body = b"" if method == "POST" else None
        response = run(jp_fetch(*API, *path, method=method, params=params, headers=headers, body=body, raise_error=False))
        return Reply(response.code, response.body or b"", response.headers)

    return call


def _finished(count: int, t0: float, **fields: Any) -> list[dict[str, Any]]:
    """Records of ``count`` finished tasks, created a second apart from ``t0`` on."""
    return [
        {
            "id": secrets.token_hex(16), "name": "imported", "state": "complete", "created": t0 + i,
            "started": t0 + i + 0.25, "finished": t0 + i + 0.5, "percent": 100.0, "message": "",
            "pid": None, "cancel_requested": False, "error": None, "traceback": None, "has_result": False,
            "settings": {"secret-ish": "not for the browser"}, "start_method": "fork", **fields,
        }
        for i in range(count)
    ]


# -- tasks the tests start -------------------------------------------------------------------------


def _wait_for_gate(path: str) -> None:
    while not os.path.exists(path):
        time.sleep(0.01)


def gated(folder: str) -> str:
    """Prints, reports 10 %, waits for ``folder``/one; reports 60 %, waits for ``folder``/two; ends."""
    print("started", flush=True)
    bg.progress(10, "waiting at the first gate")
    _wait_for_gate(os.path.join(folder, "one"))
    bg.progress(60, "waiting at the second gate")
    _wait_for_gate(os.path.join(folder, "two"))
    return "through"


def chatty(lines: int, long_line: int) -> None:
    for i in range(lines):
        print(f"line {i}")
    if long_line:
        print("x" * long_line)


def shows() -> int:
    from IPython.display import HTML, display

    print("before the display", flush=True)
    display(HTML("<b>bold</b>"))
    return 42


def _started(status: bg.TaskStatus) -> bool:
    status.refresh()
    return status.state == "running" and status.percent >= 10


# -- installing -----------------------------------------------------------------------------------


def test_importing_nbbgtask_imports_no_web_server_and_the_install_enables_the_extension():
    code = "import sys, nbbgtask; print(sorted(m for m in sys.modules if m.split('.')[0] in ('tornado', 'jupyter_server')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
    (point,) = bg._jupyter_server_extension_points()
    assert point["module"] == "nbbgtask.server" and point["app"].name == "nbbgtask"
    config = json.loads((ROOT / "jupyter-config" / "server-config" / "nbbgtask.json").read_text())
    assert config == {"ServerApp": {"jpserver_extensions": {"nbbgtask": True}}}
    wheel = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    assert wheel["shared-data"]["jupyter-config/server-config"] == "etc/jupyter/jupyter_server_config.d"
    # ... and the install of this environment put it where jupyter_server looks
    installed = Path(sys.prefix) / "etc" / "jupyter" / "jupyter_server_config.d" / "nbbgtask.json"
    assert json.loads(installed.read_text()) == config


# -- authentication --------------------------------------------------------------------------------


def test_every_endpoint_refuses_a_request_without_credentials(api, jp_fetch):
    some = secrets.token_hex(16)
    for path, method in [(("tasks",), "GET"), (("tasks", some), "GET"), (("tasks", some, "log"), "GET"),
                         (("tasks", some, "stack"), "GET"), (("tasks", some, "outputs"), "GET"),
                         (("tasks", some, "cancel"), "POST"), (("events",), "GET")]:
        reply = api(*path, method=method, headers={"Authorization": ""})
        assert reply.code == 403, path
        assert reply.json is not None and "error" in reply.json and "Traceback" not in reply.text
    assert api("tasks").code == 200  # and with them, it answers


def test_a_cookie_authenticated_post_needs_the_xsrf_token(api, run, jp_fetch, home):
    status = bg.run(gated, str(home))
    assert until(lambda: _started(status), timeout=30)
    login = api("tasks")  # token-authenticated: the server sets its login cookie
    cookies = SimpleCookie()
    for header in login.headers.get_list("Set-Cookie"):
        cookies.load(header)
    assert cookies, "the server set no login cookie"
    jar = "; ".join(f"{name}={morsel.value}" for name, morsel in cookies.items())
    assert api("tasks", headers={"Authorization": "", "Cookie": jar}).code == 200  # the cookie alone logs in

    refused = api("tasks", status.id, "cancel", method="POST", headers={"Authorization": "", "Cookie": jar})
    assert refused.code == 403 and "xsrf" in refused.json["error"].lower()
    assert bg.get(status.id).state == "running"

    xsrf = "2|" + secrets.token_hex(4) + "|" + secrets.token_hex(16) + "|" + str(int(time.time()))
    accepted = api("tasks", status.id, "cancel", method="POST",
                   headers={"Authorization": "", "Cookie": f"{jar}; _xsrf={xsrf}", "X-XSRFToken": xsrf})
    assert accepted.code == 200, accepted.text
    assert accepted.json["cancelled"] is True and accepted.json["task"]["state"] == "cancelled"


# -- errors ------------------------------------------------------------------------------------------


def test_a_malformed_id_is_400_and_an_unknown_one_404_each_with_a_json_error(api):
    for tail in [(), ("log",), ("stack",), ("outputs",)]:
        bad = api("tasks", "not-a-task-id", *tail)
        assert bad.code == 400 and "not a task id" in bad.json["error"], bad.text
        unknown = api("tasks", "0" * 32, *tail)
        assert unknown.code == 404 and "no task" in unknown.json["error"], unknown.text
    assert api("tasks", "nope", "cancel", method="POST").code == 400
    assert api("tasks", "0" * 32, "cancel", method="POST").code == 404
    elsewhere = api("nothing", "here")
    assert elsewhere.code == 404 and "no such nbbgtask endpoint" in elsewhere.json["error"]


def test_bad_query_parameters_are_400_naming_the_parameter(api):
    for params, named in [({"limit": "0"}, "limit"), ({"limit": "501"}, "limit"), ({"limit": "ten"}, "limit"),
                          ({"state": "sleeping"}, "state"), ({"before": "xyz"}, "before")]:
        reply = api("tasks", params=params)
        assert reply.code == 400 and reply.json["error"].startswith(named), (params, reply.text)
    assert api("tasks", params={"before": "0" * 32}).code == 404
    assert api("tasks", "0" * 32, "log", params={"tail": "0"}).code == 400
    assert api("tasks", "0" * 32, "log", params={"tail": "5001"}).code == 400


def test_a_home_that_fails_the_trust_checks_is_refused_by_every_request_naming_why(api, home):
    assert api("tasks").code == 200
    home.chmod(0o777)
    try:
        for path in [("tasks",), ("tasks", "0" * 32), ("events",)]:
            reply = api(*path)
            assert reply.code == 503, reply.text
            assert str(home) in reply.json["error"] and "writable by others" in reply.json["error"]
            assert "Traceback" not in reply.text
    finally:
        home.chmod(0o700)
    assert api("tasks").code == 200  # fixed while the server runs: used again


# -- the list ----------------------------------------------------------------------------------------


def test_pages_walk_the_tasks_newest_first_without_repeats(api, home):
    t0 = time.time() - 10_000
    records = _finished(120, t0)
    for record in records[::7]:
        record["state"] = "failed"
    store_for(home).add_finished(records)
    seen: list[dict[str, Any]] = []
    before = None
    pages = 0
    while True:
        reply = api("tasks", params={"limit": "50", **({"before": before} if before else {})})
        assert reply.code == 200, reply.text
        page = reply.json
        assert len(page["tasks"]) <= 50 and page["running"] == 0
        seen += page["tasks"]
        pages += 1
        before = page["next"]
        if before is None:
            break
        assert before == page["tasks"][-1]["id"]
    assert pages == 3 and len(seen) == 120
    assert [t["id"] for t in seen] == [r["id"] for r in sorted(records, key=lambda r: r["created"], reverse=True)]
    failed = api("tasks", params={"state": "failed", "limit": "500"}).json
    assert [t["id"] for t in failed["tasks"]] == [t["id"] for t in seen if t["state"] == "failed"]
    assert failed["next"] is None
    first = seen[0]
    assert set(first) == {"id", "name", "state", "percent", "message", "created", "started", "finished", "elapsed",
                          "error", "start_method", "pid", "host", "cancel_requested", "resources"}
    assert first["elapsed"] == pytest.approx(0.25) and first["resources"] is None
    assert "not for the browser" not in api("tasks").text


def test_a_running_task_is_listed_first_with_its_resources(api, home):
    store_for(home).add_finished(_finished(3, time.time() - 100, name="old"))
    status = bg.run(gated, str(home), name="live one")
    assert until(lambda: _started(status), timeout=30)
    page = api("tasks").json
    assert page["running"] == 1 and [t["name"] for t in page["tasks"]] == ["live one", "old", "old", "old"]
    shown = page["tasks"][0]
    assert shown["state"] == "running" and shown["percent"] == 10 and shown["message"] == "waiting at the first gate"
    assert shown["pid"] == status.refresh().pid and shown["elapsed"] > 0
    assert shown["resources"]["rss"] > 0 and shown["resources"]["uss"] > 0
    assert shown["resources"]["cpu_percent"] is not None
    assert [t["name"] for t in api("tasks", params={"name": "old"}).json["tasks"]] == ["old"] * 3
    assert [t["id"] for t in api("tasks", params={"state": "running"}).json["tasks"]] == [status.id]
    one = api("tasks", status.id).json["task"]
    assert one["id"] == status.id and one["resources"]["rss"] > 0
    (home / "two").touch()
    (home / "one").touch()
    assert status.result(timeout=30) == "through"
    done = api("tasks", status.id).json["task"]
    assert done["state"] == "complete" and done["percent"] == 100 and done["resources"] is None


# -- one task ----------------------------------------------------------------------------------------


def test_cancel_stops_a_running_task(api, home):
    status = bg.run(gated, str(home))
    assert until(lambda: _started(status), timeout=30)
    reply = api("tasks", status.id, "cancel", method="POST")
    assert reply.code == 200, reply.text
    assert reply.json["cancelled"] is True
    assert reply.json["task"]["state"] == "cancelled" and reply.json["task"]["cancel_requested"] is True
    assert until(lambda: status.done(), timeout=10) and status.state == "cancelled"
    again = api("tasks", status.id, "cancel", method="POST").json
    assert again["cancelled"] is False and again["task"]["state"] == "cancelled"


def test_the_log_is_its_tail_bounded_in_lines_and_bytes(api):
    status = bg.run(chatty, 300, 0)
    status.result(timeout=30)
    default = api("tasks", status.id, "log").json
    assert default["truncated"] is True and default["text"].splitlines() == [f"line {i}" for i in range(100, 300)]
    five = api("tasks", status.id, "log", params={"tail": "5"}).json
    assert five == {"text": "".join(f"line {i}\n" for i in range(295, 300)), "truncated": True}
    whole = api("tasks", status.id, "log", params={"tail": "5000"}).json
    assert whole["truncated"] is False and whole["text"] == status.log()

    huge = bg.run(chatty, 3, 1_000_000)
    huge.result(timeout=30)
    reply = api("tasks", huge.id, "log").json
    note, _, kept = reply["text"].partition("\n")
    # the last 256 KiB of the log, after a line saying how much before them was left out
    assert reply["truncated"] is True and note.startswith("[nbbgtask: ") and "earlier bytes" in note
    assert 200_000 < len(kept) <= 256 * 1024
    assert kept.endswith("x" * 1000 + "\n") and "line 2" not in kept


def test_the_stack_of_a_running_task_and_409_once_it_ended(api, home):
    status = bg.run(gated, str(home))
    assert until(lambda: _started(status), timeout=30)
    reply = api("tasks", status.id, "stack")
    assert reply.code == 200, reply.text
    assert "_wait_for_gate" in reply.json["text"]
    (home / "one").touch()
    (home / "two").touch()
    status.result(timeout=30)
    ended = api("tasks", status.id, "stack")
    assert ended.code == 409 and "has ended" in ended.json["error"]


def test_outputs_are_what_the_task_printed_and_displayed_in_order(api):
    status = bg.run(shows)
    assert status.result(timeout=30) == 42
    outputs = api("tasks", status.id, "outputs").json["outputs"]
    assert outputs[0] == {"output_type": "stream", "name": "stdout", "text": "before the display\n"}
    assert outputs[1]["output_type"] == "display_data"
    assert outputs[1]["data"]["text/html"] == "<b>bold</b>"
    quiet = bg.run(chatty, 0, 0)
    quiet.result(timeout=30)
    assert api("tasks", quiet.id, "outputs").json == {"outputs": []}


# -- the event stream --------------------------------------------------------------------------------


class EventStream:
    """A browser's EventSource, by hand: one HTTP/1.0 request, read event by event."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.comments = 0

    @classmethod
    async def open(cls, port: int, path: str, token: str) -> tuple[EventStream, int, dict[str, str]]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nAuthorization: token {token}\r\n\r\n".encode())
        status = int((await asyncio.wait_for(reader.readline(), 10)).split()[1])
        headers = {}
        while (line := (await asyncio.wait_for(reader.readline(), 10)).decode().strip()):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return cls(reader, writer), status, headers

    async def next(self, timeout: float = 15.0) -> tuple[str, dict[str, Any]]:
        """The next event (comments and ``retry:`` lines are counted and skipped)."""
        fields: dict[str, str] = {}
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), timeout)).decode()
            if not line:
                raise EOFError("the server ended the stream")
            line = line.rstrip("\n")
            if line.startswith(":"):
                self.comments += 1
            elif line:
                name, _, value = line.partition(": ")
                fields[name] = value
            elif "data" in fields:
                return fields.get("event", "message"), json.loads(fields["data"])

    async def until(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            event, data = await self.next(max(0.1, deadline - time.monotonic()))
            assert event == "tasks", data
            if predicate(data):
                return data

    def close(self) -> None:
        self.writer.close()


def _in(data: dict[str, Any], task_id: str) -> dict[str, Any] | None:
    return next((t for t in data["tasks"] if t["id"] == task_id), None)


def test_the_event_stream_brings_a_running_tasks_progress_and_its_end(run, http_server, jp_serverapp, jp_http_port, jp_base_url, home):
    path = url_path_join(jp_base_url, *API, "events")
    token = jp_serverapp.identity_provider.token
    watcher = jp_serverapp.web_app.settings["nbbgtask.watcher"]
    status = bg.run(gated, str(home), name="streamed")
    assert until(lambda: _started(status), timeout=30)

    async def scenario() -> None:
        stream, code, headers = await EventStream.open(jp_http_port, path, token)
        assert code == 200 and headers["content-type"].startswith("text/event-stream")
        first = await stream.until(lambda d: True)  # a client's first event: every live task
        shown = _in(first, status.id)
        assert shown is not None and shown["state"] == "running" and shown["percent"] == 10
        assert first["running"] == 1 and first["ended"] == [] and abs(first["now"] - time.time()) < 5
        assert watcher.clients == 1 and watcher.running

        (home / "one").touch()
        moved = await stream.until(lambda d: (_in(d, status.id) or {}).get("percent") == 60)
        assert _in(moved, status.id)["message"] == "waiting at the second gate"

        (home / "two").touch()
        ended = await stream.until(lambda d: status.id in d["ended"])
        assert _in(ended, status.id)["state"] == "complete" and ended["running"] == 0

        quick = bg.run(chatty, 1, 0)  # starts and ends between two looks, most likely: seen all the same
        await stream.until(lambda d: quick.id in d["ended"] and (_in(d, quick.id) or {}).get("state") == "complete")

        stream.close()
        deadline = time.monotonic() + 10
        while watcher.clients and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert watcher.clients == 0 and not watcher.running  # the last client gone: the watcher stopped

    run(scenario())


def test_the_event_stream_is_refused_without_credentials(run, http_server, jp_http_port, jp_base_url):
    path = url_path_join(jp_base_url, *API, "events")

    async def scenario() -> None:
        stream, code, headers = await EventStream.open(jp_http_port, path, "wrong")
        stream.close()
        assert code == 403 and headers["content-type"].startswith("application/json")

    run(scenario())


def test_the_server_stopping_ends_every_stream(run, http_server, jp_serverapp, jp_http_port, jp_base_url):
    path = url_path_join(jp_base_url, *API, "events")
    token = jp_serverapp.identity_provider.token
    watcher = jp_serverapp.web_app.settings["nbbgtask.watcher"]

    async def scenario() -> None:
        streams = [(await EventStream.open(jp_http_port, path, token))[0] for _ in range(2)]
        for stream in streams:
            await stream.until(lambda d: d["tasks"] == [] and d["running"] == 0)
        assert watcher.clients == 2 and watcher.running
        await jp_serverapp.extension_manager.stop_all_extensions()
        for stream in streams:
            with pytest.raises(EOFError):
                await stream.next(timeout=10)
            stream.close()
        assert watcher.clients == 0 and not watcher.running

    run(scenario())


def test_a_quiet_stream_gets_a_heartbeat(run, http_server, jp_serverapp, jp_http_port, jp_base_url, monkeypatch):
    from nbbgtask.server import events

    monkeypatch.setattr(events, "HEARTBEAT", 0.2)
    path = url_path_join(jp_base_url, *API, "events")

    async def scenario() -> None:
        stream, _, _ = await EventStream.open(jp_http_port, path, jp_serverapp.identity_provider.token)
        await stream.next()
        line = await asyncio.wait_for(stream.reader.readline(), 10)
        assert line == b": heartbeat\n"
        stream.close()

    run(scenario())


def test_a_stream_says_when_the_home_is_refused_and_starts_afresh_once_it_is_fixed(run, http_server, jp_serverapp, jp_http_port, jp_base_url, home):
    path = url_path_join(jp_base_url, *API, "events")
    status = bg.run(gated, str(home))
    assert until(lambda: _started(status), timeout=30)

    async def scenario() -> None:
        stream, _, _ = await EventStream.open(jp_http_port, path, jp_serverapp.identity_provider.token)
        assert _in((await stream.next())[1], status.id) is not None
        home.chmod(0o777)
        try:
            event, data = await stream.next()
            assert event == "error" and str(home) in data["error"] and "writable by others" in data["error"]
        finally:
            home.chmod(0o700)
        event, data = await stream.next()
        assert event == "tasks" and _in(data, status.id)["state"] == "running"  # every live task again
        stream.close()

    run(scenario())
