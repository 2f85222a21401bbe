"""A real ipykernel, driven over jupyter_client as a notebook would drive it."""

from __future__ import annotations

import signal
import time

import psutil
import pytest
from waiting import until

import nbbgtask as bg

pytestmark = pytest.mark.timeout(240)


def test_a_notebook_defined_function_runs_out_of_the_kernel(kernel):
    kernel.ok("""
import os, time
import nbbgtask as bg
table = {"rows": 12}            # notebook state the task inherits by fork
class Splines:
    def __init__(self, n): self.n = n
def crunch(k):
    bg.progress(50, "half")
    return Splines(table["rows"] * k), os.getpid()
status = bg.run(crunch, 2)
""")
    out = kernel.ok("value, pid = status.result(timeout=60); print(value.n, pid != os.getpid(), type(value).__name__)")
    assert out.split() == ["24", "True", "Splines"]


def _printed(kernel, msg_id, text):
    """Whether the cell ``msg_id`` has printed ``text`` (reads what the kernel has sent since)."""
    return any(
        m["parent_header"].get("msg_id") == msg_id and m["msg_type"] == "stream" and text in m["content"]["text"]
        for m in kernel.drain_all(0.05)
    )


def test_interrupting_the_kernel_stops_the_wait_not_the_task(kernel, tmp_path):
    go = tmp_path / "go"
    kernel.ok(f"""
import os, time, nbbgtask as bg
def slow():
    deadline = time.monotonic() + 120
    while not os.path.exists({str(go)!r}) and time.monotonic() < deadline:  # until the test says
        time.sleep(0.02)
    return "finished anyway"
status = bg.run(slow)
print(status.id)
""")
    waiting = kernel.submit('print("waiting", flush=True); status.result()')
    assert until(lambda: _printed(kernel, waiting, "waiting"), timeout=30)  # the next thing it does is wait
    kernel.km.interrupt_kernel()
    reply = kernel.wait(waiting, timeout=30)
    assert reply["status"] == "error" and reply["error"]["ename"] == "KeyboardInterrupt"
    assert kernel.ok("print(status.state)").strip() == "running"
    go.touch()
    assert kernel.ok("print(status.result(timeout=30))").strip() == "finished anyway"


def test_results_outlive_a_kernel_restart(kernel):
    task_id = kernel.ok("""
import time, nbbgtask as bg
def long_job():
    time.sleep(2)
    return {"answer": 42}
print(bg.run(long_job).id)
""").strip()
    kernel.restart()  # while the task still runs: a restart signals the kernel's process group
    assert kernel.ok(f"import nbbgtask as bg; print(bg.get({task_id!r}).result(timeout=60))").strip() == "{'answer': 42}"
    assert bg.get(task_id).state == "complete"


def test_the_task_never_writes_to_the_kernels_channels(kernel):
    kernel.ok("""
import sys, nbbgtask as bg
from IPython.display import display, HTML
import ipywidgets as w
print("before the task", end="")   # unflushed: must not be printed twice
def chatty():
    print("printed in the task")
    print("to stderr in the task", file=sys.stderr)
    display(HTML("<b>shown?</b>"))
    w.IntSlider(value=3)
    return "ok"
status = bg.run(chatty)
print(status.result(timeout=60))
""")
    late = kernel.drain_all(1.0)
    texts = [
        m["content"].get("text", "") + str(m["content"].get("data", ""))
        for m in kernel.iopub + late
        if m["msg_type"] in ("stream", "display_data", "execute_result", "comm_open")
    ]
    joined = "".join(texts)
    assert joined.count("before the task") == 1
    for leaked in ("printed in the task", "to stderr in the task", "shown?", "fork"):
        assert leaked not in joined
    assert not [m for m in kernel.iopub + late if m["msg_type"] == "comm_open"]
    log = kernel.ok("print(status.log())")
    assert "printed in the task" in log and "to stderr in the task" in log
    assert "a task's widgets are not shown" in log
    assert "before the task" not in log


def test_no_zombies_accumulate_in_the_kernel(kernel):
    kernel.ok("""
import nbbgtask as bg
done = [bg.run(lambda i=i: i) for i in range(15)]
print(sum(s.result(timeout=60) for s in done))
""")
    kernel_pid = kernel.pid()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        zombies = []
        for child in psutil.Process(kernel_pid).children():
            try:
                if child.status() == psutil.STATUS_ZOMBIE:
                    zombies.append(child.pid)
            except psutil.NoSuchProcess:
                pass
        if not zombies:
            break
        time.sleep(0.1)
    assert zombies == []


def test_asyncio_works_inside_a_task_started_from_a_cell(kernel):
    out = kernel.ok("""
import asyncio, nbbgtask as bg
async def fetch():
    await asyncio.sleep(0.01)
    return "fetched"
def uses_asyncio_run():
    return asyncio.run(fetch())
print(bg.run(uses_asyncio_run).result(timeout=60), bg.run(fetch).result(timeout=60))
""")
    assert out.split() == ["fetched", "fetched"]


def test_a_killed_task_shows_failed_in_the_kernel(kernel):
    kernel.ok("""
import time, nbbgtask as bg
status = bg.run(time.sleep, 60)
while status.refresh().pid is None: time.sleep(0.01)
""")
    pid = int(kernel.ok("print(status.pid)"))
    psutil.Process(pid).send_signal(signal.SIGKILL)
    out = kernel.ok("status.wait(5); print(status.state, '|', status.error)")
    assert out.startswith("failed | killed by signal 9 (SIGKILL)")


def test_a_kernel_forks_until_polars_has_run_then_uses_the_fork_server(kernel):
    """A kernel's own threads (zmq's, the heartbeat, the iopub thread) are no hazard; a polars
    query in a cell is, and the task after it still completes, with the default settings."""
    kernel.ok("""
import nbbgtask as bg, polars as pl
from nbbgtask.local import forksafety as _forksafety
def query():
    return pl.DataFrame({"k": [i % 7 for i in range(100_000)]}).group_by("k").len().height
""")
    assert kernel.ok("print(_forksafety.hazard())").strip() == "None"
    assert kernel.ok("s = bg.run(query); print(s.result(timeout=60), s.start_method)").split() == ["7", "fork"]
    kernel.ok("query()")
    out = kernel.ok("s = bg.run(query); print(s.result(timeout=60), s.start_method)", timeout=90)
    assert out.split() == ["7", "forkserver"]
