"""The notebook tour in a real JupyterLab, in headless Chromium: what a person sees.

JupyterLab runs as a subprocess on loopback with a fresh, throw-away configuration; Debian's
chromium (``apt-get install chromium``) is driven by Playwright.  No browser is ever downloaded:
without /usr/bin/chromium the tests are skipped, and say why.

The notebook is tests/browser/tour.ipynb (written by tests/browser/make_tour.py).  Run All Cells
runs it once per module; the tests then look at the page as a person would.

Screenshots go to tests/artifacts/ (git-ignored).  With NBBGTASK_UPDATE_SCREENSHOTS=1 the ones the
README shows are copied to docs/screenshots/ too; otherwise a run leaves the checkout clean.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import pytest

import nbbgtask as bg
from nbbgtask import _config

try:
    from playwright.sync_api import expect
except ImportError:  # the tests that need it skip, and say why
    expect = None

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = Path(__file__).resolve().parent / "browser"
ARTIFACTS = ROOT / "tests" / "artifacts"
SCREENSHOTS = ROOT / "docs" / "screenshots"
UPDATE_SCREENSHOTS = os.environ.get("NBBGTASK_UPDATE_SCREENSHOTS") == "1"
TOKEN = "nbbgtask-browser-test"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: milliseconds: generous for a loaded machine, but every wait is bounded
SLOW = 60_000
WAIT = 30_000

pytestmark = pytest.mark.timeout(180)


# -- JupyterLab -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Lab:
    url: str
    home: Path
    log: Path
    process: subprocess.Popen[bytes]
    page_errors: list[str] = field(default_factory=list)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


def _start_lab(tmp: Path) -> Lab:
    root = tmp / "notebooks"
    shutil.copytree(NOTEBOOKS, root, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    home = tmp / "nbbgtask-home"
    settings = tmp / "lab-settings"
    # A fresh JupyterLab: no news or update check (loopback only), nothing from the user's setup.
    notification = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True)
    notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env = {
        **os.environ,
        "NBBGTASK_HOME": str(home),
        "JUPYTERLAB_SETTINGS_DIR": str(settings),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp / "lab-workspaces"),
        "JUPYTER_CONFIG_DIR": str(tmp / "jupyter-config"),
        "JUPYTER_DATA_DIR": str(tmp / "jupyter-data"),
        "JUPYTER_RUNTIME_DIR": str(tmp / "jupyter-runtime"),
        "IPYTHONDIR": str(tmp / "ipython"),
    }
    port = _free_port()
    args = [
        sys.executable, "-m", "jupyterlab",
        "--no-browser", "--ip=127.0.0.1", f"--port={port}", "--port-retries=0",
        f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}",
    ]  # fmt: skip
    if os.geteuid() == 0:
        args.append("--allow-root")
    log = tmp / "jupyterlab.log"
    with log.open("wb") as out:
        process = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    lab = Lab(url=f"http://127.0.0.1:{port}", home=home, log=log, process=process)
    deadline = time.monotonic() + SLOW / 1000
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with {process.returncode}:\n{lab.log_tail()}")
        try:
            with urllib.request.urlopen(f"{lab.url}/api/status?token={TOKEN}", timeout=2) as answer:
                if answer.status == 200:
                    return lab
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            _stop_lab(lab)
            raise RuntimeError(f"jupyter lab did not answer within {SLOW // 1000} s:\n{lab.log_tail()}")
        time.sleep(0.2)


def _cancel_tasks(home: Path) -> None:
    """Tasks leave the kernel's process group: stop the ones the notebook left running."""
    _config.reset()
    try:
        bg.configure(home=home, cancel_grace=2)
        for status in bg.tasks(state=["queued", "running"]):
            status.cancel()
    finally:
        _config.reset()


