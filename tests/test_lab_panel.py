"""The Tasks panel of the JupyterLab extension, in a real JupyterLab 4 and Notebook 7, in headless Chromium.

The tasks are started by plain Python scripts (no kernel is open anywhere) over the server's home
folder; the page sees them through the server extension's REST API and event stream.  The server,
the browser and the screenshots are test_browser's (Debian's chromium, never a downloaded one).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_browser import (  # noqa: F401  (browser is a fixture)
    SLOW,
    TOKEN,
    WAIT,
    Server,
    _page_error,
    _screenshot,
    _serving,
    _task_state,
    browser,
)

pytestmark = pytest.mark.timeout(240)

#: front end -> the page that opens with no notebook (so no kernel)
PAGES = {"jupyterlab": "/lab", "notebook7": "/tree"}

#: What a task displays, rendered as untrusted output is: the markup stays, the script does not run.
UNTRUSTED = '<b class="shown">rendered by rendermime</b><script>window.nbbgtaskRan = 1</script><img src="x" onerror="window.nbbgtaskRan = 2">'

#: A script that starts a task and waits for it, as a user's own script would.  The task displays
#: UNTRUSTED, then writes a line to its log and moves its bar every step; its message holds markup,
#: which must show as text.
SCRIPT = textwrap.dedent(
    """
    import sys, time
    import nbbgtask as bg

    UNTRUSTED = {untrusted!r}

    def {name}(steps, pause):
        from IPython.display import HTML, display

        display(HTML(UNTRUSTED))
        for i in range(steps):
            print(f"step {{i}}", flush=True)
            bg.progress(100 * (i + 1) / steps, f"step {{i + 1}} <b>of</b> {{steps}}")
            time.sleep(pause)
        return steps

    status = bg.run({name}, int(sys.argv[1]), float(sys.argv[2]))
    print(status.id, flush=True)
    status.wait()
    """
)


@contextmanager
def _script_task(server: Server, tmp: Path, name: str, steps: int, pause: float) -> Iterator[str]:
    """A task named ``name`` started by a Python script over the server's home; yields its id."""
    script = tmp / f"{name}.py"
    script.write_text(SCRIPT.format(name=name, untrusted=UNTRUSTED))
    env = {**os.environ, "NBBGTASK_HOME": str(server.home)}
    process = subprocess.Popen(
        [sys.executable, str(script), str(steps), str(pause)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        task_id = process.stdout.readline().strip()
        assert task_id, f"the script printed no task id (exit {process.poll()})"
        yield task_id
    finally:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        finally:
            if process.stdout is not None:
                process.stdout.close()


def _quick_toasts(server_settings: Path) -> None:
    """Every task notifies, however short (the plugin's setting, as a user would change it)."""
    path = server_settings / "nbbgtask" / "plugin.jupyterlab-settings"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"notifyOn": "all", "notifyMinSeconds": 0}))


