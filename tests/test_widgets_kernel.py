"""The notebook widgets in a real kernel: what a front end receives over the wire."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time

import pytest
from widget_traffic import Models, click

import nbbgtask as bg

pytestmark = pytest.mark.timeout(240)

SETUP = """
import time, nbbgtask as bg
def steps(n=20, pause=0.1):
    for i in bg.track(range(n), message="working"):
        time.sleep(pause)
    return n
"""


def _status_times(kernel, msg_id):
    busy = idle = None
    for m in kernel.iopub:
        if m["parent_header"].get("msg_id") == msg_id and m["msg_type"] == "status":
            if m["content"]["execution_state"] == "busy":
                busy = str(m["header"]["date"])
            elif m["content"]["execution_state"] == "idle":
                idle = str(m["header"]["date"])
    return busy, idle


def test_a_status_ending_a_cell_shows_a_bar_that_moves_while_the_kernel_is_idle(kernel):
    kernel.ok(SETUP)
    out = kernel.run("status = bg.run(steps, 15); status")
    assert out["status"] == "ok"
    shown = out["data"][0]
    assert "application/vnd.jupyter.widget-view+json" in shown and "text/html" in shown
    kernel.drain_all(3.0)  # the kernel is idle: only the refresher thread is at work
    models = Models(kernel.iopub)
    (bar,) = models.of("FloatProgressModel")
    values = models.values(bar)
    assert len(set(values)) >= 4, values
    assert values == sorted(values) and values[-1] == 100.0
    assert models.state[bar]["bar_style"] == "success"
    (text,) = [m for m in models.of("HTMLModel") if "complete after" in models.state[m]["value"]]
    assert models.state[text]["value"].startswith("100% · working")


def test_bars_keep_moving_while_another_cell_runs(kernel):
    kernel.ok(SETUP)
    kernel.ok("status = bg.run(steps, 30); display(bg.ProgressBar(status))")
    busy_cell = kernel.submit("time.sleep(2)")
    kernel.wait(busy_cell)
    start, end = _status_times(kernel, busy_cell)
    models = Models(kernel.iopub)
    (bar,) = models.of("FloatProgressModel")
    during = models.updates_during(bar, start, end)
    assert len(set(during)) >= 3, during


def test_a_failed_bar_turns_red_shows_the_error_and_stays_red(kernel):
    kernel.ok(SETUP + """
def breaks():
    bg.progress(30, "trying")
    time.sleep(0.3)
    raise ValueError("bad spline")
status = bg.run(breaks)
display(status)
""")
    kernel.drain_all(2.0)
    models = Models(kernel.iopub)
    (bar,) = models.of("FloatProgressModel")
    styles = [st.get("bar_style") for _, st in models.history[bar] if "bar_style" in st]
    assert styles[-1] == "danger" and "success" not in styles
    texts = [models.state[m]["value"] for m in models.of("HTMLModel")]
    assert any("ValueError: bad spline" in t and "color:#c62828" in t for t in texts)


def test_cancelled_bar_says_cancelled(kernel):
    kernel.ok(SETUP + "status = bg.run(steps, 100); display(status); time.sleep(0.3); status.cancel()")
    kernel.drain_all(3.0)
    models = Models(kernel.iopub)
    texts = [models.state[m]["value"] for m in models.of("HTMLModel")]
    assert any("cancelled after" in t for t in texts)


def test_full_focus_shows_nothing_when_the_task_ends_within_the_acceptable_wait(kernel):
    kernel.ok(SETUP)
    out = kernel.run("bg.full_focus(bg.run(lambda: 5), acceptable_wait=3)")
    assert out["status"] == "ok"
    assert out["data"] == [{"text/plain": "5"}]
    kinds = {m["msg_type"] for m in out["messages"]}
    assert not kinds & {"display_data", "comm_open", "update_display_data"}


def test_full_focus_holds_then_completes_and_the_next_cell_runs_on(kernel):
    kernel.ok(SETUP)
    waiting = kernel.submit(
        'r = bg.full_focus(bg.run(steps, 15), acceptable_wait=0.2, holding="<b>Payment processing</b>",'
        ' on_complete=lambda s: print("completed", s.state))'
    )
    after = kernel.submit("print('next cell sees', r)")
    first = kernel.wait(waiting)
    second = kernel.wait(after)
    assert first["status"] == "ok" and first["stdout"] == "completed complete\n"
    assert second["stdout"] == "next cell sees 15\n"
    models = Models(kernel.iopub)
    assert models.of("HTMLModel", value="<b>Payment processing</b>")
    (bar,) = models.of("FloatProgressModel")
    assert len(set(models.values(bar))) >= 3 and models.state[bar]["bar_style"] == "success"
    (bar_box,) = [m for m in models.of("HBoxModel") if f"IPY_MODEL_{bar}" in models.state[m]["children"]]
    (view,) = [m for m in models.of("VBoxModel") if any(c == f"IPY_MODEL_{bar_box}" for c in models.values(m, "children")[0])]
    assert len(models.values(view, "children")[0]) == 3  # holding content, bar, Cancel
    assert models.state[view]["children"] == [f"IPY_MODEL_{bar_box}"], "the finished bar replaces the holding content"


def test_full_focus_raises_task_failed_with_the_tasks_traceback(kernel):
    kernel.ok(SETUP + """