def _stop_lab(lab: Lab) -> None:
    """Shut the server down (it shuts down its kernels), then make sure its processes are gone."""
    import psutil

    try:
        started = psutil.Process(lab.process.pid).children(recursive=True)
    except psutil.Error:
        started = []
    request = urllib.request.Request(
        f"{lab.url}/api/shutdown", method="POST", headers={"Authorization": f"token {TOKEN}"}
    )
    try:
        urllib.request.urlopen(request, timeout=5).close()
    except (urllib.error.URLError, OSError):
        pass
    try:
        lab.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if lab.process.poll() is not None:
            break
        try:
            os.killpg(lab.process.pid, sig)
        except ProcessLookupError:
            break
        try:
            lab.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    # Kernels run in their own sessions: any the shutdown missed are ended by their pid.
    _, alive = psutil.wait_procs(started, timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass


@pytest.fixture(scope="module")
def tour(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, Lab]]:
    """JupyterLab with tour.ipynb open in Chromium, right after Run → Run All Cells."""
    if not CHROMIUM.exists():
        pytest.skip(f"chromium not installed ({CHROMIUM} is missing): apt-get install chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]' installs playwright")
    pytest.importorskip("jupyterlab", reason="pip install -e '.[test]' installs jupyterlab")

    lab = _start_lab(tmp_path_factory.mktemp("browser"))
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 1000})
                page.on("pageerror", lambda error: lab.page_errors.append(str(error)))
                page.set_default_timeout(WAIT)
                page.goto(f"{lab.url}/lab/tree/tour.ipynb?token={TOKEN}", timeout=SLOW)
                page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=SLOW)
                # The kernel is up when the status bar says so; then hide the file browser.
                page.locator(".jp-StatusBar-Item", has_text=re.compile(r"Python 3.*\| Idle")).wait_for(timeout=SLOW)
                page.locator(".jp-Notebook").click(position={"x": 5, "y": 5})
                page.keyboard.press("Control+b")
                page.locator(".jp-FileBrowser").wait_for(state="hidden")
                # As a person does it: the Run menu, Run All Cells.
                page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
                page.locator(".lm-Menu-itemLabel").get_by_text("Run All Cells", exact=True).click()
                yield page, lab
            finally:
                browser.close()
    finally:
        _cancel_tasks(lab.home)
        _stop_lab(lab)


# -- what a person looks at -------------------------------------------------------------------


def cell(page, source: str):
    """The notebook cell whose code contains ``source``."""
    return page.locator(".jp-Notebook .jp-CodeCell").filter(has=page.locator(".jp-InputArea-editor", has_text=source))


def outputs(page, source: str):
    return cell(page, source).locator(".jp-OutputArea-output")


def bar_percent(bar) -> float:
    """How far a person sees an ipywidgets progress bar filled: its inner bar's width, in %."""
    width = bar.locator(".progress-bar").evaluate("el => el.style.width")
    assert width.endswith("%"), width
    return float(width[:-1])