def _open_panel(chromium, server: Server):  # type: ignore[no-untyped-def]
    """The front end's page with no notebook open, then View → Background Tasks, as a person does it."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{server.url}/nbbgtask/api/tasks?limit=1&token={TOKEN}", timeout=10).close()
    except urllib.error.HTTPError as error:
        pytest.fail(f"the server has no nbbgtask API ({error.code}): the panel needs nbbgtask's server extension")
    page = chromium.new_page(viewport={"width": 1280, "height": 900})
    page.on("pageerror", lambda error: _page_error(server, str(error)))
    page.set_default_timeout(WAIT)
    page.goto(f"{server.url}{PAGES[server.front_end]}?token={TOKEN}", timeout=SLOW)
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^View$")).wait_for(timeout=SLOW)
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^View$")).click()
    page.locator(".lm-Menu-itemLabel").get_by_text("Background Tasks", exact=True).click()
    panel = page.locator("#nbbgtask-tasks-panel")
    panel.wait_for(state="visible")
    return page, panel


def _width(row) -> float:  # type: ignore[no-untyped-def]
    width = row.locator(".nbbgtask-bar-fill").evaluate("el => el.style.width")
    assert width.endswith("%"), width
    return float(width[:-1])


@pytest.mark.parametrize("front_end", ["jupyterlab", "notebook7"])
def test_a_script_task_shows_moves_logs_toasts_and_cancels_in_the_panel(browser, tmp_path, front_end):  # noqa: F811
    with _serving(tmp_path, front_end) as server:
        _quick_toasts(tmp_path / "server-settings")
        page, panel = _open_panel(browser, server)
        try:
            with _script_task(server, tmp_path, "crawl", steps=400, pause=0.15) as task_id:
                # (1) The script's task shows, running, with no kernel anywhere; its bar moves.
                row = panel.locator(f'[data-task-id="{task_id}"]')
                row.wait_for()
                assert row.locator(".nbbgtask-name").inner_text() == "crawl"
                page.wait_for_function(
                    "el => el.dataset.state === 'running' && parseFloat(el.querySelector('.nbbgtask-bar-fill').style.width) > 0",
                    arg=row.element_handle(),
                )
                before = _width(row)
                page.wait_for_function(
                    "([el, before]) => parseFloat(el.querySelector('.nbbgtask-bar-fill').style.width) > before",
                    arg=[row.element_handle(), before],
                )
                # Its message is text: the markup in it shows as typed, nothing is made bold.
                message = row.locator(".nbbgtask-message")
                expect_text = re.compile(r"^step \d+ <b>of</b> 400$")
                page.wait_for_function("el => /<b>of<\\/b>/.test(el.textContent)", arg=message.element_handle())
                assert expect_text.match(message.inner_text()), message.inner_text()
                assert message.locator("b").count() == 0
                # The session list is empty: nothing here needed a kernel.
                assert _sessions(server) == []

                # (2) Log shows the tail of its log, and keeps following it while it is open.
                row.locator('[data-action="log"]').click()
                log = row.locator(".nbbgtask-detail pre.nbbgtask-log")
                log.wait_for()
                page.wait_for_function("el => /step \\d+/.test(el.textContent)", arg=log.element_handle())
                last = _last_step(log.inner_text())
                page.wait_for_function(
                    "([el, last]) => (el.textContent.match(/step (\\d+)/g) || []).map(s => +s.slice(5)).some(n => n > last)",
                    arg=[log.element_handle(), last],
                )
                shot_panel = _screenshot(panel, f"{front_end}-tasks-panel.png", docs=front_end == "jupyterlab")

                # (3) Stack shows what the task's threads are doing; Outputs renders what it
                # displayed with JupyterLab's rendermime, as untrusted: markup yes, scripts no.
                row.locator('[data-action="stack"]').click()
                stack = row.locator(".nbbgtask-detail pre.nbbgtask-stack")
                stack.wait_for()
                assert "crawl" in stack.inner_text(), stack.inner_text()
                row.locator('[data-action="outputs"]').click()
                shown = row.locator(".nbbgtask-outputs .jp-OutputArea-output")
                shown.locator("b", has_text="rendered by rendermime").wait_for()
                assert shown.locator("script, img[onerror]").count() == 0
                assert page.evaluate("window.nbbgtaskRan") is None
                row.locator('[data-action="outputs"]').click()  # closes it again
                expect_hidden = row.locator(".nbbgtask-detail")
                expect_hidden.wait_for(state="hidden")

                # (4) A task that ends while the page is open: a toast names it and how it ended.
                with _script_task(server, tmp_path, "quick", steps=5, pause=0.2) as quick_id:
                    toast = page.locator(".Toastify__toast", has_text="nbbgtask: quick completed in")
                    toast.wait_for()
                    panel.locator(f'[data-task-id="{quick_id}"][data-state="complete"]').wait_for()
                assert re.search(r"nbbgtask: quick completed in \d+ s", toast.inner_text()), toast.inner_text()
                page.wait_for_timeout(800)  # the toast has slid in, for the picture
                shot_toast = _screenshot(page, f"{front_end}-task-toast.png", docs=front_end == "jupyterlab")

                # (5) Cancel in the panel ends the script's task: the row and the store both say so.
                assert _task_state(server.home, task_id) == "running"
                row.locator('[data-action="cancel"]').click()
                panel.locator(f'[data-task-id="{task_id}"][data-state="cancelled"]').wait_for()
                assert row.locator('[data-action="cancel"]').is_hidden()
            assert _task_state(server.home, task_id) == "cancelled"
            page.locator(".Toastify__toast", has_text="nbbgtask: crawl was cancelled after").wait_for()

            assert not server.page_errors, f"{server.page_errors}\n--- server log ---\n{server.log_tail()}"
            for shot in (shot_panel, shot_toast):
                assert shot.stat().st_size > 10_000, shot
        except BaseException:
            _screenshot(page, f"{front_end}-tasks-panel-failed.png")
            raise
        finally:
            page.close()


def _last_step(text: str) -> int:
    steps = [int(n) for n in re.findall(r"step (\d+)", text)]
    assert steps, text
    return max(steps)


def _sessions(server: Server) -> list[object]:
    import urllib.request

    with urllib.request.urlopen(f"{server.url}/api/sessions?token={TOKEN}", timeout=5) as answer:
        return json.load(answer)


#: Many short tasks and one that fails, started by a script that waits for them all.
MANY = textwrap.dedent(
    """
    import nbbgtask as bg

    def other():
        raise ValueError("bad row 7")

    statuses = [bg.run(lambda i=i: i, name="batch") for i in range(60)] + [bg.run(other)]
    for status in statuses:
        status.wait()
    """
)


def test_the_panel_pages_with_load_more_and_filters_by_state_and_name(browser, tmp_path):  # noqa: F811
    with _serving(tmp_path, "jupyterlab") as server:
        script = tmp_path / "many.py"
        script.write_text(MANY)
        env = {**os.environ, "NBBGTASK_HOME": str(server.home)}
        subprocess.run([sys.executable, str(script)], env=env, check=True, timeout=120)
        page, panel = _open_panel(browser, server)
        try:
            rows = panel.locator(".nbbgtask-row")
            # One page (50 of the 61, newest first), then the rest with Load more.
            page.wait_for_function("el => el.querySelectorAll('.nbbgtask-row').length === 50", arg=panel.element_handle())
            more = panel.locator('[data-action="load-more"]')
            more.click()
            page.wait_for_function("el => el.querySelectorAll('.nbbgtask-row').length === 61", arg=panel.element_handle())
            assert more.is_hidden()

            # The failed one alone, by state; its row says what went wrong.
            panel.locator('select[data-filter="state"]').select_option("failed")
            page.wait_for_function("el => el.querySelectorAll('.nbbgtask-row').length === 1", arg=panel.element_handle())
            failed = rows.first
            assert failed.get_attribute("data-state") == "failed"
            assert failed.locator(".nbbgtask-message").inner_text() == "ValueError: bad row 7"

            # By name (and any state): the batch's 60, a page at a time again.
            panel.locator('select[data-filter="state"]').select_option("")
            panel.locator('input[data-filter="name"]').fill("batch")
            page.wait_for_function(
                "el => el.querySelectorAll('.nbbgtask-row').length === 50 && "
                "[...el.querySelectorAll('.nbbgtask-name')].every(n => n.textContent === 'batch')",
                arg=panel.element_handle(),
            )
            more.click()
            page.wait_for_function("el => el.querySelectorAll('.nbbgtask-row').length === 60", arg=panel.element_handle())
            assert not server.page_errors, f"{server.page_errors}\n--- server log ---\n{server.log_tail()}"
        except BaseException:
            _screenshot(page, "jupyterlab-tasks-paging-failed.png")
            raise
        finally:
            page.close()