def breaks():
    time.sleep(0.5)
    raise ValueError("card declined")
""")
    out = kernel.run("bg.full_focus(bg.run(breaks), acceptable_wait=0.1)")
    assert out["status"] == "error"
    assert out["error"]["ename"] == "TaskFailed"
    text = "\n".join(out["error"]["traceback"])
    assert "card declined" in text and 'raise ValueError("card declined")' in text


def _cancel_button(kernel) -> str:
    deadline = time.monotonic() + 30
    button: list[str] = []
    while not button and time.monotonic() < deadline:
        kernel.drain_all(0.2)
        button = Models(kernel.iopub).of("ButtonModel", description="Cancel")
    assert button, "the Cancel button was never shown"
    return button[0]


#: how the front end sends widget messages: as a plain shell message (ipykernel 6, VS Code, older
#: front ends), or through a subshell of its own, as JupyterLab >= 4.4 and Notebook 7 do
CLICK_ROUTES = ["plain", "subshell"]


@pytest.mark.parametrize("route", CLICK_ROUTES)
def test_clicking_cancel_while_the_cell_blocks_cancels_the_task(kernel, route):
    if route == "subshell" and not _supports_subshells(kernel):
        pytest.skip("this ipykernel has no subshells (JEP 91): front ends send plain comm messages")
    subshell = kernel.create_subshell() if route == "subshell" else None
    kernel.ok(SETUP + "status = bg.run(steps, 600)")
    # Sent before the click, so it waits in the kernel's queue behind the blocked cell; the
    # focus cell does not abort the queue when it raises, so this one must run after it.
    waiting = kernel.submit("bg.full_focus(status, acceptable_wait=0.1)", stop_on_error=False)
    queued = kernel.submit("print('ran after the focus cell')")
    click(kernel, _cancel_button(kernel), subshell_id=subshell)
    blocked = kernel.wait(waiting, timeout=30)
    assert blocked["status"] == "error" and blocked["error"]["ename"] == "TaskCancelled"
    after = kernel.wait(queued)
    assert after["stdout"] == "ran after the focus cell\n"
    assert _status_times(kernel, waiting)[1] < _status_times(kernel, queued)[0]
    assert kernel.ok("print(status.state)").strip() == "cancelled"


def _supports_subshells(kernel) -> bool:
    msg_id = kernel.kc.kernel_info()
    while True:
        reply = kernel.kc.get_shell_msg(timeout=30)
        if reply["parent_header"].get("msg_id") == msg_id:
            return "kernel subshells" in reply["content"].get("supported_features", [])


def test_cancel_works_for_a_focus_cell_blocked_in_a_subshell(kernel):
    """A cell run in a subshell publishes its widgets from there, so their clicks are routed to that
    subshell, whose stream the waiting cell must read (not the main shell's)."""
    if not _supports_subshells(kernel):
        pytest.skip("this ipykernel has no subshells (JEP 91)")
    subshell = kernel.create_subshell()
    kernel.ok(SETUP + "status = bg.run(steps, 600)")
    waiting = kernel.submit("bg.full_focus(status, acceptable_wait=0.1)", stop_on_error=False, subshell_id=subshell)
    queued = kernel.submit("print('the subshell ran on')", subshell_id=subshell)
    click(kernel, _cancel_button(kernel), subshell_id=subshell)
    blocked = kernel.wait(waiting, timeout=30)
    assert blocked["status"] == "error" and blocked["error"]["ename"] == "TaskCancelled"
    assert kernel.wait(queued)["stdout"] == "the subshell ran on\n"
    assert kernel.ok("print(status.state)").strip() == "cancelled"


def test_interrupting_a_focus_cell_stops_the_wait_not_the_task(kernel):
    kernel.ok(SETUP + "status = bg.run(steps, 20)")
    waiting = kernel.submit("bg.full_focus(status, acceptable_wait=0.1)")
    time.sleep(1.0)
    kernel.km.interrupt_kernel()
    out = kernel.wait(waiting)
    assert out["error"]["ename"] == "KeyboardInterrupt"
    assert kernel.ok("print(status.result(timeout=30))").strip() == "20"


def test_the_global_bar_follows_the_newest_running_task_then_the_next(kernel):
    kernel.ok(SETUP + """
first = bg.run(steps, 30, name="first")
time.sleep(0.05)
second = bg.run(steps, 8, name="second")
display(bg.ProgressBar.last_running())
""")
    kernel.drain_all(4.0)
    models = Models(kernel.iopub)
    names = [st["value"] for m in models.of("HTMLModel") for _, st in models.history[m] if "<b>" in st.get("value", "")]
    assert "<b>second</b>" in names and "<b>first</b>" in names
    assert names.index("<b>second</b>") < names.index("<b>first</b>")


def test_the_monitor_lists_tasks_started_by_another_process(kernel, home, tmp_path):
    script = tmp_path / "elsewhere.py"
    script.write_text(textwrap.dedent(f"""
        import time, nbbgtask as bg
        bg.configure(home={str(home)!r})
        def nightly_import():
            for _ in bg.track(range(30)):
                time.sleep(0.1)
        print(bg.run(nightly_import).id)
    """))
    other = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True, timeout=60)
    task_id = other.stdout.strip()
    kernel.ok(SETUP + "local = bg.run(steps, 5, name='local_job'); m = bg.monitor(); display(m)")
    kernel.drain_all(2.0)
    models = Models(kernel.iopub)
    names = " ".join(models.state[m]["value"] for m in models.of("HTMLModel"))
    assert "nightly_import" in names and task_id[:8] in names and "local_job" in names
    assert models.of("ButtonModel", description="Cancel") and models.of("ToggleButtonModel", description="Log")
    bg.get(task_id).cancel()


def test_the_monitor_cancel_button_and_log_toggle_work(kernel):
    kernel.ok(SETUP + """
def chatty():
    for i in range(300):
        print("line", i, flush=True)
        time.sleep(0.05)
task = bg.run(chatty)
m = bg.monitor()
display(m)
""")
    kernel.drain_all(1.5)
    models = Models(kernel.iopub)
    (toggle,) = models.of("ToggleButtonModel", description="Log")
    kernel.kc.shell_channel.send(kernel.kc.session.msg(
        "comm_msg", {"comm_id": toggle, "data": {"method": "update", "state": {"value": True}, "buffer_paths": []}}
    ))
    kernel.drain_all(1.0)
    (cancel,) = Models(kernel.iopub).of("ButtonModel", description="Cancel")
    click(kernel, cancel)
    kernel.drain_all(2.0)
    models = Models(kernel.iopub)
    logs = [models.state[m]["value"] for m in models.of("HTMLModel") if "<pre" in models.state[m]["value"]]
    assert logs and re.search(r"line \d+\n", logs[0])
    assert kernel.ok("print(task.refresh().state)").strip() == "cancelled"