def _screenshot(target, name: str, docs: bool = False) -> Path:
    """Write tests/artifacts/NAME; a ``docs`` one goes to docs/screenshots/ too, when asked to."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    target.screenshot(path=str(path))
    if docs and UPDATE_SCREENSHOTS:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, SCREENSHOTS / name)
    return path


def test_the_tour_shows_a_live_bar_a_focus_cell_that_resumes_and_the_monitor(tour):
    page, lab = tour
    context = f"\n--- jupyter lab log ---\n{lab.log_tail()}\n--- page errors ---\n{lab.page_errors}"

    # (1) The cell that ends with the status shows a live bar: name, bar, message.
    first = outputs(page, "splines = bg.run(reticulate_splines)")
    bar = first.locator(".widget-hprogress")
    bar.wait_for()
    assert "reticulate_splines" in first.inner_text()
    before = bar_percent(bar)

    # (2) The full-focus cell holds with the text it was given, a live bar and a Cancel button.
    focus = outputs(page, "bg.full_focus(")
    holding = focus.get_by_text("Payment processing…")
    holding.wait_for()
    assert focus.locator(".widget-hprogress").is_visible()
    assert focus.get_by_role("button", name="Cancel").is_enabled()
    shot_focus = _screenshot(page, "jupyterlab-focus.png", docs=True)

    # The first bar moves on: sampled again later, it is further along.
    page.wait_for_function(
        "([el, before]) => parseFloat(el.style.width) > before",
        arg=[bar.locator(".progress-bar").element_handle(), before],
        timeout=WAIT,
    )
    assert bar_percent(bar) > before

    # (3) When the task completes, the cell below runs on and sees its result.
    resumed = outputs(page, 'print("resumed with", result)')
    resumed.get_by_text("resumed with paid").wait_for()
    assert not holding.is_visible(), "the holding text should be replaced once the task completes"

    # (4) The monitor lists both tasks, each in its own row, with Cancel buttons.
    monitor = outputs(page, "bg.monitor()")
    monitor.get_by_text(re.compile(r"nbbgtask · \d+ running")).wait_for()
    rows = {}
    for name in ("reticulate_splines", "process_payment"):
        rows[name] = monitor.locator(".widget-hbox").filter(has_text=name)
        rows[name].wait_for()
    paid = rows["process_payment"]
    paid.get_by_text("complete", exact=True).wait_for()
    assert paid.get_by_text("100% · talking to the bank · complete after").is_visible()
    # A finished task has nothing left to cancel: its button is hidden.
    expect(paid.locator("button", has_text="Cancel")).to_be_hidden()
    splines = rows["reticulate_splines"]
    assert splines.get_by_text("running", exact=True).is_visible(), splines.inner_text()
    cancel = splines.get_by_role("button", name="Cancel")
    assert cancel.is_visible() and cancel.is_enabled()
    assert splines.get_by_role("button", name="Log").is_visible()
    shot_tour = _screenshot(page, "jupyterlab-tour.png", docs=True)
    shot_monitor = _screenshot(cell(page, "bg.monitor()"), "jupyterlab-monitor.png", docs=True)

    # (5) Cancel in the monitor stops the running task: its row and its bar both say so.
    cancel.click()
    splines.get_by_text("cancelled", exact=True).wait_for()
    expect(splines.locator("button", has_text="Cancel")).to_be_hidden()
    first.get_by_text(re.compile(r"cancelled after")).wait_for()
    assert bar.locator(".progress-bar-warning").is_visible()

    # Nothing on the page went wrong along the way (no traceback, nothing on stderr).
    # (tracebacks render as stderr; the printed line proves the selector sees real outputs)
    stdout = cell(page, 'print("resumed with", result)').locator('[data-mime-type="application/vnd.jupyter.stdout"]')
    assert stdout.inner_text().strip() == "resumed with paid"
    errors = page.locator(
        '[data-mime-type="application/vnd.jupyter.error"], [data-mime-type="application/vnd.jupyter.stderr"]'
    )
    assert errors.count() == 0, errors.all_inner_texts()
    assert page.get_by_text(re.compile("Error displaying widget|Widget not found|model not found")).count() == 0
    assert not lab.page_errors, context
    for shot in (shot_focus, shot_tour, shot_monitor):
        assert shot.stat().st_size > 10_000, shot


def test_the_focus_cell_keeps_the_finished_bar_in_place_of_the_holding_content(tour):
    page, _ = tour
    outputs(page, 'print("resumed with", result)').get_by_text("resumed with").wait_for()
    focus = outputs(page, "bg.full_focus(")
    focus.get_by_text(re.compile(r"complete after")).wait_for(timeout=5_000)


def test_the_tour_notebook_is_what_make_tour_writes_and_holds_no_outputs():
    """tests/browser/tour.ipynb is generated: edit make_tour.py, then run it."""
    sys.path.insert(0, str(NOTEBOOKS))
    try:
        import make_tour
    finally:
        sys.path.remove(str(NOTEBOOKS))
    stored = nbformat.read(NOTEBOOKS / "tour.ipynb", as_version=4)
    assert stored == make_tour.build(), "run: .venv/bin/python tests/browser/make_tour.py"
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in stored.cells if c.cell_type == "code")
